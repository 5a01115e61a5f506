"""Engine state machine of a node, with the reference server's states.

States (:class:`~S15qkd.status.EngineState`) and what moves between them:

- ``OFF``: no channel to the peer. The channel connecting moves to ``ONLY_COMMUNICATION``.
- ``ONLY_COMMUNICATION``: channel up, no key generation. A start request (local button,
  HTTP route, or the peer's ``st1``) moves to ``INITIATING``.
- ``INITIATING``: the start handshake runs (``st1``/``st2``/``st3``); each side starts the
  stages of its role. The high-count side then enters ``PEAK_FINDING``; the low-count
  side waits in ``INITIATING`` for the peer's result.
- ``PEAK_FINDING``: the high-count side searches the time offset between the clocks. A
  found offset moves both sides to ``SERVICE_MODE``; a lost lock in service mode or key
  generation moves back here.
- ``SERVICE_MODE``: coincidences are matched and the raw key of a few epochs is
  disclosed to measure the QBER. A QBER at or below ``QBER_threshold`` moves to
  ``KEY_GENERATION``.
- ``KEY_GENERATION``: raw key goes into reconciliation blocks and final keys. A block
  QBER above 0.15, or a mean over ``servo_blocks`` above ``QBER_limit``, moves back to
  ``SERVICE_MODE``.
- Stop (either side, or a fatal error such as a full keys folder) moves to
  ``ONLY_COMMUNICATION``, or ``OFF`` when the channel is down.
- Losing the channel during a run moves to ``OFF`` with the reason, and the run pauses
  (:meth:`Engine.suspend`): the workers keep their state, and changes they make while
  the peer is unreachable are recorded in :attr:`Engine.mode`. When the channel resumes
  the same link session, the engine returns to that state (:meth:`Engine.resume`); a
  stop or a new session ends the paused run instead.

Every change is logged with its reason and kept in :attr:`Engine.reason`, which the
status page and ``qkdserver simulate`` show (for example why no key was made).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .status import EngineState

log = logging.getLogger(__name__)

S = EngineState

#: Allowed transitions; anything else is a bug in the caller and raises.
TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    S.OFF: frozenset({S.ONLY_COMMUNICATION}),
    S.ONLY_COMMUNICATION: frozenset({S.OFF, S.INITIATING}),
    S.INITIATING: frozenset({S.OFF, S.ONLY_COMMUNICATION, S.INITIATING, S.PEAK_FINDING,
                             S.SERVICE_MODE}),
    S.PEAK_FINDING: frozenset({S.OFF, S.ONLY_COMMUNICATION, S.INITIATING, S.PEAK_FINDING,
                               S.SERVICE_MODE}),
    S.SERVICE_MODE: frozenset({S.OFF, S.ONLY_COMMUNICATION, S.INITIATING, S.PEAK_FINDING,
                               S.KEY_GENERATION}),
    S.KEY_GENERATION: frozenset({S.OFF, S.ONLY_COMMUNICATION, S.INITIATING, S.PEAK_FINDING,
                                 S.SERVICE_MODE}),
}

#: States in which stage workers run.
RUNNING_STATES = frozenset({S.INITIATING, S.PEAK_FINDING, S.SERVICE_MODE, S.KEY_GENERATION})

#: A single block with a QBER above this always returns to service mode (the reference's
#: hard-coded bound).
SINGLE_BLOCK_QBER_BOUND = 0.15


class TransitionError(RuntimeError):
    """A state change the state machine does not allow."""


class Engine:
    """Current engine state, its reason, and the history of changes (thread-safe)."""

    def __init__(self, on_change: Callable[[EngineState, EngineState, str], None] | None = None):
        self._lock = threading.Condition()
        self.state = S.OFF
        self.reason = "node started; channel not connected"
        self.since = time.time()
        self.history: list[tuple[float, str, str]] = []
        self._on_change = on_change
        #: State of a run paused while the peer is unreachable; None when no run is paused.
        self.suspended: EngineState | None = None

    @property
    def mode(self) -> EngineState:
        """State of the key generation run: the paused state while the peer is unreachable."""
        suspended = self.suspended
        return suspended if suspended is not None else self.state

    def move(self, new: EngineState, reason: str) -> bool:
        """Change to ``new`` with a reason; return False when already there.

        While a run is paused, a move to a running state only updates the paused state,
        and a move to OFF or ONLY_COMMUNICATION ends the paused run.
        """
        with self._lock:
            old = self.state
            ends_pause = self.suspended is not None
            if ends_pause and new in RUNNING_STATES:
                return self._move_paused(new, reason)
            self.suspended = None
            if new not in TRANSITIONS[old] and not (ends_pause and new is old):
                if new is old:
                    return False
                raise TransitionError(f"engine cannot go from {old.value} to {new.value} ({reason})")
            self._set(new, reason)
        self._announce(old, new, reason)
        return True

    def _move_paused(self, new: EngineState, reason: str) -> bool:
        paused = self.suspended
        assert paused is not None
        if new is paused:
            return False
        if new not in TRANSITIONS[paused]:
            raise TransitionError(f"engine cannot go from {paused.value} to {new.value} ({reason})")
        self.suspended = new
        log.info("paused run moves from %s to %s while the peer is unreachable: %s",
                 paused.value, new.value, reason)
        return True

    def suspend(self, reason: str) -> bool:
        """Pause a running state: move to OFF and keep the state to return to."""
        with self._lock:
            old = self.state
            if old not in RUNNING_STATES:
                return False
            self.suspended = old
            self._set(S.OFF, reason)
        self._announce(old, S.OFF, reason)
        return True

    def resume(self, reason: str) -> bool:
        """Return from a pause to the paused state; return False when no run is paused."""
        with self._lock:
            new, old = self.suspended, self.state
            if new is None:
                return False
            self.suspended = None
            self._set(new, reason)
        self._announce(old, new, reason)
        return True

    def _set(self, new: EngineState, reason: str) -> None:
        # Called with the lock held.
        self.state = new
        self.reason = reason
        self.since = time.time()
        self.history.append((self.since, new.value, reason))
        del self.history[:-200]
        self._lock.notify_all()

    def _announce(self, old: EngineState, new: EngineState, reason: str) -> None:
        # A move to OFF that ends a paused run keeps the state OFF, so it is no change.
        if new is old:
            log.info("engine stays in %s: %s", new.value, reason)
        else:
            log.info("engine state %s -> %s: %s", old.value, new.value, reason)
        if self._on_change is not None:
            self._on_change(old, new, reason)

    def note(self, reason: str) -> None:
        """Record why the engine stays in its state (for example a QBER above threshold)."""
        with self._lock:
            if reason != self.reason:
                self.reason = reason
                log.info("engine stays in %s: %s", self.state.value, reason)

    def wait_for(self, predicate: Callable[[EngineState], bool], timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self.state), timeout)

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES


class QberServo:
    """Running mean of block QBERs and the decision to leave key generation.

    The mean over the last ``blocks`` values is clamped below at 0.005, as the
    reference does before handing it to the next block as the expected QBER.
    """

    def __init__(self, limit: float, blocks: int, default: float):
        self.limit = limit
        self.blocks = blocks
        self.default = default
        self.values: list[float] = []

    def add(self, qber: float) -> str:
        """Add a block QBER; return a reason to leave key generation, or ''."""
        if qber > SINGLE_BLOCK_QBER_BOUND:
            self.values.clear()
            return f"block QBER {qber:.4f} above {SINGLE_BLOCK_QBER_BOUND}"
        self.values.append(qber)
        del self.values[:-self.blocks]
        mean = sum(self.values) / len(self.values)
        if len(self.values) >= self.blocks and mean > self.limit:
            self.values.clear()
            return f"mean QBER {mean:.4f} of the last {self.blocks} blocks above QBER_limit {self.limit}"
        return ""

    @property
    def servoed(self) -> float:
        if not self.values:
            return self.default
        return max(0.005, sum(self.values) / len(self.values))
