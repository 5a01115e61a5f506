"""Reconciliation through qkd_core: two peers exchanging bytes, golden raw keys, type-7 files."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

import qkd_core
from conftest import golden_case


def exchange(initiator, responder, block_id, bits_a, bits_b, tamper=None):
    """Run one block by passing bytes between two Reconcilers; return both outcomes."""
    outcomes = {}
    _, out = responder.start_block(block_id, bits_b)
    if out is not None:
        outcomes["responder"] = out
    messages, _ = initiator.start_block(block_id, bits_a)
    queue = [("responder", m) for m in messages]
    index = 0
    while queue:
        target, data = queue.pop(0)
        if tamper is not None:
            data = tamper(index, target, data)
        index += 1
        peer = responder if target == "responder" else initiator
        other = "initiator" if target == "responder" else "responder"
        try:
            replies, outcome = peer.handle_message(data)
        except qkd_core.ReconcileError:
            continue
        queue.extend((other, r) for r in replies)
        if outcome is not None:
            outcomes[target] = outcome
    return outcomes["initiator"], outcomes["responder"]


def test_two_peers_agree_on_final_key():
    a, b = qkd_core.simulated_raw_key_pair(50_000, 0.03, seed=1)
    assert a.dtype == np.uint8
    assert a.shape == (50_000,)
    initiator = qkd_core.Reconciler("initiator", seed=1)
    responder = qkd_core.Reconciler("responder", seed=2)
    out_a, out_b = exchange(initiator, responder, 0x4F87, a, b)
    assert out_a.verified
    assert out_b.verified
    assert out_a.key == out_b.key
    assert out_a.key_bits == out_b.key_bits > 10_000
    assert len(out_a.key) == (out_a.key_bits + 7) // 8
    assert 0.02 < out_b.qber < 0.04
    assert out_b.leaked_bits > 0
    assert out_b.tag_bits == 128
    assert "key=" not in repr(out_a)
    assert initiator.qber_estimate == pytest.approx(out_b.qber, rel=1e-6)
    assert initiator.active_blocks == []
    assert responder.active_blocks == []


def test_packed_bytes_give_same_key_as_bit_arrays():
    a, b = qkd_core.simulated_raw_key_pair(30_001, 0.02, seed=3)
    by_array = qkd_core.reconcile_pair(a, b, 5, seed=9)
    by_bytes = qkd_core.reconcile_pair(
        np.packbits(a).tobytes(), np.packbits(b).tobytes(), 5, nbits=30_001, seed=9
    )
    assert by_array[0].verified
    assert by_bytes[0].verified
    assert by_array[0].key == by_bytes[0].key == by_bytes[1].key


def test_high_qber_block_is_discarded_on_both_sides():
    a, b = qkd_core.simulated_raw_key_pair(40_000, 0.15, seed=4)
    out_a, out_b, messages = qkd_core.reconcile_pair(a, b, 1, seed=4)
    assert not out_a.verified
    assert not out_b.verified
    assert out_a.key is None
    assert out_b.key is None
    assert out_a.reason == out_b.reason == "qber_above_limit"
    assert "above the limit 0.11" in out_b.detail
    assert messages >= 2


def test_tampered_message_discards_block():
    a, b = qkd_core.simulated_raw_key_pair(20_000, 0.02, seed=5)
    initiator = qkd_core.Reconciler("initiator", seed=5)
    responder = qkd_core.Reconciler("responder", seed=6)

    def flip_byte(index, target, data):
        if index == 3:
            data = bytearray(data)
            data[len(data) // 2] ^= 0x01
            return bytes(data)
        return data

    out_a, out_b = exchange(initiator, responder, 9, a, b, tamper=flip_byte)
    assert out_a.reason == out_b.reason == "protocol_error"
    assert "checksum" in out_a.detail + out_b.detail


def test_messages_outside_blocks_raise():
    a, b = qkd_core.simulated_raw_key_pair(20_000, 0.01, seed=6)
    initiator = qkd_core.Reconciler("initiator", seed=7)
    responder = qkd_core.Reconciler("responder", seed=8)
    responder.start_block(3, b)
    start, _ = initiator.start_block(3, a)
    replies, _ = responder.handle_message(start[0])
    stranger = qkd_core.Reconciler("initiator", seed=9)
    with pytest.raises(qkd_core.ReconcileError, match="unknown block"):
        stranger.handle_message(replies[0])
    with pytest.raises(qkd_core.ReconcileError, match="invalid message"):
        responder.handle_message(b"not a reconciliation message at all")


def test_replay_after_finish_raises():
    a, b = qkd_core.simulated_raw_key_pair(20_000, 0.01, seed=6)
    initiator = qkd_core.Reconciler("initiator", seed=7)
    responder = qkd_core.Reconciler("responder", seed=8)
    responder.start_block(3, b)
    start, _ = initiator.start_block(3, a)
    queue = [("responder", start[0])]
    while queue:
        target, data = queue.pop(0)
        peer, other = (responder, "initiator") if target == "responder" else (initiator, "responder")
        replies, _ = peer.handle_message(data)
        queue.extend((other, r) for r in replies)
    with pytest.raises(qkd_core.ReconcileError, match="already finished"):
        responder.handle_message(start[0])


def test_abort_block_notifies_peer():
    a, b = qkd_core.simulated_raw_key_pair(20_000, 0.01, seed=6)
    initiator = qkd_core.Reconciler("initiator", seed=7)
    responder = qkd_core.Reconciler("responder", seed=8)
    responder.start_block(3, b)
    initiator.start_block(3, a)
    messages, outcome = initiator.abort_block(3, "timed out after 30 s")
    assert outcome.reason == "aborted" and not outcome.by_peer
    _, peer_outcome = responder.handle_message(messages[0])
    assert peer_outcome.reason == "aborted" and peer_outcome.by_peer
    assert "timed out" in peer_outcome.detail


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="invalid role"):
        qkd_core.Reconciler("alice")
    with pytest.raises(ValueError, match="qber_limit"):
        qkd_core.Reconciler("initiator", qber_limit=0.9)
    r = qkd_core.Reconciler("initiator")
    with pytest.raises(TypeError, match="uint8"):
        r.start_block(1, np.zeros(10, dtype=np.int64))
    with pytest.raises(ValueError, match="not a bit"):
        r.start_block(1, np.array([0, 1, 2], dtype=np.uint8))
    with pytest.raises(ValueError, match="need 2 bytes"):
        r.start_block(1, b"\x00", nbits=12)
    with pytest.raises(ValueError, match="expected 1"):
        r.start_block(1, np.zeros(0, dtype=np.uint8))


def test_final_key_file_round_trip(tmp_path):
    a, b = qkd_core.simulated_raw_key_pair(30_000, 0.02, seed=8)
    out_a, _, _ = qkd_core.reconcile_pair(a, b, 0x4F87, seed=8)
    path = qkd_core.write_final_key(tmp_path, 0x4F87, 2, out_a.key, out_a.key_bits)
    assert os.path.basename(path) == "00004f87"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = open(path, "rb").read()
    assert raw[:4] == (7).to_bytes(4, "little")
    assert len(raw) == 16 + 4 * ((out_a.key_bits + 31) // 32)
    assert qkd_core.read_final_key(path) == (0x4F87, 2, out_a.key, out_a.key_bits)
    assert sorted(os.listdir(tmp_path)) == ["00004f87"]
    with pytest.raises(qkd_core.FormatError, match="need"):
        qkd_core.write_final_key(tmp_path, 1, 1, b"\x00", 12)


def read_raw_keys(folder):
    """Concatenate the raw-key files of one side (type 3, one bit per entry) in epoch order."""
    chunks = []
    for name in sorted(os.listdir(folder)):
        data = open(folder / name, "rb").read()
        nbits = int.from_bytes(data[8:12], "little")
        words = np.frombuffer(data[16:], dtype="<u4").astype(">u4").tobytes()
        chunks.append(np.unpackbits(np.frombuffer(words, dtype=np.uint8))[:nbits])
    return np.concatenate(chunks)


@pytest.mark.parametrize("case", ["realistic", "fail"])
def test_golden_raw_keys(case):
    folder = golden_case(case)
    low = read_raw_keys(folder / "rawkey.lec")
    high = read_raw_keys(folder / "rawkey.hec")
    assert low.shape == high.shape
    out_a, out_b, _ = qkd_core.reconcile_pair(low, high, 0x4F87, seed=3)
    if case == "fail":
        assert out_a.reason == out_b.reason == "qber_above_limit"
        assert "above the limit" in out_b.detail
    else:
        assert out_a.verified
        assert out_b.verified
        assert out_a.key == out_b.key
        assert out_a.key_bits > 0
