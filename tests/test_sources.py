"""The event sources behind S15qkd.sources: simulator, TDC1 device, file and pipe."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import qkd_core
from S15qkd.sources import DeviceSource, FileSource, PipeSource, SimulatorSource

LINK = dict(seed=17, pair_rate=5e4, qber=0.03, transmission=(1.0, 0.3), jitter_ps=100,
            dark_count_rate=100, offset_ticks=4000, start_ticks=0)


def concat(batches):
    batches = list(batches)
    return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))


def simulated_high(seconds=0.7):
    """High-count node events of about `seconds` of the test link."""
    sim = qkd_core.LinkSimulator(**LINK)
    parts = [sim.next_batch(0.1) for _ in range(int(round(seconds / 0.1)))]
    return concat([(p[0], p[1]) for p in parts])


# Simulator ---------------------------------------------------------------------------

def test_simulator_source_matches_link_simulator():
    sim = qkd_core.LinkSimulator(**LINK)
    parts = [sim.next_batch(0.1) for _ in range(5)]
    with SimulatorSource("low", batch_duration=0.1, **LINK) as source:
        got = [source.read_batch() for _ in range(5)]
    for part, batch in zip(parts, got):
        np.testing.assert_array_equal(batch[0], part[2])
        np.testing.assert_array_equal(batch[1], part[3])
    assert not source.running


def test_simulator_source_ends_at_pair_limit():
    source = SimulatorSource("high", batch_duration=0.5, pair_rate=1e3, pair_limit=1200)
    times, patterns = concat(source.start())
    assert len(times) == 1200
    assert patterns.dtype == np.uint8
    assert source.read_batch() is None


def test_simulator_source_rejects_bad_side_and_values():
    with pytest.raises(ValueError, match="qber"):
        SimulatorSource("high", qber=0.9)
    with pytest.raises(ValueError, match="invalid side"):
        SimulatorSource("middle").start()


def test_source_must_be_started():
    source = FileSource("/nonexistent")
    with pytest.raises(RuntimeError, match="not started"):
        source.read_batch()


# Files and pipes ---------------------------------------------------------------------

def test_file_source_reads_raw_and_tdc1(tmp_path):
    times, patterns = simulated_high()
    raw = tmp_path / "events.raw"
    raw.write_bytes(qkd_core.encode_raw_events(times, patterns))
    got = concat(FileSource(raw).start())
    np.testing.assert_array_equal(got[0], times)
    np.testing.assert_array_equal(got[1], patterns)

    tdc1 = tmp_path / "events.tdc1"
    two_ns = times - times % np.uint64(16)
    tdc1.write_bytes(qkd_core.encode_tdc1(two_ns, patterns))
    got = concat(FileSource(tdc1, format="tdc1", skew=(0, 0, 0, 3)).start())
    expected = qkd_core.apply_detector_skew(two_ns, patterns, (0, 0, 0, 3))
    np.testing.assert_array_equal(got[0], expected)


def test_file_source_truncated_record(tmp_path):
    path = tmp_path / "short.raw"
    path.write_bytes(bytes(8 * 5 + 3))
    source = FileSource(path).start()
    with pytest.raises(qkd_core.FormatError, match="3 bytes left over"):
        list(source)


def test_file_source_missing_file():
    with pytest.raises(OSError, match="no-such.raw"):
        FileSource("/nonexistent/no-such.raw").start()


def test_file_source_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="format"):
        FileSource(tmp_path, format="csv").start()


def test_pipe_source_reads_qkd_sim(tmp_path):
    fifo = tmp_path / "rawevents"
    os.mkfifo(fifo)
    low_file = tmp_path / "low.raw"
    source = PipeSource(fifo).start()
    writer = subprocess.Popen(
        [sys.executable, "-m", "S15qkd.cli.sim", "-s", "3", "-n", "20000", "-e", "1e5",
         "-F", str(fifo), "-f", str(low_file)],
    )
    got = []
    count = 0
    deadline = time.monotonic() + 60
    while count < 20000 and time.monotonic() < deadline:
        times, patterns = source.read_batch()
        got.append((times, patterns))
        count += len(times)
    assert writer.wait(timeout=60) == 0
    # The writer has closed the pipe; the source stays open until stopped.
    assert source.running
    assert len(source.read_batch()[0]) == 0
    source.stop()
    times, _ = concat(got)
    assert len(times) == 20000
    assert np.all(np.diff(times.astype(np.int64)) >= 0)


def test_pipe_writer_pause_logged(tmp_path, monkeypatch, caplog):
    from conftest import golden_case
    from S15qkd.stages import DeviceEvents

    caplog.set_level("INFO", logger="S15qkd")
    monkeypatch.setattr(DeviceEvents, "PIPE_IDLE_S", 0.3, raising=False)
    words = (golden_case("realistic") / "events" / "events.hec.out").read_bytes()[:8 * 2000]
    fifo = tmp_path / "rawevents"
    os.mkfifo(fifo)
    events = DeviceEvents(PipeSource(fifo), applies_skew=False, pipe=str(fifo))
    stop = threading.Event()

    def read_until(text: str) -> int:
        count = 0
        deadline = time.monotonic() + 30
        while text not in caplog.text and time.monotonic() < deadline:
            count += len(events.next_batch(stop)[0])
        assert text in caplog.text
        return count

    try:
        # Each writer opens the pipe, writes half of the events and closes it.
        with open(fifo, "wb") as writer:
            writer.write(words[:8 * 1000])
        assert read_until(f"pipe {fifo}: no events for 0.3 s") == 1000
        with open(fifo, "wb") as writer:
            writer.write(words[8 * 1000:])
        assert read_until("events arrive again") >= 1
    finally:
        events._source.stop()
    stopped = [r.getMessage() for r in caplog.records if "no events for" in r.getMessage()]
    assert len(stopped) == 1, stopped


def test_pipe_source_rejects_regular_file(tmp_path):
    path = tmp_path / "plain"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a named pipe"):
        PipeSource(path).start()


# TDC1 device on an emulated serial port ------------------------------------------------

def tdc1_stream():
    times, patterns = simulated_high()
    return qkd_core.encode_tdc1(times, patterns)


def read_until(source, count, limit_s=20):
    got, n = [], 0
    deadline = time.monotonic() + limit_s
    while n < count:
        assert time.monotonic() < deadline, f"only {n} of {count} events"
        batch = source.read_batch()
        got.append(batch)
        n += len(batch[0])
    return concat(got)


def test_device_source_streams_emulated_tdc1():
    stream = tdc1_stream()
    expected = qkd_core.decode_tdc1(stream, skew_ticks=(1, 2, 3, 4))
    emulator = qkd_core.Tdc1Emulator(stream)
    with DeviceSource(emulator.path, input_level="TTL", skew_ticks=(1, 2, 3, 4),
                      stall_timeout=1.0) as source:
        times, patterns = read_until(source, len(expected[0]))
    np.testing.assert_array_equal(times, expected[0])
    np.testing.assert_array_equal(patterns, expected[1])
    commands = emulator.commands()
    assert "TTL" in commands
    assert "counts?" in commands
    assert "status?" in commands
    emulator.stop()


def test_device_absolute_time_counts_from_unix_time():
    stream = qkd_core.encode_tdc1(np.array([16, 32], np.uint64), np.array([1, 2], np.uint8))
    emulator = qkd_core.Tdc1Emulator(stream)
    before = (time.time_ns() // 1000 * 8000) % (1 << 49)
    with DeviceSource(emulator.path, absolute_time=True) as source:
        times, _ = read_until(source, 2)
    after = (time.time_ns() // 1000 * 8000) % (1 << 49)
    assert before + 16 <= int(times[0]) <= after + 16
    assert int(times[1]) - int(times[0]) == 16
    emulator.stop()


def test_device_missing_port():
    with pytest.raises(qkd_core.DeviceError, match="not found"):
        DeviceSource("/dev/serial/by-id/usb-S-Fifteen_TDC1_absent").start()


@pytest.mark.parametrize(
    "fault, message",
    [("garbage", "corrupt or misaligned"), ("hang", "timed out"), ("unplug", "unplugged")],
)
def test_device_faults_end_source(fault, message):
    emulator = qkd_core.Tdc1Emulator(tdc1_stream(), fault=fault, fault_after_bytes=6000)
    source = DeviceSource(emulator.path, stall_timeout=0.8).start()
    started = time.monotonic()
    with pytest.raises(qkd_core.DeviceError, match=message):
        read_until(source, 10**9)
    assert time.monotonic() - started < 10
    assert not source.running
    emulator.stop()


def test_device_fifo_overflow_reported_on_stop():
    emulator = qkd_core.Tdc1Emulator(tdc1_stream(), overflow=True)
    source = DeviceSource(emulator.path).start()
    read_until(source, 100)
    with pytest.raises(qkd_core.DeviceError, match="FIFO overflow"):
        source.stop()
    emulator.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_device_permission_denied():
    emulator = qkd_core.Tdc1Emulator(b"")
    os.chmod(emulator.path, 0o600)
    # A forked child drops to user nobody and opens the root-only port; qkd_core is
    # already loaded, so the child needs no access to the interpreter's files.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        message = b"opened"
        try:
            os.setgid(65534)
            os.setuid(65534)
            qkd_core.open_tdc1(emulator.path)
        except qkd_core.DeviceError as exc:
            message = str(exc).encode()
        except BaseException as exc:  # report anything else to the parent
            message = repr(exc).encode()
        os.write(write_end, message)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    emulator.stop()
    assert "permission denied" in message, message
    assert emulator.path in message


# Straight into a chopper stage -----------------------------------------------------------

def test_pump_into_chopper2_matches_python_feed(tmp_path):
    via_rust = tmp_path / "rust"
    via_python = tmp_path / "python"
    via_rust.mkdir()
    via_python.mkdir()
    kwargs = dict(LINK, pair_rate=2e4, start_ticks=qkd_core.DEFAULT_START_TICKS)

    source = SimulatorSource("high", batch_duration=0.1, **kwargs).start()
    still_open, epochs = source.pump(qkd_core.Chopper2(via_rust), max_batches=25)
    assert still_open
    assert len(epochs) >= 3

    reference = qkd_core.Chopper2(via_python)
    python_epochs = []
    for times, patterns in SimulatorSource("high", batch_duration=0.1, **kwargs).start():
        python_epochs += reference.feed(times, patterns)
        if len(python_epochs) >= len(epochs):
            break
    for summary in epochs:
        name = summary["name"]
        assert (via_rust / name).read_bytes() == (via_python / name).read_bytes()


def test_pump_rejects_other_stages():
    source = SimulatorSource("high").start()
    with pytest.raises(TypeError, match="Chopper"):
        source.pump(object())


def test_real_time_file_source_paces_epochs():
    from conftest import golden_case
    from S15qkd.stages import EPOCH_TICKS, FileSource as NodeFileSource

    # The low-count side's recording: 12 s of events, fewer than one read chunk.
    path = golden_case("realistic") / "events" / "events.lec.out"
    source = NodeFileSource(str(path), real_time=True)
    stop = threading.Event()
    start = time.monotonic()
    first = last = None
    spans = []
    while time.monotonic() - start < 2.5:
        times, _ = source.next_batch(stop)
        if first is None:
            first = int(times[0])
        last = int(times[-1])
        spans.append(int(times[-1]) - int(times[0]))
    source._file.close()

    replayed_s = (last - first) / 8e9
    # The events of the first 2.5 s came during those 2.5 s, not all at the end.
    assert replayed_s > 1.0, replayed_s
    assert replayed_s < 3.5, replayed_s
    assert max(spans) <= EPOCH_TICKS // 4
