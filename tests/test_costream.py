"""qkd-costream and qkd-splicer against the golden cases, the stage objects, and bad input."""

from __future__ import annotations

import errno
import filecmp
import os
import shlex
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import qkd_core
from S15qkd.cli import costream as costream_cli
from S15qkd.cli import splicer as splicer_cli

COSTREAM_LOGS = ["costream.log", "costream_t1.log", "costream_t2.log", "costream_t3.log",
                 "costream_t4.log", "costream_tlog"]
SPLICER_LOGS = ["splicer.log", "splicer_t3.log", "splicer_t4.log"]


def command_args(case: Path, program: str) -> list[str]:
    """Return the arguments of the first `program` line of the case's commands.log."""
    for line in (case / "commands.log").read_text().splitlines():
        if line.startswith(program + " "):
            return shlex.split(line)[1:]
    raise AssertionError(f"no {program} line in {case / 'commands.log'}")


def prepare_run(case: Path, run: Path) -> None:
    """Link the case's inputs into `run` and create the output folders."""
    for name in ["t1", "t2", "t3"]:
        (run / name).symlink_to(case / name)
    for name in ["t4", "rawkey.hec", "rawkey.lec"]:
        (run / name).mkdir()


def same_folders(ours: Path, reference: Path) -> bool:
    comparison = filecmp.dircmp(ours, reference)
    if comparison.left_only or comparison.right_only:
        return False
    _, mismatch, errors = filecmp.cmpfiles(ours, reference, comparison.common_files, shallow=False)
    return not mismatch and not errors


def test_golden_costream_and_splicer(simulated_case, tmp_path, monkeypatch, capsys):
    prepare_run(simulated_case, tmp_path)
    monkeypatch.chdir(tmp_path)

    assert costream_cli.main(command_args(simulated_case, "costream")) == 0
    assert capsys.readouterr().err == (simulated_case / "costream.stderr").read_text()
    for name in COSTREAM_LOGS:
        assert (tmp_path / name).read_bytes() == (simulated_case / name).read_bytes(), name
    assert same_folders(tmp_path / "t4", simulated_case / "t4")
    assert same_folders(tmp_path / "rawkey.hec", simulated_case / "rawkey.hec")

    assert splicer_cli.main(command_args(simulated_case, "splicer")) == 0
    for name in SPLICER_LOGS:
        assert (tmp_path / name).read_bytes() == (simulated_case / name).read_bytes(), name
    assert same_folders(tmp_path / "rawkey.lec", simulated_case / "rawkey.lec")


def test_costream_object_matches_golden(golden_tiny):
    case = golden_tiny
    first = 0x4F87
    costream = qkd_core.Costream(first, 8, epoch_count=3, protocol=1, coincidence_window=16,
                                 tracking_window=30, track_filter=-2000000, width_filter=5,
                                 zero_policy=2)
    for k in range(4):
        costream.push_type1((case / "t1" / f"{first + k:08x}").read_bytes())
        costream.push_type2((case / "t2" / f"{first + k:08x}").read_bytes())
    closed, need, epoch = costream.advance()
    assert (need, epoch) == ("done", None)
    assert [c.epoch for c in closed] == [first, first + 1, first + 2]
    reference_lines = (case / "costream.log").read_text().splitlines(keepends=True)
    for result, line in zip(closed, reference_lines):
        assert result.log_line(5) == line
        assert "\t".join(str(v) for v in result.log_fields) == line.strip().replace(
            f"{result.epoch:08x}", str(result.epoch), 1)
        assert result.type4 == (case / "t4" / f"{result.epoch:08x}").read_bytes()
        assert result.type3 == (case / "rawkey.hec" / f"{result.epoch:08x}").read_bytes()


def test_splicer_object_matches_golden(golden_tiny):
    case = golden_tiny
    splicer = qkd_core.Splicer(1)
    name = "00004f88"
    result = splicer.splice(0x4F88, (case / "t3" / name).read_bytes(), (case / "t4" / name).read_bytes())
    assert result.type3 == (case / "rawkey.lec" / name).read_bytes()
    assert result.log_line(1) == (case / "splicer.log").read_text().splitlines(keepends=True)[1]


@pytest.fixture
def golden_tiny():
    from conftest import golden_case

    return golden_case("tiny")


@pytest.fixture
def tiny_copy(golden_tiny, tmp_path, monkeypatch):
    """A writable copy of the first six epochs of the tiny case, as the working folder."""
    for name in ["t1", "t2", "t3"]:
        (tmp_path / name).mkdir()
        for k in range(6):
            epoch = f"{0x4F87 + k:08x}"
            shutil.copy(golden_tiny / name / epoch, tmp_path / name / epoch)
    for name in ["t4", "rawkey.hec", "rawkey.lec"]:
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


