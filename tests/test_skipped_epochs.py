"""The low-count side's splicer for epochs without events on this side.

When the chopper writes no file for an epoch (no events in it), the high-count side
skips that type-2 epoch and sends a type-4 file without entries. The splicer then gives
an empty raw key for the epoch, so the raw key epochs on both sides stay aligned.
"""

from __future__ import annotations

import queue
from types import SimpleNamespace

import numpy as np
import pytest

import qkd_core
from S15qkd.config import Config
from S15qkd.pipeline import MAX_LEAD_EPOCHS, LowPipeline
from S15qkd.stages import Splicer

EPOCH = 0x4F90


def type4_file(epoch: int, indices: list[int]) -> bytes:
    """Encode a BBM92 type-4 file (no data bits) with an 8-bit index field.

    A file with one entry at index 0 codes the value 2 and then the end entry 1.
    """
    assert indices in ([], [0]), "this helper encodes no entry or one entry at index 0"
    header = np.array([4, epoch, len(indices), 8, 0], dtype="<u4").tobytes()
    word = 0x0201_0000 if indices else 0x0100_0000
    return header + word.to_bytes(4, "little")


def low_pipeline(tmp_path) -> LowPipeline:
    config = Config({"QBER_limit": 0.11, "servo_blocks": 5, "default_QBER": 0.05})
    node = SimpleNamespace(
        config=config, data_root=tmp_path, watchdog=SimpleNamespace(adopt=lambda worker: None),
        stats=SimpleNamespace(service_qber=None), send_control=lambda message: None,
        progress=lambda *args, **fields: None)
    return LowPipeline(node, run=1)


def raw_keys(pipeline: LowPipeline) -> list[tuple[int, np.ndarray]]:
    items = []
    while True:
        try:
            kind, epoch, bits = pipeline.ec_worker.queue.get_nowait()
        except queue.Empty:
            return items
        assert kind == "raw_key"
        items.append((epoch, bits))


def test_splice_without_type3_gives_empty_key(tmp_path, caplog):
    caplog.set_level("INFO", logger="S15qkd")
    pipeline = low_pipeline(tmp_path)
    # The chopper wrote epoch EPOCH + 1 but none for EPOCH.
    pipeline.splice(("t3", EPOCH + 1, None))
    pipeline.splice(("t4", EPOCH, type4_file(EPOCH, [])))

    keys = raw_keys(pipeline)
    assert len(keys) == 1
    assert keys[0][0] == EPOCH
    assert len(keys[0][1]) == 0
    assert f"epoch {EPOCH:08x} has no events on this side" in caplog.text
    assert EPOCH not in pipeline.t4
    assert EPOCH + 1 in pipeline.t3


def test_splice_waits_while_type3_may_come(tmp_path):
    pipeline = low_pipeline(tmp_path)
    # No later type-3 epoch yet: the chopper may still write EPOCH.
    pipeline.splice(("t4", EPOCH, type4_file(EPOCH, [])))
    assert raw_keys(pipeline) == []
    assert EPOCH in pipeline.t4


def test_splice_kept_events_without_type3_dropped(tmp_path, caplog):
    pipeline = low_pipeline(tmp_path)
    pipeline.splice(("t3", EPOCH + 1, None))
    pipeline.splice(("t4", EPOCH, type4_file(EPOCH, [0])))

    assert raw_keys(pipeline) == []
    assert EPOCH not in pipeline.t4
    assert f"type-4 file of epoch {EPOCH:08x} dropped: this side has no events" in caplog.text


def test_splice_keeps_type3_until_passed(tmp_path):
    pipeline = low_pipeline(tmp_path)
    # The chopper runs far ahead of the peer, as in simulate without --real-time: the
    # type-3 file of EPOCH stays until the peer's type-4 file for it arrives.
    (pipeline.folders["t3"] / f"{EPOCH:08x}").write_bytes(b"\x03")
    pipeline.splice(("t3", EPOCH, None))
    pipeline.splice(("t3", EPOCH + 4 * MAX_LEAD_EPOCHS, None))
    assert (pipeline.folders["t3"] / f"{EPOCH:08x}").exists()
    assert EPOCH in pipeline.t3


