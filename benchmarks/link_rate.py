"""Throughput of the two-node simulated link and its final key rate.

Runs ``qkdserver simulate`` in this process as fast as the stages go (no real-time
pacing) for several pair rates, and reports for each: the high-count side's events per
second of wall time, how many times faster than real time the link ran (above 1 it
keeps up), and the final key rate per simulated second. The baseline is the time the
link simulator alone needs to produce the same events, measured in the same run, since
absolute times on a shared machine drift.

    python benchmarks/link_rate.py [--epochs 20] [--rates 1e5,1e6,4e6]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time

import qkd_core
from S15qkd.simulate import Progress, node_configs, run_simulation  # noqa: F401
from S15qkd.stages import EPOCH_SECONDS


def simulator_seconds(pair_rate: float, epochs: int, seed: int) -> float:
    simulator = qkd_core.LinkSimulator(seed=seed, pair_rate=pair_rate, qber=0.03,
                                       offset_ticks=34568, transmission=(1.0, 0.2))
    started = time.perf_counter()
    for _ in range(epochs * 4):
        simulator.next_batch(EPOCH_SECONDS / 4)
    return time.perf_counter() - started


def run(pair_rate: float, epochs: int, seed: int) -> dict:
    out = io.StringIO()
    with tempfile.TemporaryDirectory() as workdir:
        args = argparse.Namespace(events_high=None, events_low=None, epochs=epochs,
                                  pair_rate=pair_rate, qber=0.03, seed=seed, real_time=False,
                                  block_bits=max(20000, int(pair_rate * 0.2 * 0.5 * 2)),
                                  workdir=workdir, timeout=600.0, quiet=False)
        started = time.perf_counter()
        status = run_simulation(args, out=out)
        wall = time.perf_counter() - started
    text = out.getvalue()
    final_bits = 0
    high_events = 0
    for line in text.splitlines():
        if line.startswith("blocks:"):
            final_bits = int(line.rsplit(":", 1)[1])
    simulated = epochs * EPOCH_SECONDS
    return {"pair_rate": pair_rate, "status": status, "wall_s": wall, "simulated_s": simulated,
            "final_bits": final_bits, "high_events": high_events, "output": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rates", default="1e5,1e6,4e6")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    print("| pairs/s | high-side events/s (wall) | x real time | simulator alone (s) "
          "| link (s) | final key bits | final key rate (bit/s simulated) | keys equal |")
    print("|---|---|---|---|---|---|---|---|")
    for rate in (float(r) for r in args.rates.split(",")):
        baseline = simulator_seconds(rate, args.epochs, args.seed)
        result = run(rate, args.epochs, args.seed)
        events = rate * result["simulated_s"]  # every pair reaches the high-count side
        print(f"| {rate:.0e} | {events / result['wall_s']:.3g} | "
              f"{result['simulated_s'] / result['wall_s']:.2f} | {baseline:.2f} | "
              f"{result['wall_s']:.1f} | {result['final_bits']} | "
              f"{result['final_bits'] / result['simulated_s']:.0f} | "
              f"{'yes' if result['status'] == 0 else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
