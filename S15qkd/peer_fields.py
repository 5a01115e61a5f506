"""Checks of the values in the peer's control messages.

Each function returns the value when it has the expected type and range, and raises
ValueError naming the field and the value otherwise. A node drops a message that fails a
check, so a peer's bad value never reaches the status page or the JSON routes.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional


#: Detectors per node, the length of ``detector_counts``.
DETECTORS = 4

#: Largest count or offset accepted from the peer: an int64, which the page and
#: the JSON routes can show.
MAX_PEER_COUNT = 2**63 - 1


def peer_int(value: Any, name: str, low: int, high: int) -> int:
    # JSON numbers with a fraction, booleans and strings are not counts.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"invalid {name}: expected an integer from {low} to {high}, "
                         f"got {shown(value)}")
    return value


def shown(value: Any) -> str:
    """Return the repr of a peer's value, cut to 40 characters for the log."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def peer_epoch(message: Mapping[str, Any], name: str) -> int:
    return peer_int(message[name], name, 0, 0xFFFFFFFF)


def peer_list(message: Mapping[str, Any], name: str, shortest: int, longest: int) -> list:
    value = message[name]
    if not isinstance(value, list) or not shortest <= len(value) <= longest:
        expected = f"{longest}" if shortest == longest else f"{shortest} to {longest}"
        found = f"{len(value)} items" if isinstance(value, list) else shown(value)
        raise ValueError(f"invalid {name}: expected a list of {expected} integers, got {found}")
    return value


def peer_qber(message: Mapping[str, Any], key: str, name: str = "") -> Optional[float]:
    # NaN or infinity would reach /status_data, whose JSON then fails to parse.
    value = message[key]
    if value is None:
        return None
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not 0.0 <= value <= 1.0):
        raise ValueError(f"invalid {name or key}: expected null or a fraction from 0 to 1, "
                         f"got {shown(value)}")
    return float(value)


def peer_float(message: Mapping[str, Any], key: str, low: float, high: float) -> Optional[float]:
    """Return the number or None under ``key``, checked to lie from ``low`` to ``high``."""
    value = message.get(key)
    if value is None:
        return None
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or not low <= value <= high):
        raise ValueError(f"invalid {key}: expected null or a number from {low:g} to {high:g}, "
                         f"got {shown(value)}")
    return float(value)
