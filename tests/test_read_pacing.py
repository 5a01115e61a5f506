"""The low-count side's reader waits for the peer instead of dropping epochs.

Without the wait, a source faster than the link (simulate without --real-time) runs far
ahead of the peer. A side that removes its type-3 files by their age then removes them
before the peer's type-4 files for them arrive, and those epochs give no key.
"""

from __future__ import annotations

import argparse
import io
import logging
import threading
import time
from collections import defaultdict


import S15qkd.pacing
import S15qkd.pipeline
import S15qkd.simulate
from S15qkd.node import Node
from S15qkd.pacing import ReadPacer
from S15qkd.pipeline import max_lead_epochs
from S15qkd.simulate import Progress, node_configs, run_simulation, shared_simulator_factory
from test_link import wait_until

#: A lead much shorter than the run, so the low-count side's source is far ahead of the
#: peer for most of it.
SHORT_LEAD_EPOCHS = 6
EPOCHS = 40


def start_reader(pacer: ReadPacer, epoch: int) -> threading.Thread:
    reader = threading.Thread(target=pacer.wait_for_room, args=(epoch,), daemon=True)
    reader.start()
    return reader


def test_pacer_waits_for_release():
    pacer = ReadPacer(4, threading.Event())
    pacer.keep(10)
    pacer.wait_for_room(13)   # 3 epochs ahead: returns at once
    reader = start_reader(pacer, 14)
    reader.join(0.2)
    assert reader.is_alive()
    pacer.keep(11)
    pacer.release(10)
    reader.join(5)
    assert not reader.is_alive()
    assert pacer.oldest_kept() == 11


def test_pacer_counts_each_keep():
    pacer = ReadPacer(4, threading.Event())
    pacer.keep(10)
    pacer.keep(10)   # the event batch and the type-3 file of one epoch
    pacer.release(10)
    assert pacer.oldest_kept() == 10
    pacer.release(10)
    assert pacer.oldest_kept() is None


def test_pacer_counts_held_epochs():
    pacer = ReadPacer(4, threading.Event())
    pacer.set_held([12, 10])
    assert pacer.oldest_kept() == 10
    reader = start_reader(pacer, 14)
    reader.join(0.2)
    assert reader.is_alive()
    pacer.set_held([12])
    reader.join(5)
    assert not reader.is_alive()


def test_pacer_stop_ends_wait():
    stopping = threading.Event()
    pacer = ReadPacer(4, stopping)
    pacer.keep(10)
    reader = start_reader(pacer, 20)
    reader.join(0.2)
    assert reader.is_alive()
    stopping.set()
    pacer.wake()
    reader.join(5)
    assert not reader.is_alive()


def test_pacer_long_pause_warned_once(caplog):
    caplog.set_level(logging.INFO, logger="S15qkd.pacing")
    pacer = ReadPacer(4, threading.Event(), warning_after_s=0.05)
    pacer.keep(0x10)
    for attempt in range(2):
        reader = start_reader(pacer, 0x20 + attempt)
        time.sleep(0.3)
        pacer.keep(0x1F + attempt)
        pacer.release(0x10 + attempt)
        reader.join(5)
        assert not reader.is_alive()
        pacer.keep(0x11 + attempt)
        pacer.release(0x1F + attempt)
    stopped = [record for record in caplog.records if "stopped reading" in record.getMessage()]
    assert [record.levelname for record in stopped] == ["WARNING", "INFO"]
    assert "at epoch 00000020" in stopped[0].getMessage()
    assert "it still keeps epoch 00000010, 16 epochs earlier" in stopped[0].getMessage()
    resumed = [record for record in caplog.records if "resumed reading" in record.getMessage()]
    assert len(resumed) == 2


class RecordingProgress(Progress):
    """Progress that also records the raw key epochs of each side."""

    epochs: dict[str, list[int]] = defaultdict(list)

    def __call__(self, kind: str, node: str, **fields) -> None:
        if kind == "epoch":
            RecordingProgress.epochs[node].append(fields["epoch"])
        super().__call__(kind, node, **fields)


