"""Two nodes end to end on loopback: real TLS, real files, the Rust stages.

The fault tests follow what an operator sees: after a node is killed and restarted, the
channel is cut, a frame is corrupted, a certificate is wrong or the keys disk is full,
no mismatched or partial key is released, no epoch is used twice, and the link either
resumes or stops with a clear reason.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qkd_core
from conftest import golden_case
from linkproxy import LinkProxy
from S15qkd.config import Config
from S15qkd.keystore import KeyStore, decode_type7
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


def assert_keystores_agree(high_folder: Path, low_folder: Path, allow_missing: int = 0) -> dict:
    """Check the released keys: complete type-7 files, equal on both sides, no epoch twice.

    ``allow_missing`` keys may exist on one side only: a node killed between the two
    sides' releases of the same block leaves its peer with that one key.
    """
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
    assert len(only_one_side) <= allow_missing, f"keys on one side only: {sorted(only_one_side)}"
    ranges = sorted((key.start_epoch, key.start_epoch + key.epochs) for key in keys["high"].values())
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert start >= end, f"epoch {start:08x} went into two keys"
    return keys["high"]


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

    def __init__(self, tmp_path: Path, proxy: bool = False, **overrides):
        args = simulate_args(tmp_path, **overrides)
        self.high_config, self.low_config = node_configs(tmp_path, args)
        real_time = {"source": {"real_time": True, "epochs": 0, "start_time": time.time()}}
        self.high_config.update(real_time)
        self.low_config.update(real_time)
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


@needs_keys
def test_cut_channel_resumes_keys(tmp_path):
    link = LinkUnderTest(tmp_path, proxy=True)
    try:
        assert link.wait_keys(1), link.high.engine.reason
        before = len(link.keys("high"))
        link.proxy.cut()
        time.sleep(CUT_SECONDS)
        assert not link.high.link.state.value == "connected"
        link.proxy.restore()
        assert link.wait_keys(before + 2), link.high.engine.reason
        assert link.high.link.stats.resets == 1, link.high.link.stats
    finally:
        link.close()
    # The nodes close one after the other while a block may be between the two releases.
    assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys", allow_missing=1)


@pytest.mark.slow
@needs_keys
def test_cut_channel_for_30_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CUT_SECONDS", 30.0)
    test_cut_channel_resumes_keys(tmp_path)


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
    # The nodes close one after the other while a block may be between the two releases.
    assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys", allow_missing=1)


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
        # NOTE: a block whose release races the stop can end on one side only (seen once in
        # 4 runs: the high-count side kept 00004f92). Keys on both sides must still be equal.
        assert_keystores_agree(tmp_path / "high" / "keys", mount / "keys", allow_missing=1)
        assert not list((mount / "keys" / ".staging").iterdir())
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def write_node_config(path: Path, config: Config) -> Path:
    import json

    path.write_text(json.dumps(config.as_dict()))
    return path


@needs_keys
def test_kill_and_restart_node(tmp_path):
    args = simulate_args(tmp_path)
    high_config, low_config = node_configs(tmp_path, args)
    source = {"source": {"real_time": True, "epochs": 0, "start_time": time.time()}}
    high_config.update(source)
    low_config.update(source)
    high_file = write_node_config(tmp_path / "high.json", high_config)
    low_file = write_node_config(tmp_path / "low.json", low_config)
    command = [sys.executable, "-m", "S15qkd.cli.main", "node", "--start", "--config"]
    high_keys, low_keys = tmp_path / "high" / "keys", tmp_path / "low" / "keys"

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

    high = subprocess.Popen(command + [str(high_file)])
    low = subprocess.Popen(command + [str(low_file)])
    try:
        assert wait_for(1)
        low.send_signal(signal.SIGKILL)
        low.wait()
        used_before = KeyStore(low_keys, tmp_path / "low" / "data").next_unused_epoch
        killed_count = key_count(low_keys)
        time.sleep(1.0)
        low = subprocess.Popen(command + [str(low_file)])
        assert wait_for(killed_count + 2)
    finally:
        for process in (high, low):
            process.send_signal(signal.SIGTERM)
        for process in (high, low):
            process.wait(timeout=20)
    keys = assert_keystores_agree(high_keys, low_keys, allow_missing=1)
    after_restart = [name for name in keys if int(name, 16) >= used_before]
    assert after_restart, "no key from epochs after the restart"
    watchdog_log = (tmp_path / "high" / "data" / "watchdog.log").read_text()
    assert "the peer restarted" in watchdog_log
