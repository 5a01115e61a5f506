"""Raw 64-bit timestamp events through the qkd_core Python API."""

import numpy as np
import pytest

import qkd_core
from conftest import golden_case


def test_legacy_round_trip_hand_made():
    times = np.array([0, 1, (1 << 49) - 1, 0x1234_5678_9ABC], dtype=np.uint64)
    patterns = np.array([1, 2, 4, 8], dtype=np.uint8)

    data = qkd_core.encode_raw_events(times, patterns)
    assert len(data) == 8 * len(times)
    back_times, back_patterns = qkd_core.decode_raw_events(data)

    assert back_times.dtype == np.uint64
    assert back_patterns.dtype == np.uint8
    np.testing.assert_array_equal(back_times, times)
    np.testing.assert_array_equal(back_patterns, patterns)


def test_legacy_word_order():
    # Event word 0x00000001_00008003: time 2 ticks (bits 63..15), pattern 3.
    data = bytes([1, 0, 0, 0, 3, 0x80, 0, 0])
    times, patterns = qkd_core.decode_raw_events(data, "legacy")
    assert times.tolist() == [(0x1_0000_8003) >> 15]
    assert patterns.tolist() == [3]


def test_truncated_record_is_rejected():
    with pytest.raises(qkd_core.FormatError, match="got 12 bytes"):
        qkd_core.decode_raw_events(bytes(12))


def test_wrong_dtype_is_rejected():
    times = np.zeros(3, dtype=np.float64)
    patterns = np.zeros(3, dtype=np.uint8)
    with pytest.raises(TypeError):
        qkd_core.encode_raw_events(times, patterns)


def test_unknown_serialisation_is_rejected():
    with pytest.raises(ValueError, match="invalid serialisation"):
        qkd_core.decode_raw_events(bytes(8), "big-endian")


def test_golden_events_are_time_ordered():
    events = golden_case("tiny") / "events" / "events.hec.out"
    times, patterns = qkd_core.decode_raw_events(events.read_bytes())
    assert len(times) == 50_000
    assert np.all(np.diff(times.astype(np.int64)) >= 0)
    assert set(np.unique(patterns)) <= {1, 2, 4, 8}