SERVER_STYLE = ["-d", "t2", "-D", "t1", "-f", "rawkey.hec", "-F", "t4", "-e", "0x4f87", "-k -K",
                "-t", "8", "-p", "1", "-T", "2", "-n", "genlog", "-V", "5", "-G", "2", "-w", "16",
                "-u", "30", "-Q", "-2000000", "-R", "5", "", "-h", "50"]


def test_server_quirks_are_accepted(tiny_copy):
    assert costream_cli.main(SERVER_STYLE + ["-q", "4"]) == 0
    # "-k -K" as one argument deletes both inputs; the type-1 stream reads one file ahead.
    assert sorted(os.listdir("t2")) == ["00004f8b", "00004f8c"]
    assert sorted(os.listdir("t1")) == ["00004f8c"]
    debug = Path("costream_tlog").read_text().splitlines()
    # The space and the second dash of "-k -K" are unknown option characters.
    assert debug.count("got code I should not get: >>?<<") == 2
    assert len(Path("genlog").read_text().splitlines()) == 4


def test_folder_names_with_spaces_are_used_whole(golden_tiny, tmp_path, monkeypatch, capsys):
    # The reference cut folder names at the first space; ours use the whole name.
    prepare_run(golden_tiny, tmp_path)
    for name in ["t1", "t2", "t3", "t4", "rawkey.hec", "rawkey.lec"]:
        (tmp_path / name).rename(tmp_path / f"{name} of run 1")
    monkeypatch.chdir(tmp_path)
    spaced = {"t1", "t2", "t3", "t4", "rawkey.hec", "rawkey.lec"}

    def renamed(args):
        return [f"{a} of run 1" if a in spaced else a for a in args]

    assert costream_cli.main(renamed(command_args(golden_tiny, "costream"))) == 0
    assert splicer_cli.main(renamed(command_args(golden_tiny, "splicer"))) == 0
    capsys.readouterr()
    for name in ["t4", "rawkey.hec", "rawkey.lec"]:
        assert same_folders(tmp_path / f"{name} of run 1", golden_tiny / name), name
    assert (tmp_path / "costream.log").read_bytes() == (golden_tiny / "costream.log").read_bytes()


def test_numbers_parse_like_sscanf(tiny_copy, capsys):
    args = ["-d", "t2", "-D", "t1", "-f", "rawkey.hec", "-F", "t4", "-e", "020307", "-q", "1",
            "-t", "8.9", "-V", "1", "-n", "log"]
    # 020307 is octal for 0x20c7, an epoch with no files: costream waits for it.
    assert costream_cli.main(args + ["--wait", "0.1"]) == 225
    assert "t1/000020c7" in capsys.readouterr().err
    args[9] = "0x4f87"
    assert costream_cli.main(args) == 0
    assert Path("log").read_text().startswith("00004f87\t")


def test_negative_epoch_count_runs_to_the_end(tiny_copy, capsys):
    """-q below 0 means no epoch limit, as in the reference (it stops only for n > 0)."""
    base = ["-d", "t2", "-D", "t1", "-f", "rawkey.hec", "-F", "t4", "-e", "0x4f87", "-V", "1",
            "--wait", "0.2"]
    unlimited = costream_cli.main(base + ["-q", "0", "-n", "log0"])
    negative = costream_cli.main(base + ["-q", "-1", "-n", "log1"])
    assert negative == unlimited
    assert Path("log1").read_text() == Path("log0").read_text()
    assert "Traceback" not in capsys.readouterr().err


def test_missing_type2_times_out(tiny_copy, capsys):
    os.remove("t2/00004f89")
    args = SERVER_STYLE + ["-q", "4", "--wait", "0.2"]
    assert costream_cli.main(args) == 224
    err = capsys.readouterr().err
    assert "t2/00004f89" in err
    assert len(Path("genlog").read_text().splitlines()) == 2


def test_missing_type1_times_out(tiny_copy, capsys):
    os.remove("t1/00004f87")
    assert costream_cli.main(SERVER_STYLE + ["-q", "1", "--wait", "0.1"]) == 225
    assert "t1/00004f87" in capsys.readouterr().err


def test_truncated_type1_is_rejected(tiny_copy, capsys):
    path = Path("t1/00004f88")
    path.write_bytes(path.read_bytes()[:-12])
    assert costream_cli.main(SERVER_STYLE + ["-q", "3"]) == 213
    err = capsys.readouterr().err
    assert "type-1 file of epoch 00004f88" in err
    # Closing epoch 00004f87 needs the events of the bad file, so nothing is written.
    assert os.listdir("t4") == []


def test_truncated_type2_is_rejected(tiny_copy, capsys):
    path = Path("t2/00004f87")
    path.write_bytes(path.read_bytes()[:40])
    assert costream_cli.main(SERVER_STYLE + ["-q", "1"]) == 208
    assert "truncated" in capsys.readouterr().err
    assert os.listdir("t4") == []


