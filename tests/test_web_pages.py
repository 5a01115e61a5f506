"""Page helpers: form values to configuration, snapshot to figures and reference JSON."""

from __future__ import annotations

import time
import pytest

pytest.importorskip("dash", reason="the web extra is not installed: pip install '.[web]'")

from S15qkd.status import (  # noqa: E402
    BlockRecord,
    CoincidenceHistogram,
    DetectorStatus,
    InMemoryNode,
    NodeCounts,
    RawKeyStatus,
    Role,
    StatusSnapshot,
    ErrorCorrectionStatus,
)
from S15qkd.web import detectors_page, settings_page, status_page  # noqa: E402
from S15qkd.web.routes import reference_status_data  # noqa: E402


@pytest.mark.parametrize("value, kind", [
    (True, "bool"), (3, "int"), (0.1, "float"), ("alice", "str"), (None, "optional"),
    ([1, 2], None), ({}, None),
])
def test_field_kind(value, kind):
    assert settings_page.field_kind(value) == kind


@pytest.mark.parametrize("kind, form_value, expected", [
    ("bool", ["on"], True),
    ("bool", [], False),
    ("bool", None, False),
    ("int", 40.0, 40),
    ("int", 40.5, 40.5),
    ("float", 0.08, 0.08),
    ("str", None, ""),
    ("str", "bob", "bob"),
    ("optional", "", None),
    ("optional", None, None),
    ("optional", "/keys/peer.crt", "/keys/peer.crt"),
])
def test_convert_value(kind, form_value, expected):
    converted = settings_page.convert_value(kind, form_value)
    assert converted == expected
    assert type(converted) is type(expected)


def test_candidate_config_keeps_unlisted_keys():
    node = InMemoryNode(config={"QBER_limit": 0.1, "hosts": ["a", "b"], "skew": {"det1corr": 0}})
    ids = [{"type": "setting", "key": "QBER_limit", "kind": "float"},
           {"type": "setting", "key": "skew.det1corr", "kind": "int"}]
    config = settings_page.candidate_config(node, ids, [0.09, 3.0])
    assert config == {"QBER_limit": 0.09, "hosts": ["a", "b"], "skew": {"det1corr": 3}}


def test_settings_layout_needs_login():
    node = InMemoryNode(config={"QBER_limit": 0.1})
    assert "Log in" in str(settings_page.layout(node, authorized=False))
    assert "QBER_limit" in str(settings_page.layout(node, authorized=True))


def blocks(count: int) -> tuple[BlockRecord, ...]:
    return tuple(
        BlockRecord(first_epoch=16 + i, num_epochs=1, raw_bits=100, qber=0.02 + 0.001 * i, leaked_bits=30,
                    efficiency=1.1, final_bits=40 + i, key_rate_bps=70.0 + i)
        for i in range(count)
    )


def test_qber_figure_numbers_blocks_and_draws_limit():
    snapshot = StatusSnapshot(time=0.0, error_correction=ErrorCorrectionStatus(
        blocks=250, qber_limit=0.11, recent_blocks=blocks(100)))
    figure = status_page.qber_figure(snapshot)
    qber, limit = figure["data"]
    assert qber["x"][0] == 151
    assert qber["x"][-1] == 250
    assert qber["y"][0] == pytest.approx(2.0)
    assert limit["y"] == pytest.approx([11.0] * 100)


def test_qber_figure_without_blocks_still_draws_limit():
    figure = status_page.qber_figure(StatusSnapshot(time=0.0))
    assert figure["data"][0]["y"] == []
    assert len(figure["data"][1]["y"]) == 2


def test_key_figure_uses_second_axis_for_rate():
    snapshot = StatusSnapshot(time=0.0, error_correction=ErrorCorrectionStatus(blocks=3, recent_blocks=blocks(3)))
    bits, rate = status_page.key_figure(snapshot)["data"]
    assert bits["y"] == [40, 41, 42]
    assert rate["y"] == [70.0, 71.0, 72.0]
    assert rate["yaxis"] == "y2"


def test_histogram_figure_centres_bins_in_ns():
    snapshot = StatusSnapshot(time=0.0, detectors=DetectorStatus(
        histogram=CoincidenceHistogram(tracked_offset_ticks=800, first_bin_ticks=-4, bin_width_ticks=4,
                                       counts=(1, 9))))
    figure, caption = detectors_page.histogram_figure(snapshot)
    assert figure["data"][0]["x"] == [-0.25, 0.25]
    assert "100.0 ns" in caption


