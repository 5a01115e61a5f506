"""Benchmark: latency of the status requests of the web page while a node works.

Measures, over real HTTP on loopback, the three requests a watching operator or script
makes: ``/status_data`` (scripts), ``/api/status`` (full snapshot) and the Dash callback
that redraws the status page every second. The baseline, measured in the same run on
the same server, is a static file (``/assets/style.css``), so the ratio shows what the
status code adds on top of the HTTP round trip.

The node is the in-memory stand-in with 100 blocks of history (the most the graphs
show) and detector data. ``--busy-threads N`` adds N Python threads that spin, as a
stand-in for engine threads competing for the GIL. ``--simulate`` instead serves the
high-count node of the simulated two-node link, paced at the wall clock like a time
tagger, with ``--pair-rate`` photon pairs per second.

Run: python benches/web_status.py [--requests 300] [--busy-threads 2 | --simulate]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests

from S15qkd.status import (
    EPOCH_SECONDS,
    BlockRecord,
    CoincidenceHistogram,
    DetectorStatus,
    InMemoryNode,
    NodeCounts,
)
from S15qkd.web import WebServer

TOKEN = "benchmark-token-0123456789"
LIMIT_MS = 200.0

STATUS_OUTPUTS = [
    ("engine-state", "children"), ("engine-state", "className"), ("config-note", "children"),
    ("blinded-banner", "hidden"), ("worker-badges", "children"), ("qber-graph", "figure"),
    ("key-graph", "figure"), ("raw-key-card", "children"), ("error-correction-card", "children"),
]


def filled_node() -> InMemoryNode:
    node = InMemoryNode()
    for index in range(100):
        node.add_block(BlockRecord(
            first_epoch=0x1000 + 5 * index, num_epochs=5, raw_bits=20000, qber=0.03, leaked_bits=4500,
            efficiency=1.12, final_bits=11000, key_rate_bps=11000 / (5 * EPOCH_SECONDS),
        ))
    node.override_status(detectors=DetectorStatus(
        counts=(NodeCounts("alice", 0x1200, (95000,) * 4), NodeCounts("bob", 0x1200, (21000,) * 4)),
        skew_corrections_ticks=(0, 0, 0, 0),
        histogram=CoincidenceHistogram(0, -64, 2, tuple(range(64))),
    ))
    node.start_keygen()
    return node


def status_callback_payload() -> dict:
    """Build the request body that the Dash renderer sends on each tick of the status page."""
    return {
        "output": ".." + "...".join(f"{cid}.{prop}" for cid, prop in STATUS_OUTPUTS) + "..",
        "outputs": [{"id": cid, "property": prop} for cid, prop in STATUS_OUTPUTS],
        "inputs": [{"id": "tick", "property": "n_intervals", "value": 1}],
        "changedPropIds": ["tick.n_intervals"],
        "state": [],
    }


def measure(session: requests.Session, method: str, url: str, count: int, **kwargs) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        response = session.request(method, url, **kwargs)
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        times.append(1000 * elapsed)
    return times


def spin(stop: threading.Event) -> None:
    value = 0
    while not stop.is_set():
        for i in range(10000):
            value += i * i


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run(node, server: WebServer, count: int) -> bool:
    session = requests.Session()
    base = server.url
    session.get(f"{base}/apps/QKD_status").raise_for_status()  # warm up Dash's caches
    cases = [
        ("static file (baseline)", "GET", f"{base}/assets/style.css", {}),
        ("/status_data", "GET", f"{base}/status_data", {}),
        ("/api/status", "GET", f"{base}/api/status", {}),
        ("status page refresh (Dash callback)", "POST", f"{base}/_dash-update-component",
         {"json": status_callback_payload()}),
    ]
    results = {name: measure(session, method, url, count, **kwargs) for name, method, url, kwargs in cases}
    baseline = statistics.median(results["static file (baseline)"])
    print(f"{'request':40} {'median ms':>10} {'p95 ms':>8} {'max ms':>8} {'median/baseline':>16}")
    within_limit = True
    for name, times in results.items():
        median = statistics.median(times)
        print(f"{name:40} {median:10.2f} {percentile(times, 0.95):8.2f} {max(times):8.2f} "
              f"{median / baseline:16.1f}")
        if name != "static file (baseline)" and percentile(times, 0.95) > LIMIT_MS:
            within_limit = False
    print(f"p95 of every status request under {LIMIT_MS:.0f} ms: {'yes' if within_limit else 'NO'}")
    return within_limit


@contextlib.contextmanager
def simulated_link(epochs: int, pair_rate: float):
    """Run both nodes of the simulated link in this process; yield the high-count node in key generation."""
    from S15qkd.node import Node
    from S15qkd.simulate import node_configs, shared_simulator_factory
    from S15qkd.status import EngineState

    with tempfile.TemporaryDirectory(prefix="qkd-web-bench-") as workdir:
        args = argparse.Namespace(
            events_high=None, events_low=None, epochs=epochs, pair_rate=pair_rate, qber=0.03, seed=3,
            real_time=True, block_bits=20000, workdir=workdir, timeout=600.0, quiet=True,
        )
        high_config, low_config = node_configs(Path(workdir), args)
        factory = shared_simulator_factory(high_config)
        high = Node(high_config, source_factory=factory)
        low = Node(low_config, source_factory=factory)
        high.start()
        low.start()
        try:
            deadline = time.monotonic() + 90
            while not high.status().connected:
                if time.monotonic() > deadline:
                    raise RuntimeError("the simulated nodes did not connect within 90 s")
                time.sleep(0.2)
            high.start_keygen()
            while high.status().engine_state is not EngineState.KEY_GENERATION:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"key generation not reached within 90 s: {high.engine.reason}")
                time.sleep(0.2)
            before = high.status()
            yield high
            after = high.status()
            print(f"during the measurement the link finished {after.error_correction.blocks - before.error_correction.blocks} "
                  f"blocks and received epochs {before.raw_key.last_received_epoch} to "
                  f"{after.raw_key.last_received_epoch}; engine state at the end: {after.engine_state.value}")
        finally:
            high.close()
            low.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per case (default 300)")
    parser.add_argument("--busy-threads", type=int, default=0,
                        help="Python threads that spin during the measurement (default 0)")
    parser.add_argument("--simulate", action="store_true",
                        help="serve the high-count node of the simulated link instead of the stand-in")
    parser.add_argument("--epochs", type=int, default=2000,
                        help="epochs the simulated link may run for with --simulate (default 2000)")
    parser.add_argument("--pair-rate", type=float, default=2e5,
                        help="photon pairs per second of the simulated link (default 2e5)")
    args = parser.parse_args()

    if args.simulate:
        with simulated_link(args.epochs, args.pair_rate) as node:
            with WebServer(node, TOKEN, host="127.0.0.1", port=0) as server:
                return 0 if run(node, server, args.requests) else 1

    node = filled_node()
    stop = threading.Event()
    spinners = [threading.Thread(target=spin, args=(stop,), daemon=True) for _ in range(args.busy_threads)]
    for thread in spinners:
        thread.start()
    try:
        with WebServer(node, TOKEN, host="127.0.0.1", port=0) as server:
            within_limit = run(node, server, args.requests)
    finally:
        stop.set()
    return 0 if within_limit else 1


if __name__ == "__main__":
    raise SystemExit(main())
