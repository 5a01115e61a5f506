"""Command-line checks of ``qkdserver simulate``: bad values stop it with a message, not a traceback."""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from S15qkd.simulate import run_simulation


def simulate_args(tmp_path: Path, **overrides) -> argparse.Namespace:
    values = dict(events_high=None, events_low=None, epochs=14, pair_rate=2e5, qber=0.03,
                  seed=7, real_time=False, block_bits=8000, workdir=str(tmp_path / "work"),
                  timeout=120.0, quiet=True)
    values.update(overrides)
    return argparse.Namespace(**values)


def run_rejected(args: argparse.Namespace, capsys) -> str:
    """Run simulate with values it must reject; return its error message."""
    out = io.StringIO()
    assert run_simulation(args, out=out) == 2
    assert out.getvalue() == ""
    error = capsys.readouterr().err
    assert error.startswith("qkdserver simulate: ")
    assert "Traceback" not in error
    return error


@pytest.mark.parametrize("epochs", [0, -3])
def test_epochs_below_one_rejected(tmp_path, capsys, epochs):
    error = run_rejected(simulate_args(tmp_path, epochs=epochs), capsys)
    assert f"invalid --epochs {epochs}" in error
    assert "at least 1" in error
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("option, values", [("--qber", {"qber": 2.0}),
                                            ("--block-bits", {"block_bits": 10}),
                                            ("--pair-rate", {"pair_rate": 0.0}),
                                            ("--seed", {"seed": -1})])
def test_invalid_value_names_option(tmp_path, capsys, option, values):
    error = run_rejected(simulate_args(tmp_path, **values), capsys)
    assert f"invalid value for {option}: expected " in error
    assert "source." not in error
    assert "minimal_block_size" not in error


@pytest.mark.parametrize("timeout", [0.0, -1.0])
def test_timeout_not_positive_rejected(tmp_path, capsys, timeout):
    error = run_rejected(simulate_args(tmp_path, timeout=timeout), capsys)
    assert "invalid --timeout" in error
    assert "greater than 0" in error


def test_events_file_missing(tmp_path, capsys):
    low = tmp_path / "low.out"
    low.write_bytes(bytes(16))
    missing = tmp_path / "missing.out"
    error = run_rejected(simulate_args(tmp_path, events_high=str(missing), events_low=str(low)), capsys)
    assert f"invalid --events-high {str(missing)!r}" in error
    assert "No such file or directory" in error


def test_events_file_not_raw_events(tmp_path, capsys):
    high = tmp_path / "high.out"
    high.write_bytes(bytes(16))
    text = tmp_path / "notes.txt"
    text.write_text("not events\n")
    error = run_rejected(simulate_args(tmp_path, events_high=str(high), events_low=str(text)), capsys)
    assert f"invalid --events-low {str(text)!r}" in error
    assert "11 bytes is not a multiple of 8" in error


def test_events_file_empty_or_folder(tmp_path, capsys):
    empty = tmp_path / "empty.out"
    empty.write_bytes(b"")
    error = run_rejected(simulate_args(tmp_path, events_high=str(empty), events_low=str(empty)), capsys)
    assert "the file is empty" in error
    error = run_rejected(simulate_args(tmp_path, events_high=str(tmp_path), events_low=str(empty)), capsys)
    assert "is a folder" in error


def test_only_one_events_file(tmp_path, capsys):
    high = tmp_path / "high.out"
    high.write_bytes(bytes(16))
    error = run_rejected(simulate_args(tmp_path, events_high=str(high)), capsys)
    assert "give both --events-high and --events-low" in error


def test_workdir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    error = run_rejected(simulate_args(tmp_path, workdir=str(blocker / "work")), capsys)
    assert "cannot create the node folders in --workdir" in error
    assert "give a writable folder" in error


def test_too_few_epochs_explained(tmp_path):
    out = io.StringIO()
    status = run_simulation(simulate_args(tmp_path, epochs=2, quiet=False), out=out)
    text = out.getvalue()
    assert status == 1, text
    assert "FAIL: no final keys were released" in text
    assert "the input ended before the link measured its QBER: give more --epochs" in text


def interrupt_simulation(tmp_path, signum, *waits: str) -> tuple[int, str, str]:
    """Run `qkdserver simulate`, send signum after each stdout line that starts with one
    of waits in turn, and return its exit status, stdout and stderr."""
    environment = dict(os.environ, TMPDIR=str(tmp_path))
    command = [sys.executable, "-m", "S15qkd.cli.main", "simulate", "--epochs", "400"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=environment)
    try:
        for wait in waits:
            for line in process.stdout:
                if line.startswith(wait):
                    break
            process.send_signal(signum)
        out, error = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, out, error


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_cleans_up(tmp_path, signum):
    # Wait until the nodes run, so the signal arrives mid-run.
    status, out, error = interrupt_simulation(tmp_path, signum, "epoch ")
    assert status == 130, error
    assert "Traceback" not in error
    assert "finished (interrupted)" in out
    assert list(tmp_path.glob("qkd-simulate-*")) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_second_interrupt_ignored_while_closing(tmp_path, signum):
    # The first signal comes during key generation, so the close has staged keys to
    # settle. The second comes while the nodes close, when the low-count node reports
    # the stop of the high-count node.
    status, out, error = interrupt_simulation(tmp_path, signum, "block ",
                                              " low-count side: ONLY_COMMUNICATION")
    assert status == 130, error
    assert "Traceback" not in error
    assert "finished (interrupted)" in out
    assert list(tmp_path.glob("qkd-simulate-*")) == []


SIMULATE = [sys.executable, "-m", "S15qkd.cli.main", "simulate"]


def test_workdir_in_use_rejected(tmp_path):
    workdir = tmp_path / "work"
    first = subprocess.Popen(SIMULATE + ["--workdir", str(workdir), "--epochs", "400", "--real-time"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if "count side:" in line:  # the nodes run, so the first run has locked the folder
                break
        second = subprocess.run(SIMULATE + ["--workdir", str(workdir), "--epochs", "4"],
                                capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    assert second.stdout == ""
    assert (f"qkdserver simulate: --workdir {str(workdir)!r} is in use by process {first.pid} "
            in second.stderr)
    assert "give each simulation its own --workdir" in second.stderr


def test_workdir_of_earlier_run_rejected(tmp_path):
    workdir = tmp_path / "work"
    (workdir / "high" / "keys").mkdir(parents=True)
    (workdir / "high" / "keys" / "00004f89").write_bytes(bytes(20))
    result = subprocess.run(SIMULATE + ["--workdir", str(workdir), "--epochs", "4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert f"holds the state of an earlier run ({workdir / 'high'})" in result.stderr
    assert "delete its high and low folders" in result.stderr
    assert (workdir / "high" / "keys" / "00004f89").exists()


def test_workdir_with_certificates_only_runs(tmp_path, capsys):
    # Certificates of an earlier run are reused, so they do not count as its state.
    workdir = tmp_path / "work"
    from S15qkd.channel.tls import create_node_certificate

    for name in ("high", "low"):
        create_node_certificate(workdir / "certs", name)
    out = io.StringIO()
    assert run_simulation(simulate_args(tmp_path, workdir=str(workdir)), out=out) == 0, out.getvalue()
