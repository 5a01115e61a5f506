"""Sustained event rate of the two-node simulated link and its final key rate.

Runs the two nodes of ``qkdserver simulate`` in this process for several pair rates
and reports for each: when the first epoch was matched, how long after the end of the
source the last epoch was matched, and the final key bits and rate. With
``--real-time`` the simulator is paced at the wall clock, so a link that ends within
about an epoch of its source kept up with that rate. The baseline is the time the link
simulator alone needs to produce the same events, measured in the same run, because
absolute times on a shared machine drift.

    python benches/link_rate.py [--epochs 20] [--rates 1e5,1e6,4e6] [--real-time]
"""

from __future__ import annotations

import argparse
import io
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


def run(pair_rate: float, epochs: int, seed: int, real_time: bool) -> dict:
    """Run both nodes until the input is used up; time until the last epoch or block."""
    with tempfile.TemporaryDirectory() as workdir:
        args = argparse.Namespace(events_high=None, events_low=None, epochs=epochs,
                                  pair_rate=pair_rate, qber=0.03, seed=seed, real_time=real_time,
                                  block_bits=max(20000, int(pair_rate * 0.1)))
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
    # Lag: how long after the last events left the source the last epoch was matched.
    source_end = max(progress.finished_at.values(), default=started)
    lag = matched[-1] - source_end if matched else float("nan")
    return {"outcome": outcome, "wall_s": progress.last_event - started, "lag_s": lag,
            "first_epoch_s": matched[0] - started if matched else float("nan"),
            "simulated_s": epochs * EPOCH_SECONDS, "final_bits": progress.final_bits,
            "high_events": progress.events["high"], "keys_equal": keys_equal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rates", default="1e5,1e6,4e6")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--real-time", action="store_true",
                        help="pace the simulated events at the wall clock")
    args = parser.parse_args()
    print("| pairs/s | simulator alone (s) | real time | whole run (s) | first epoch matched "
          "after (s) | last epoch matched after the source ended (s) | high-side events/s "
          "kept up with | final key bits | final key rate (bit/s simulated) | keys equal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rate in (float(r) for r in args.rates.split(",")):
        baseline = simulator_seconds(rate, args.epochs, args.seed)
        result = run(rate, args.epochs, args.seed, args.real_time)
        # Every simulated pair gives one high-count side event (no loss on that side), so
        # a link that ends within about one epoch of its real-time source kept up.
        kept_up = args.real_time and result["lag_s"] < 2 * EPOCH_SECONDS
        print(f"| {rate:.0e} | {baseline:.2f} | {'yes' if args.real_time else 'no'} | "
              f"{result['wall_s']:.1f} | {result['first_epoch_s']:.1f} | {result['lag_s']:.2f} | "
              f"{f'{rate:.0e}' if kept_up else '-'} | {result['final_bits']} | "
              f"{result['final_bits'] / result['simulated_s']:.0f} | "
              f"{'yes' if result['keys_equal'] else 'no'} |", flush=True)

if __name__ == "__main__":
    main()
