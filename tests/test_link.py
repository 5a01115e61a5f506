"""Two nodes end to end on loopback: real TLS, real files, the Rust stages.

The fault tests follow what an operator sees: after a node is killed and restarted, the
channel is cut, a frame is corrupted, a certificate is wrong or the keys disk is full,
no mismatched or partial key is released, no epoch is used twice, and the link either
resumes or stops with a clear reason.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

import qkd_core
from conftest import golden_case
from linkproxy import LinkProxy
from S15qkd import stages
from S15qkd.config import Config
from S15qkd.keystore import FinalKey, KeyStore, decode_type7, pack_key_bits
from S15qkd.node import Node
from S15qkd.simulate import Progress, node_configs, run_simulation, wait_until_idle
from S15qkd.status import EngineState

MATCHING_STAGES = ("Chopper", "Chopper2", "OffsetFinder", "Costream", "Splicer", "LinkSimulator")


def needs(*names: str):
    """Skip a test when the installed qkd_core lacks one of these stage classes."""
    missing = [name for name in names if not hasattr(qkd_core, name)]
    return pytest.mark.skipif(bool(missing), reason=f"qkd_core lacks {missing}")


needs_matching = needs(*MATCHING_STAGES)
needs_keys = needs(*MATCHING_STAGES, "Reconciler")


#: Length of the channel cut in the quick test; the slow test cuts for 30 s.
CUT_SECONDS = float(os.environ.get("QKD_CUT_SECONDS", "3"))


def simulate_args(tmp_path: Path, **overrides) -> argparse.Namespace:
    values = dict(events_high=None, events_low=None, epochs=14, pair_rate=2e5, qber=0.03,
                  seed=7, real_time=False, block_bits=8000, workdir=str(tmp_path), timeout=120.0,
                  quiet=False)
    values.update(overrides)
    return argparse.Namespace(**values)


def is_key_file(path: Path) -> bool:
    """Final keys are named by their first epoch in 8 hex digits."""
    return path.is_file() and len(path.name) == 8 and all(c in "0123456789abcdef" for c in path.name)


def assert_keystores_agree(high_folder: Path, low_folder: Path) -> dict:
    """Check the released keys: complete type-7 files, the same on both sides, no epoch twice."""
    keys = {}
    for side, folder in (("high", high_folder), ("low", low_folder)):
        keys[side] = {}
        for path in folder.iterdir():
            if is_key_file(path):
                key = decode_type7(path.read_bytes(), str(path))
                assert key.start_epoch == int(path.name, 16)
                keys[side][path.name] = key
    for name in set(keys["high"]) & set(keys["low"]):
        assert keys["high"][name] == keys["low"][name], f"key {name} differs between the nodes"
    only_one_side = set(keys["high"]) ^ set(keys["low"])
    assert not only_one_side, f"keys on one side only: {sorted(only_one_side)}"
    ranges = sorted((key.start_epoch, key.start_epoch + key.epochs) for key in keys["high"].values())
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert start >= end, f"epoch {start:08x} went into two keys"
    return keys["high"]


def assert_nothing_staged(*folders: Path) -> None:
    """Check that every staged final key was released or dropped on both sides."""
    for folder in folders:
        staged = sorted(path.name for path in (folder / ".staging").iterdir())
        assert not staged, f"keys left in {folder / '.staging'}: {staged}"


@needs_keys
def test_simulated_link_keys_match(tmp_path):
    out = io.StringIO()
    status = run_simulation(simulate_args(tmp_path), out=out)
    text = out.getvalue()
    assert status == 0, text
    assert "OK: both keystores hold the same" in text
    assert "epoch " in text
    assert "coincidences" in text
    assert "block " in text
    keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert keys


def run_nodes(high_config: Config, low_config: Config, timeout: float = 120.0,
              inspect=None, progress: Optional[Progress] = None) -> str:
    """Run two nodes until their sources ended and they are idle; return the outcome.

    inspect(high, low), when given, is called with the nodes before they close.
    """
    progress = progress or Progress(io.StringIO(), quiet=True)
    high = Node(high_config, progress=progress, auto_start=True)
    low = Node(low_config, progress=progress)
    high.start()
    low.start()
    try:
        outcome = wait_until_idle(high, low, progress, timeout)
        if inspect is not None:
            inspect(high, low)
        return outcome
    finally:
        high.close()
        low.close()


@needs_matching
def test_frame_above_peer_limit_stops_run_once(tmp_path, caplog):
    # At 2e5 pairs/s a type-2 file is about 100 kB, above the high-count side's limit.
    high_config, low_config = node_configs(tmp_path, simulate_args(tmp_path))
    high_config.update({"max_frame_bytes": 65536})
    caplog.set_level("INFO", logger="S15qkd")
    connections = {}

    def inspect(high, low):
        connections.update(high=high.link.stats.connections, low=low.link.stats.connections)

    outcome = run_nodes(high_config, low_config, timeout=60, inspect=inspect)
    assert outcome.startswith("key generation stopped:"), outcome
    assert connections == {"high": 1, "low": 1}
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    low_side = [m for m in errors if m.startswith("key generation stopped: type-2 file of epoch")]
    high_side = [m for m in errors if m.startswith("key generation stopped by the peer (sim-low): type-2 file")]
    assert len(low_side) == 1, errors
    assert len(high_side) == 1, errors
    assert "set max_frame_bytes on the peer (sim-high) to at least" in low_side[0]
    assert "max_frame_bytes of the peer (sim-high), 65536" in high_side[0]
    assert not [m for m in errors if "oversized frame" in m]


@needs_keys
def test_restarted_simulator_skips_used_epochs(tmp_path, caplog):
    high_config, low_config = node_configs(tmp_path, simulate_args(tmp_path))
    assert run_nodes(high_config, low_config) == "input used up"
    used = KeyStore(tmp_path / "low" / "keys", tmp_path / "low" / "data").next_unused_epoch
    keys_before = set(KeyStore(tmp_path / "high" / "keys", tmp_path / "high" / "data").keys())
    assert keys_before

    # Without source.start_time the restarted simulators begin again at their first epoch.
    caplog.clear()
    caplog.set_level("INFO", logger="S15qkd")
    for config in (high_config, low_config):
        config.update({"source": {"epochs": 30}})
    assert run_nodes(high_config, low_config) == "input used up"
    messages = [record.getMessage() for record in caplog.records]
    skipped = [m for m in messages if "used by an earlier run" in m]
    assert len(skipped) == 1, skipped
    assert not [m for m in messages if "refusing to use it twice" in m]
    keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    new_keys = set(keys) - keys_before
    assert new_keys, "no key from the epochs after the first run"
    assert min(int(name, 16) for name in new_keys) >= used


@needs_matching
def test_simulator_runs_start_at_start_time(tmp_path):
    # With source.start_time an hour back, a node once simulated the whole hour at every
    # run start (7.2e8 pairs here) before its first epoch.
    pair_rate = 2e5
    link = LinkUnderTest(tmp_path, pair_rate=pair_rate,
                         config={"source": {"start_time": time.time() - 3600}})
    runs = []
    try:
        for run in range(3):
            if run:
                link.high.stop_keygen("next run")
                assert wait_until(lambda: link.low.pipeline is None, 30)
                link.high.start_keygen()
            assert wait_until(lambda: link.high.pipeline is not None
                              and link.high.pipeline.run not in runs, 30)
            runs.append(link.high.pipeline.run)
            assert wait_until(lambda: link.high.engine.state in (EngineState.SERVICE_MODE,
                                                                 EngineState.KEY_GENERATION),
                              120), link.high.engine.reason
            for node in (link.high, link.low):
                # At most two segments of 67 ms before the skip rebuild the detector state.
                opening_pairs = node.pipeline.source.opening_pairs
                assert opening_pairs < pair_rate * 0.15, (run, node.role, opening_pairs)
            folders = {role: sorted(p.name for p in (tmp_path / role / "data").glob("run-*"))
                       for role in ("high", "low")}
            assert folders["high"] == [f"run-{runs[-1]:08x}"], folders
            assert folders["low"] == [f"run-{runs[-1]:08x}"], folders
    finally:
        link.close()


@needs_matching
def test_golden_realistic_reaches_key_generation(tmp_path):
    events = golden_case("realistic") / "events"
    out = io.StringIO()
    args = simulate_args(tmp_path, events_high=str(events / "events.hec.out"),
                         events_low=str(events / "events.lec.out"), block_bits=16384)
    run_simulation(args, out=out)
    text = out.getvalue()
    assert "time offset 3456" in text, text
    assert "high-count side: KEY_GENERATION" in text
    assert "low-count side: KEY_GENERATION" in text
    service = [line for line in text.splitlines() if line.startswith("service")]
    qber = float(service[0].split("QBER")[1].split()[0])
    assert 0.02 < qber < 0.04


@needs_keys
def test_golden_realistic_keys_match(tmp_path):
    events = golden_case("realistic") / "events"
    out = io.StringIO()
    args = simulate_args(tmp_path, events_high=str(events / "events.hec.out"),
                         events_low=str(events / "events.lec.out"), block_bits=16384)
    status = run_simulation(args, out=out)
    assert status == 0, out.getvalue()
    keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert len(keys) >= 3


@needs_matching
def test_golden_fail_makes_no_key(tmp_path):
    events = golden_case("fail") / "events"
    out = io.StringIO()
    args = simulate_args(tmp_path, events_high=str(events / "events.hec.out"),
                         events_low=str(events / "events.lec.out"), block_bits=16384)
    status = run_simulation(args, out=out)
    text = out.getvalue()
    assert status == 1, text
    assert "FAIL: no final keys were released" in text
    assert "above QBER_threshold" in text
    assert KeyStore(tmp_path / "high" / "keys", tmp_path / "high" / "data").keys() == {}


class LinkUnderTest:
    """Two in-process nodes from the simulate configuration, optionally through a proxy."""

    def __init__(self, tmp_path: Path, proxy: bool = False, config: Optional[dict] = None,
                 **overrides):
        args = simulate_args(tmp_path, **overrides)
        self.high_config, self.low_config = node_configs(tmp_path, args)
        real_time = {"source": {"real_time": True, "epochs": 0, "start_time": time.time()}}
        for node_config in (self.high_config, self.low_config):
            node_config.update(real_time)
            node_config.update(config or {})
        self.proxy = LinkProxy(self.high_config["port_authd"]) if proxy else None
        if self.proxy is not None:
            self.low_config.update({"port_authd": self.proxy.port})
        self.progress = Progress(io.StringIO(), quiet=True)
        self.high = Node(self.high_config, progress=self.progress, auto_start=True)
        self.low = Node(self.low_config, progress=self.progress)
        self.high.start()
        self.low.start()

    def keys(self, side: str) -> dict:
        return (self.high if side == "high" else self.low).keystore.keys()

    def wait_keys(self, count: int, timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.keys("high")) >= count and len(self.keys("low")) >= count:
                return True
            time.sleep(0.2)
        return False

    def close(self) -> None:
        self.high.close()
        self.low.close()
        if self.proxy is not None:
            self.proxy.close()


def wait_until(condition, timeout: float = 60.0) -> bool:
    """Poll condition every 0.05 s; the limit only matters on a very slow machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_no_epoch_reused(caplog) -> None:
    """Check that neither node tried to use an epoch twice (keystore or service check)."""
    reused = [record.getMessage() for record in caplog.records
              if "refusing to use it twice" in record.getMessage()
              or "which this side used before" in record.getMessage()]
    assert not reused, reused


