"""Frames of the classical channel: a 16-byte header and a payload.

Header, little-endian::

    offset 0  2 bytes  magic b"QK"
    offset 2  u8       protocol version (1)
    offset 3  u8       frame type (FrameType)
    offset 4  u64      sequence number (0 for frames that are not acknowledged)
    offset 12 u32      payload length in bytes

Frames of type CONTROL, FILE and RECONCILE carry a sequence number that starts at 1 on
each link session and grows by one per frame; the receiver acknowledges them with a
cumulative ACK frame whose sequence number is the last one it has processed.
HELLO and PING frames carry 0.

A FILE payload starts with a 12-byte prefix (u8 file type 2 or 4, three zero bytes,
u32 epoch, u32 run id of the key generation run it belongs to) followed by the whole
epoch file.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"QK"
VERSION = 1
HEADER = struct.Struct("<2sBBQI")
HEADER_SIZE = HEADER.size
FILE_PREFIX = struct.Struct("<B3xII")


class FrameType(enum.IntEnum):
    HELLO = 1
    ACK = 2
    PING = 3
    CONTROL = 16
    FILE = 17
    RECONCILE = 18


SEQUENCED = frozenset({FrameType.CONTROL, FrameType.FILE, FrameType.RECONCILE})


class FrameError(ValueError):
    """A frame that breaks the format: bad magic, version, type, length or payload."""


@dataclass(frozen=True)
class Frame:
    type: FrameType
    seq: int
    payload: bytes

    def encode(self) -> bytes:
        return HEADER.pack(MAGIC, VERSION, int(self.type), self.seq, len(self.payload)) + self.payload


def parse_header(header: bytes, max_payload: int) -> tuple[FrameType, int, int]:
    """Check a 16-byte header; return (type, sequence number, payload length)."""
    magic, version, type_code, seq, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise FrameError(f"invalid frame magic {magic!r}: expected {MAGIC!r}; the peer is "
                         "not a QKDServer channel or the stream lost its framing")
    if version != VERSION:
        raise FrameError(f"unsupported channel protocol version {version}: expected {VERSION}")
    try:
        frame_type = FrameType(type_code)
    except ValueError:
        raise FrameError(f"unknown frame type {type_code}") from None
    if length > max_payload:
        raise FrameError(f"oversized frame: {length} bytes of payload, limit {max_payload} "
                         f"(max_frame_bytes); set max_frame_bytes on this node to at least "
                         f"{length}")
    # Numbered frames count from 1; an ACK carries the last processed number (0: none).
    if frame_type in SEQUENCED:
        valid_seq = seq >= 1
    else:
        valid_seq = frame_type is FrameType.ACK or seq == 0
    if not valid_seq:
        raise FrameError(f"invalid sequence number {seq} for a {frame_type.name} frame")
    return frame_type, seq, length


def describe_payload(frame_type: FrameType, payload: bytes) -> str:
    """Name what a numbered frame carries, for messages: its epoch file or its type."""
    if frame_type is FrameType.FILE and len(payload) >= FILE_PREFIX.size:
        file_type, epoch, _ = FILE_PREFIX.unpack_from(payload)
        return f"type-{file_type} file of epoch {epoch:08x}"
    return f"{frame_type.name} frame"


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


def decode_json(payload: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object payload; raise FrameError naming the frame kind otherwise."""
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FrameError(f"malformed {what} payload: {error}") from None
    except RecursionError:
        # JSON nested deeper than the interpreter's stack. Any error but FrameError would
        # close the connection, and the peer would send the same frame again.
        raise FrameError(f"malformed {what} payload: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise FrameError(f"malformed {what} payload: expected a JSON object")
    return value


def encode_file(file_type: int, epoch: int, run: int, content: bytes) -> bytes:
    return FILE_PREFIX.pack(file_type, epoch, run) + content


def decode_file(payload: bytes) -> tuple[int, int, int, bytes]:
    """Split a FILE payload into (file type, epoch, run id, file content)."""
    if len(payload) < FILE_PREFIX.size:
        raise FrameError(f"malformed FILE payload: {len(payload)} bytes, shorter than its "
                         f"{FILE_PREFIX.size}-byte prefix")
    file_type, epoch, run = FILE_PREFIX.unpack_from(payload)
    if file_type not in (2, 4):
        raise FrameError(f"malformed FILE payload: file type {file_type}, expected 2 or 4")
    return file_type, epoch, run, payload[FILE_PREFIX.size:]
