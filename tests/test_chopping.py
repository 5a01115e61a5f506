"""Chopping: golden byte-identity through the command-line tools and the Python API,
epoch-file readers and writers, and bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qkd_core

from conftest import SIMULATED_CASES, golden_case

REAL_SMALL = ["c1234", "c14", "c1234_flushed", "c14_flushed"]


def _tool(name: str) -> list[str]:
    """Command line of an installed tool, falling back to its module."""
    exe = shutil.which(name)
    if exe:
        return [exe]
    module = {"qkd-chopper": "chopper", "qkd-chopper2": "chopper2",
              "qkd-decompress": "decompress"}[name]
    return [sys.executable, "-m", f"S15qkd.cli.{module}"]


def _golden_inputs(case: str) -> tuple[Path, Path, Path, str, str]:
    """(low-count input, high-count input, expected folder, chopper log, chopper2 log)."""
    if case in SIMULATED_CASES:
        root = golden_case(case)
        return (root / "events/events.lec.out", root / "events/events.hec.out", root,
                "chopper.lec.log", "chopper2.hec.log")
    root = golden_case("real-small")
    raw = root / "raw" / f"{case}.raw"
    return raw, raw, root / case, "chopper.log", "chopper2.log"


def _files(folder: Path) -> dict[str, bytes]:
    if not folder.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _assert_same_folder(ours: Path, expected: Path) -> None:
    a, b = _files(ours), _files(expected)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name] == b[name], f"{ours / name} differs from {expected / name}"


ALL_CASES = SIMULATED_CASES + REAL_SMALL


@pytest.mark.parametrize("case", ALL_CASES)
def test_chopper_cli_matches_golden(case, tmp_path):
    lec, _, expected, log_name, _ = _golden_inputs(case)
    (tmp_path / "t2").mkdir()
    (tmp_path / "t3").mkdir()
    log = tmp_path / "chopper.log"
    result = subprocess.run(
        _tool("qkd-chopper") + ["-i", str(lec), "-D", str(tmp_path / "t2"), "-d",
                                str(tmp_path / "t3"), "-l", str(log), "-V", "3"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert log.read_text() == (expected / log_name).read_text()
    _assert_same_folder(tmp_path / "t2", expected / "t2")
    _assert_same_folder(tmp_path / "t3", expected / "t3")


@pytest.mark.parametrize("case", ALL_CASES)
def test_chopper2_cli_matches_golden(case, tmp_path):
    _, hec, expected, _, log_name = _golden_inputs(case)
    (tmp_path / "t1").mkdir()
    log = tmp_path / "chopper2.log"
    result = subprocess.run(
        _tool("qkd-chopper2") + ["-i", str(hec), "-D", str(tmp_path / "t1"), "-l", str(log),
                                 "-V", "3"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == (expected / "chopper2.stderr").read_text()
    assert log.read_text() == (expected / log_name).read_text()
    _assert_same_folder(tmp_path / "t1", expected / "t1")


def test_cli_folder_names_with_spaces_are_used_whole(tmp_path):
    # The reference cut names at the first space; ours must write into the named folder.
    lec, hec, expected, log_name, log2_name = _golden_inputs("tiny")
    t1, t2, t3 = (tmp_path / f"run 1/t{k} files" for k in (1, 2, 3))
    for folder in (t1, t2, t3):
        folder.mkdir(parents=True)
    (tmp_path / "run").mkdir()
    chopper = subprocess.run(
        _tool("qkd-chopper") + ["-i", str(lec), "-D", str(t2), "-d", str(t3), "-V", "3"],
        capture_output=True, text=True,
    )
    assert chopper.returncode == 0, chopper.stderr
    assert chopper.stdout == (expected / log_name).read_text()
    chopper2 = subprocess.run(
        _tool("qkd-chopper2") + ["-i", str(hec), "-D", str(t1), "-V", "3"],
        capture_output=True, text=True,
    )
    assert chopper2.returncode == 0, chopper2.stderr
    assert chopper2.stdout == (expected / log2_name).read_text()
    _assert_same_folder(t1, expected / "t1")
    _assert_same_folder(t2, expected / "t2")
    _assert_same_folder(t3, expected / "t3")
    # Nothing went to the folder that a cut name would have meant.
    assert list((tmp_path / "run").iterdir()) == []


def test_cli_folder_name_extra_words_fail(tmp_path):
    _, hec, _, _, _ = _golden_inputs("tiny")
    (tmp_path / "t1").mkdir()
    wrong = f"{tmp_path / 't1'} extra"
    result = subprocess.run(_tool("qkd-chopper2") + ["-i", str(hec), "-D", wrong],
                            capture_output=True, text=True)
    assert result.returncode == 245
    assert f"type-1 folder {wrong} does not exist" in result.stderr
    assert list((tmp_path / "t1").iterdir()) == []


@pytest.mark.parametrize("case", ALL_CASES)
def test_python_api_matches_golden(case, tmp_path):
    lec, hec, expected, log_name, log2_name = _golden_inputs(case)
    for sub in ("t1", "t2", "t3"):
        (tmp_path / sub).mkdir()
    chopper = qkd_core.Chopper(tmp_path / "t2", tmp_path / "t3", verbosity=3)
    chopper2 = qkd_core.Chopper2(tmp_path / "t1", verbosity=3)
    # Times and patterns as numpy arrays, in batches that split epochs.
    lec_times, lec_patterns = qkd_core.decode_raw_events(lec.read_bytes())
    hec_words = np.frombuffer(hec.read_bytes(), dtype="<u4").reshape(-1, 2).astype(np.uint64)
    hec_words = (hec_words[:, 0] << np.uint64(32)) | hec_words[:, 1]
    log, log2 = [], []
    for start in range(0, len(lec_times), 77_777):
        stop = start + 77_777
        log += [s["log_line"] for s in chopper.feed(lec_times[start:stop],
                                                    lec_patterns[start:stop])]
    for start in range(0, len(hec_words), 100_003):
        log2 += [s["log_line"] for s in chopper2.feed_words(hec_words[start:start + 100_003])]
    assert "".join(log) == (expected / log_name).read_text()
    assert "".join(log2) == (expected / log2_name).read_text()
    # The open epoch grows in a hidden temporary file until the chopper is closed.
    del chopper, chopper2
    _assert_same_folder(tmp_path / "t1", expected / "t1")
    _assert_same_folder(tmp_path / "t2", expected / "t2")
    _assert_same_folder(tmp_path / "t3", expected / "t3")


def test_feed_batch_sizes_match_one_feed(tmp_path):
    """Both choppers keep their event-word buffer between feed calls; a short batch after
    a long one must not see the long one's leftover words."""
    lec, hec, _, _, _ = _golden_inputs("realistic")
    sizes = [100_000, 7, 50_001, 1, 30_000]
    outputs = {}
    for name, cuts in (("whole", [None]), ("batches", sizes)):
        out = tmp_path / name
        for sub in ("t1", "t2", "t3"):
            (out / sub).mkdir(parents=True)
        chopper = qkd_core.Chopper(out / "t2", out / "t3", verbosity=0, now=0)
        chopper2 = qkd_core.Chopper2(out / "t1", verbosity=0, now=0)
        for events, target in ((lec, chopper), (hec, chopper2)):
            times, patterns = qkd_core.decode_raw_events(events.read_bytes())
            start = 0
            for size in cuts:
                stop = len(times) if size is None else start + size
                target.feed(times[start:stop], patterns[start:stop])
                start = stop
            if start < len(times):
                target.feed(times[start:], patterns[start:])
        del chopper, chopper2, target  # dropping both writes the open epochs
        outputs[name] = {sub: _files(out / sub) for sub in ("t1", "t2", "t3")}
    assert all(outputs["whole"][sub] for sub in ("t1", "t2", "t3"))
    assert outputs["batches"] == outputs["whole"]


