"""Time offset (pfind) and frequency offset search: golden cases, CLI, drift, bad input."""

from __future__ import annotations

import shlex
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import qkd_core
from S15qkd.cli import pfind as pfind_cli

from conftest import SIMULATED_CASES, golden_case


def pfind_commands(case_dir):
    """Return the argument lists of the pfind lines in a case's commands.log."""
    lines = (case_dir / "commands.log").read_text().splitlines()
    return [shlex.split(line)[1:] for line in lines if line.startswith("pfind ")]


def run_cli(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "S15qkd.cli.pfind", *args],
        cwd=cwd, capture_output=True, text=True, check=False,
    )


@pytest.mark.parametrize("name", SIMULATED_CASES)
def test_cli_output_matches_golden(name):
    case = golden_case(name)
    quiet, verbose = pfind_commands(case)
    assert "-k" not in quiet and "-K" not in quiet, "golden files must never be deleted"

    result = run_cli(quiet, case)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (case / "pfind.stdout").read_text()
    assert result.stdout == (case / "timediff.out").read_text()
    assert result.stderr == (case / "pfind.stderr").read_text()

    result = run_cli(verbose, case)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (case / "pfind_V3.stdout").read_text()
    assert result.stderr == (case / "pfind_V3.stderr").read_text()


def test_cli_folder_names_with_spaces_are_used_whole(tmp_path):
    # The reference cut folder names at the first space; ours use the whole name.
    case = golden_case("tiny")
    for name in ["t1", "t2"]:
        (tmp_path / f"{name} of run 1").symlink_to(case / name)
    quiet, _ = pfind_commands(case)
    args = [f"{a} of run 1" if a in ("t1", "t2") else a for a in quiet]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (case / "pfind.stdout").read_text()


@pytest.mark.parametrize("name", SIMULATED_CASES)
def test_find_time_offset_matches_golden(name):
    case = golden_case(name)
    args = pfind_commands(case)[0]
    start = int(args[args.index("-e") + 1], 16)
    count = int(args[args.index("-n") + 1])
    result = qkd_core.find_time_offset(
        case / "t1", case / "t2", start, count,
        buffer_order=17, fine_resolution_ns=1, coarse_resolution_ns=2048,
    )
    assert result.offset_ticks == int((case / "pfind.stdout").read_text())
    assert result.report(0) == (case / "pfind.stdout").read_text()
    assert result.diagnostic_line(start) == (case / "pfind.stderr").read_text()
    assert result.fine_snr > 6
    assert result.coarse_snr > 6


def load_events(case, side):
    data = (case / "events" / f"events.{side}.out").read_bytes()
    times, _ = qkd_core.decode_raw_events(data)
    return times


def rescale(times, origin, drift):
    """Return times stretched by (1 + drift) around origin, as uint64 ticks."""
    relative = (times.astype(np.int64) - np.int64(origin)).astype(np.float64)
    return (np.int64(origin) + np.round(relative * (1.0 + drift)).astype(np.int64)).astype(np.uint64)


# The realistic case's side L clock runs fast by 1e-9 and its offset at the start is
# 4.321 us = 34568 ticks (case.cfg and MANIFEST.md of the golden case).
GOLDEN_DRIFT = 1e-9
GOLDEN_START_OFFSET = 34568


@pytest.fixture(scope="module")
def realistic_events():
    case = golden_case("realistic")
    return load_events(case, "lec"), load_events(case, "hec")


@pytest.fixture(scope="module")
def frequency_finder():
    return qkd_core.FrequencyFinder()


@pytest.mark.parametrize("drift", [1e-8, 1e-7, 1e-6, 1e-5, -1e-6])
def test_frequency_search_recovers_drift(realistic_events, frequency_finder, drift):
    low, high = realistic_events
    origin = max(int(low[0]), int(high[0]))
    drifted = rescale(high, origin, drift)

    result = frequency_finder.find(low, drifted)

    expected = (1.0 + GOLDEN_DRIFT) / (1.0 + drift) - 1.0
    assert result.origin_ticks == origin
    assert abs(result.relative_frequency - expected) < 2e-9, result
    # 16 ticks = 2 ns, the coincidence half-window the golden costream runs use.
    assert abs(result.offset_ticks - GOLDEN_START_OFFSET) < 16, result
    assert result.significance > 6


def test_find_frequency_offset_reads_golden_folders():
    case = golden_case("realistic")
    result = qkd_core.find_frequency_offset(case / "t1", case / "t2", 0x4F87, 5)
    offset, frequency, significance = result.as_tuple()
    assert abs(frequency - GOLDEN_DRIFT) < 2e-9, result
    # Epoch 00004f87 starts about 0.5 s into the run: 34568 ticks plus 0.5 ns of drift.
    assert abs(offset - (GOLDEN_START_OFFSET + 4)) < 16, result
    assert significance > 6


