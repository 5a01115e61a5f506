"""Stopping a node: signals to `qkdserver node`, and stops in the middle of key generation.

The time limits here are test limits for a very slow, shared machine, not speed targets.
On a 2-core machine, Node.close() took about 0.2 s when idle and up to 3 s at a load
average of 13.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from S15qkd.config import Config
from S15qkd.folder_lock import FolderLock
from S15qkd.node import Node
from S15qkd.simulate import node_configs
from S15qkd.status import ControlError
from test_link import (LinkUnderTest, assert_keystores_agree, assert_nothing_staged, needs_keys,
                       settle_after_restart, wait_until)

#: Seconds a stopping process may take, interpreter start and exit included, before a
#: test calls it stuck.
STOP_LIMIT_S = 30.0

#: Seconds Node.close() may take. A stage worker that ignores the stop costs its whole
#: join timeout of 10 s, so this limit catches one. The settlement with a silent peer
#: takes up to 5 s by design.
CLOSE_LIMIT_S = 10.0


def simulate_args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(events_high=None, events_low=None, epochs=14, pair_rate=2e5,
                              qber=0.03, seed=7, real_time=True, block_bits=8000,
                              workdir=str(tmp_path), timeout=120.0, quiet=True)


def write_config(path: Path, config: Config) -> Path:
    path.write_text(json.dumps(config.as_dict()))
    return path


# The kernel hands a signal sent to a process to any of its threads that does not block
# it, and CPython then runs the Python handler in the main thread only when that thread
# next executes bytecode. This script sends SIGTERM to a thread other than the main one,
# as the kernel may do while the main thread waits for the stop.
SIGNAL_ANOTHER_THREAD = """
import logging, signal, sys, threading, time
from pathlib import Path
from S15qkd.config import load_config
from S15qkd.node import run_node_until_signal

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
config = load_config(sys.argv[1])
watchdog_log = Path(config["data_root"]) / "watchdog.log"

def signal_this_thread():
    while "started as" not in (watchdog_log.read_text() if watchdog_log.exists() else ""):
        time.sleep(0.05)
    time.sleep(0.5)  # the main thread waits for a signal by now
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

