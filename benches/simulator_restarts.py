"""Start-up cost of simulated nodes whose source.start_time lies in the past.

Runs two nodes in this process, with the simulator in real time and source.start_time
``--behind`` seconds back, and stops and starts key generation ``--runs`` times. For
each run it reports the time from the start request to the time offset found, the pairs
each node's simulator generated before its first batch, the bytes in each data_root after the stop,
and the run folders left there.

    python benches/simulator_restarts.py [--behind 600] [--pair-rate 1e6] [--runs 3]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from S15qkd.node import Node
from S15qkd.simulate import Progress, node_configs
from S15qkd.status import EngineState


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def opening_pairs(node: Node) -> int:
    """Return the pairs the node's simulator generated before its first batch."""
    return node.pipeline.source.opening_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--behind", type=float, default=600.0,
                        help="seconds from source.start_time to the first run start")
    parser.add_argument("--pair-rate", type=float, default=1e6, help="simulated pairs per second")
    parser.add_argument("--runs", type=int, default=3, help="key generation runs, one after another")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        args = argparse.Namespace(events_high=None, events_low=None, epochs=0,
                                  pair_rate=options.pair_rate, qber=0.03, seed=7, real_time=True,
                                  block_bits=8000)
        high_config, low_config = node_configs(workdir, args)
        for config in (high_config, low_config):
            config.update({"source": {"start_time": time.time() - options.behind}})
        progress = Progress(io.StringIO(), quiet=True)
        high, low = Node(high_config, progress=progress), Node(low_config, progress=progress)
        high.start()
        low.start()
        try:
            if not wait_until(lambda: high.link.state.value == "connected", 30):
                raise SystemExit("the two nodes did not connect within 30 s")
            for run in range(1, options.runs + 1):
                started = time.monotonic()
                high.start_keygen()
                found = wait_until(lambda: high.engine.state in (EngineState.SERVICE_MODE,
                                                                 EngineState.KEY_GENERATION), 300)
                peak_seconds = time.monotonic() - started
                pairs = [opening_pairs(node) for node in (high, low)]
                high.stop_keygen("next measurement run")
                time.sleep(1.0)
                data = {role: workdir / role / "data" for role in ("high", "low")}
                print(f"run {run}: time offset {'found' if found else 'NOT found'} after "
                      f"{peak_seconds:.1f} s; pairs simulated at the start high {pairs[0]:.3g} "
                      f"low {pairs[1]:.3g}; data_root bytes high {folder_bytes(data['high'])} "
                      f"low {folder_bytes(data['low'])}; run folders "
                      f"high {len(list(data['high'].glob('run-*')))} "
                      f"low {len(list(data['low'].glob('run-*')))}", flush=True)
        finally:
            high.close()
            low.close()


if __name__ == "__main__":
    main()
