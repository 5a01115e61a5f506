"""Keystore: type-7 files, staging and release, notifications, used epochs."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from S15qkd.keystore import (FinalKey, KeyStore, KeyStoreError, decode_type7, encode_type7,
                             pack_key_bits, unpack_key_bits)


def make_key(start=0x4F87, epochs=5, bits=77, seed=1) -> FinalKey:
    rng = np.random.default_rng(seed)
    return FinalKey(start, epochs, bits, pack_key_bits(rng.integers(0, 2, bits, dtype=np.uint8)))


def test_bit_packing_layout():
    bits = np.zeros(40, dtype=np.uint8)
    bits[0] = 1   # most significant bit of the first word: top bit of byte 3
    bits[39] = 1  # bit 7 of the second word counted from its top
    data = pack_key_bits(bits)
    assert data == bytes([0, 0, 0, 0x80, 0, 0, 0, 0x01])
    np.testing.assert_array_equal(unpack_key_bits(data, 40), bits)


def test_type7_round_trip_and_header():
    key = make_key()
    content = encode_type7(key)
    assert content[:16] == (7).to_bytes(4, "little") + (0x4F87).to_bytes(4, "little") + \
        (5).to_bytes(4, "little") + (77).to_bytes(4, "little")
    assert len(content) == 16 + 12
    assert decode_type7(content) == key
    with pytest.raises(KeyStoreError, match="data bytes"):
        decode_type7(content[:-4])


def test_release_writes_file_and_notifies(tmp_path):
    store = KeyStore(tmp_path / "keys", tmp_path / "state", local_id="QKDE0001", remote_id="QKDE0002")
    for index, start in enumerate((0x10, 0x20, 0x30)):
        store.stage(make_key(start=start, seed=index))
        store.commit(start)
    assert sorted(store.keys()) == ["00000010", "00000020", "00000030"]
    assert (tmp_path / "keys" / "notified").read_text().splitlines() == [
        "00000010 QKDE0002 1", "00000020 QKDE0002 0", "00000030 QKDE0002 1"]
    assert not list((tmp_path / "keys" / ".staging").iterdir())
    assert (tmp_path / "keys" / "notify.pipe").is_fifo()


def test_direction_continues_after_restart(tmp_path):
    store = KeyStore(tmp_path / "keys", tmp_path / "state", local_id="B", remote_id="A")
    store.stage(make_key(start=1))
    store.commit(1)
    again = KeyStore(tmp_path / "keys", tmp_path / "state", local_id="B", remote_id="A")
    again.stage(make_key(start=2))
    again.commit(2)
    assert (tmp_path / "keys" / "notified").read_text().splitlines() == ["00000001 A 0", "00000002 A 1"]


def test_notify_pipe_reader_gets_line(tmp_path):
    store = KeyStore(tmp_path / "keys", tmp_path / "state", local_id="A", remote_id="B")
    descriptor = os.open(store.notify_pipe, os.O_RDONLY | os.O_NONBLOCK)
    try:
        store.stage(make_key(start=0x4F87))
        store.commit(0x4F87)
        assert os.read(descriptor, 100) == b"00004f87 B 1\n"
    finally:
        os.close(descriptor)


def test_empty_key_is_released_but_not_notified(tmp_path):
    store = KeyStore(tmp_path / "keys", tmp_path / "state")
    store.stage(FinalKey(5, 1, 0, b""))
    store.commit(5)
    assert "00000005" in store.keys()
    assert not (tmp_path / "keys" / "notified").exists()


def test_epochs_are_never_used_twice(tmp_path):
    store = KeyStore(tmp_path / "keys", tmp_path / "state")
    store.consume_epochs(100, 4)
    with pytest.raises(KeyStoreError, match="already used"):
        store.consume_epochs(102, 1)
    restarted = KeyStore(tmp_path / "keys", tmp_path / "state")
    assert restarted.next_unused_epoch == 104
    with pytest.raises(KeyStoreError, match="already used"):
        restarted.consume_epochs(103, 2)


def test_staged_key_kept_at_start(tmp_path):
    store = KeyStore(tmp_path / "keys", tmp_path / "state")
    store.stage(make_key(start=7))
    partial = store.staging / ".00000008.tmp"
    partial.write_bytes(b"\x07\x00")
    again = KeyStore(tmp_path / "keys", tmp_path / "state")
    # The staged key waits for the two nodes to settle it; the partial write goes.
    assert again.staged_keys() == [7]
    assert not partial.exists()
    assert again.keys() == {}


def test_release_decisions_survive_restart(tmp_path):
    store = KeyStore(tmp_path / "keys", tmp_path / "state")
    store.consume_epochs(0x40, 8)
    store.mark_releasing(0x40)
    store.mark_releasing(0x44)
    store.mark_released(0x40)
    again = KeyStore(tmp_path / "keys", tmp_path / "state")
    assert again.releasing == [0x44]
    assert again.next_unused_epoch == 0x48


def test_invalid_release_state_names_file(tmp_path):
    state = tmp_path / "state" / "keystore_state.json"
    state.parent.mkdir()
    state.write_text('{"next_unused_epoch": 5, "releasing": "all"}')
    with pytest.raises(KeyStoreError, match="keystore_state.json.*releasing"):
        KeyStore(tmp_path / "keys", tmp_path / "state")


@pytest.mark.parametrize("content, named", [
    ("", "the file is empty"),
    ('{"next_unused_epoch": 12', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got [1, 2]"),
    ('{"releasing": []}', "next_unused_epoch is missing"),
    ('{"next_unused_epoch": "abc", "releasing": []}', "got 'abc'"),
    ('{"next_unused_epoch": -1}', "got -1"),
    ('{"next_unused_epoch": true}', "got True"),
    ('{"next_unused_epoch": 5.5}', "got 5.5"),
    ('{"next_unused_epoch": 4294967297}', "got 4294967297"),
    ('{"next_unused_epoch": 5, "releasing": 5}', "invalid releasing"),
    ('{"next_unused_epoch": 5, "releasing": ["../x"]}', "got '../x'"),
])
def test_damaged_state_rejected(tmp_path, content, named):
    state = tmp_path / "state" / "keystore_state.json"
    state.parent.mkdir()
    state.write_text(content)
    with pytest.raises(KeyStoreError) as raised:
        KeyStore(tmp_path / "keys", tmp_path / "state")
    message = str(raised.value)
    assert str(state) in message
    assert named in message
    assert "docs/node.md" in message
    assert "\n" not in message


def test_state_at_last_epoch_accepted(tmp_path):
    state = tmp_path / "state" / "keystore_state.json"
    state.parent.mkdir()
    state.write_text('{"next_unused_epoch": 4294967296, "releasing": [4294967295]}')
    store = KeyStore(tmp_path / "keys", tmp_path / "state")
    assert store.next_unused_epoch == 1 << 32
    assert store.releasing == [0xFFFFFFFF]


def test_full_disk_leaves_no_partial_file(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        store = KeyStore(mount / "keys", tmp_path / "state")
        big = make_key(start=9, bits=8 * 200_000)
        with pytest.raises(KeyStoreError, match="keys folder full"):
            store.stage(big)
        assert not list(store.staging.iterdir())
        store.stage(make_key(start=10))
        store.commit(10)
        assert list(store.keys()) == ["0000000a"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)
