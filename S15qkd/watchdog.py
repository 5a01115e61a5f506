"""Stage workers and their watchdog.

A :class:`StageWorker` is a thread that takes items from its queue and processes them
one at a time (an event batch, an epoch, a peer message). It blocks on the queue, so an
idle stage costs nothing and a new item starts at once. When processing raises, the
worker stops, reports the failure to the :class:`Watchdog` and keeps its queue; the
watchdog starts a fresh thread on the same queue after a short, growing delay, so the
item that failed is dropped and the following ones are processed. A worker that fails
``max_restarts`` times within ``restart_window_s`` stays failed, and the watchdog
reports that to the node, which stops key generation with the reason.

The watchdog log (``<data_root>/watchdog.log``) has one line per start, stop, failure
and restart of a worker and per engine state change, with a UTC time stamp; ``make
watchdog`` tails it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Optional

from .status import WorkerBadge, WorkerState

log = logging.getLogger(__name__)

#: Put into a worker's queue to end its thread after the items before it.
STOP = object()


class StageWorker:
    """A named thread that processes the items of its queue with ``process(item)``."""

    def __init__(self, name: str, process: Callable[[Any], None],
                 on_stop: Optional[Callable[[], None]] = None,
                 on_restart: Optional[Callable[[], None]] = None):
        self.name = name
        self._process = process
        self._on_stop = on_stop
        self.on_restart = on_restart  # called after a restart, e.g. to queue a resume item
        self.queue: "queue.Queue[Any]" = queue.Queue()
        self.state = WorkerState.STOPPED
        self.restarts = 0
        self.last_error = ""
        self.items_done = 0
        self.busy = False  # processing an item now
        self._thread: Optional[threading.Thread] = None
        self.watchdog: Optional["Watchdog"] = None

    @property
    def idle(self) -> bool:
        """True when no item is being processed or waiting in the queue."""
        return not self.busy and self.queue.empty()

    def put(self, item: Any) -> None:
        self.queue.put(item)

    def start(self) -> None:
        # A failed worker's old thread may still be returning from its last item; a
        # restart must not wait for it.
        running = self._thread is not None and self._thread.is_alive()
        if running and self.state is WorkerState.RUNNING:
            return
        self.state = WorkerState.RUNNING
        self._thread = threading.Thread(target=self._run, name=f"worker-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Finish the queued items, then end the thread.

        Returns True when no thread of this worker runs any more, False when the thread
        outlived the timeout or is the calling thread itself.
        """
        thread = self._thread
        if thread is None:
            self.state = WorkerState.STOPPED
            return True
        self.queue.put(STOP)
        ended = False
        if thread is not threading.current_thread():
            thread.join(timeout)
            ended = not thread.is_alive()
            if not ended:
                log.error("stage worker %s did not stop within %.0f s", self.name, timeout)
        self._thread = None
        self.state = WorkerState.STOPPED
        return ended

    def clear(self) -> None:
        """Drop every queued item."""
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                return

    def badge(self) -> WorkerBadge:
        return WorkerBadge(self.name, self.state, self.restarts, self.last_error)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is STOP:
                break
            self.busy = True
            try:
                self._process(item)
                self.items_done += 1
            except Exception as error:
                self.last_error = f"{type(error).__name__}: {error}"
                if isinstance(error, OSError):
                    # A missing file or device: the message names it, so a traceback adds nothing.
                    log.error("stage worker %s failed: %s", self.name, self.last_error)
                else:
                    log.exception("stage worker %s failed", self.name)
                self.state = WorkerState.FAILED
                if self.watchdog is not None:
                    self.watchdog.report_failure(self, self.last_error)
                return
            finally:
                self.busy = False
        if self._on_stop is not None:
            self._on_stop()


class Watchdog:
    """Restarts failed stage workers and writes the watchdog log."""

    def __init__(self, log_path: str | Path, on_give_up: Callable[[str, str], None],
                 max_restarts: int = 5, restart_window_s: float = 60.0,
                 first_delay_s: float = 0.2):
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._on_give_up = on_give_up
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.first_delay_s = first_delay_s
        self._workers: dict[str, StageWorker] = {}
        self._failures: dict[str, deque] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def adopt(self, worker: StageWorker) -> StageWorker:
        worker.watchdog = self
        with self._lock:
            self._workers[worker.name] = worker
        return worker

    def workers(self) -> list[StageWorker]:
        with self._lock:
            return list(self._workers.values())

    def badges(self) -> tuple[WorkerBadge, ...]:
        return tuple(worker.badge() for worker in self.workers())

    def record(self, message: str) -> None:
        """Append one line to the watchdog log."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            with open(self.log_path, "a", encoding="utf-8") as file:
                file.write(f"{stamp} {message}\n")
        except OSError as error:
            log.error("cannot write watchdog log %s: %s", self.log_path, error.strerror)

    def start_worker(self, worker: StageWorker) -> None:
        worker.start()
        self.record(f"worker {worker.name} started")

    def stop_worker(self, worker: StageWorker) -> bool:
        """Stop a worker; returns True when its thread ended (see StageWorker.stop)."""
        was_running = worker.state is WorkerState.RUNNING
        ended = worker.stop()
        if was_running:
            self.record(f"worker {worker.name} stopped")
        return ended

    def close(self) -> None:
        self._closed.set()

    def report_failure(self, worker: StageWorker, error: str) -> None:
        now = time.monotonic()
        with self._lock:
            history = self._failures.setdefault(worker.name, deque())
            history.append(now)
            while history and now - history[0] > self.restart_window_s:
                history.popleft()
            count = len(history)
        self.record(f"worker {worker.name} failed: {error}")
        if count > self.max_restarts:
            message = (f"worker {worker.name} failed {count} times within "
                       f"{self.restart_window_s:.0f} s; not restarting it: {error}")
            self.record(message)
            log.error("watchdog: %s", message)
            self._on_give_up(worker.name, message)
            return
        delay = self.first_delay_s * 2 ** (count - 1)
        worker.state = WorkerState.RESTARTING
        timer = threading.Timer(delay, self._restart, args=(worker,))
        timer.daemon = True
        timer.start()

    def _restart(self, worker: StageWorker) -> None:
        if self._closed.is_set() or worker.state is not WorkerState.RESTARTING:
            return
        worker.restarts += 1
        worker.start()
        if worker.on_restart is not None:
            worker.on_restart()
        self.record(f"worker {worker.name} restarted (restart {worker.restarts})")
        log.warning("watchdog restarted stage worker %s (restart %d)", worker.name, worker.restarts)