@needs_keys
def test_cut_channel_resumes_keys(tmp_path, caplog):
    caplog.set_level("INFO", logger="S15qkd")
    link = LinkUnderTest(tmp_path, proxy=True)
    try:
        assert link.wait_keys(1), link.high.engine.reason
        before = set(link.keys("high"))
        link.proxy.cut()
        time.sleep(CUT_SECONDS)
        assert not link.high.link.state.value == "connected"
        # Both engines show the lost peer while the run is paused.
        for node in (link.high, link.low):
            assert wait_until(lambda: node.engine.state is EngineState.OFF, 20), node.engine.reason
            assert "channel to the peer lost" in node.engine.reason
        link.proxy.restore()
        for node in (link.high, link.low):
            assert wait_until(lambda: node.engine.state is EngineState.KEY_GENERATION), \
                node.engine.reason
        assert "reconnected" in link.high.engine.reason
        assert link.wait_keys(len(before) + 2), link.high.engine.reason
        # One link session from start to end: the cut resumed it instead of starting anew.
        assert link.high.link.stats.resets == 1, link.high.link.stats
        assert link.low.link.stats.resets == 1, link.low.link.stats
    finally:
        link.close()
    keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert set(keys) - before, "no key released after the channel came back"
    assert_nothing_staged(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert_no_epoch_reused(caplog)


@pytest.mark.slow
@needs_keys
def test_cut_channel_for_30_seconds(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sys.modules[__name__], "CUT_SECONDS", 30.0)
    test_cut_channel_resumes_keys(tmp_path, caplog)


@needs_keys
def test_corrupted_frame_reconnects(tmp_path):
    link = LinkUnderTest(tmp_path, proxy=True)
    try:
        assert link.wait_keys(1), link.high.engine.reason
        before = len(link.keys("high"))
        link.proxy.corrupt_after(5000)
        assert link.wait_keys(before + 2), link.high.engine.reason
        assert link.proxy.connections >= 2
        assert link.high.link.stats.resets == 1, link.high.link.stats
    finally:
        link.close()
    assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert_nothing_staged(tmp_path / "high" / "keys", tmp_path / "low" / "keys")


def truncate_file(content: bytes) -> bytes:
    return content[:len(content) // 2]


def relabel_file(content: bytes) -> bytes:
    """Label a type-2 file with the epoch after its own (header field at byte 4)."""
    epoch = int.from_bytes(content[4:8], "little")
    return content[:4] + (epoch + 1).to_bytes(4, "little") + content[8:]


def change_base_bits(content: bytes) -> bytes:
    """Give a type-2 file the 4 base bits of the service protocol (header field at byte 16)."""
    return content[:16] + (4).to_bytes(4, "little") + content[20:]


#: How each case damages one type-2 file on its way to costream, the reason expected in
#: the log line, and the type2_timeout_s in force. None drops the file.
TYPE2_DAMAGE = {
    "truncated": (truncate_file, "invalid type-2 file", 10.0),
    "relabelled": (relabel_file, "labelled epoch", 10.0),
    "base_bits": (change_base_bits, "base bits", 10.0),
    "missing": (None, "type2_timeout_s", 1.0),
}


def run_with_damaged_type2(tmp_path: Path, monkeypatch, change, index: int,
                           timeout: float) -> tuple[int, tuple[int, int]]:
    """Run a simulated link whose type-2 epoch number index (from 0) reaches the
    high-count side damaged by change, or not at all when change is None.

    Returns that epoch and the skipped epochs both status pages show at the end.
    """
    from S15qkd.pipeline import HighPipeline

    received: list[int] = []
    original = HighPipeline.on_file

    def on_file(pipeline, file_type, epoch, content):
        received.append(epoch)
        if epoch == received[0] + index:
            if change is None:
                return
            content = change(content)
        original(pipeline, file_type, epoch, content)

    monkeypatch.setattr(HighPipeline, "on_file", on_file)
    skipped = run_counting_skipped(tmp_path, {"type2_timeout_s": timeout})
    return received[0] + index, skipped


def run_counting_skipped(tmp_path: Path, config: dict) -> tuple[int, int]:
    """Run a simulated link of 24 epochs to its end with config added.

    Returns the skipped epochs that the high-count and the low-count status page show.
    """
    high_config, low_config = node_configs(tmp_path, simulate_args(tmp_path, epochs=24))
    for node_config in (high_config, low_config):
        node_config.update(config)
    skipped = []

    def count_skipped(high: Node, low: Node) -> None:
        skipped.extend(node.status().raw_key.skipped_epochs for node in (high, low))

    assert run_nodes(high_config, low_config, inspect=count_skipped) == "input used up"
    return skipped[0], skipped[1]


@needs_keys
@pytest.mark.parametrize("damage", list(TYPE2_DAMAGE))
def test_bad_type2_epoch_skipped(tmp_path, monkeypatch, caplog, damage):
    change, reason, timeout = TYPE2_DAMAGE[damage]
    caplog.set_level("INFO", logger="S15qkd")
    # The 11th epoch: costream matches it, after the offset search.
    bad, skipped_counts = run_with_damaged_type2(tmp_path, monkeypatch, change, 10, timeout)

    skipped = [r.getMessage() for r in caplog.records if "skipped, no raw key" in r.getMessage()]
    assert len(skipped) == 1, skipped
    assert f"type-2 epoch {bad:08x} skipped" in skipped[0]
    assert reason in skipped[0]
    assert skipped_counts == (1, 1)
    keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert_nothing_staged(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    # The link went on after the bad epoch. A block held back by max_blocks_in_flight
    # may span it, because the low-count side gets an empty raw key for a skipped epoch.
    last_epochs = {name: key.start_epoch + key.epochs - 1 for name, key in keys.items()}
    assert [name for name, last in last_epochs.items() if last > bad], sorted(keys)
    assert not [r for r in caplog.records if "stage worker costream failed" in r.getMessage()]


@needs_keys
def test_bad_type2_epoch_in_offset_search(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="S15qkd")
    # The 3rd epoch is in the first search window, which starts at the 2nd.
    bad, skipped_counts = run_with_damaged_type2(tmp_path, monkeypatch, truncate_file, 2, 10.0)

    failed = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("offset search in epochs")]
    assert failed, "the offset search did not fail on the invalid file"
    assert f"{bad:08x}" in failed[0]
    assert skipped_counts == (0, 0)
    keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert keys
    assert all(int(name, 16) > bad for name in keys), sorted(keys)
    assert not [r for r in caplog.records if "stage worker costream failed" in r.getMessage()]


def damage_type1(path: Path, damage: str) -> None:
    """Damage the type-1 file at path in the way that the case name damage describes."""
    if damage == "truncated":
        path.write_bytes(truncate_file(path.read_bytes()))
    elif damage == "garbled":
        # A header tag that is neither type 1 (1) nor extended type 1 (0x101).
        path.write_bytes(b"\xf7\x27\x3f\x53" + path.read_bytes()[4:])
    else:
        path.unlink()


#: How each case damages one type-1 file before costream reads it, and the reason
#: expected in the log line. "never_written" also keeps costream from hearing of it,
#: as for an epoch without events on the high-count side.
TYPE1_DAMAGE = {
    "truncated": "invalid type-1 file",
    "garbled": "header tag",
    "removed": "No such file",
    "never_written": "no type-1 file of it reached costream",
}


@needs_keys
@pytest.mark.parametrize("damage", list(TYPE1_DAMAGE))
def test_bad_type1_epoch_skipped(tmp_path, monkeypatch, caplog, damage):
    from S15qkd.pipeline import HighPipeline

    caplog.set_level("INFO", logger="S15qkd")
    chopped: list[int] = []
    original = HighPipeline.handle_chopped

    def handle_chopped(pipeline, item):
        chopped.append(item.epoch)
        # The 11th epoch: costream matches it, after the offset search.
        if item.epoch == chopped[0] + 10:
            damage_type1(pipeline.folders["t1"] / f"{item.epoch:08x}", damage)
            if damage == "never_written":
                return
        original(pipeline, item)

    monkeypatch.setattr(HighPipeline, "handle_chopped", handle_chopped)
    skipped_counts = run_counting_skipped(tmp_path, {})

    bad = chopped[0] + 10
    skipped = [r.getMessage() for r in caplog.records if "skipped, its events" in r.getMessage()]
    assert len(skipped) == 1, skipped
    assert f"type-1 epoch {bad:08x} skipped" in skipped[0]
    assert TYPE1_DAMAGE[damage] in skipped[0]
    assert skipped_counts == (1, 1)
    keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert_nothing_staged(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert_key_after(keys, bad)
    assert not [r for r in caplog.records if "stage worker costream failed" in r.getMessage()]


def assert_key_after(keys: dict, epoch: int) -> None:
    """Check that a key contains raw key of an epoch after epoch: the link went on."""
    ends = {name: key.start_epoch + key.epochs - 1 for name, key in keys.items()}
    assert [name for name, last in ends.items() if last > epoch], ends


@needs_keys
def test_failed_costream_push_skips_epoch(tmp_path, monkeypatch, caplog):
    from S15qkd import stages

    caplog.set_level("INFO", logger="S15qkd")
    original = stages.Costream.push_type1
    pushed: list[bytes] = []
    failed: list[int] = []

    def push_type1(costream, content):
        # The worker took the epoch's file before the push failed, as after a bug or an
        # unexpected error. The restarted worker must not wait for that file.
        pushed.append(content)
        if len(pushed) == 10:
            failed.append(costream.next_type1_epoch)
            raise RuntimeError("costream failed on purpose")
        original(costream, content)

    monkeypatch.setattr(stages.Costream, "push_type1", push_type1)
    high_config, low_config = node_configs(tmp_path, simulate_args(tmp_path, epochs=24))
    assert run_nodes(high_config, low_config) == "input used up"

    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "stage worker costream failed" in m]
    skipped = [m for m in messages if "skipped, its events" in m]
    assert len(skipped) == 1, skipped
    assert f"type-1 epoch {failed[0]:08x} skipped" in skipped[0]
    keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert_nothing_staged(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert_key_after(keys, failed[0])


class TimeJump:
    """Event source factory whose first source moves its times by ``epochs`` epochs once
    ``jump`` is set. Going back is a restarted time tagger whose clock began again."""

    def __init__(self, config: Config, epochs: int):
        self.config = config
        self.epochs = epochs
        self.jump = threading.Event()
        self.sources = 0

    def __call__(self, role: str):
        from S15qkd import stages

        source = stages.open_source(self.config, role)
        self.sources += 1
        if self.sources > 1:
            return source
        jump = self.jump
        original = source.next_batch
        shift = np.int64(self.epochs * stages.EPOCH_TICKS)

        def next_batch(stop_event):
            # Moved after the pacing, so the events still come at the wall clock's pace.
            batch = original(stop_event)
            if batch is None or not jump.is_set():
                return batch
            return (batch[0].astype(np.int64) + shift).astype(np.uint64), batch[1]

        source.next_batch = next_batch
        return source


def start_nodes(high_config: Config, low_config: Config, high_factory: TimeJump,
                low_factory: TimeJump) -> tuple[Node, Node]:
    """Start two nodes with real-time simulated sources from the factories."""
    real_time = {"source": {"real_time": True, "epochs": 0, "start_time": time.time()}}
    for node_config in (high_config, low_config):
        node_config.update(real_time)
    high = Node(high_config, progress=Progress(io.StringIO(), quiet=True), auto_start=True,
                source_factory=high_factory)
    low = Node(low_config, progress=Progress(io.StringIO(), quiet=True),
               source_factory=low_factory)
    high.start()
    low.start()
    return high, low


@needs_keys
def test_time_going_back_restarts_keygen(tmp_path, monkeypatch, caplog):
    from S15qkd import pipeline

    caplog.set_level("INFO", logger="S15qkd")
    monkeypatch.setattr(pipeline, "BACKWARD_RESTART_S", 1.0, raising=False)
    high_config, low_config = node_configs(tmp_path, simulate_args(tmp_path))
    high_factory, low_factory = TimeJump(high_config, -100), TimeJump(low_config, 0)
    high, low = start_nodes(high_config, low_config, high_factory, low_factory)
    try:
        assert wait_until(lambda: len(high.keystore.keys()) >= 1, 120), high.engine.reason
        high_factory.jump.set()
        assert wait_until(lambda: high_factory.sources >= 2, 60), high.engine.reason
        before = len(high.keystore.keys())
        assert wait_until(lambda: len(high.keystore.keys()) > before, 120), high.engine.reason
    finally:
        high.close()
        low.close()

    messages = [r.getMessage() for r in caplog.records]
    dropped = [m for m in messages if "because their time lies before the latest" in m]
    assert dropped, "no warning about events going back in time"
    assert "restart key generation" in dropped[0]
    restarts = [m for m in messages if m.startswith("restarting key generation: every event")]
    assert len(restarts) == 1, restarts
    assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")


@needs_keys
def test_silent_peer_block_times_out(tmp_path, caplog):
    caplog.set_level("INFO", logger="S15qkd")
    link = LinkUnderTest(tmp_path, proxy=True, config={"block_timeout_s": 2.0})
    stuck = None
    try:
        assert link.wait_keys(1), link.high.engine.reason
        # Stop all traffic while the low-count side has a block open, so neither peer
        # receives the other's next reconciliation message.
        for _ in range(100):
            assert wait_until(lambda: bool(link.low.pipeline.blocks.blocks), 30)
            link.proxy.pause()
            time.sleep(0.3)
            blocks = link.low.pipeline.blocks.blocks
            if blocks:
                stuck = min(blocks)
                break
            link.proxy.resume()
        assert stuck is not None, "no block was open when the channel paused"
        name = f"{stuck:08x}"
        assert wait_until(lambda: stuck not in link.low.pipeline.blocks.blocks, 10)
        link.proxy.resume()
        before = len(link.keys("high"))
        assert link.wait_keys(before + 1), link.high.engine.reason
        for node in (link.high, link.low):
            assert stuck not in node.pipeline.blocks.blocks
    finally:
        link.close()

    timed_out = [r.getMessage() for r in caplog.records
                 if f"block {name} discarded: timed out" in r.getMessage()]
    assert timed_out, "no timeout was logged for the stuck block"
    assert "block_timeout_s" in timed_out[0]
    discarded = [r for r in caplog.records if f"block {name} discarded" in r.getMessage()
                 or f"block {name} dropped on both sides" in r.getMessage()]
    assert len(discarded) >= 2, "the block was not discarded on both sides"
    keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert name not in keys
    assert_nothing_staged(tmp_path / "high" / "keys", tmp_path / "low" / "keys")


# ---- blocks held back by max_blocks_in_flight ------------------------------------------

STARTED = re.compile(r"block ([0-9a-f]{8}) started: (\d+) epochs, (\d+) raw bits")
DROPPED = re.compile(r"raw key epochs ([0-9a-f]{8})\.\.([0-9a-f]{8}) \((\d+) bits\) dropped: (.*)")


class EpochBits(Progress):
    """Progress that also records the raw key bits of each epoch on the low-count side."""

    def __init__(self):
        super().__init__(io.StringIO(), quiet=True)
        self.bits: dict[int, int] = {}

    def __call__(self, kind: str, node: str, **fields) -> None:
        if kind == "epoch" and node == "low":
            self.bits[fields["epoch"]] = fields["raw_bits"]
        super().__call__(kind, node, **fields)


def started_blocks(caplog) -> dict[int, tuple[int, int]]:
    """Return (epochs, raw bits) of each block the low-count side started, by first epoch."""
    blocks = {}
    for record in caplog.records:
        match = STARTED.match(record.getMessage())
        if match:
            blocks[int(match[1], 16)] = (int(match[2]), int(match[3]))
    return blocks


def log_lines(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def fast_link_configs(tmp_path: Path, epochs: int, **options) -> tuple[Config, Config]:
    """Configurations of a link whose simulator runs as fast as it can, so raw key
    epochs arrive faster than blocks are reconciled."""
    high_config, low_config = node_configs(tmp_path, simulate_args(tmp_path, epochs=epochs))
    for config in (high_config, low_config):
        config.update(options)
    return high_config, low_config


@needs_keys
def test_held_back_blocks_take_in_epochs(tmp_path, caplog):
    caplog.set_level("INFO", logger="S15qkd")
    # One epoch has about 10800 raw bits, above minimal_block_size 8000, so every epoch
    # would start its own block without the limit.
    high_config, low_config = fast_link_configs(tmp_path, 24, max_blocks_in_flight=1)
    assert run_nodes(high_config, low_config) == "input used up"

    held_lines = log_lines(caplog, "held back: ")
    assert held_lines, "no block was held back"
    for line in held_lines:
        assert "1 blocks in flight, max_blocks_in_flight 1" in line
    started = started_blocks(caplog)
    assert [first for first, (epochs, _) in started.items() if epochs > 1], started
    keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert [name for name, key in keys.items() if key.epochs > 1], sorted(keys)
    assert_nothing_staged(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert_no_epoch_reused(caplog)


@needs_keys
def test_held_back_block_starts_at_maximum(tmp_path, caplog):
    caplog.set_level("INFO", logger="S15qkd")
    maximal = 30000
    high_config, low_config = fast_link_configs(tmp_path, 24, max_blocks_in_flight=1,
                                                maximal_block_size=maximal)
    progress = EpochBits()
    assert run_nodes(high_config, low_config, progress=progress) == "input used up"

    at_maximum = log_lines(caplog, f"because it reached maximal_block_size {maximal}")
    assert at_maximum, "no block started because it reached its maximum"
    assert "with 1 blocks in flight" in at_maximum[0]
    started = started_blocks(caplog)
    assert started
    for first, (epochs, raw_bits) in started.items():
        bits = [progress.bits[epoch] for epoch in range(first, first + epochs)]
        assert sum(bits) == raw_bits, f"block {first:08x}"
        # The block started with the epoch that took it to the maximum, not later.
        assert sum(bits[:-1]) < maximal, f"block {first:08x}: {bits}"
    assert [first for first, (epochs, _) in started.items() if epochs > 1], started
    assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert_nothing_staged(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert_no_epoch_reused(caplog)


@needs_keys
def test_held_back_block_dropped_on_service_mode(tmp_path, caplog):
    caplog.set_level("INFO", logger="S15qkd")
    # Each released block has a QBER near 0.03, above QBER_limit, so the low-count side
    # returns to service mode when it releases a block, while the next one is held back.
    high_config, low_config = fast_link_configs(tmp_path, 40, max_blocks_in_flight=1,
                                                QBER_limit=0.01, servo_blocks=1)
    assert run_nodes(high_config, low_config) == "input used up"

    held_blocks = {line.split()[1] for line in log_lines(caplog, "held back: ")}
    dropped = [DROPPED.match(line) for line in log_lines(caplog, "dropped: the engine left")]
    assert dropped, "no collected epochs were dropped at the return to service mode"
    for match in dropped:
        assert match[4] == "the engine left key generation for SERVICE_MODE"
    assert [match for match in dropped if match[1] in held_blocks], (held_blocks, dropped)
    keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    used = {key.start_epoch + i for key in keys.values() for i in range(key.epochs)}
    for match in dropped:
        lost = set(range(int(match[1], 16), int(match[2], 16) + 1))
        assert not lost & used, f"dropped epochs {match[1]}..{match[2]} went into a key"
    assert_nothing_staged(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert_no_epoch_reused(caplog)


@needs_keys
def test_collected_epochs_dropped_at_stop(tmp_path, caplog):
    caplog.set_level("INFO", logger="S15qkd")
    # The whole run has about 10**5 raw key bits, so no block starts.
    high_config, low_config = fast_link_configs(tmp_path, 14, minimal_block_size=1_000_000)
    statuses = []
    assert run_nodes(high_config, low_config,
                     inspect=lambda high, low: statuses.append(low.status())) == "input used up"

    dropped = [DROPPED.match(line) for line in log_lines(caplog, "dropped: the run stopped")]
    assert len(dropped) == 1, dropped
    assert not started_blocks(caplog)
    first, last, bits = int(dropped[0][1], 16), int(dropped[0][2], 16), int(dropped[0][3])
    error_correction = statuses[0].error_correction
    assert error_correction.undigested_epochs == last - first + 1
    assert error_correction.undigested_raw_bits == bits
    assert error_correction.blocks_in_flight == 0
    assert KeyStore(tmp_path / "low" / "keys", tmp_path / "low" / "data").next_unused_epoch <= first



@needs_matching
def test_runs_release_search_and_costream(tmp_path, monkeypatch):
    """Stop and start runs on the same nodes; no run's offset search or costream stays.

    The offset search allocates about 770 MiB at the default FFT_buffer_order, and a node
    restarts runs for months, so the search must go once a peak is found, and costream
    once its run stopped, even while the watchdog still holds the stopped workers.
    """
    live: dict[str, list[weakref.ref]] = {"OffsetFinder": [], "Costream": []}

    def tracked(name: str):
        base = getattr(stages, name)

        class Tracked(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                live[name].append(weakref.ref(self))

        return Tracked

    for name in live:
        monkeypatch.setattr(stages, name, tracked(name))
    # A small search keeps the test fast; the release does not depend on the order.
    high_config, low_config = fast_link_configs(tmp_path, 10, FFT_buffer_order=17,
                                                minimal_block_size=1_000_000)
    progress = Progress(io.StringIO(), quiet=True)
    high = Node(high_config, progress=progress, auto_start=True)
    low = Node(low_config, progress=progress)
    high.start()
    low.start()
    runs = 3
    try:
        for run in range(runs):
            if run:
                with progress.lock:
                    progress.sources_finished.clear()
                high.start_keygen()
            assert wait_until_idle(high, low, progress, 120) == "input used up"
            assert len(live["OffsetFinder"]) == run + 1, "each run searches once"
            assert len(live["Costream"]) == run + 1, "each run found the peak"
            assert all(ref() is None for ref in live["OffsetFinder"]), \
                f"run {run + 1}: the offset search outlived the peak it found"

            high.stop_keygen("next cycle")
            assert wait_until(lambda: low.pipeline is None, 30)
            assert all(ref() is None for ref in live["Costream"]), \
                f"run {run + 1}: costream outlived its stopped run"
    finally:
        high.close()
        low.close()

def random_key(start_epoch: int, seed: int) -> FinalKey:
    bits = np.random.default_rng(seed).integers(0, 2, 300, dtype=np.uint8)
    return FinalKey(start_epoch, 4, 300, pack_key_bits(bits))


def settle_after_restart(high_config: Config, low_config: Config) -> None:
    """Start both nodes without key generation until they settled every staged key."""
    high, low = Node(high_config), Node(low_config)
    high.start()
    low.start()
    try:
        assert wait_until(lambda: not high.keystore.staged_keys(), 30)
        assert wait_until(lambda: not low.keystore.releasing, 30)
    finally:
        high.close()
        low.close()


def test_restart_settles_staged_keys(tmp_path):
    high_config, low_config = node_configs(tmp_path, simulate_args(tmp_path))
    high_store = KeyStore(high_config["final_key_folder"], high_config["data_root"])
    low_store = KeyStore(low_config["final_key_folder"], low_config["data_root"])
    keys = {epoch: random_key(epoch, seed) for seed, epoch in enumerate((0x100, 0x200, 0x300, 0x400))}
    # What kill -9 can leave behind. 0x100: release decided, released nowhere yet.
    # 0x200: released on the low-count side only. 0x300: staged on both, not decided.
    # 0x400: staged on the high-count side only.
    for epoch in (0x100, 0x200, 0x300):
        high_store.stage(keys[epoch])
        low_store.stage(keys[epoch])
    high_store.stage(keys[0x400])
    low_store.mark_releasing(0x100)
    low_store.mark_releasing(0x200)
    low_store.commit(0x200)

    settle_after_restart(high_config, low_config)
    high_keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert sorted(high_keys) == ["00000100", "00000200"]
    assert high_keys["00000100"] == keys[0x100]
    assert_nothing_staged(tmp_path / "high" / "keys", tmp_path / "low" / "keys")


@pytest.mark.parametrize("role", ["high", "low"])
def test_unsettled_close_warns_only_about_staged_keys(tmp_path, caplog, role):
    """A close that cannot reach the peer warns only when a key waits for a decision here."""
    configs = dict(zip(("high", "low"), node_configs(tmp_path, simulate_args(tmp_path))))
    node = Node(configs[role])   # The peer never starts, so the settlement cannot finish.
    node.start()
    try:
        caplog.set_level("INFO", logger="S15qkd.release")
        node.release.settle_at_close(0.2)
        messages = [(r.levelname, r.getMessage()) for r in caplog.records]
        assert not [m for level, m in messages if level == "WARNING"], messages
        assert any("with no final key staged" in m for _, m in messages), messages

        caplog.clear()
        node.keystore.stage(random_key(0x500, 5))
        if role == "low":
            # The coordinator drops an undecided key at close, so only a decided one waits.
            node.keystore.mark_releasing(0x500)
        node.release.settle_at_close(0.2)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1, warnings
        assert "00000500" in warnings[0], warnings
    finally:
        node.close()


@needs_matching
def test_wrong_certificate_makes_no_key(tmp_path):
    from S15qkd.channel.tls import create_node_certificate

    intruder_cert, intruder_key = create_node_certificate(tmp_path / "intruder", "intruder")
    args = simulate_args(tmp_path)
    high_config, low_config = node_configs(tmp_path, args)
    low_config.update({"local_cert": str(intruder_cert), "local_key": str(intruder_key)})
    high = Node(high_config, auto_start=True)
    low = Node(low_config)
    high.start()
    low.start()
    try:
        # Wait for the refused handshake itself; a fixed pause was too short under load.
        deadline = time.monotonic() + 30
        while "TLS handshake" not in high.link.stats.last_error and time.monotonic() < deadline:
            time.sleep(0.1)
        assert high.engine.state is EngineState.OFF
        assert low.engine.state is EngineState.OFF
        assert "TLS handshake" in high.link.stats.last_error
        assert high.status().connected is False
    finally:
        high.close()
        low.close()
    assert high.keystore.keys() == {}
    assert low.keystore.keys() == {}


@needs_keys
def test_full_keys_disk_stops_with_reason(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        args = simulate_args(tmp_path)
        high_config, low_config = node_configs(tmp_path, args)
        low_config.update({"final_key_folder": str(mount / "keys")})
        progress = Progress(io.StringIO(), quiet=True)
        high = Node(high_config, progress=progress, auto_start=True)
        low = Node(low_config, progress=progress)
        high.start()
        low.start()
        try:
            wait_until_idle(high, low, progress, timeout=90)
        finally:
            high.close()
            low.close()
        assert "keys folder full" in high.stop_reason + low.stop_reason
        assert_keystores_agree(tmp_path / "high" / "keys", mount / "keys")
        assert_nothing_staged(tmp_path / "high" / "keys", mount / "keys")
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def write_node_config(path: Path, config: Config) -> Path:
    import json

    path.write_text(json.dumps(config.as_dict()))
    return path


@needs_keys
@pytest.mark.parametrize("killed", ["low", "high"])
def test_kill_and_restart_node(tmp_path, killed):
    args = simulate_args(tmp_path)
    high_config, low_config = node_configs(tmp_path, args)
    source = {"source": {"real_time": True, "epochs": 0, "start_time": time.time()}}
    high_config.update(source)
    low_config.update(source)
    files = {"high": write_node_config(tmp_path / "high.json", high_config),
             "low": write_node_config(tmp_path / "low.json", low_config)}
    command = [sys.executable, "-m", "S15qkd.cli.main", "node", "--start", "--config"]
    high_keys, low_keys = tmp_path / "high" / "keys", tmp_path / "low" / "keys"
    survivor = "high" if killed == "low" else "low"

    def key_count(folder: Path) -> int:
        if not folder.exists():
            return 0
        return len([p for p in folder.iterdir() if is_key_file(p)])

    def wait_for(count: int, timeout: float = 120) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if key_count(high_keys) >= count and key_count(low_keys) >= count:
                return True
            time.sleep(0.2)
        return False

    processes = {role: subprocess.Popen(command + [str(files[role])]) for role in ("high", "low")}
    try:
        assert wait_for(1)
        processes[killed].send_signal(signal.SIGKILL)
        processes[killed].wait()
        killed_keys = tmp_path / killed / "keys"
        used_before = KeyStore(killed_keys, tmp_path / killed / "data").next_unused_epoch
        killed_count = key_count(killed_keys)
        time.sleep(1.0)
        processes[killed] = subprocess.Popen(command + [str(files[killed])])
        assert wait_for(killed_count + 2)
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        # A node stops its workers (up to 10 s each), then settles its staged keys with
        # the peer (up to 5 s) and closes the channel (up to 5 s).
        stuck = []
        for role, process in processes.items():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                stuck.append(role)
        assert not stuck, f"nodes still running 60 s after SIGTERM: {stuck}"
    keys = assert_keystores_agree(high_keys, low_keys)
    assert_nothing_staged(high_keys, low_keys)
    after_restart = [name for name in keys if int(name, 16) >= used_before]
    assert after_restart, "no key from epochs after the restart"
    watchdog_log = (tmp_path / survivor / "data" / "watchdog.log").read_text()
    assert "the peer restarted" in watchdog_log


@needs_matching
def test_epochs_without_overlap_warned(tmp_path, monkeypatch, caplog):
    from S15qkd import pipeline

    caplog.set_level("INFO", logger="S15qkd")
    monkeypatch.setattr(pipeline, "OVERLAP_WARNING_S", 2.0, raising=False)
    monkeypatch.setattr(pipeline, "OVERLAP_REPEAT_S", 3.0, raising=False)
    high_config, low_config = node_configs(tmp_path, simulate_args(tmp_path))
    # The low-count side's clock runs 1000 epochs (9 minutes) ahead.
    high_factory, low_factory = TimeJump(high_config, 0), TimeJump(low_config, 1000)
    low_factory.jump.set()
    high, low = start_nodes(high_config, low_config, high_factory, low_factory)
    try:
        def warnings() -> list[str]:
            return [r.getMessage() for r in caplog.records
                    if "common epochs of both sides after" in r.getMessage()]

        assert wait_until(lambda: len(warnings()) >= 2, 60), high.engine.reason
        assert high.engine.state is EngineState.PEAK_FINDING
        reason = high.engine.reason
    finally:
        high.close()
        low.close()

    first = warnings()[0]
    assert re.match(r"0 common epochs of both sides after \d+ s of peak finding", first), first
    own = re.search(r"this side has epochs ([0-9a-f]{8})\.\.([0-9a-f]{8})", first)
    peer = re.search(r"the peer ([0-9a-f]{8})\.\.([0-9a-f]{8})", first)
    assert own is not None, first
    assert peer is not None, first
    assert int(peer.group(1), 16) - int(own.group(2), 16) > 900, first
    assert "started together" in first
    assert "source.start_time" in first
    assert "common epochs of both sides" in reason
    # Repeated at the lower rate, not once per epoch.
    assert len(warnings()) <= 3, warnings()
