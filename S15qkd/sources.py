"""Timestamp event sources of a node: one interface over a simulator, a TDC1 device, a
recorded file and a pipe.

Every source yields batches of events as numpy arrays: times as uint64 ticks of 1/8 ns
(49 bits, wrapping like the device counter) and detector patterns as uint8. The events
come from a ``qkd_core.EventStream`` in Rust, so a source can also feed a chopper stage
directly in Rust (:meth:`Source.pump`) without a Python step per batch::

    with SimulatorSource("low", pair_rate=1e5, qber=0.03) as source:
        chopper = qkd_core.Chopper(t2_dir, t3_dir)
        still_open, epochs = source.pump(chopper, max_batches=50)

A source is started once; :meth:`Source.stop` ends it (a TDC1 is aborted, checked for
FIFO overflow and reset). Errors arrive as ``qkd_core.DeviceError`` (device missing,
inaccessible, unplugged, silent, garbage), ``qkd_core.FormatError`` (undecodable content),
``OSError`` (files) or ``ValueError`` (bad parameters).
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

import qkd_core

log = logging.getLogger(__name__)

Batch = tuple[np.ndarray, np.ndarray]


def unix_start_ticks() -> int:
    """Return the Unix time now in ticks of 1/8 ns, cut to whole microseconds and to the
    49 bits of the event time."""
    return (time.time_ns() // 1000 * 8000) % (1 << 49)


class Source:
    """Base class: start, read batches, pump into a chopper stage, stop."""

    def __init__(self) -> None:
        self._stream: Optional[qkd_core.EventStream] = None

    def _open(self) -> qkd_core.EventStream:
        raise NotImplementedError

    def start(self) -> "Source":
        """Open the underlying stream; a second call raises RuntimeError."""
        if self._stream is not None:
            raise RuntimeError(f"{self!r} is already started")
        self._stream = self._open()
        log.info("started event source %r", self)
        return self

    def _require(self) -> qkd_core.EventStream:
        if self._stream is None:
            raise RuntimeError(f"{self!r} is not started; call start() first")
        return self._stream

    @property
    def running(self) -> bool:
        """True between start() and the end of the stream or stop()."""
        return self._stream is not None and self._stream.open

    def read_batch(self) -> Optional[Batch]:
        """Return the next (times, patterns) batch, possibly empty, or None at the end."""
        return self._require().read_batch()

    def read_batch_words(self) -> Optional[np.ndarray]:
        """Return the next batch as raw uint64 event words (flag bits kept), or None."""
        return self._require().read_batch_words()

    def __iter__(self) -> Iterator[Batch]:
        """Yield batches until the stream ends."""
        stream = self._require()
        while True:
            batch = stream.read_batch()
            if batch is None:
                return
            yield batch

    def pump(self, stage: Any, max_batches: Optional[int] = None) -> tuple[bool, list[dict]]:
        """Feed up to ``max_batches`` batches (None: to the end) into a ``qkd_core.Chopper``
        or ``qkd_core.Chopper2`` in Rust; return (still_open, epoch summaries written)."""
        return self._require().pump(stage, max_batches)

    def stop(self) -> None:
        """End the stream; safe to call more than once."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.stop()
            log.info("stopped event source %r", self)

    def __enter__(self) -> "Source":
        if self._stream is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SimulatorSource(Source):
    """One node ("high" or "low") of a simulated link; ``batch_duration`` seconds of
    simulated time per batch. The keyword arguments are those of
    ``qkd_core.LinkSimulator`` (seed, pair_rate, qber, offset_ticks, drift, transmission,
    efficiency, dark_count_rate, background_rate, jitter_ps, dead_time_ps, start_ticks,
    pair_limit, skip_ticks). Two sources with equal arguments and opposite sides are the
    two nodes of one link, even in different processes, and with different skip_ticks they
    hand out the same events from the later of the two skips on."""

    def __init__(self, side: str, batch_duration: float = 0.1, **link: Any) -> None:
        super().__init__()
        self.side = side
        self.batch_duration = batch_duration
        self.link = dict(link)
        # Validate now, so that bad parameters fail before start().
        self._simulator = qkd_core.LinkSimulator(**self.link)

    def _open(self) -> qkd_core.EventStream:
        return self._simulator.source(self.side, self.batch_duration)

    def __repr__(self) -> str:
        return f"SimulatorSource({self.side!r}, seed={self.link.get('seed', 0)})"


class DeviceSource(Source):
    """An S-Fifteen TDC1 on a serial port (``/dev/ttyACM0``, ``/dev/serial/by-id/...``).

    ``input_level`` is "NIM" or "TTL"; ``skew_ticks`` the per-detector skews in ticks;
    ``reply_timeout`` and ``stall_timeout`` in seconds bound every wait. Event times count
    from ``start_ticks``; with ``absolute_time`` they count from the Unix time at start()
    instead (in whole microseconds, as readevents4a -A does), so that epochs follow the
    wall clock."""

    def __init__(
        self,
        path: str,
        input_level: str = "NIM",
        skew_ticks: Optional[Sequence[int]] = None,
        start_ticks: int = 0,
        reply_timeout: float = 1.0,
        stall_timeout: float = 2.0,
        absolute_time: bool = False,
    ) -> None:
        super().__init__()
        self.absolute_time = absolute_time
        self.path = str(path)
        self.input_level = input_level
        self.skew_ticks = tuple(skew_ticks) if skew_ticks is not None else None
        self.start_ticks = start_ticks
        self.reply_timeout = reply_timeout
        self.stall_timeout = stall_timeout

    def _open(self) -> qkd_core.EventStream:
        start_ticks = self.start_ticks
        if self.absolute_time:
            start_ticks = unix_start_ticks()
        return qkd_core.open_tdc1(
            self.path, self.input_level, self.skew_ticks, start_ticks,
            self.reply_timeout, self.stall_timeout,
        )

    def __repr__(self) -> str:
        return f"DeviceSource({self.path!r})"


class FileSource(Source):
    """A recorded file: ``format`` "raw" (legacy raw events), "raw-native", "a1"/"a1X"
    (timestamp7) or "tdc1"; ``skew`` per detector in the format's unit. Ends at the end
    of the file; a truncated last record raises ``qkd_core.FormatError``."""

    def __init__(self, path: os.PathLike | str, format: str = "raw",
                 skew: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.format = format
        self.skew = tuple(skew) if skew is not None else None

    def _open(self) -> qkd_core.EventStream:
        return qkd_core.open_event_stream(self.path, self.format, self.skew)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, format={self.format!r})"


class PipeSource(FileSource):
    """A named pipe (FIFO) written by another program, such as ``qkd-sim`` or readevents.

    The FIFO is held open for reading and writing, as the reference server does, so the
    source neither waits for a writer to appear nor ends when writers come and go: it runs
    until stop(). Each batch waits at most 100 ms for data."""

    def _open(self) -> qkd_core.EventStream:
        try:
            mode = self.path.stat().st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"pipe {self.path} not found; create it with mkfifo") from None
        if not stat.S_ISFIFO(mode):
            raise ValueError(f"{self.path} is not a named pipe; use FileSource for a regular file")
        return super()._open()