def test_unpaced_link_loses_no_epoch(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(S15qkd.pipeline, "MAX_LEAD_EPOCHS", SHORT_LEAD_EPOCHS, raising=False)
    # The name of the age limit of type-3 files before the reader waited for the peer.
    monkeypatch.setattr(S15qkd.pipeline, "RAW_KEY_RETENTION_EPOCHS", 2 * SHORT_LEAD_EPOCHS,
                        raising=False)
    monkeypatch.setattr(S15qkd.simulate, "Progress", RecordingProgress)
    RecordingProgress.epochs.clear()
    caplog.set_level(logging.WARNING, logger="S15qkd")
    args = argparse.Namespace(events_high=None, events_low=None, epochs=EPOCHS, pair_rate=2e5,
                              qber=0.03, seed=5, real_time=False, block_bits=8000,
                              workdir=str(tmp_path / "work"), timeout=240.0, quiet=True)
    out = io.StringIO()
    assert run_simulation(args, out=out) == 0, out.getvalue()

    high, low = RecordingProgress.epochs["high"], RecordingProgress.epochs["low"]
    assert len(high) >= EPOCHS - 2
    assert low == high
    dropped = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
    assert dropped == []
    missing = [record.getMessage() for record in caplog.records
               if "raw key of some epochs is missing" in record.getMessage()]
    assert missing == []


def test_peer_gone_stops_reader(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(S15qkd.pipeline, "MAX_LEAD_EPOCHS", SHORT_LEAD_EPOCHS)
    monkeypatch.setattr(S15qkd.pacing, "PAUSE_WARNING_S", 0.5)
    caplog.set_level(logging.INFO, logger="S15qkd")
    args = argparse.Namespace(events_high=None, events_low=None, epochs=400, pair_rate=2e5,
                              qber=0.03, seed=5, real_time=False, block_bits=8000)
    high_config, low_config = node_configs(tmp_path, args)
    factory = shared_simulator_factory(high_config)
    high = Node(high_config, auto_start=True, source_factory=factory)
    low = Node(low_config, source_factory=factory)
    try:
        high.start()
        low.start()
        assert wait_until(lambda: low.pipeline is not None
                          and low.stats.last_local_epoch is not None)
        # The peer vanishes without a stop message, as after a crash or a cut cable.
        high.link.stop()
        assert wait_until(lambda: "stopped reading events" in caplog.text), caplog.text

        pipeline = low.pipeline
        assert pipeline is not None
        lead = max_lead_epochs(low_config)
        t3_files = len(list(pipeline.folders["t3"].iterdir()))
        assert 0 < t3_files <= lead + 1
        assert low.link.queued_frames <= 3 * lead
        # The reader stays stopped.
        last_epoch = low.stats.last_local_epoch
        time.sleep(1.0)
        assert low.stats.last_local_epoch == last_epoch
        assert len(list(pipeline.folders["t3"].iterdir())) == t3_files
        warnings = [record for record in caplog.records
                    if "stopped reading events" in record.getMessage()]
        assert [record.levelname for record in warnings] == ["WARNING"]
    finally:
        low.close()
        high.close()


def test_pacer_admit_drops_and_counts(caplog):
    caplog.set_level(logging.INFO, logger="S15qkd.pacing")
    pacer = ReadPacer(4, threading.Event())
    pacer.keep(0x10)
    assert pacer.admit(0x13)
    assert not pacer.admit(0x14)
    assert not pacer.admit(0x15)
    assert pacer.dropped_batches == 2
    dropped = [record for record in caplog.records if "dropped" in record.getMessage()]
    # The second drop comes within DROP_LOG_INTERVAL_S of the first: counted, not logged.
    assert [record.levelname for record in dropped] == ["WARNING"]
    assert "up to epoch 00000014" in dropped[0].getMessage()
    assert "it still keeps epoch 00000010, 4 epochs earlier" in dropped[0].getMessage()
    pacer.release(0x10)
    assert pacer.admit(0x40)


def test_peer_gone_live_source_drops(tmp_path, monkeypatch, caplog):
    """A time tagger cannot wait: with the peer gone, its batches are read and dropped."""
    monkeypatch.setattr(S15qkd.pipeline, "MAX_LEAD_EPOCHS", SHORT_LEAD_EPOCHS)
    caplog.set_level(logging.INFO, logger="S15qkd")
    args = argparse.Namespace(events_high=None, events_low=None, epochs=3000, pair_rate=2e5,
                              qber=0.03, seed=5, real_time=False, block_bits=8000)
    high_config, low_config = node_configs(tmp_path, args)
    simulators = shared_simulator_factory(high_config)
    sources = {}

    def live_factory(role: str):
        source = simulators(role)
        if role == "low":
            source.can_pause = False   # as a TDC1 device or a named pipe
        sources[role] = source
        return source

    high = Node(high_config, auto_start=True, source_factory=live_factory)
    low = Node(low_config, source_factory=live_factory)
    try:
        high.start()
        low.start()
        assert wait_until(lambda: low.pipeline is not None
                          and low.stats.last_local_epoch is not None)
        high.link.stop()
        assert wait_until(lambda: "dropped" in caplog.text and "event batches" in caplog.text,
                          timeout=60), caplog.text

        pipeline = low.pipeline
        assert pipeline is not None
        lead = max_lead_epochs(low_config)
        dropped = pipeline.pacer.dropped_batches
        # The reader goes on reading the source, so the count grows until the source ends.
        assert wait_until(lambda: pipeline.pacer.dropped_batches > dropped, timeout=30)
        assert not any("stopped reading events" in record.getMessage()
                       for record in caplog.records)
        assert len(list(pipeline.folders["t3"].iterdir())) <= lead + 1
        warnings = [record for record in caplog.records
                    if "event batches" in record.getMessage() and record.levelname == "WARNING"]
        assert len(warnings) == 1
    finally:
        low.close()
        high.close()
