"""timestamp7 recordings, the TDC1 stream and detector skews through the qkd_core API."""

import numpy as np
import pytest

import qkd_core
from conftest import golden_case

# Recording, its fpfind layout, and the raw file the reference conversion made from it.
REAL_SMALL = [
    ("timestamp7_c1234.Aa1.ts", "a1", "c1234.raw"),
    ("timestamp7_c14_rollover.Aa1fX.ts", "a1X", "c14.raw"),
    ("timestamp7_c14_rollover.Aa2f.ts", "a2", "c14.raw"),
    ("timestamp7_c14_rollover.Aa0f.ts", "a0", "c14.raw"),
]


@pytest.mark.parametrize("recording, layout, raw_name", REAL_SMALL)
def test_real_recordings_convert_to_reference_raw(recording, layout, raw_name):
    case = golden_case("real-small")
    data = (case / "input" / recording).read_bytes()
    expected = (case / "raw" / raw_name).read_bytes()
    assert qkd_core.timestamp7_to_raw(data, layout) == expected


@pytest.mark.parametrize("recording, layout, raw_name", REAL_SMALL)
def test_real_recordings_read_as_arrays(recording, layout, raw_name):
    case = golden_case("real-small")
    times, patterns = qkd_core.read_timestamp7(case / "input" / recording, layout)
    ref_times, ref_patterns = qkd_core.decode_raw_events((case / "raw" / raw_name).read_bytes())
    assert times.dtype == np.uint64
    assert patterns.dtype == np.uint8
    np.testing.assert_array_equal(times, ref_times)
    np.testing.assert_array_equal(patterns, ref_patterns)


@pytest.mark.parametrize("layout", ["a0", "a1", "a1X", "a2"])
def test_timestamp7_round_trip(layout):
    rng = np.random.default_rng(4)
    times = np.sort(rng.integers(0, 1 << 49, 1000, dtype=np.uint64))
    patterns = rng.choice(np.array([1, 2, 4, 8, 3], dtype=np.uint8), 1000)
    data = qkd_core.encode_timestamp7(times, patterns, layout)
    back_times, back_patterns = qkd_core.decode_timestamp7(data, layout)
    np.testing.assert_array_equal(back_times, times)
    np.testing.assert_array_equal(back_patterns, patterns)


def test_timestamp7_fine_skew_applies_after_short_mode():
    # One event at 10 ticks plus 31 fine ticks (bits 14..10), detector 1.
    word = (10 << 15) | (31 << 10) | 0x300 | 1
    data = word.to_bytes(8, "little")
    times, _ = qkd_core.decode_timestamp7(data, "a1", skew_fine_ticks=(33, 0, 0, 0))
    # Short mode drops the 31 fine ticks first; 33 fine ticks then add 1 tick and 1/256 ns.
    assert times.tolist() == [11]


def test_timestamp7_errors():
    with pytest.raises(qkd_core.FormatError, match="got 12 bytes"):
        qkd_core.decode_timestamp7(bytes(12), "a1")
    with pytest.raises(qkd_core.FormatError, match="line 1"):
        qkd_core.decode_timestamp7(b"not hex at all!!\n", "a2")
    with pytest.raises(ValueError, match="timestamp7 layout"):
        qkd_core.decode_timestamp7(bytes(8), "a9")
    with pytest.raises(OSError, match="no-such-file"):
        qkd_core.read_timestamp7("/nonexistent/no-such-file.ts")
    with pytest.raises(TypeError):
        qkd_core.encode_timestamp7(np.zeros(2, np.int64), np.zeros(2, np.uint8))


def test_tdc1_round_trip_with_rollovers():
    rng = np.random.default_rng(8)
    # 2 ns granularity; gaps long enough to cross several 268 ms counter periods.
    gaps = rng.integers(1, 3 * 10**9, 200, dtype=np.uint64)
    times = np.cumsum(gaps) * np.uint64(16)
    patterns = rng.choice(np.array([1, 2, 4, 8], dtype=np.uint8), 200)
    data = qkd_core.encode_tdc1(times, patterns)
    back_times, back_patterns = qkd_core.decode_tdc1(data)
    # The decoder counts from the first word's counter period.
    base = (int(times[0]) // (16 << 27)) * (16 << 27)
    np.testing.assert_array_equal(back_times, times - np.uint64(base))
    np.testing.assert_array_equal(back_patterns, patterns)
    assert back_times.dtype == np.uint64
    assert back_patterns.dtype == np.uint8


def test_tdc1_dummies_and_skew():
    words = np.array([(100 << 5) | 1, (200 << 5) | 0x10, (300 << 5) | 2], dtype="<u4")
    times, patterns = qkd_core.decode_tdc1(words.tobytes())
    assert times.tolist() == [1600, 4800]
    times, patterns = qkd_core.decode_tdc1(words.tobytes(), keep_dummies=True)
    assert patterns.tolist() == [1, 0, 2]
    times, _ = qkd_core.decode_tdc1(words.tobytes(), skew_ticks=(5, -7, 0, 0))
    assert times.tolist() == [1605, 4793]


def test_tdc1_errors():
    with pytest.raises(qkd_core.FormatError, match="got 6 bytes"):
        qkd_core.decode_tdc1(bytes(6))
    garbage = np.array([(5000 << 5) | 1, (10 << 5) | 1], dtype="<u4").tobytes()
    with pytest.raises(qkd_core.FormatError, match="corrupt or misaligned"):
        qkd_core.decode_tdc1(garbage)
    with pytest.raises(qkd_core.FormatError, match="sort the events"):
        qkd_core.encode_tdc1(np.array([32, 16], np.uint64), np.array([1, 1], np.uint8))


def test_apply_detector_skew_like_readevents():
    times = np.array([100, 100, 100, 100, 100, 0], dtype=np.uint64)
    patterns = np.array([1, 2, 4, 8, 3, 1], dtype=np.uint8)
    corrected = qkd_core.apply_detector_skew(times, patterns, (1, -2, 3, -4))
    assert corrected.dtype == np.uint64
    # Multi-detector patterns stay; a negative result wraps modulo 2^49.
    assert corrected.tolist() == [101, 98, 103, 96, 100, 1]
    wrapped = qkd_core.apply_detector_skew(times[:1] * 0, patterns[:1], (-1, 0, 0, 0))
    assert wrapped.tolist() == [(1 << 49) - 1]
    with pytest.raises(ValueError, match="differ in length"):
        qkd_core.apply_detector_skew(times, patterns[:2], (0, 0, 0, 0))
