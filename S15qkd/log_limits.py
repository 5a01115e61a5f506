"""Warnings logged at most once per interval, for events a peer or client can repeat."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class RateLimitedWarning:
    """Logs a warning at most once per interval and counts the ones it drops.

    Rejected credentials and rejected channel connections are logged this way, so a
    client that retries in a loop cannot flood the node's log.
    """

    def __init__(self, logger: logging.Logger = log, interval_s: float = 10.0):
        self._log = logger
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last = -interval_s
        self._dropped = 0
        self._flush: threading.Timer | None = None

    def __call__(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._interval_s:
                self._dropped += 1
                # Without a later warning the count would never be logged, so a timer
                # logs it at the end of the interval.
                if self._flush is None:
                    self._flush = threading.Timer(self._last + self._interval_s - now,
                                                  self._log_dropped, (message, args))
                    self._flush.daemon = True
                    self._flush.start()
                return
            dropped, self._dropped, self._last = self._dropped, 0, now
            self._cancel_flush()
        if dropped:
            message += " (%d similar warnings dropped since the last one)"
            args += (dropped,)
        self._log.warning(message, *args)

    def _cancel_flush(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None

    def _log_dropped(self, message: str, args: tuple) -> None:
        """Log the count of the warnings dropped in the interval, with the first of them."""
        with self._lock:
            dropped, self._dropped, self._flush = self._dropped, 0, None
            self._last = time.monotonic()
        if dropped:
            self._log.warning(message + " (and %d similar warnings in the last %g s)",
                        *args, dropped, self._interval_s)
