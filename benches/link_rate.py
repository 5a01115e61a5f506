"""Sustained event rate of the two-node simulated link and its final key rate.

Runs the two nodes of ``qkdserver simulate`` in this process for several pair rates
and reports for each: when the first epoch was matched, how long after the end of the
source the last epoch was matched and the last final key was released, and the final
key bits and rate. The baseline is the time the link simulator alone needs to produce
the same events, measured in the same run, because absolute times on a shared machine
drift.

With ``--real-time`` the simulator is paced at the wall clock. A stage kept up with the
source when its last output came within two of its units of work after the source
ended: coincidence matching within two epochs (1.07 s), the final keys within two
block lengths (the mean epochs per released block times 0.537 s). A stage that falls
behind builds a backlog that grows with the run, so its lag exceeds that bound on a
long enough run.

    python benches/link_rate.py [--epochs 20] [--rates 1e5,1e6,4e6] [--block-seconds 0.1]
        [--real-time]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import qkd_core
from S15qkd.node import Node
from S15qkd.simulate import Progress, node_configs, shared_simulator_factory, wait_until_idle
from S15qkd.stages import EPOCH_SECONDS


def simulator_seconds(pair_rate: float, epochs: int, seed: int) -> float:
    simulator = qkd_core.LinkSimulator(seed=seed, pair_rate=pair_rate, qber=0.03,
                                       offset_ticks=34568, transmission=(1.0, 0.2))
    started = time.perf_counter()
    for _ in range(epochs * 4):
        simulator.next_batch(EPOCH_SECONDS / 4)
    return time.perf_counter() - started


def run(pair_rate: float, epochs: int, seed: int, real_time: bool,
        block_seconds: float = 0.1) -> dict:
    """Run both nodes until the input is used up; time until the last epoch or block."""
    with tempfile.TemporaryDirectory() as workdir:
        args = argparse.Namespace(events_high=None, events_low=None, epochs=epochs,
                                  pair_rate=pair_rate, qber=0.03, seed=seed, real_time=real_time,
                                  block_bits=max(20000, int(pair_rate * block_seconds)))
        high_config, low_config = node_configs(Path(workdir), args)
        progress = Progress(io.StringIO(), quiet=True)
        factory = shared_simulator_factory(high_config)
        high = Node(high_config, progress=progress, auto_start=True, source_factory=factory)
        low = Node(low_config, progress=progress, source_factory=factory)
        started = time.monotonic()
        high.start()
        low.start()
        try:
            outcome = wait_until_idle(high, low, progress, timeout=600.0)
        finally:
            high.close()
            low.close()
        keys_equal = high.keystore.keys() == low.keystore.keys() != {}
    matched = progress.matched_at
    released = progress.released
    # Lag: how long after the last events left the source the last epoch was matched.
    source_end = max(progress.finished_at.values(), default=started)
    lag = matched[-1] - source_end if matched else float("nan")
    key_lag = released[-1][0] - source_end if released else float("nan")
    block_epochs = sum(epochs for _, epochs in released) / len(released) if released else 0
    return {"outcome": outcome, "wall_s": progress.last_event - started, "lag_s": lag,
            "first_epoch_s": matched[0] - started if matched else float("nan"),
            "key_lag_s": key_lag, "block_s": block_epochs * EPOCH_SECONDS,
            "blocks": len(released), "failed_blocks": progress.failed_blocks,
            "simulated_s": epochs * EPOCH_SECONDS, "final_bits": progress.final_bits,
            "high_events": progress.events["high"], "keys_equal": keys_equal}


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rates", default="1e5,1e6,4e6")
    parser.add_argument("--seed", type=int, default=11)
    # About a tenth of the pairs become raw key (20 % reach the low-count side, half of
    # those have matching bases), so the default makes blocks of about 1 s of raw key.
    parser.add_argument("--block-seconds", type=float, default=0.1,
                        help="minimal raw key bits per block: the pair rate times this many "
                             "seconds (default 0.1, about 1 s of raw key)")
    parser.add_argument("--real-time", action="store_true",
                        help="pace the simulated events at the wall clock")
    args = parser.parse_args()
    print("| pairs/s | simulator alone (s) | real time | whole run (s) | first epoch matched "
          "after (s) | last epoch matched after the source ended (s) | matching kept up | "
          "blocks released (discarded) | block length (s) | last final key after the source "
          "ended (s) | final keys kept up | final key bits | final key rate (bit/s simulated) "
          "| keys equal | load average |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rate in (float(r) for r in args.rates.split(",")):
        load_before = os.getloadavg()[0]
        baseline = simulator_seconds(rate, args.epochs, args.seed)
        result = run(rate, args.epochs, args.seed, args.real_time, args.block_seconds)
        load_after = os.getloadavg()[0]
        # Every simulated pair gives one high-count side event (no loss on that side).
        matching_kept_up = args.real_time and result["lag_s"] < 2 * EPOCH_SECONDS
        keys_kept_up = (args.real_time and result["blocks"] > 0
                        and result["key_lag_s"] < 2 * result["block_s"])
        print(f"| {rate:.0e} | {baseline:.2f} | {yes_no(args.real_time)} | "
              f"{result['wall_s']:.1f} | {result['first_epoch_s']:.1f} | {result['lag_s']:.2f} | "
              f"{yes_no(matching_kept_up)} | {result['blocks']} ({result['failed_blocks']}) | "
              f"{result['block_s']:.2f} | {result['key_lag_s']:.2f} | {yes_no(keys_kept_up)} | "
              f"{result['final_bits']} | {result['final_bits'] / result['simulated_s']:.0f} | "
              f"{yes_no(result['keys_equal'])} | {load_before:.1f} to {load_after:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
