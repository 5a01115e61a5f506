"""Final keys on disk: type-7 files, the key manager's notifications, used epochs.

A final key is released in two phases so that the two nodes release the same keys:
:meth:`KeyStore.stage` writes the complete file into ``<final_key_folder>/.staging``
(temporary name, fsync, rename), and :meth:`KeyStore.commit` renames it to
``<final_key_folder>/<epoch>`` (8 lowercase hex digits) and notifies. Which staged key
is committed and which is discarded is decided between the nodes by
:mod:`S15qkd.release`; this module only keeps the files and the decisions on disk.
At start-up, temporary files of an interrupted write are removed from the staging
folder, and staged keys are kept until the two nodes settle them.

File layout (type 7, little-endian): i32 tag 7, u32 start epoch, u32 number of epochs,
i32 number of key bits, then the key packed into 32-bit words, first bit in the most
significant bit of the first word, unused trailing bits zero.

Notification: for every released non-empty key, the line ``<epoch> <remote_id>
<direction>`` (``<epoch>`` alone when no remote connection id is configured) goes to the
FIFO ``notify.pipe`` when a reader has it open, and is appended to ``notified``. The
direction of the first key is ``int(local_connection_id < remote_connection_id)`` and
alternates with every notified key, so the two nodes file each key into opposite
one-way ledgers. The count of lines already in ``notified`` continues the alternation
after a restart.

Node state: ``keystore_state.json`` in the state folder records the first epoch not yet
consumed by a block, so an epoch that went into a block (released, discarded or failed)
is never used again, also across restarts. On the low-count side it also lists the
blocks whose release was decided but not yet confirmed by the peer (``releasing``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .peer_fields import peer_int, shown

log = logging.getLogger(__name__)

TYPE7_HEADER = struct.Struct("<iIIi")
TYPE7_TAG = 7


#: Names of the node state file in the state folder and of the FIFO in the keys folder.
STATE_FILE = "keystore_state.json"
NOTIFY_PIPE = "notify.pipe"


class KeyStoreError(Exception):
    """A key that could not be written or released; the message names the file and cause."""


@dataclass(frozen=True)
class FinalKey:
    start_epoch: int
    epochs: int
    bits: int
    data: bytes  # type-7 body: ceil(bits / 32) little-endian words


def pack_key_bits(bits: np.ndarray) -> bytes:
    """Pack an array of 0/1 values (uint8) into the type-7 body layout."""
    if bits.dtype != np.uint8:
        raise TypeError(f"key bits must be uint8, got {bits.dtype}")
    padded = np.zeros(-(-len(bits) // 32) * 32, dtype=np.uint8)
    padded[:len(bits)] = bits
    big_endian_words = np.packbits(padded).view(">u4")
    return big_endian_words.astype("<u4").tobytes()


def unpack_key_bits(data: bytes, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_key_bits`: the first ``bits`` key bits as uint8 0/1 values."""
    words = np.frombuffer(data, dtype="<u4").astype(">u4")
    return np.unpackbits(words.view(np.uint8))[:bits]