def test_histogram_caption_names_sender():
    histogram = CoincidenceHistogram(tracked_offset_ticks=800, first_bin_ticks=-4, bin_width_ticks=4,
                                     counts=(1, 9), epoch=0x4F87, computed_by="the high-count side alice")
    snapshot = StatusSnapshot(time=0.0, detectors=DetectorStatus(histogram=histogram))
    _figure, caption = detectors_page.histogram_figure(snapshot)
    assert caption.startswith("Computed by the high-count side alice")
    assert "epoch 00004f87" in caption


def test_histogram_caption_own_histogram():
    histogram = CoincidenceHistogram(tracked_offset_ticks=8, first_bin_ticks=-1, bin_width_ticks=1,
                                     counts=(1, 9))
    snapshot = StatusSnapshot(time=0.0, detectors=DetectorStatus(histogram=histogram))
    _figure, caption = detectors_page.histogram_figure(snapshot)
    assert "Computed by" not in caption
    assert "one epoch" in caption


@pytest.mark.parametrize("role, expected", [
    (Role.LOW_COUNT, "costream runs on the high-count side"),
    (Role.HIGH_COUNT, "once costream has matched its first epoch"),
])
def test_empty_histogram_caption_by_role(role, expected):
    snapshot = StatusSnapshot(time=0.0, raw_key=RawKeyStatus(role=role))
    figure, caption = detectors_page.histogram_figure(snapshot)
    assert figure["data"] == []
    assert expected in caption


def test_counts_table_has_column_per_node():
    snapshot = StatusSnapshot(time=0.0, detectors=DetectorStatus(counts=(
        NodeCounts("alice", 5, (1, 2, 3, 4)), NodeCounts("bob", 6, (10, 20, 30, 40)))))
    table = detectors_page.counts_table(snapshot).children[0]
    header, body = table.children
    assert [cell.children for cell in header.children.children] == ["", "alice", "bob"]
    rows = [[cell.children for cell in row.children] for row in body.children]
    assert rows[0] == ["Epoch", "00000005", "00000006"]
    assert rows[1][0] == "Detector 1"
    assert rows[-1][0] == "Total"
    assert len(rows) == 6


def test_raw_key_card_shows_corrected_frequency():
    snapshot = StatusSnapshot(time=0.0, raw_key=RawKeyStatus(frequency_offset=-2.5e-6))
    rows = dict(status_page.raw_key_rows(snapshot))
    assert rows["Frequency offset (corrected)"] == "-2.5000e-06 (-2.5000 ppm)"


def test_raw_key_card_shows_skipped_epochs():
    rows = dict(status_page.raw_key_rows(StatusSnapshot(time=0.0, raw_key=RawKeyStatus(skipped_epochs=3))))
    assert rows["Skipped epochs (type-2 invalid or missing)"] == "3"


def test_raw_key_card_without_frequency_search():
    rows = dict(status_page.raw_key_rows(StatusSnapshot(time=0.0)))
    assert "Frequency offset (corrected)" not in rows


def test_reference_local_counts_use_own_node():
    snapshot = StatusSnapshot(time=0.0, identity="bob", detectors=DetectorStatus(counts=(
        NodeCounts("alice", 5, (1, 2, 3, 4)), NodeCounts("bob", 5, (10, 20, 30, 40)))))
    counts = reference_status_data(snapshot)["status_info"]["local_counts"]
    assert counts == {"total": 100, "v": 10, "-": 20, "h": 30, "+": 40}


def test_reference_local_counts_empty():
    counts = reference_status_data(StatusSnapshot(time=0.0))["status_info"]["local_counts"]
    assert counts == {"total": 0, "v": 0, "-": 0, "h": 0, "+": 0}


def test_rate_limited_warning_counts_dropped(caplog):
    from S15qkd.web.routes import RateLimitedWarning

    warn = RateLimitedWarning(interval_s=60.0)
    with caplog.at_level("WARNING", logger="S15qkd.web.routes"):
        for attempt in range(5):
            warn("rejected attempt %d", attempt)
    assert [record.getMessage() for record in caplog.records] == ["rejected attempt 0"]

    warn._last -= 61.0  # as if the interval had passed
    with caplog.at_level("WARNING", logger="S15qkd.web.routes"):
        warn("rejected attempt %d", 5)
    assert caplog.records[-1].getMessage() == "rejected attempt 5 (4 similar warnings dropped since the last one)"


def test_rate_limited_warning_logs_count_later(caplog):
    from S15qkd.web.routes import RateLimitedWarning

    warn = RateLimitedWarning(interval_s=0.3)
    with caplog.at_level("WARNING", logger="S15qkd.web.routes"):
        for attempt in range(4):
            warn("rejected attempt %d", attempt)
        time.sleep(0.8)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["rejected attempt 0",
                        "rejected attempt 1 (and 3 similar warnings in the last 0.3 s)"]