@pytest.mark.parametrize("case,epoch", [("c1234_flushed", "0001fa84"),
                                        ("c14_flushed", "0001db5c")])
def test_decompress_cli_matches_golden(case, epoch):
    folder = golden_case("real-small") / case
    result = subprocess.run(_tool("qkd-decompress") + [str(folder / "t2" / epoch)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ours = [line for line in result.stdout.splitlines() if not line.startswith("original buffer:")]
    expected = (folder / f"t2_{epoch}.decompress.txt").read_text().splitlines()
    assert ours == expected


def test_decompress_cli_rejects_a_device():
    # /dev/zero has no end, so reading it whole would never finish.
    result = subprocess.run(_tool("qkd-decompress") + ["/dev/zero"], capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 1
    assert "/dev/zero is not a regular file" in result.stderr


def test_readers_agree_with_golden_events():
    root = golden_case("tiny")
    header, times, patterns = qkd_core.read_type1(root / "t1" / "00004f87")
    assert header["epoch"] == 0x4F87
    assert header["length"] == len(times)
    assert times.dtype == np.uint64
    assert patterns.dtype == np.uint8
    assert np.all(times >> np.uint64(32) == 0x4F87)
    assert np.all(np.diff(times.astype(np.int64)) >= 0)
    header2, times2, values2 = qkd_core.read_type2(root / "t2" / "00004f87")
    header3, values3 = qkd_core.read_type3(root / "t3" / "00004f87")
    assert header2["length"] == header3["length"] == len(times2) == len(values3)
    assert (header2["time_order"], header2["base_bits"], header2["protocol"]) == (17, 1, 1)
    assert values2.dtype == values3.dtype == np.uint8
    # The tiny case has no loss and an offset of 1 ns, so both sides see the same events.
    assert abs(int(times2[0]) - int(times[0])) <= 16


# --- round trips and writers, on data generated here --------------------------------


def _epoch_events(rng, epoch: int, n: int) -> np.ndarray:
    offsets = np.unique(rng.integers(2, 1 << 32, size=n, dtype=np.uint64))
    return (np.uint64(epoch) << np.uint64(32)) | offsets


def test_type2_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    times = _epoch_events(rng, 0x1234, 5000)
    # Force escapes: a few gaps longer than 2**17 ticks, and neighbours 2 ticks apart.
    times = np.unique(np.concatenate([times, times[:50] + np.uint64(2)]))
    keep = np.concatenate([[True], np.diff(times) >= 2])
    times = times[keep]
    values = rng.integers(0, 2, size=len(times), dtype=np.uint8)
    path = tmp_path / "00001234"
    qkd_core.write_type2(path, 0x1234, times, values, time_order=17, protocol=1)
    header, back, back_values = qkd_core.read_type2(path)
    assert header["length"] == len(times)
    np.testing.assert_array_equal(back, times)
    np.testing.assert_array_equal(back_values, values)


def test_type1_and_type3_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    times = np.sort(_epoch_events(rng, 0x77, 1000))
    words = (times << np.uint64(15)) | rng.integers(0, 1 << 15, size=len(times)).astype(np.uint64)
    qkd_core.write_type1(tmp_path / "00000077", 0x77, words)
    header, back = qkd_core.read_type1_words(tmp_path / "00000077")
    np.testing.assert_array_equal(back, words)
    values = rng.integers(0, 16, size=333, dtype=np.uint8)
    qkd_core.write_type3(tmp_path / "t3", 0x77, values, 4, extended=True)
    header, back = qkd_core.read_type3(tmp_path / "t3")
    assert header["tag"] == 0x103
    np.testing.assert_array_equal(back, values)


def test_chopper_output_decodes_to_input(tmp_path):
    """chopper's type-2 files decode to the accepted input times (no 1-tick steps here)."""
    rng = np.random.default_rng(9)
    times = np.concatenate([_epoch_events(rng, e, 20_000) for e in (0x100, 0x101, 0x102)])
    times = times[np.concatenate([[True], np.diff(times) >= 2])]
    patterns = rng.choice(np.array([1, 2, 4, 8], dtype=np.uint8), size=len(times))
    (tmp_path / "t2").mkdir()
    (tmp_path / "t3").mkdir()
    chopper = qkd_core.Chopper(tmp_path / "t2", tmp_path / "t3", protocol=0, servo_filter=5)
    written = chopper.feed(times, patterns) + [chopper.flush()]
    assert [s["epoch"] for s in written] == [0x100, 0x101, 0x102]
    decoded, values = [], []
    for s in written:
        _, t, v = qkd_core.read_type2(tmp_path / "t2" / s["name"])
        _, v3 = qkd_core.read_type3(tmp_path / "t3" / s["name"])
        np.testing.assert_array_equal(v, v3)
        decoded.append(t)
        values.append(v)
    np.testing.assert_array_equal(np.concatenate(decoded), times)
    np.testing.assert_array_equal(np.concatenate(values), patterns)


def test_extended_epoch_uses_injected_clock(tmp_path):
    now = 1_767_225_600
    host = (now * 1_953_125) >> 20
    chopper2 = qkd_core.Chopper2(tmp_path, extended=True, now=now, verbosity=0)
    local = host & 0x1FFFF
    times = np.array([(local << 32) | 5, ((local + 1) << 32) | 5], dtype=np.uint64)
    written = chopper2.feed(times, np.array([1, 1], dtype=np.uint8))
    assert written[0]["epoch"] == host
    assert written[0]["log_line"] == f"{host:08x}\n"
    header, _, _ = qkd_core.read_type1(tmp_path / f"{host:08x}")
    assert header["tag"] == 0x101


def test_cli_extended_epochs_and_servo(tmp_path):
    """The server's option set runs (-U -Q 5 -F -y -m -V 4) and writes tagged files."""
    rng = np.random.default_rng(10)
    times = np.concatenate([_epoch_events(rng, e, 3000) for e in range(0x10, 0x16)])
    data = qkd_core.encode_raw_events(times, np.full(len(times), 4, dtype=np.uint8))
    raw = tmp_path / "raw"
    raw.write_bytes(data)
    for sub in ("t2", "t3"):
        (tmp_path / sub).mkdir()
    log = tmp_path / "log"
    result = subprocess.run(
        _tool("qkd-chopper") + ["-i", str(raw), "-D", str(tmp_path / "t2"), "-d",
                                str(tmp_path / "t3"), "-l", str(log), "-V", "4", "-U",
                                "-p", "1", "-Q", "5", "-F", "-y", "1", "-m", "2000000"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 5
    fields = lines[0].split("\t")
    assert len(fields) == 6
    assert int(fields[1]) == int(fields[4])  # pattern 4 is detector 3
    header, _, _ = qkd_core.read_type2(tmp_path / "t2" / fields[0])
    assert header["tag"] == 0x102
    # -y 1 discarded the first read: 1024 events of epoch 0x10.
    assert header["length"] == 3000 - 1024


# --- bad input ----------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("reader", [qkd_core.read_type1, qkd_core.read_type2,
                                    qkd_core.read_type3])
def test_readers_reject_short_files(reader, tmp_path):
    with pytest.raises(qkd_core.FormatError, match="shorter than"):
        reader(_write(tmp_path / "x", b"\x01\x00\x00"))


def test_readers_reject_wrong_tags(tmp_path):
    t2 = tmp_path / "t2"
    qkd_core.write_type2(t2, 5, np.array([(5 << 32) | 9], dtype=np.uint64),
                         np.array([1], dtype=np.uint8))
    with pytest.raises(qkd_core.FormatError, match="not a type-1"):
        qkd_core.read_type1(t2)
    with pytest.raises(qkd_core.FormatError, match="not a type-3"):
        qkd_core.read_type3(t2)


def test_readers_reject_truncated_files(tmp_path):
    rng = np.random.default_rng(11)
    times = np.sort(_epoch_events(rng, 3, 100))
    qkd_core.write_type1(tmp_path / "t1", 3, times << np.uint64(15))
    data = (tmp_path / "t1").read_bytes()
    with pytest.raises(qkd_core.FormatError, match="truncated"):
        qkd_core.read_type1(_write(tmp_path / "cut1", data[:-12]))
    qkd_core.write_type2(tmp_path / "t2", 3, times, np.zeros(len(times), dtype=np.uint8))
    data = (tmp_path / "t2").read_bytes()
    with pytest.raises(qkd_core.FormatError, match="truncated"):
        qkd_core.read_type2(_write(tmp_path / "cut2", data[:-8]))
    qkd_core.write_type3(tmp_path / "t3", 3, np.ones(100, dtype=np.uint8), 1)
    data = (tmp_path / "t3").read_bytes()
    with pytest.raises(qkd_core.FormatError, match="needs 16 data bytes"):
        qkd_core.read_type3(_write(tmp_path / "cut3", data[:-4]))


def test_readers_reject_impossible_headers(tmp_path):
    qkd_core.write_type2(tmp_path / "t2", 3, np.array([(3 << 32) | 9], dtype=np.uint64),
                         np.array([1], dtype=np.uint8))
    data = bytearray((tmp_path / "t2").read_bytes())
    data[12] = 40  # time order 40 bits
    with pytest.raises(qkd_core.FormatError, match="cannot be decoded"):
        qkd_core.read_type2(_write(tmp_path / "bad2", bytes(data)))
    data = bytearray(16)
    data[0], data[8], data[12] = 3, 1, 99
    with pytest.raises(qkd_core.FormatError, match="99 bits per entry"):
        qkd_core.read_type3(_write(tmp_path / "bad3", bytes(data)))


def test_missing_file_is_oserror(tmp_path):
    with pytest.raises(OSError, match="missing"):
        qkd_core.read_type2(tmp_path / "missing")


def test_wrong_dtypes_are_type_errors(tmp_path):
    chopper2 = qkd_core.Chopper2(tmp_path)
    with pytest.raises(TypeError, match="dtype uint64, got a 1-D array of dtype float64"):
        chopper2.feed(np.zeros(3), np.zeros(3, dtype=np.uint8))
    with pytest.raises(TypeError, match="patterns must be a 1-D numpy array of dtype uint8"):
        chopper2.feed(np.zeros(3, dtype=np.uint64), np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="differ in length"):
        chopper2.feed(np.zeros(3, dtype=np.uint64), np.zeros(2, dtype=np.uint8))
    with pytest.raises(ValueError, match="above 15"):
        chopper2.feed(np.zeros(1, dtype=np.uint64), np.array([16], dtype=np.uint8))


def test_truncated_event_bytes_are_rejected(tmp_path):
    chopper2 = qkd_core.Chopper2(tmp_path)
    with pytest.raises(qkd_core.FormatError, match="got 12 bytes"):
        chopper2.feed_bytes(b"\x00" * 12)


def test_bad_options_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="protocol 7"):
        qkd_core.Chopper(tmp_path, tmp_path, protocol=7)
    with pytest.raises(ValueError, match="time order 3"):
        qkd_core.Chopper(tmp_path, tmp_path, time_order=3)
    with pytest.raises(ValueError, match="no t3 destination"):
        qkd_core.Chopper(tmp_path)
    with pytest.raises(qkd_core.FormatError, match="not an existing folder"):
        qkd_core.Chopper2(tmp_path / "missing")


def test_epoch_jumps_raise_and_stop(tmp_path):
    chopper2 = qkd_core.Chopper2(tmp_path)
    times = np.array([(10 << 32) | 5] + [(12 << 32) | i for i in range(1, 7)], dtype=np.uint64)
    with pytest.raises(qkd_core.ChopError, match="epoch 0000000a to epoch 0000000c"):
        chopper2.feed(times, np.ones(len(times), dtype=np.uint8))
    with pytest.raises(qkd_core.ChopError, match="create a new one"):
        chopper2.flush()


def test_non_monotonic_events_are_counted(tmp_path):
    (tmp_path / "t2").mkdir()
    (tmp_path / "t3").mkdir()
    chopper = qkd_core.Chopper(tmp_path / "t2", tmp_path / "t3")
    times = np.array([(4 << 32) | 100, (4 << 32) | 50, (4 << 32) | 100, (4 << 32) | 200],
                     dtype=np.uint64)
    chopper.feed(times, np.ones(4, dtype=np.uint8))
    stats = chopper.stats
    assert stats["dropped_backward"] == 1
    assert stats["dropped_not_after_previous"] == 1
    assert chopper.flush()["events"] == 2


def test_all_zero_events_write_nothing(tmp_path):
    """Zero words sit at offset 0 of epoch 0, which no epoch file can carry."""
    (tmp_path / "t2").mkdir()
    (tmp_path / "t3").mkdir()
    raw = _write(tmp_path / "zeros", bytes(8 * 5000))
    result = subprocess.run(
        _tool("qkd-chopper") + ["-i", str(raw), "-D", str(tmp_path / "t2"), "-d",
                                str(tmp_path / "t3"), "-V", "3", "--flush"],
        capture_output=True, text=True,
    )
    assert result.returncode == 3, result.stderr
    assert "all 5000 input events are zero words" in result.stderr
    assert list((tmp_path / "t2").iterdir()) == []


def test_unwritable_output_folder_fails_cleanly(tmp_path):
    (tmp_path / "t2").mkdir()
    raw = _write(tmp_path / "raw", qkd_core.encode_raw_events(
        np.array([(4 << 32) | 9, (5 << 32) | 9], dtype=np.uint64), np.ones(2, dtype=np.uint8)))
    result = subprocess.run(
        _tool("qkd-chopper") + ["-i", str(raw), "-D", str(tmp_path / "t2"), "-d",
                                str(tmp_path / "missing")],
        capture_output=True, text=True,
    )
    assert result.returncode == 245
    assert "missing does not exist" in result.stderr
    assert list((tmp_path / "t2").iterdir()) == []
    # A folder that disappears while running: the type-2 file of the pair is removed.
    (tmp_path / "t3").mkdir()
    chopper = qkd_core.Chopper(tmp_path / "t2", tmp_path / "t3")
    os.rmdir(tmp_path / "t3")
    with pytest.raises(OSError, match="t3"):
        chopper.feed(np.array([(4 << 32) | 9, (5 << 32) | 9], dtype=np.uint64),
                     np.ones(2, dtype=np.uint8))
    assert list((tmp_path / "t2").iterdir()) == []


def test_cli_exit_statuses(tmp_path):
    chopper = _tool("qkd-chopper")
    cases = [
        (["-D", str(tmp_path)], 247),  # no type-3 destination
        (["-d", str(tmp_path)], 248),  # no type-2 destination
        (["-D", str(tmp_path), "-O", "x", "-d", str(tmp_path)], 252),
        (["-D", str(tmp_path), "-d", str(tmp_path), "-p", "9"], 230),
        (["-D", str(tmp_path), "-d", str(tmp_path), "-p", "x"], 231),
        (["-D", str(tmp_path), "-d", str(tmp_path), "-q", "40"], 227),
        (["-D", str(tmp_path), "-d", str(tmp_path), "-V", "abc"], 255),
        (["-D", str(tmp_path), "-d", str(tmp_path), "-i", str(tmp_path / "none")], 244),
    ]
    for args, status in cases:
        result = subprocess.run(chopper + args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert result.returncode == status, (args, result.stderr)
        assert result.stderr.startswith("qkd-chopper: ")
    result = subprocess.run(_tool("qkd-chopper2") + ["-V", "3"], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 246
    result = subprocess.run(_tool("qkd-decompress") + [str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "none" in result.stderr


def test_sigterm_leaves_no_partial_file(tmp_path):
    """A chopper stopped while reading a FIFO exits 0 and leaves only whole files."""
    import signal
    import time

    fifo = tmp_path / "rawevents"
    os.mkfifo(fifo)
    (tmp_path / "t1").mkdir()
    proc = subprocess.Popen(_tool("qkd-chopper2") + ["-i", str(fifo), "-D", str(tmp_path / "t1"),
                                                     "-V", "1", "-F"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    times = np.array([(0x20 << 32) | 5, (0x20 << 32) | 9, (0x21 << 32) | 1], dtype=np.uint64)
    with open(fifo, "wb") as writer:
        writer.write(qkd_core.encode_raw_events(times, np.ones(3, dtype=np.uint8)))
        writer.flush()
        deadline = time.monotonic() + 30
        while not (tmp_path / "t1" / "00000020").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == "00000020\t2\n"
    assert sorted(p.name for p in (tmp_path / "t1").iterdir()) == ["00000020"]
