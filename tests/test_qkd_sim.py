"""The qkd-sim command: esim-compatible options, outputs and errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import qkd_core


def qkd_sim(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "S15qkd.cli.sim", *args],
        capture_output=True, cwd=cwd, timeout=120,
    )


def test_esim_command_line_writes_both_nodes(tmp_path):
    # The golden case `realistic` command line, with fewer pairs.
    result = qkd_sim(
        "-r", "-s", "123456789", "-t", "1587318692304817123", "-n", "2E5", "-e", "1E5",
        "-c", "1E-9", "-o", "4.321E3", "-L", "0.0", "-l", "0.8", "-m", "0.03",
        "-F", "events.hec.out", "-f", "events.lec.out", "-v", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert b"Number of HEC events" in result.stderr

    high_t, high_p = qkd_core.decode_raw_events((tmp_path / "events.hec.out").read_bytes())
    low_t, low_p = qkd_core.decode_raw_events((tmp_path / "events.lec.out").read_bytes())
    assert len(high_t) == 200_000  # lossless high-count side, no noise
    assert abs(len(low_t) - 40_000) < 5 * np.sqrt(40_000 * 0.8)
    # The reference start time puts the first events in epoch 0x4f86, and is taken to
    # the nanosecond: the first event is no earlier than the start.
    assert int(high_t[0]) >> 32 == 0x4F86
    start_ticks = (1587318692304817123 * 8) % (1 << 49)
    assert start_ticks <= int(high_t[0]) < start_ticks + 8 * 10**6
    # Offset: each low-count event sits 34568 ticks (4.321 us) after its partner, plus drift.
    # Search 100 ticks early, far less than the 10 us mean pair spacing.
    partner = np.searchsorted(high_t, low_t - np.uint64(34_568 + 100))
    partner = np.clip(partner, 0, len(high_t) - 1)
    diffs = low_t.astype(np.int64) - high_t[partner].astype(np.int64)
    assert np.count_nonzero(np.abs(diffs - 34_568) <= 40) > 0.99 * len(low_t)
    assert sorted(set(np.unique(low_p))) == [1, 2, 4, 8]
    assert not list(tmp_path.glob(".*tmp*"))


def test_duration_and_stdout(tmp_path):
    result = qkd_sim("-d", "0.2", "-e", "1e4", "-F", "-", "-f", str(tmp_path / "low.raw"))
    assert result.returncode == 0, result.stderr
    times, _ = qkd_core.decode_raw_events(result.stdout)
    assert abs(len(times) - 2000) < 5 * np.sqrt(2000)


def test_invalid_options_leave_no_output(tmp_path):
    result = qkd_sim("-n", "1000", "-m", "0.9", "-F", "h.out", "-f", "l.out", cwd=tmp_path)
    assert result.returncode == 2
    assert b"qber" in result.stderr
    assert list(tmp_path.iterdir()) == []

    result = qkd_sim("-F", "h.out", cwd=tmp_path)
    assert result.returncode == 2
    assert b"-n" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder(tmp_path):
    result = qkd_sim("-n", "100", "-F", str(tmp_path / "missing" / "h.out"))
    assert result.returncode == 2
    assert b"missing" in result.stderr


def test_start_time_parsed_to_the_nanosecond():
    from S15qkd.cli.sim import parse_nanoseconds

    assert parse_nanoseconds("1587318692304817123") == 1587318692304817123
    assert parse_nanoseconds("1.5E3") == 1500
