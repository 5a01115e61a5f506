"""Pacing of the low-count side's event reader by the epochs that side still keeps.

The low-count side keeps each epoch from the moment its reader passes a batch of events
to the chopper. The epoch is kept as an event batch first, then as a type-3 file until
the peer's type-4 file for it arrives, then as raw key until error correction takes it.
A type-3 epoch that the peer will never match (the peer reported that it passed that
epoch) is released unmatched. A source that is faster than the link, such as an event
file or a simulator without real-time pacing, would otherwise run ahead of the
high-count side without limit. While the peer is away, its type-3 files and queued
type-2 frames would then fill disk and memory.

:class:`ReadPacer` blocks the reader while the batch it is about to pass on starts
``max_lead`` or more epochs after the oldest epoch still kept. A time tagger cannot be
paused: it keeps counting, and its buffer would overflow while the node does not read.
The reader of such a source calls :meth:`ReadPacer.admit` instead, which drops the batch
and counts it. Raw key that error
correction collects for a block under construction is not counted: a block may need
more epochs than ``max_lead``, and counting them would stop the reader for good.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Iterable, Optional

log = logging.getLogger(__name__)

#: Seconds one pause lasts before it is logged as a warning (once per run; later long
#: pauses are logged at INFO). Shorter pauses are normal with a source faster than the
#: link, for example while the peer searches the time offset.
PAUSE_WARNING_S = 30.0
#: Seconds between two log lines about batches dropped by :meth:`ReadPacer.admit`.
DROP_LOG_INTERVAL_S = 60.0


class ReadPacer:
    """Counter of the epochs kept on the low-count side, which stops the reader.

    Every :meth:`keep` of an epoch needs one :meth:`release` of it, from the stage that
    keeps it last. All methods may be called from any thread.
    """

    def __init__(self, max_lead: int, stopping: threading.Event,
                 warning_after_s: Optional[float] = None):
        self.max_lead = max_lead
        self.warning_after_s = PAUSE_WARNING_S if warning_after_s is None else warning_after_s
        self._stopping = stopping
        self._condition = threading.Condition()
        self._kept: Counter[int] = Counter()
        # Raw key epochs that error correction keeps back in service mode until the
        # QBER of the disclosed ones is known.
        self._held: frozenset[int] = frozenset()
        self._warned = False
        self._dropped_batches = 0
        self._dropped_since_log = 0
        self._drop_logged_at: Optional[float] = None

    def keep(self, epoch: int) -> None:
        with self._condition:
            self._kept[epoch] += 1

    def release(self, *epochs: int) -> None:
        with self._condition:
            for epoch in epochs:
                if self._kept[epoch] <= 1:
                    del self._kept[epoch]
                else:
                    self._kept[epoch] -= 1
            self._condition.notify_all()

    def set_held(self, epochs: Iterable[int]) -> None:
        """Replace the raw key epochs error correction keeps back in service mode."""
        held = frozenset(epochs)
        with self._condition:
            if held != self._held:
                self._held = held
                self._condition.notify_all()

    def wake(self) -> None:
        """Let a waiting reader check the stop flag."""
        with self._condition:
            self._condition.notify_all()

    def oldest_kept(self) -> Optional[int]:
        with self._condition:
            return self._oldest()

    def _oldest(self) -> Optional[int]:
        return min(self._kept.keys() | self._held, default=None)

    def _may_read(self, epoch: int) -> bool:
        if self._stopping.is_set():
            return True
        oldest = self._oldest()
        return oldest is None or epoch - oldest < self.max_lead

    def admit(self, epoch: int) -> bool:
        """Return whether a batch starting in this epoch may be passed on, without waiting.

        A refused batch counts as dropped. The first drop of a run is logged as a warning,
        later ones as one info line a ``DROP_LOG_INTERVAL_S`` with their count.
        """
        with self._condition:
            if self._may_read(epoch):
                return True
            oldest = self._oldest()
            self._dropped_batches += 1
            self._dropped_since_log += 1
            now = time.monotonic()
            first = self._drop_logged_at is None
            if not first and now - self._drop_logged_at < DROP_LOG_INTERVAL_S:
                return False
            level = logging.WARNING if first else logging.INFO
            log.log(level, "low-count side dropped %d event batches up to epoch %08x "
                    "(%d in this run): it still keeps epoch %08x, %d epochs earlier, which "
                    "waits for the peer's type-4 file or for error correction. The time "
                    "tagger cannot be paused, so its events are dropped until the peer "
                    "catches up; check the channel and the peer's log",
                    self._dropped_since_log, epoch, self._dropped_batches, oldest,
                    epoch - oldest)
            self._drop_logged_at = now
            self._dropped_since_log = 0
            return False

    @property
    def dropped_batches(self) -> int:
        with self._condition:
            return self._dropped_batches

    def wait_for_room(self, epoch: int) -> None:
        """Block until a batch starting in this epoch may be passed on, or the run stops."""
        with self._condition:
            if self._may_read(epoch):
                return
            started = time.monotonic()
            oldest = self._oldest()
            if self._condition.wait_for(lambda: self._may_read(epoch), self.warning_after_s):
                return
            level = logging.INFO if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "low-count side stopped reading events at epoch %08x for %.0f s so "
                    "far: it still keeps epoch %08x, %d epochs earlier, which waits for the "
                    "peer's type-4 file or for error correction. Reading resumes when the peer "
                    "catches up; check the channel and the peer's log", epoch,
                    time.monotonic() - started, oldest, epoch - oldest)
            self._condition.wait_for(lambda: self._may_read(epoch))
        if not self._stopping.is_set():
            log.info("low-count side resumed reading events at epoch %08x after %.0f s", epoch,
                     time.monotonic() - started)