def test_corrected_stream_has_pfind_offset_back(realistic_events, frequency_finder):
    """Correcting side H by the found rate undoes a 1e-5 drift for the plain search."""
    low, high = realistic_events
    origin = max(int(low[0]), int(high[0]))
    drifted = rescale(high, origin, 1e-5)
    found = frequency_finder.find(low, drifted)

    corrector = qkd_core.FrequencyCorrector(found.relative_frequency, found.origin_ticks)
    corrected = corrector.correct_times(drifted)
    assert corrected.dtype == np.uint64

    window = slice(0, len(corrected) // 4)
    finder = qkd_core.OffsetFinder(buffer_order=17, fine_resolution_ns=1)
    plain = finder.find(corrected[window], low[low < corrected[window][-1]])
    assert abs(plain.offset_ticks - found.offset_ticks) < 24, (plain, found)
    assert plain.fine_snr > 10


def test_simulated_link_locks_at_ten_ppm():
    """The project's own simulator, independent of the golden cases: 1e-5 locks."""
    simulator = qkd_core.LinkSimulator(seed=7, pair_rate=5e4, offset_ticks=12_345, drift=1e-5)
    high, _, low, _ = simulator.next_batch(3.0)
    result = qkd_core.FrequencyFinder(buffer_order=22).find(low, high)
    # The simulator puts side L at start + offset + t * (1 + drift), side H at start + t.
    assert abs(result.relative_frequency - 1e-5) < 5e-9, result
    assert abs(result.offset_ticks - 12_345) < 16, result
    assert result.significance > 6


def test_corrector_is_independent_of_batches():
    times = np.arange(1_000_000, 9_000_000_000, 7_919, dtype=np.uint64)
    whole = qkd_core.FrequencyCorrector(-3.7e-6).correct_times(times)
    split = qkd_core.FrequencyCorrector(-3.7e-6)
    parts = [split.correct_times(times[:1001]), split.correct_times(times[1001:])]
    assert np.array_equal(whole, np.concatenate(parts))


def test_offset_finder_rejects_wrong_dtype():
    finder = qkd_core.OffsetFinder()
    with pytest.raises(TypeError):
        finder.find(np.zeros(10, dtype=np.float64), np.zeros(10, dtype=np.uint64))


def test_empty_side_raises_sync_error():
    finder = qkd_core.OffsetFinder(buffer_order=12)
    with pytest.raises(qkd_core.SyncError, match="no type-2 events"):
        finder.find(np.arange(10, dtype=np.uint64), np.zeros(0, dtype=np.uint64))


def test_invalid_options_raise_value_error():
    with pytest.raises(ValueError, match="buffer order 30"):
        qkd_core.OffsetFinder(buffer_order=30)
    with pytest.raises(ValueError, match="fine resolution 3 ns"):
        qkd_core.OffsetFinder(fine_resolution_ns=3)
    with pytest.raises(ValueError, match="relative frequency"):
        qkd_core.FrequencyCorrector(1e-3)


def write_type1(path, epoch, times):
    words = [(int(t) << 15) | 1 for t in times]
    body = b"".join(struct.pack("<II", w >> 32, w & 0xFFFFFFFF) for w in words)
    path.write_bytes(struct.pack("<iIIii", 1, epoch, len(words), 49, 4) + body + bytes(8))


def pack_type2(epoch, differences, time_order=15, base_bits=1):
    """Pack short-form type-2 entries (every difference below 2^time_order)."""
    width = time_order + base_bits
    fields = [d << base_bits for d in differences] + [1 << base_bits]
    bits = "".join(format(f, f"0{width}b") for f in fields)
    bits += "0" * (-len(bits) % 32)
    words = [int(bits[i:i + 32], 2) for i in range(0, len(bits), 32)]
    header = struct.pack("<iIIiii", 2, epoch, len(differences), time_order, base_bits, 1)
    return header + b"".join(struct.pack("<I", w) for w in words)


@pytest.fixture
def linked_folders(tmp_path):
    """One epoch of files written here: side L 4000 ticks after side H; the type-2 file
    has 16-bit entries and an odd count, so its last entry starts the final word."""
    epoch = 0x1234
    base = epoch << 32
    # Irregular spacing (2000 to 30000 ticks, short-form entries) so the correlation has
    # one peak, not one per period.
    spacing = np.random.default_rng(3).integers(2000, 30_000, size=999)
    h_times = [base + int(t) for t in np.cumsum(spacing)]
    l_times = [t + 4000 for t in h_times]
    differences = [l_times[0] - base] + [b - a for a, b in zip(l_times, l_times[1:])]
    (tmp_path / "t1").mkdir()
    (tmp_path / "t2").mkdir()
    write_type1(tmp_path / "t1" / f"{epoch:08x}", epoch, h_times)
    (tmp_path / "t2" / f"{epoch:08x}").write_bytes(pack_type2(epoch, differences))
    return tmp_path, epoch


def test_type2_last_entry_in_final_word_decodes(linked_folders):
    folder, epoch = linked_folders
    data = (folder / "t2" / f"{epoch:08x}").read_bytes()
    assert (len(data) - 24) * 8 == 16 * 1000  # the last of 999 entries starts the final word
    result = run_cli(["-D", "t1", "-d", "t2", "-e", hex(epoch), "-q", "14", "-r", "1"], folder)
    assert result.returncode == 0, result.stderr  # the reference exits with 237 here
    assert result.stdout == "4000\n"


def test_cli_accepts_server_arguments_and_deletes(linked_folders):
    folder, epoch = linked_folders
    args = ["-d", "t2", "-D", "t1", "-e", f"0x{epoch:08x}", "-n", "1", "-V", "1",
            "-q", "14", "-R", "32", "-r", "1", "", "-k -K"]
    result = run_cli(args, folder)
    assert result.returncode == 0, result.stderr
    offset, fine_snr, coarse_snr = result.stdout.split("\t")
    assert offset == "4000"
    assert float(fine_snr) > 6 and float(coarse_snr) > 6
    assert result.stderr.startswith("pfind: pos_f:")
    assert not any((folder / "t1").iterdir()), "-K deletes type-1 files"
    assert not any((folder / "t2").iterdir()), "-k deletes type-2 files"


def test_cli_appends_to_log_file(linked_folders):
    folder, epoch = linked_folders
    for _ in range(2):
        result = run_cli(["-D", "t1", "-d", "t2", "-e", str(epoch), "-q", "14", "-r", "1",
                          "-V", "7", "-l", "out.log"], folder)
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
    assert (folder / "out.log").read_text() == "Verbosity level undefined.\n" * 2


@pytest.mark.parametrize("args, status", [
    (["-D", "t1", "-d", "t2", "-e", "0x99"], 236),      # missing type-1 file
    (["-D", "t1", "-d", "nowhere", "-e", "0x1234"], 233),  # missing type-2 file
    (["-D", "t1", "-d", "t2", "-e", "0x1234", "-r", "3"], 247),  # not a power of two
    (["-D", "t1", "-d", "t2", "-e", "0x1234", "-q", "28"], 226),  # buffer order
])
def test_cli_errors_use_reference_statuses(linked_folders, args, status):
    folder, _ = linked_folders
    result = run_cli(args, folder)
    assert result.returncode == status, result.stderr
    assert result.stdout == ""
    assert "qkd-pfind:" in result.stderr


def test_cli_truncated_type1_exits_241(linked_folders):
    folder, epoch = linked_folders
    path = folder / "t1" / f"{epoch:08x}"
    path.write_bytes(path.read_bytes()[:-5])
    result = run_cli(["-D", "t1", "-d", "t2", "-e", hex(epoch), "-q", "14"], folder)
    assert result.returncode == 241, result.stderr
    assert "inconsistent" in result.stderr


def test_parse_c_integer_follows_sscanf():
    parse = pfind_cli.parse_c_integer
    assert parse("0x4f87", auto_base=True) == 0x4F87
    assert parse("017", auto_base=True) == 15
    assert parse("-123456.0", auto_base=True) == -123456
    assert parse("23abc", auto_base=False) == 23
    with pytest.raises(ValueError):
        parse("abc", auto_base=False)


def test_clean_arguments_drops_junk_like_getopt():
    cleaned = pfind_cli.clean_arguments(["", "-k -K", "-xV3", "stray", "-D", "t1"])
    assert cleaned == ["-kK", "-V", "3", "-D", "t1"]


def test_console_script_is_installed():
    assert shutil.which("qkd-pfind") is not None


@pytest.mark.parametrize("drift", [8e-5, -8e-5, 8e-6, -8e-6, 0.0])
def test_frequency_search_over_seeds(drift):
    """The search lands on the simulator's rate for every seed.

    The node's defaults (2^23 bins of 32 ns) smear the first peak at a drift of 1e-5 over
    84 bins, and the highest bin may lie anywhere on that plateau. 2^20 bins at 8 times
    the drift give the same plateau in a fraction of the time. The small offset keeps
    the later delays from hiding behind a large one.
    """
    finder = qkd_core.FrequencyFinder(buffer_order=20)
    rate_errors, offset_errors = {}, {}
    for seed in range(1, 21):
        simulator = qkd_core.LinkSimulator(seed=seed, pair_rate=2e5, qber=0.03,
                                           offset_ticks=3_000, drift=drift,
                                           transmission=(1.0, 0.2))
        high, _, low, _ = simulator.next_batch(0.35)
        result = finder.find(low, high)
        elapsed = (result.origin_ticks - qkd_core.DEFAULT_START_TICKS) % 2**49
        rate_errors[seed] = result.relative_frequency - drift
        offset_errors[seed] = result.offset_ticks - (3_000 + drift * elapsed)
    # The windows lie 0.17 s apart, so 1e-8 is 1.7 ticks. A search that stops on a misread
    # plateau is 1e-7 to 1e-5 off.
    assert max(map(abs, rate_errors.values())) < 1e-8, rate_errors
    assert max(map(abs, offset_errors.values())) < 16, offset_errors