def test_zero_header_lengths_are_read(tiny_copy):
    for name in ["t1/00004f87", "t1/00004f88", "t2/00004f87"]:
        data = bytearray(Path(name).read_bytes())
        data[8:12] = bytes(4)
        Path(name).write_bytes(bytes(data))
    assert costream_cli.main(SERVER_STYLE + ["-q", "1"]) == 0
    reference = qkd_reference_folder() / "t4" / "00004f87"
    assert Path("t4/00004f87").read_bytes() == reference.read_bytes()


def qkd_reference_folder() -> Path:
    from conftest import golden_case

    return golden_case("tiny")


def test_wrong_protocol_is_rejected(tiny_copy, capsys):
    args = [a if a != "1" else "0" for a in SERVER_STYLE]
    assert costream_cli.main(args + ["-q", "1"]) == 193
    assert "base bits" in capsys.readouterr().err


def test_initial_width_option_fails_like_reference(tiny_copy):
    assert costream_cli.main(SERVER_STYLE + ["-r", "9"]) == 197


@pytest.mark.parametrize("option, value, name", [
    ("-w", "0", "coincidence window (-w)"),
    ("-w", "-6", "coincidence window (-w)"),
    ("-u", "0", "tracking window (-u)"),
    ("-u", "-30", "tracking window (-u)"),
    # Windows beyond a C int are rejected while the options are parsed, see
    # test_reference_option_beyond_c_int.
])
def test_absurd_window_is_rejected_by_the_tool(tiny_copy, capsys, option, value, name):
    assert costream_cli.main(SERVER_STYLE + ["-q", "1", option, value]) == 255
    err = capsys.readouterr().err
    assert f"invalid {name}: {value} ticks is outside the accepted range" in err
    assert f"to {(1 << 32) - 1} ticks" in err
    assert "such as" in err
    # Nothing was matched or written.
    assert os.listdir("t4") == []
    assert os.listdir("rawkey.hec") == []


def test_absurd_window_is_rejected_by_the_stage():
    from S15qkd import stages

    offset = stages.OffsetResult(offset_ticks=8, snr_coarse=10.0, snr_fine=10.0)
    with pytest.raises(ValueError, match=r"invalid coincidence window \(-w\): 0 ticks .* such as 8"):
        stages.Costream(0x4F87, offset, coincidence_window=0, tracking_window=30,
                        filter_time_constant_us=200000)
    with pytest.raises(ValueError, match=r"invalid tracking window \(-u\): -1 ticks .* such as 40"):
        stages.Costream(0x4F87, offset, coincidence_window=6, tracking_window=-1,
                        filter_time_constant_us=200000)
    with pytest.raises(ValueError, match=r"accidentals distance \(-a\): 4294967296 ticks"):
        qkd_core.Costream(5, 0, accidental_distance=1 << 32)


def test_costream_object_errors_carry_status():
    costream = qkd_core.Costream(5, 0)
    with pytest.raises(qkd_core.FormatError) as info:
        costream.push_type2(b"\x02\x00\x00\x00")
    assert info.value.exit_status == 208
    with pytest.raises(ValueError, match="protocol"):
        qkd_core.Costream(5, 0, protocol=9)
    with pytest.raises(ValueError, match="zero_policy"):
        qkd_core.Costream(5, 0, zero_policy=3)


def test_splicer_missing_type4(tiny_copy, capsys):
    args = ["-d", "t3", "-D", "t4", "-f", "rawkey.lec", "-e", "0x4f87", "-q", "1", "-p", "1"]
    assert splicer_cli.main(args) == 238
    assert "type-4 file of epoch 00004f87 not found" in capsys.readouterr().err
    assert os.listdir("rawkey.lec") == []


def test_splicer_reads_command_pipe(tiny_copy):
    assert costream_cli.main(SERVER_STYLE[:10] + ["-t", "8", "-w", "16", "-u", "30", "-Q", "-2000000",
                                                  "-R", "5", "-T", "2", "-q", "2"]) == 0
    os.mkfifo("splicepipe")
    args = ["-d", "t3", "-D", "t4", "-f", "rawkey.lec", "-E", "splicepipe", "-q", "2", "-e", "0x4f87",
            "-m", "genlog", "-V", "1"]
    splicer = subprocess.Popen([sys.executable, "-m", "S15qkd.cli.splicer", *args])
    try:
        write_to_fifo("splicepipe", b"4f87\n4f88 4f89\n", timeout_s=20)
        assert splicer.wait(timeout=30) == 0
    finally:
        splicer.kill()
    assert sorted(os.listdir("rawkey.lec")) == ["00004f87", "00004f88"]
    reference = qkd_reference_folder()
    assert Path("genlog").read_text() == "".join(
        (reference / "splicer.log").read_text().splitlines(keepends=True)[:2])


