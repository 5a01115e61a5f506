"""Stopping a node: signals to `qkdserver node`, and stops in the middle of key generation.

The time limits here are test limits for a very slow, shared machine, not speed targets:
a node that stops at all stops within a second or two on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from S15qkd.config import Config
from S15qkd.simulate import node_configs

#: Seconds a stopping process may take, interpreter start and exit included, before a
#: test calls it stuck.
STOP_LIMIT_S = 30.0


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