def test_splice_passed_type3_removed(tmp_path, caplog):
    pipeline = low_pipeline(tmp_path)
    (pipeline.folders["t3"] / f"{EPOCH:08x}").write_bytes(b"\x03")
    (pipeline.folders["t3"] / f"{EPOCH + 1:08x}").write_bytes(b"\x03")
    pipeline.splice(("t3", EPOCH, None))
    pipeline.splice(("t3", EPOCH + 1, None))
    pipeline.splice(("passed", EPOCH + 1, None))
    assert not (pipeline.folders["t3"] / f"{EPOCH:08x}").exists()
    assert (pipeline.folders["t3"] / f"{EPOCH + 1:08x}").exists()
    assert pipeline.t3 == {EPOCH + 1}

    # A type-4 file for a passed epoch contradicts the peer's report: dropped, no raw key.
    pipeline.splice(("t4", EPOCH, type4_file(EPOCH, [0])))
    assert raw_keys(pipeline) == []
    assert EPOCH not in pipeline.t4
    assert "ERROR" not in [record.levelname for record in caplog.records]
    assert (f"type-4 file of epoch {EPOCH:08x} dropped: this side removed the type-3 files "
            f"up to epoch {EPOCH:08x} unmatched, because the peer reported that it passed "
            f"epoch {EPOCH + 1:08x}") in caplog.text
    assert [record.levelname for record in caplog.records] == ["WARNING"]

    # A type-3 epoch the chopper writes after the peer passed it is removed at once, and
    # the next dropped type-4 file is logged at INFO.
    caplog.clear()
    caplog.set_level("INFO", logger="S15qkd")
    (pipeline.folders["t3"] / f"{EPOCH - 1:08x}").write_bytes(b"\x03")
    pipeline.splice(("t3", EPOCH - 1, None))
    assert not (pipeline.folders["t3"] / f"{EPOCH - 1:08x}").exists()
    pipeline.splice(("t4", EPOCH - 1, type4_file(EPOCH - 1, [0])))
    assert raw_keys(pipeline) == []
    removed = [record for record in caplog.records if "removed the type-3" in record.message]
    assert [record.levelname for record in removed] == ["INFO"]


def test_splice_releases_kept_epochs(tmp_path):
    pipeline = low_pipeline(tmp_path)
    for epoch in (EPOCH, EPOCH + 1, EPOCH + 2):
        pipeline.pacer.keep(epoch)   # as the chopper does for each type-3 file
        pipeline.splice(("t3", epoch, None))
    pipeline.splice(("passed", EPOCH + 1, None))
    assert pipeline.pacer.oldest_kept() == EPOCH + 1


def test_splice_invalid_type3_dropped(tmp_path, caplog):
    pipeline = low_pipeline(tmp_path)
    # Tag 3, then zeros: a header of another epoch with 0 bits per entry.
    (pipeline.folders["t3"] / f"{EPOCH:08x}").write_bytes(b"\x03" + bytes(20))
    pipeline.splice(("t3", EPOCH, None))
    pipeline.splice(("t4", EPOCH, type4_file(EPOCH, [0])))

    assert raw_keys(pipeline) == []
    assert EPOCH not in pipeline.t3
    assert EPOCH not in pipeline.t4
    assert not (pipeline.folders["t3"] / f"{EPOCH:08x}").exists()
    assert (f"epoch {EPOCH:08x} dropped, no raw key from it: invalid type-3 file of epoch "
            f"{EPOCH:08x}") in caplog.text

    # The next epoch is spliced as usual.
    pipeline.splice(("t3", EPOCH + 2, None))
    pipeline.splice(("t4", EPOCH + 1, type4_file(EPOCH + 1, [])))
    keys = raw_keys(pipeline)
    assert [epoch for epoch, _ in keys] == [EPOCH + 1]


def test_splice_repeated_type4_dropped(tmp_path, caplog):
    pipeline = low_pipeline(tmp_path)
    pipeline.splice(("t3", EPOCH + 1, None))
    pipeline.splice(("t4", EPOCH, type4_file(EPOCH, [])))
    assert len(raw_keys(pipeline)) == 1

    pipeline.splice(("t4", EPOCH, type4_file(EPOCH, [])))
    assert raw_keys(pipeline) == []
    assert f"type-4 file of epoch {EPOCH:08x} dropped: that epoch was spliced before" in caplog.text


def test_splicer_empty_type4_without_type3():
    bits = Splicer().process_without_type3(EPOCH, type4_file(EPOCH, []))
    assert len(bits) == 0


def test_splicer_kept_event_without_type3_rejected():
    with pytest.raises(qkd_core.FormatError, match="type-3 entry 0"):
        Splicer().process_without_type3(EPOCH, type4_file(EPOCH, [0]))