def write_to_fifo(path: str, data: bytes, timeout_s: float) -> None:
    """Write to a named pipe once a reader has opened it; fail instead of blocking."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_splicer_rejects_non_fifo_pipe(tiny_copy):
    Path("plain").write_text("")
    args = ["-d", "t3", "-D", "t4", "-f", "rawkey.lec", "-E", "plain"]
    assert splicer_cli.main(args) == 215


def service_type3(entries: list[int]) -> bytes:
    """Build a service-mode raw-key file: 8-bit entries packed MSB first into LE words."""
    padded = entries + [0] * (-len(entries) % 4)
    words = [int.from_bytes(bytes(padded[i:i + 4]), "big") for i in range(0, len(padded), 4)]
    return struct.pack(f"<4I{len(words)}I", 3, 7, len(entries), 8, *words)


def test_service_qber_per_basis():
    # L=V/H=H good twice, L=V/H=V error, L=-/H=+ good, L=+/H=+ error, L pattern 3 invalid.
    result = qkd_core.service_qber(service_type3([0x14, 0x14, 0x11, 0x28, 0x88, 0x34]))
    assert result["valid"] == 5
    assert result["invalid_low"] == 1
    assert result["matrix"][0] == [1, 0, 2, 0]
    assert result["qber_hv"] == pytest.approx(1 / 3)
    assert result["qber_diagonal"] == pytest.approx(1 / 2)
    assert result["qber"] == pytest.approx(2 / 5)


def test_service_qber_rejects_bbm92_key():
    bbm92 = struct.pack("<4II", 3, 7, 4, 1, 0x60000000)
    with pytest.raises(qkd_core.FormatError, match="needs 8"):
        qkd_core.service_qber(bbm92)


def test_detector_counts_like_getrate():
    events = np.array([1, 2, 2, 3, 0, 8 | 0x10, 9, 0xF], dtype=np.uint64)
    total, counts = qkd_core.detector_counts(events)
    assert total == 7
    assert list(counts) == [1, 2, 0, 1, 1, 0, 0, 1]
    with pytest.raises(TypeError):
        qkd_core.detector_counts(events.astype(np.int64))


def dense_link_epoch(rng, epoch: int, offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch of a link at about 1e7 pairs/s (1e6 pairs, and four uncorrelated type-1
    events per pair): type-1 words, type-2 times and type-2 basis values."""
    start = epoch << 32
    pairs = np.sort(rng.integers(start + (1 << 20), start + (1 << 32) - (1 << 20), 1_000_000,
                                 dtype=np.uint64))
    pairs = np.unique(pairs)
    pairs = pairs[np.concatenate(([True], np.diff(pairs) >= 8))]
    background = rng.integers(start, start + (1 << 32), 4_000_000, dtype=np.uint64)
    high_times = np.concatenate((pairs, background))
    high_patterns = (np.uint64(1) << rng.integers(0, 4, high_times.size, dtype=np.uint64))
    order = np.argsort(high_times, kind="stable")
    high_times, high_patterns = high_times[order], high_patterns[order]
    keep = np.concatenate(([True], np.diff(high_times) > 0))
    words = (high_times[keep] << np.uint64(15)) | high_patterns[keep]
    jitter = rng.integers(-2, 3, pairs.size)
    low_times = (pairs.astype(np.int64) + offset + jitter).astype(np.uint64)
    values = rng.integers(0, 2, pairs.size, dtype=np.uint8)
    return words, low_times, values


def test_stage_holds_lock_on_dense_link(tmp_path):
    """At 1e7 pairs/s the reference's truncated servo steps let the offset walk off the
    peak. With a 60-tick tracking window the offset moved 4 ticks in the first epoch. The
    node's costream stage carries the remainders and stays on the peak."""
    from S15qkd import stages

    rng = np.random.default_rng(5)
    first, offset = 0x200, 1234
    costream = stages.Costream(first, stages.OffsetResult(offset, 10.0, 10.0),
                               coincidence_window=6, tracking_window=60,
                               filter_time_constant_us=200000)
    closed = []
    for epoch in range(first, first + 3):
        words, times, values = dense_link_epoch(rng, epoch, offset)
        qkd_core.write_type1(tmp_path / "t1", epoch, words)
        qkd_core.write_type2(tmp_path / "t2", epoch, times, values)
        costream.push_type1((tmp_path / "t1").read_bytes())
        costream.push_type2((tmp_path / "t2").read_bytes())
        closed += costream.advance()
    assert [result.epoch for result in closed] == [first, first + 1, first + 2]
    for result in closed:
        assert result.coincidences > 900_000, (hex(result.epoch), result.coincidences)
        assert abs(result.tracked_offset_ticks - offset) <= 2, hex(result.epoch)