threading.Thread(target=signal_this_thread, daemon=True).start()
sys.exit(run_node_until_signal(config))
"""


def test_sigterm_on_another_thread_stops_node(tmp_path):
    high_config, _ = node_configs(tmp_path, simulate_args(tmp_path))
    config = write_config(tmp_path / "high.json", high_config)
    process = subprocess.Popen([sys.executable, "-c", SIGNAL_ANOTHER_THREAD, str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, error = process.communicate(timeout=STOP_LIMIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        _, error = process.communicate()
        raise AssertionError(f"node still running {STOP_LIMIT_S} s after SIGTERM:\n{error}")
    assert process.returncode == 0, error
    assert "received SIGTERM; stopping the node" in error
    assert "node stopped" in error


def close_timed(*nodes: Node) -> list[float]:
    """Close the nodes at the same time, as two nodes that get SIGTERM together; return
    the seconds each close took."""
    seconds = [0.0] * len(nodes)

    def close(index: int) -> None:
        started = time.monotonic()
        nodes[index].close()
        seconds[index] = time.monotonic() - started

    threads = [threading.Thread(target=close, args=(index,)) for index in range(len(nodes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a close did not return in 60 s"
    return seconds


def open_block(node: Node) -> set:
    pipeline = node.pipeline
    return set(pipeline.blocks.blocks) if pipeline is not None else set()


@needs_keys
def test_stop_during_key_generation_in_time(tmp_path):
    link = LinkUnderTest(tmp_path)
    closed = False
    try:
        assert link.wait_keys(1), link.high.engine.reason
        # The real-time source keeps producing; wait for a moment with a block open.
        assert wait_until(lambda: bool(open_block(link.low)), 60), link.low.engine.reason
        seconds = close_timed(link.high, link.low)
        closed = True
    finally:
        if not closed:
            link.close()
    assert max(seconds) < CLOSE_LIMIT_S, seconds
    for side in ("high", "low"):
        # node.lock is free again: a new lock on it succeeds.
        FolderLock(tmp_path / side / "data", "node.lock").release()
    keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert keys
    assert_nothing_staged(tmp_path / "high" / "keys", tmp_path / "low" / "keys")


@needs_keys
def test_stop_with_silent_peer_in_time(tmp_path):
    link = LinkUnderTest(tmp_path, proxy=True)
    closed = []
    try:
        assert link.wait_keys(1), link.high.engine.reason
        # Hold every byte while the low-count side has a block open: its replies and the
        # stop request never arrive, like a peer that hangs.
        in_flight = set()
        for _ in range(100):
            assert wait_until(lambda: bool(open_block(link.low)), 60), link.low.engine.reason
            link.proxy.pause()
            in_flight = open_block(link.low)
            if in_flight:
                break
            link.proxy.resume()
        assert in_flight, "no block was open when the channel paused"
        seconds = close_timed(link.low)
        closed.append(link.low)
        link.proxy.resume()
        seconds += close_timed(link.high)
        closed.append(link.high)
    finally:
        for node in (link.low, link.high):
            if node not in closed:
                node.close()
        link.proxy.close()
    assert max(seconds) < CLOSE_LIMIT_S, seconds
    assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")

    # A key one side staged for the block in flight waits for the next link session,
    # which releases it on both sides or on neither. The restarted nodes connect directly.
    link.low_config.update({"port_authd": link.high_config["port_authd"]})
    settle_after_restart(link.high_config, link.low_config)
    keys = assert_keystores_agree(tmp_path / "high" / "keys", tmp_path / "low" / "keys")
    assert keys
    assert_nothing_staged(tmp_path / "high" / "keys", tmp_path / "low" / "keys")


def test_closed_node_starts_no_run(tmp_path):
    high_config, low_config = node_configs(tmp_path, simulate_args(tmp_path))
    low = Node(low_config)
    low.close()
    # The peer's start message can still arrive while close() settles the staged keys.
    low._join_run(7)
    assert low.pipeline is None
    assert not list((tmp_path / "low" / "data").glob("run-*"))

    high = Node(high_config)
    high.close()
    with pytest.raises(ControlError, match="the node is shutting down"):
        high.start_keygen()
    assert high.pipeline is None


def key_files(folder: Path) -> list[str]:
    """Names of the released keys in a keys folder (8 hex digits), sorted."""
    if not folder.exists():
        return []
    return sorted(path.name for path in folder.iterdir()
                  if path.is_file() and len(path.name) == 8 and not path.name.startswith("."))


def wait_for_exit(process: subprocess.Popen, role: str, log: Path) -> str:
    """Return the log of a node process that exits within STOP_LIMIT_S, or fail."""
    try:
        process.wait(timeout=STOP_LIMIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"{role} node still running {STOP_LIMIT_S} s after the signal:\n"
                             f"{log.read_text()}") from None
    return log.read_text()


@needs_keys
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_nodes_one_by_one(tmp_path, signum):
    high_config, low_config = node_configs(tmp_path, simulate_args(tmp_path))
    source = {"source": {"real_time": True, "epochs": 0, "start_time": time.time()}}
    processes, logs = {}, {}
    for role, config in (("high", high_config), ("low", low_config)):
        config.update(source)
        command = [sys.executable, "-m", "S15qkd.cli.main", "node", "--start", "--config",
                   str(write_config(tmp_path / f"{role}.json", config))]
        # A file, not a pipe, takes the log: a full pipe would block the node.
        logs[role] = tmp_path / f"{role}.log"
        with open(logs[role], "w") as log:
            processes[role] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    high_keys, low_keys = tmp_path / "high" / "keys", tmp_path / "low" / "keys"

    try:
        assert wait_until(lambda: key_files(high_keys) and key_files(low_keys), 120)
        # The low-count node stops during key generation; the high-count node stays up.
        processes["low"].send_signal(signum)
        low_error = wait_for_exit(processes["low"], "low", logs["low"])
        assert processes["high"].poll() is None
        processes["high"].send_signal(signum)
        high_error = wait_for_exit(processes["high"], "high", logs["high"])
    finally:
        for process in processes.values():
            process.kill()
    name = signal.Signals(signum).name
    for role, error in (("low", low_error), ("high", high_error)):
        assert processes[role].returncode == 0, error
        assert "Traceback" not in error
        assert f"received {name}; stopping the node" in error
        assert "node stopped" in error
        FolderLock(tmp_path / role / "data", "node.lock").release()
    assert "peer stopped key generation: sim-low shut down" in high_error
    keys = assert_keystores_agree(high_keys, low_keys)
    assert keys
    assert_nothing_staged(high_keys, low_keys)
    for folder in (high_keys, low_keys):
        # A key file is written under a temporary name and renamed, so none is partial.
        assert not [path.name for path in folder.iterdir() if path.name.startswith(".")
                    and path.name != ".staging"]