def encode_type7(key: FinalKey) -> bytes:
    expected = -(-key.bits // 32) * 4
    if len(key.data) != expected:
        raise ValueError(f"type-7 body of {key.bits} bits must be {expected} bytes, got {len(key.data)}")
    return TYPE7_HEADER.pack(TYPE7_TAG, key.start_epoch, key.epochs, key.bits) + key.data


def decode_type7(content: bytes, name: str = "type-7 file") -> FinalKey:
    if len(content) < TYPE7_HEADER.size:
        raise KeyStoreError(f"{name}: {len(content)} bytes, shorter than the 16-byte header")
    tag, start, epochs, bits = TYPE7_HEADER.unpack_from(content)
    if tag not in (7, 0x107) or bits < 0:
        raise KeyStoreError(f"{name}: invalid type-7 header (tag {tag}, {bits} bits)")
    data = content[TYPE7_HEADER.size:]
    if len(data) != -(-bits // 32) * 4:
        raise KeyStoreError(f"{name}: {len(data)} data bytes for {bits} key bits")
    return FinalKey(start, epochs, bits, data)


def write_atomic(path: Path, content: bytes, mode: int = 0o600) -> None:
    """Write a file under a temporary name, fsync it and rename it into place.

    On failure the temporary file is removed, so no partial file remains.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(content)
            while view:
                written = os.write(descriptor, view)
                view = view[written:]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    except OSError:
        try:
            temporary.unlink()
        except FileNotFoundError:
            pass
        raise


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_keystore_state(path: Path) -> dict:
    """Read and check a keystore_state.json; a missing file means no epoch was used yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {"next_unused_epoch": 0, "releasing": []}
    except OSError as error:
        raise _state_error(path, f"cannot read it: {error.strerror}") from None
    except UnicodeDecodeError:
        raise _state_error(path, "it is not UTF-8 text") from None
    if not text.strip():
        raise _state_error(path, "the file is empty")
    try:
        state = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise _state_error(path, f"invalid JSON ({error})") from None
    if not isinstance(state, dict):
        raise _state_error(path, f"expected a JSON object, got {shown(state)}")
    if "next_unused_epoch" not in state:
        raise _state_error(path, "next_unused_epoch is missing")
    releasing = state.get("releasing", [])
    try:
        # The end of the last used epoch, so one past the largest 8-hex-digit epoch.
        epoch = peer_int(state["next_unused_epoch"], "next_unused_epoch", 0, 1 << 32)
        if not isinstance(releasing, list):
            raise ValueError("invalid releasing: expected a list of block ids, got "
                             f"{shown(releasing)}")
        for block_id in releasing:
            peer_int(block_id, "block id in releasing", 0, 0xFFFFFFFF)
    except ValueError as error:
        raise _state_error(path, str(error)) from None
    return {"next_unused_epoch": epoch, "releasing": releasing}


def _state_error(path: Path, problem: str) -> KeyStoreError:
    # Starting from epoch 0 instead would let a replaying source put an epoch into a
    # second block, so every damaged state stops the node.
    return KeyStoreError(
        f"invalid keystore state {path}: {problem}. The node does not start without the "
        "record of the epochs already used in blocks; fix the file, or if it is lost, "
        "write it anew as docs/node.md (section Keys) describes")


def check_notify_pipe(path: Path) -> None:
    """Raise KeyStoreError if something other than a FIFO has the name of the notify pipe."""
    if path.exists() and not path.is_fifo():
        raise KeyStoreError(f"{path} exists and is not a FIFO; remove it, and the node "
                            "creates the FIFO at start-up")


class KeyStore:
    """The keys folder of one node."""

    def __init__(self, folder: str | Path, state_folder: str | Path,
                 local_id: str = "", remote_id: str = ""):
        self.folder = Path(folder)
        self.staging = self.folder / ".staging"
        self.state_path = Path(state_folder) / STATE_FILE
        self.notify_pipe = self.folder / NOTIFY_PIPE
        self.notified_path = self.folder / "notified"
        self.local_id = local_id
        self.remote_id = remote_id
        self._lock = threading.Lock()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(exist_ok=True)
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self._make_notify_pipe()
        self._remove_partial_staging()
        self._state = read_keystore_state(self.state_path)
        self._notified_count = self._count_notified()
        self.released_keys = 0
        self.released_bits = 0

    # ---- used epochs --------------------------------------------------------------------

    @property
    def next_unused_epoch(self) -> int:
        """First epoch not consumed by any block yet (0 before the first block)."""
        return self._state["next_unused_epoch"]

    def consume_epochs(self, start_epoch: int, epochs: int) -> None:
        """Record that epochs [start_epoch, start_epoch + epochs) went into a block.

        Raises KeyStoreError when any of them was consumed before.
        """
        with self._lock:
            if start_epoch < self._state["next_unused_epoch"]:
                raise KeyStoreError(
                    f"epoch {start_epoch:08x} was already used in a block (next unused epoch "
                    f"{self._state['next_unused_epoch']:08x}); refusing to use it twice")
            self._state["next_unused_epoch"] = start_epoch + epochs
            self._write_state()

    def _write_state(self) -> None:
        write_atomic(self.state_path, json.dumps(self._state).encode(), mode=0o644)

    # ---- release decisions (low-count side) ---------------------------------------------

    @property
    def releasing(self) -> list[int]:
        """Blocks whose release was decided here and not yet confirmed by the peer."""
        with self._lock:
            return list(self._state["releasing"])

    def mark_releasing(self, block_id: int) -> None:
        """Record on disk that block_id will be released on both sides."""
        with self._lock:
            if block_id not in self._state["releasing"]:
                self._state["releasing"].append(block_id)
                self._write_state()

    def mark_released(self, block_id: int) -> None:
        """Forget a release decision once the peer confirmed that it released the key."""
        with self._lock:
            if block_id in self._state["releasing"]:
                self._state["releasing"].remove(block_id)
                self._write_state()

    # ---- staging and release ------------------------------------------------------------

    def stage(self, key: FinalKey) -> None:
        """Write the key into the staging folder; raise KeyStoreError if that fails."""
        path = self.staging / f"{key.start_epoch:08x}"
        try:
            write_atomic(path, encode_type7(key))
        except OSError as error:
            reason = "keys folder full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else error.strerror
            raise KeyStoreError(f"cannot stage final key {path.name} in {self.staging}: {reason}") from None

    def discard(self, start_epoch: int) -> bool:
        """Remove a staged key that will not be released; return False if none was staged."""
        try:
            (self.staging / f"{start_epoch:08x}").unlink()
        except FileNotFoundError:
            return False
        return True

    def is_staged(self, start_epoch: int) -> bool:
        return (self.staging / f"{start_epoch:08x}").is_file()

    def staged_keys(self) -> list[int]:
        """Return the start epochs of the staged keys, in order."""
        return sorted(int(path.name, 16) for path in self.staging.iterdir()
                      if len(path.name) == 8 and _is_hex(path.name))

    def commit(self, start_epoch: int) -> Path:
        """Release a staged key: move it into the keys folder and notify the key manager."""
        name = f"{start_epoch:08x}"
        staged, final = self.staging / name, self.folder / name
        with self._lock:
            if final.exists():
                raise KeyStoreError(f"final key {final} exists already; not overwriting it")
            try:
                key = decode_type7(staged.read_bytes(), str(staged))
                os.replace(staged, final)
                _fsync_folder(self.folder)
            except OSError as error:
                raise KeyStoreError(f"cannot release final key {name}: {error.strerror}") from None
            self.released_keys += 1
            self.released_bits += key.bits
            if key.bits > 0:
                self._notify(name)
        log.info("released final key %s: %d bits from %d epochs", name, key.bits, key.epochs)
        return final

    def keys(self) -> dict[str, bytes]:
        """Return every released key file by name, for comparisons and tests."""
        result = {}
        for path in sorted(self.folder.iterdir()):
            if path.is_file() and len(path.name) == 8 and _is_hex(path.name):
                result[path.name] = path.read_bytes()
        return result

    def _remove_partial_staging(self) -> None:
        # Staged keys stay until the nodes settle them; anything else in the staging
        # folder is a temporary file of a write that a crash interrupted.
        for path in self.staging.iterdir():
            if len(path.name) == 8 and _is_hex(path.name):
                continue
            log.warning("removing %s from %s: a key write interrupted by a crash", path.name,
                        self.staging)
            if path.is_dir():
                log.error("%s is a folder; remove it by hand", path)
                continue
            path.unlink()

    # ---- notifications ------------------------------------------------------------------

    def _make_notify_pipe(self) -> None:
        check_notify_pipe(self.notify_pipe)
        if self.notify_pipe.exists():
            return
        try:
            os.mkfifo(self.notify_pipe, 0o600)
        except OSError as error:
            raise KeyStoreError(f"cannot create {self.notify_pipe}: {error.strerror}") from None

    def _count_notified(self) -> int:
        try:
            with open(self.notified_path, "rb") as file:
                return sum(1 for _ in file)
        except FileNotFoundError:
            return 0

    def direction(self, index: int) -> int:
        first = int(self.local_id < self.remote_id)
        return (first + index) % 2

    def _notify(self, name: str) -> None:
        if self.remote_id:
            line = f"{name} {self.remote_id} {self.direction(self._notified_count)}\n"
        else:
            line = f"{name}\n"
        self._notified_count += 1
        # The key is released at this point; a failed notification must not undo that.
        try:
            with open(self.notified_path, "a", encoding="ascii") as file:
                file.write(line)
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            log.error("final key %s released, but its line could not be added to %s: %s",
                      name, self.notified_path, error.strerror)
        # The pipe is written only while a key manager holds it open, so a missing reader
        # never blocks key release; `notified` keeps every line for replay.
        try:
            descriptor = os.open(self.notify_pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as error:
            if error.errno != errno.ENXIO:
                log.warning("cannot open %s: %s", self.notify_pipe, error.strerror)
            return
        try:
            os.write(descriptor, line.encode("ascii"))
        except OSError as error:
            log.warning("cannot write key notification %s to %s: %s", name, self.notify_pipe,
                        error.strerror)
        finally:
            os.close(descriptor)


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
        return True
    except ValueError:
        return False
