"""Two nodes whose clocks run at different rates, end to end on loopback.

The link simulator runs the low-count side's clock fast or slow by a relative frequency
(``source.drift``). With ``qcrypto.pfind.frequency_search`` the high-count side finds
that frequency with the time offset and rescales its events before costream, so the
link makes keys. Without it the clocks drift apart, so the lock-loss check fires and no
key is made. The file also checks the accidentals and the figures each node sends its
peer.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import pytest

import qkd_core
from S15qkd.node import Node
from S15qkd.simulate import Progress, node_configs, report, shared_simulator_factory, wait_until_idle

REQUIRED = ("Chopper", "Chopper2", "OffsetFinder", "FrequencyFinder", "Costream", "Splicer",
            "Reconciler", "LinkSimulator")
missing = [name for name in REQUIRED if not hasattr(qkd_core, name)]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"qkd_core lacks {missing}")


def simulate_args(tmp_path: Path, **overrides) -> argparse.Namespace:
    values = dict(events_high=None, events_low=None, epochs=20, pair_rate=2e5, qber=0.03,
                  seed=5, real_time=False, block_bits=8000, workdir=str(tmp_path), timeout=120.0,
                  quiet=False, drift=0.0, frequency_search=False)
    values.update(overrides)
    return argparse.Namespace(**values)


def run_link(tmp_path: Path, source: dict | None = None, **overrides):
    """Run both nodes until the input is used up; return (status, output, high, low).

    ``source`` overrides ``source.*`` keys of both nodes. The nodes are closed but keep
    their statistics for the checks.
    """
    args = simulate_args(tmp_path, **overrides)
    high_config, low_config = node_configs(tmp_path, args)
    for config in (high_config, low_config):
        config.update({"source": source or {}})
    out = io.StringIO()
    progress = Progress(out, quiet=False)
    factory = shared_simulator_factory(high_config)
    high = Node(high_config, progress=progress, auto_start=True, source_factory=factory)
    low = Node(low_config, progress=progress, source_factory=factory)
    high.start()
    low.start()
    try:
        outcome = wait_until_idle(high, low, progress, args.timeout)
        states = {"high": (high.engine.state.value, high.engine.reason),
                  "low": (low.engine.state.value, low.engine.reason)}
    finally:
        high.close()
        low.close()
    status = report(high, low, progress, outcome, states, 0.0, out)
    return status, out.getvalue(), high, low


@pytest.mark.parametrize("drift", [1e-6, 1e-5, -1e-5])
def test_drifted_link_with_search_makes_keys(tmp_path, drift):
    # With seed 5 at -1e-5 the first peak's highest bin lies far from the middle of its
    # plateau. A search that stops there is about 5e-7 off and loses the lock.
    status, text, high, low = run_link(tmp_path, drift=drift, frequency_search=True, seed=5)
    assert status == 0, text
    assert "OK: both keystores hold the same" in text
    assert "clock lock lost" not in text
    for node in (high, low):
        found = node.status().raw_key.frequency_offset
        assert found is not None, node.role
        # The simulator's clock L reads t * (1 + drift); the search finds that rate.
        assert abs(found - drift) < 1e-8, (node.role, found)


def test_drifted_link_without_search_fails(tmp_path):
    status, text, high, _low = run_link(tmp_path, epochs=30, drift=1e-6)
    assert status == 1, text
    assert "FAIL: no final keys were released" in text
    # The time offset search alone finds a wrong offset, and the running mean of
    # coincidences over accidentals shows it.
    assert "clock lock lost in epoch" in text
    assert high.status().raw_key.frequency_offset is None
    assert not any((tmp_path / "high" / "keys").glob("0*"))


def test_search_off_keeps_plain_offset(tmp_path):
    status, text, high, _low = run_link(tmp_path, epochs=14)
    assert status == 0, text
    assert high.status().raw_key.frequency_offset is None


def test_accidentals_and_peer_figures(tmp_path):
    # Uncorrelated counts on both sides: 1e5/s at the low-count side leave about 5e4
    # type-2 events per epoch without a partner. Each meets a type-1 event in the
    # 12-tick (1.5 ns) accidentals window with a probability of about 3e5/s * 1.5 ns.
    status, text, high, low = run_link(tmp_path, epochs=14,
                                       source={"background_rate": 1e5, "jitter_ps": 200.0})
    assert status == 0, text
    accidentals = [int(line.split("accidentals")[1].split()[0])
                   for line in text.splitlines() if line.startswith("epoch ")]
    assert accidentals, text
    mean = sum(accidentals[1:]) / len(accidentals[1:])
    assert 5 < mean < 100, accidentals

    high_status, low_status = high.status(), low.status()
    # The low-count side shows the high-count side's coincidence figures and histogram.
    assert low_status.raw_key.accidentals_per_epoch is not None
    assert low_status.raw_key.coincidences_per_epoch > 1000
    histogram = low_status.detectors.histogram
    assert histogram is not None
    assert histogram.computed_by.startswith("the high-count side")
    assert high_status.detectors.histogram.computed_by == ""
    peak = max(range(len(histogram.counts)), key=histogram.counts.__getitem__)
    # 200 ps jitter on each side: the peak sits within 2 ticks of the tracked offset.
    assert abs(histogram.first_bin_ticks + peak) <= 2, histogram
    # Each side shows both nodes' detector counts.
    for snapshot in (high_status, low_status):
        assert len(snapshot.detectors.counts) == 2
        assert all(node.total > 0 for node in snapshot.detectors.counts)
    # Both sides show the link's service QBER and the QBER per basis.
    assert high_status.raw_key.service_qber == pytest.approx(low_status.raw_key.service_qber)
    assert 0.01 < high_status.raw_key.service_qber < 0.06
    for snapshot in (high_status, low_status):
        assert set(snapshot.detectors.basis_qber) == {"H/V", "diagonal"}
        assert all(0.0 < qber < 0.08 for qber in snapshot.detectors.basis_qber.values())
    assert high_status.error_correction.servoed_qber is not None


def locked_pipeline():
    """Return a high-count pipeline stand-in in service mode with a running costream,
    its engine and the list that collects its control messages."""
    from types import SimpleNamespace

    from S15qkd.controller import Engine
    from S15qkd.pipeline import INITIAL_PAIR_RATIO
    from S15qkd.status import EngineState

    engine = Engine()
    for state in (EngineState.ONLY_COMMUNICATION, EngineState.INITIATING,
                  EngineState.PEAK_FINDING, EngineState.SERVICE_MODE):
        engine.move(state, "test setup")
    sent = []
    node = SimpleNamespace(engine=engine, send_control=sent.append)
    pipeline = SimpleNamespace(node=node, costream=object(), pair_ratio=INITIAL_PAIR_RATIO,
                               config={"remote_coincidence_window": 6}, peak_outside_epochs=0)
    return pipeline, engine, sent


def test_lock_check_fires_without_any_pairs():
    """An epoch with no pair in either window (no light at the low-count side, or an
    offset far off) counts as unlocked, because coincidences/(accidentals + 1) is 0."""
    from S15qkd.pipeline import HighPipeline
    from S15qkd.stages import CoincidenceEpoch
    from S15qkd.status import EngineState

    pipeline, engine, sent = locked_pipeline()
    lost_after = None
    for epoch in range(20):
        empty = CoincidenceEpoch(epoch, None, np.zeros(0, dtype=np.uint8), 0, 0, 0)
        HighPipeline.check_lock(pipeline, empty)
        if pipeline.costream is None:
            lost_after = epoch + 1
            break
    # The running mean falls from 10 by a factor 4/5 per epoch: below 2.5 after 7.
    assert lost_after == 7
    assert engine.state is EngineState.PEAK_FINDING
    assert [message["msg"] for message in sent] == ["lock_lost"]


def test_peer_stats_update_and_reject():
    from S15qkd.node import MAX_PEER_HISTOGRAM_BINS, LiveStats

    stats = LiveStats()
    stats.update_from_peer({"msg": "epoch_stats", "counts_epoch": 0x4F87,
                            "detector_counts": [1, 2, 3, 4]})
    assert stats.peer_detector_counts == (1, 2, 3, 4)
    assert stats.peer_counts_epoch == 0x4F87
    assert stats.histogram is None

    message = {"epoch": 0x4F88, "coincidences": 10, "accidentals": 1, "tracked_offset_ticks": 5,
               "histogram": [0] * (MAX_PEER_HISTOGRAM_BINS + 1), "basis_qber": {}}
    with pytest.raises(ValueError, match="invalid histogram: expected a list of 0 to 1024 "
                                         "integers, got 1025 items"):
        stats.update_from_peer(message)
    assert stats.histogram is None
    assert stats.coincidences is None

    message["histogram"] = [0, 7, 0]
    stats.update_from_peer(message)
    assert stats.histogram == (0, 7, 0)
    assert stats.histogram_from_peer
    assert stats.coincidences == 10


def test_failed_search_retries_later(tmp_path):
    """With two unrelated event streams every search fails, and the node keeps searching
    later epochs instead of failing its costream worker."""
    from S15qkd.stages import SimulatedSource, simulator_arguments

    args = simulate_args(tmp_path, epochs=12, frequency_search=True)
    high_config, low_config = node_configs(tmp_path, args)
    for config in (high_config, low_config):
        # Small FFTs keep each of the many failing searches short.
        config.update({"FFT_buffer_order": 17})

    def unrelated_source(role: str):
        arguments = simulator_arguments(high_config)
        arguments["seed"] = 1 if role == "high" else 2
        return SimulatedSource(role, False, args.epochs, **arguments)

    progress = Progress(io.StringIO(), quiet=True)
    high = Node(high_config, progress=progress, auto_start=True, source_factory=unrelated_source)
    low = Node(low_config, progress=progress, source_factory=unrelated_source)
    high.start()
    low.start()
    try:
        assert high.engine.wait_for(lambda state: state.value == "PEAK_FINDING", 30)
        deadline = time.monotonic() + 60
        while "found no peak" not in high.engine.reason and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "found no peak; trying later epochs" in high.engine.reason
        costream = high.status().worker("costream")
        assert costream is not None
        assert costream.restarts == 0, costream
        assert high.engine.state.value == "PEAK_FINDING"
    finally:
        high.close()
        low.close()
    assert not any((tmp_path / "high" / "keys").glob("0*"))


def run_lock_check(peak_ticks: int, epochs: int):
    """Feed check_lock epochs of 12 000 coincidences, 0 accidentals and a histogram
    peak at peak_ticks; return the pipeline, the engine and the control messages sent."""
    from S15qkd.pipeline import HighPipeline
    from S15qkd.stages import HISTOGRAM_FIRST_TICK, CoincidenceEpoch

    pipeline, engine, sent = locked_pipeline()
    histogram = [3] * 128
    histogram[peak_ticks - HISTOGRAM_FIRST_TICK] = 2000
    for epoch in range(epochs):
        result = CoincidenceEpoch(epoch, None, np.zeros(0, dtype=np.uint8), 12_000, 0, 0,
                                  tuple(histogram))
        HighPipeline.check_lock(pipeline, result)
        if pipeline.costream is None:
            break
    return pipeline, engine, sent


def test_lock_check_fires_when_peak_leaves_window():
    """A peak 10 ticks off, inside the tracking window but outside the coincidence window
    of 6 ticks, leaves few coincidences and no accidentals. The pair ratio stays high, so
    only the histogram peak shows the lost lock."""
    from S15qkd.status import EngineState

    pipeline, engine, sent = run_lock_check(10, 2)
    assert pipeline.costream is None
    assert engine.state is EngineState.PEAK_FINDING
    assert [message["msg"] for message in sent] == ["lock_lost"]
    assert "peak of the examined pairs at 10 ticks" in sent[0]["reason"]


def test_lock_check_waits_one_epoch_off_peak():
    pipeline, _engine, sent = run_lock_check(-6, 1)
    assert pipeline.costream is not None
    assert pipeline.peak_outside_epochs == 1
    assert sent == []


def test_lock_check_keeps_peak_inside_window():
    from S15qkd.status import EngineState

    pipeline, engine, sent = run_lock_check(5, 20)
    assert pipeline.costream is not None
    assert engine.state is EngineState.SERVICE_MODE
    assert sent == []
