"""The stage workers of each role and what they pass between them, epoch by epoch.

High-count side (:class:`HighPipeline`)::

    readevents -> chopper2 -> type-1 epochs --+
    type-2 epochs from the peer --------------+-> costream -> type-4 to the peer
                                                             raw key -> error_correction

Low-count side (:class:`LowPipeline`)::

    readevents -> chopper -> type-2 to the peer, type-3 epochs --+
    type-4 epochs from the peer ---------------------------------+-> splicer -> raw key
                                                                     -> error_correction

Each arrow is a worker queue (:class:`~S15qkd.watchdog.StageWorker`); a worker blocks on
its queue and never polls. Every item carries the run id of the key generation run it
belongs to, and items of an older run are dropped, so a stop and a new start never mix
epochs of two runs.

Pacing. The low-count side keeps each type-3 epoch until the peer's type-4 file for it
arrives, or until the high-count side reports with ``passed`` that it will never match
that epoch (it passed it in costream, or its offset search dropped it). The low-count
side's reader waits while it is :func:`max_lead_epochs` ahead of the oldest epoch it
keeps (:mod:`S15qkd.pacing`), so a source faster than the link loses no epoch, and a
peer that is away stops the reader instead of filling the disk.

Service mode and key generation. The low-count side decides which raw key epochs serve
which purpose, because its raw key is ready last. In service mode it discloses its raw
key of each epoch to the high-count side, which counts the errors against its own raw
key and returns the count; the mean over ``service_epochs`` epochs is the service QBER,
and a QBER at or below ``QBER_threshold`` moves the link to key generation. Disclosed
epochs are marked used in both keystores and never reach a key. In key generation, the
low-count side groups consecutive raw key epochs into blocks of at least
``minimal_block_size`` bits and starts reconciliation (:mod:`S15qkd.blocks`), with at
most ``max_blocks_in_flight`` blocks at once, so blocks grow when reconciliation lags.
"""

from __future__ import annotations

import base64
import logging
import math
import shutil
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Optional

import numpy as np
import qkd_core

from . import stages
from .blocks import MAX_HELD_EPOCHS, BlockManager
from .channel import FrameError
from .controller import QberServo
from .keystore import write_atomic
from .pacing import ReadPacer
from .peer_fields import MAX_PEER_COUNT, peer_epoch, peer_float, peer_int
from .status import EngineState
from .watchdog import StageWorker

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

S = EngineState

#: Epochs the low-count side reads ahead of the oldest epoch it still keeps (a type-3
#: file waiting for the peer's type-4 file, or raw key waiting for error correction),
#: on top of the epochs one offset search needs. See max_lead_epochs.
MAX_LEAD_EPOCHS = 256

#: The clock lock counts as lost when the running mean of coincidences/(accidentals + 1)
#: falls below this; the mean starts at INITIAL_PAIR_RATIO. Both are the reference's.
LOCK_LOST_PAIR_RATIO = 2.5
INITIAL_PAIR_RATIO = 10.0

#: The clock lock also counts as lost when the highest bin of costream's histogram lies
#: outside the coincidence window in this many epochs in a row. The servo can hold the
#: peak inside the tracking window but outside the coincidence window, and then the
#: accidentals stay 0 and the pair ratio above stays high.
LOCK_LOST_PEAK_EPOCHS = 2

#: Seconds of wall time in which every event lies before the latest accepted one, after
#: which the run restarts. A time tagger that restarted counts from an earlier time, and
#: the chopper would drop its events until they pass the old time, which may take hours.
BACKWARD_RESTART_S = 5.0

#: Minimum seconds between two warnings about events whose time went back.
BACKWARD_WARNING_INTERVAL_S = 10.0

#: Seconds of peak finding without enough common epochs of both sides before the
#: high-count side warns, and then the minimum seconds between two such warnings.
OVERLAP_WARNING_S = 30.0
OVERLAP_REPEAT_S = 300.0

#: Names of the two measurement bases of BBM92, in the order of costream's basis bit.
BASIS_NAMES = ("H/V", "diagonal")

#: Largest relative frequency offset accepted from the peer's search. The search
#: reaches 2**-13 (about 1.2e-4), so 1e-3 leaves room without admitting nonsense.
MAX_FREQUENCY_OFFSET = 1e-3


class Pipeline:
    """Stage workers of one role for one key generation run."""

    role = ""

    def __init__(self, node: "Node", run: int):
        self.node = node
        self.config = node.config
        self.run = run
        self.stopping = threading.Event()
        self.workers: list[StageWorker] = []
        self.source: Optional[stages.EventSource] = None
        self.source_finished = threading.Event()
        self.chopper: Optional[stages.Chopper] = None
        self.chopper_worker: StageWorker  # set by the role's constructor
        self.blocks: BlockManager  # set by the role's constructor
        self.pacer: Optional[ReadPacer] = None  # set by the low-count side
        self.time_order = TimeOrderCheck(node)
        self.folder = node.data_root / f"run-{run:08x}"
        self.folders = {name: self.folder / name for name in ("t1", "t2", "t3")}
        for folder in self.folders.values():
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def timer_pending(self) -> bool:
        """True while a timer is due to queue work for a worker."""
        return False

    def worker(self, name: str, process, on_restart=None) -> StageWorker:
        worker = StageWorker(name, process, on_restart=on_restart)
        self.node.watchdog.adopt(worker)
        self.workers.append(worker)
        return worker

    def start(self) -> None:
        for worker in self.workers:
            self.node.watchdog.start_worker(worker)

    def stop(self) -> None:
        self.stopping.set()
        if self.pacer is not None:
            self.pacer.wake()
        for worker in self.workers:
            worker.clear()
        ended = [self.node.watchdog.stop_worker(worker) for worker in reversed(self.workers)]
        self.blocks.drop_collected("the run stopped")
        if all(ended):
            self.release_stages()
        else:
            log.warning("run %d: a stage worker is still running, so its stages stay in memory "
                        "until it ends", self.run)
        # Epoch files of a stopped run are never used again; type-2 and type-4 files
        # still waiting for the peer's acknowledgement are removed by their callbacks.
        for kind in ("t1", "t3"):
            shutil.rmtree(self.folders[kind], ignore_errors=True)
        if self.role == "high":
            shutil.rmtree(self.folders["t2"], ignore_errors=True)

    def release_stages(self) -> None:
        """Drop the stage objects and epoch data of the stopped run.

        The watchdog keeps the stopped workers, and with them this pipeline, until the
        next run adopts its own, and reference cycles keep it until Python's cyclic
        garbage collector runs. Only the workers' threads use these objects, so this
        runs after all of them ended.
        """
        self.source = None
        self.chopper = None

    def remove_files(self, epoch: int) -> None:
        for folder in self.folders.values():
            try:
                (folder / f"{epoch:08x}").unlink()
            except FileNotFoundError:
                pass

    def take_file(self, kind: str, epoch: int) -> bytes:
        """Read and delete the epoch file a chopper wrote."""
        path = self.folders[kind] / f"{epoch:08x}"
        content = path.read_bytes()
        path.unlink()
        return content

    # ---- readevents ---------------------------------------------------------------------

    def read_events(self, _item) -> None:
        """Pump the event source into the chopper queue until it ends or the run stops."""
        if self.source is None:
            factory = self.node.source_factory
            self.source = (factory(self.role) if factory is not None
                           else stages.open_source(self.config, self.role))
        skews = [0, 0, 0, 0] if self.source.applies_skew else self.config.skew_corrections()
        while not self.stopping.is_set():
            batch = self.source.next_batch(self.stopping)
            if batch is None:
                log.info("event source of the %s-count side ended", self.role)
                self.chopper_worker.put(("finish", None, None))
                return
            times, patterns = batch
            times = stages.skew_correct(times, patterns, skews)
            if self.pacer is not None and len(times):
                epoch = batch_epoch(times)
                if not self.source.can_pause:
                    if not self.pacer.admit(epoch):
                        continue
                else:
                    self.pacer.wait_for_room(epoch)
                    if self.stopping.is_set():
                        return
                self.pacer.keep(epoch)
            self.chopper_worker.put(("batch", times, patterns))

    def chop(self, item) -> None:
        kind, times, patterns = item
        try:
            self.chop_batch(kind, times, patterns)
        finally:
            if self.pacer is not None and kind == "batch" and len(times):
                self.pacer.release(batch_epoch(times))

    def chop_batch(self, kind: str, times, patterns) -> None:
        if self.chopper is None:
            self.chopper = stages.Chopper(self.role, self.folders, self.config["max_event_diff"])
        try:
            epochs = self.chopper.feed(times, patterns) if kind == "batch" else self.chopper.finish()
        except Exception:
            # A chopper that raised (for example on a full disk) rejects all further input,
            # so the worker that the watchdog restarts opens a new one.
            self.chopper = None
            raise
        self.time_order.update(self.chopper.stats())
        for chopped in epochs:
            self.node.stats.last_local_epoch = chopped.epoch
            self.node.stats.detector_counts = chopped.detector_counts
            self.node.progress("chopped", epoch=chopped.epoch, events=chopped.events)
            self.handle_chopped(chopped)
            self.send_epoch_stats(counts_epoch=chopped.epoch,
                                  detector_counts=list(chopped.detector_counts))
        if kind == "finish":
            self.source_finished.set()
            self.node.progress("source_finished", role=self.role)

    def handle_chopped(self, chopped: stages.ChoppedEpoch) -> None:
        raise NotImplementedError

    def send_epoch_stats(self, **fields) -> None:
        """Send this side's figures of an epoch, for the peer's status page."""
        self.node.send_control({"msg": "epoch_stats", **fields})

    # ---- messages from the peer ---------------------------------------------------------

    def on_epoch_stats(self, message: dict) -> None:
        """Store the figures the peer sent with ``epoch_stats``; absent fields keep their value."""
        self.node.stats.update_from_peer(message)

    def on_file(self, file_type: int, epoch: int, content: bytes) -> None:
        raise NotImplementedError

    def on_control(self, message: dict) -> None:
        raise NotImplementedError


def offset_search_epochs(config) -> int:
    """Return the consecutive common epochs the high-count side's offset search waits for."""
    needed = config["pfind_epochs"]
    if config["qcrypto.pfind.frequency_search"]:
        needed = max(needed, stages.FrequencySearch.epochs_for(
            config["qcrypto.pfind.coarse_resolution"], config["FFT_buffer_order"]))
    # The search leaves out the first common epoch, which one side usually starts late.
    return needed + 1


def max_lead_epochs(config) -> int:
    """Return the epochs the low-count side's reader may run ahead of its oldest kept epoch.

    The peer passes no epoch before its offset search has the epochs it needs, so the
    lead covers them. That assumes equal search settings on both nodes.
    """
    return MAX_LEAD_EPOCHS + offset_search_epochs(config)


def raw_key_retention_epochs(config) -> int:
    """Return the raw key epochs the high-count side keeps behind its newest one.

    The peer's reader stays within max_lead_epochs of the raw key the peer still needs,
    and costream cannot pass the peer's reader, so twice that leaves room for the epochs
    in flight. The peer's reader does not wait for a block under construction, which
    takes in up to MAX_HELD_EPOCHS epochs while it is held back, so those come on top.
    """
    return 2 * max_lead_epochs(config) + MAX_HELD_EPOCHS


def batch_epoch(times: np.ndarray) -> int:
    """Return the epoch of the first event of a batch, as the chopper numbers epochs."""
    return (int(times[0]) >> 32) & 0xFFFF_FFFF


class TimeOrderCheck:
    """Events the chopper dropped because their time lies before the latest accepted event.

    A few such events are hardware glitches. When every event goes back for
    BACKWARD_RESTART_S, the time tagger restarted with an earlier time, so key generation
    restarts and peak finding runs on the new times.
    """

    def __init__(self, node: "Node"):
        self.node = node
        self.events_in = 0          # the chopper's counters at the last update
        self.dropped = 0
        self.unreported = 0         # dropped events not yet in a warning
        self.warned_at: Optional[float] = None
        self.all_back_since: Optional[float] = None   # first batch of a row that all went back
        self.restarting = False

    def update(self, stats: dict) -> None:
        """Take the chopper's counters after a batch; warn and restart as needed."""
        events = stats["events_in"] - self.events_in
        dropped = stats["dropped_backward"] - self.dropped
        self.events_in, self.dropped = stats["events_in"], stats["dropped_backward"]
        if dropped == 0:
            if events:
                self.all_back_since = None
            return
        now = time.monotonic()
        epoch = self.node.stats.last_local_epoch
        after = "before the first epoch" if epoch is None else f"after epoch {epoch:08x}"
        self.unreported += dropped
        if self.warned_at is None or now - self.warned_at >= BACKWARD_WARNING_INTERVAL_S:
            log.warning("%d events dropped %s because their time lies before the latest "
                        "accepted event; if the time tagger was restarted, restart key "
                        "generation (stop_keygen, then start_keygen) so that peak finding "
                        "runs again", self.unreported, after)
            self.unreported = 0
            self.warned_at = now
        if dropped < events:
            self.all_back_since = None
        elif self.all_back_since is None:
            self.all_back_since = now
        elif now - self.all_back_since >= BACKWARD_RESTART_S and not self.restarting:
            self.restarting = True
            self.node.restart_keygen(
                f"every event for {BACKWARD_RESTART_S:g} s lay before the latest accepted "
                f"one ({self.dropped} dropped in all, {after}): the time tagger was probably "
                "restarted")


def epoch_range(epochs: set[int]) -> str:
    """Describe a set of epochs by its first and last one and its size."""
    if not epochs:
        return "none"
    return f"{min(epochs):08x}..{max(epochs):08x} ({len(epochs)} epochs)"


def histogram_peak_ticks(histogram) -> Optional[int]:
    """Return the time difference in ticks of the histogram's highest bin (the first of
    equal ones), or None when the histogram counts no pair."""
    if len(histogram) == 0 or max(histogram) == 0:
        return None
    return int(np.argmax(histogram)) + stages.HISTOGRAM_FIRST_TICK


class HighPipeline(Pipeline):
    """chopper2, offset search, costream; responder of service QBER and reconciliation."""

    role = "high"

    def __init__(self, node: "Node", run: int):
        super().__init__(node, run)
        self.t1: set[int] = set()   # epochs with a type-1 file in folders["t1"]
        self.t2: set[int] = set()   # epochs with a type-2 file in folders["t2"]
        self.t2_store_failed = False  # a type-2 file of the peer could not be written
        self.raw_keys: dict[int, np.ndarray] = {}
        self.key_bases: dict[int, np.ndarray] = {}  # basis of each raw key bit, by epoch
        self.raw_keys_lock = threading.Lock()
        self.costream: Optional[stages.Costream] = None
        # The missing type-2 epoch whose timer runs (a later epoch arrived before it),
        # and the epoch whose timer ran out. See type2_overdue.
        self.t2_missing: Optional[int] = None
        self.t2_timer: Optional[threading.Timer] = None
        self.t2_overdue_epoch: Optional[int] = None
        self.skipped: set[int] = set()   # skipped epochs costream has not closed yet
        # Epochs before this one are done here: costream closed them, or the offset search
        # dropped them, so the peer's type-3 files of those epochs are never matched.
        self.passed_epoch = 0
        self.passed_sent = 0             # the last passed_epoch sent to the peer
        self.search: "stages.OffsetFinder | stages.FrequencySearch | None" = None
        # Monotonic times of the start of the current peak finding and of the last
        # warning that the two sides' epochs do not overlap.
        self.search_since: Optional[float] = None
        self.overlap_warned_at: Optional[float] = None
        self.pair_ratio = INITIAL_PAIR_RATIO       # running coincidences/(accidentals + 1)
        self.peak_outside_epochs = 0               # epochs in a row with the peak outside
        # (errors, bits) per basis of the last disclosed service epochs.
        self.basis_results: deque = deque(maxlen=self.config["service_epochs"])
        self.source_worker = self.worker("readevents", self.read_events,
                                         on_restart=lambda: self.source_worker.put("resume"))
        self.chopper_worker = self.worker("chopper2", self.chop)
        self.costream_worker = self.worker("costream", self.match)
        self.blocks = BlockManager(node, self)
        self.ec_worker = self.worker("error_correction", self.blocks.process)

    def start(self) -> None:
        super().start()
        self.source_worker.put("start")
        self.node.engine.move(S.PEAK_FINDING, "waiting for overlapping epochs of both sides")

    def stop(self) -> None:
        if self.t2_timer is not None:
            self.t2_timer.cancel()
        super().stop()

    def release_stages(self) -> None:
        super().release_stages()
        self.search = None
        self.costream = None
        with self.raw_keys_lock:
            self.raw_keys.clear()
            self.key_bases.clear()

    @property
    def timer_pending(self) -> bool:
        return self.t2_timer is not None and self.t2_timer.is_alive()

    def handle_chopped(self, chopped: stages.ChoppedEpoch) -> None:
        self.costream_worker.put(("t1", chopped.epoch))

    def on_file(self, file_type: int, epoch: int, content: bytes) -> None:
        if file_type != 2:
            # FrameError drops and acknowledges the frame: a ValueError would close the
            # connection, and the peer would send the same file again after reconnecting.
            raise FrameError(f"high-count side received a type-{file_type} file for epoch "
                             f"{epoch:08x}; it expects type 2")
        # Written before the acknowledgement goes out, so the offset search finds it.
        try:
            write_atomic(self.folders["t2"] / f"{epoch:08x}", content, mode=0o644)
        except OSError as error:
            # Raising would close the connection, and the peer would send the same file
            # again after reconnecting. The run cannot go on without the peer's epochs.
            if not self.t2_store_failed:
                self.t2_store_failed = True
                self.node.fatal(f"cannot store the peer's type-2 file of epoch {epoch:08x}: "
                                f"{error}; free space in data_root {self.config['data_root']}")
            return
        self.node.stats.last_received_epoch = epoch
        self.costream_worker.put(("t2", epoch))

    def on_control(self, message: dict) -> None:
        kind = message["msg"]
        if kind == "service_bits":
            self.count_basis_errors(message)
            self.ec_worker.put(("service_bits", message))
        elif kind == "epoch_stats":
            self.on_epoch_stats(message)

    def count_basis_errors(self, message: dict) -> None:
        """Update the QBER per basis with a disclosed service epoch.

        Runs before the error-correction worker takes the epoch's raw key, which only
        happens once this message is queued.
        """
        epoch, count = int(message["epoch"]), int(message["count"])
        with self.raw_keys_lock:
            own, bases = self.raw_keys.get(epoch), self.key_bases.get(epoch)
        if own is None or bases is None or len(own) != count or len(bases) != count:
            return
        wrong = own != decode_bits(message["bits"], count)
        result = tuple((int(np.count_nonzero(wrong[bases == basis])),
                        int(np.count_nonzero(bases == basis))) for basis in (0, 1))
        self.basis_results.append(result)
        qber = {}
        for basis, name in enumerate(BASIS_NAMES):
            errors = sum(epoch_result[basis][0] for epoch_result in self.basis_results)
            bits = sum(epoch_result[basis][1] for epoch_result in self.basis_results)
            if bits:
                qber[name] = errors / bits
        self.node.stats.basis_qber = qber

    # ---- costream worker ----------------------------------------------------------------

    def match(self, item) -> None:
        try:
            self.match_files(item)
        finally:
            self.send_passed()

    def send_passed(self) -> None:
        """Tell the peer which epochs this side is done with, when that changed."""
        if self.costream is None and self.t1:
            # The search starts costream at an epoch with both files, and chopper2 writes
            # its epochs in order, so a type-2 epoch older than every type-1 one is never used.
            self.passed_epoch = max(self.passed_epoch, min(self.t1))
        if self.passed_epoch > self.passed_sent:
            self.passed_sent = self.passed_epoch
            self.node.send_control({"msg": "passed", "epoch": self.passed_epoch})

    def match_files(self, item) -> None:
        kind, epoch = item
        if kind == "t1":
            self.t1.add(epoch)
        elif kind == "t2":
            self.t2.add(epoch)
        elif kind == "t2_overdue":
            self.t2_overdue_epoch = epoch
        # Search again at once after a failed search or a lost lock: with a source that
        # is faster than real time, no later file may arrive to trigger it.
        while True:
            if self.costream is None:
                retry = self.find_peak()
                if self.costream is None:
                    if retry:
                        continue
                    return
            if not self.advance():
                return

    def offset_search(self):
        """Return the configured search: frequency and time offset, or the time offset alone.

        One search object serves the attempts until a peak is found, because it plans FFTs
        of 2^FFT_buffer_order bins. find_peak drops it then: at the default order 23 its
        buffers and plans take about 770 MiB, and making it again after a lost lock costs
        about 0.5 s (measured on a 2-core x86-64 machine).
        """
        if self.search is None:
            order = self.config["FFT_buffer_order"]
            fine = self.config["qcrypto.pfind.fine_resolution"]
            coarse = self.config["qcrypto.pfind.coarse_resolution"]
            if self.config["qcrypto.pfind.frequency_search"]:
                self.search = stages.FrequencySearch(order, fine, coarse)
            else:
                self.search = stages.OffsetFinder(order, fine, coarse)
        return self.search

    def find_peak(self) -> bool:
        """Search the offset once enough epochs overlap and start costream with it.

        Returns True when it dropped the oldest epoch and a search on the next ones may
        run at once.
        """
        search = self.offset_search()
        needed = self.config["pfind_epochs"]
        if isinstance(search, stages.FrequencySearch):
            needed = max(needed, search.epochs_needed())
        common = sorted(self.t1 & self.t2)
        # The first common epoch is usually cut short by the later start of one side,
        # so the search starts at the second one, as the reference does.
        if len(common) < needed + 1:
            self.check_overlap(len(common), needed + 1)
            return False
        epochs = common[1:needed + 1]
        if epochs != list(range(epochs[0], epochs[0] + needed)):
            # The search needs consecutive epochs; drop the older ones and wait.
            self.drop_epoch(common[0])
            return True
        try:
            result = search.find(self.folders["t1"], self.folders["t2"], epochs[0], needed)
        except (qkd_core.SyncError, qkd_core.FormatError) as error:
            # The next attempt starts one epoch later, with one more epoch of events. A
            # FormatError names an invalid epoch file, which later attempts leave out.
            log.warning("offset search in epochs %08x..%08x failed: %s", epochs[0], epochs[-1],
                        error)
            # The error lists every pre-compensation tried; the log has it in full.
            outcome = ("found no peak" if isinstance(error, qkd_core.SyncError)
                       else "read an invalid epoch file")
            self.node.engine.note(f"offset search in epochs {epochs[0]:08x}..{epochs[-1]:08x} "
                                  f"{outcome}; trying later epochs")
            self.drop_epoch(common[0])
            return True
        stats = self.node.stats
        stats.initial_offset_ticks = result.offset_ticks
        stats.snr_coarse, stats.snr_fine = result.snr_coarse, result.snr_fine
        stats.frequency_offset = (result.frequency_offset
                                  if isinstance(search, stages.FrequencySearch) else None)
        log.info("time offset %d ticks, frequency offset %.4g found in epochs %08x..%08x "
                 "(signal to noise %.1f coarse, %s fine)", result.offset_ticks,
                 result.frequency_offset, epochs[0], epochs[-1], result.snr_coarse,
                 "-" if result.snr_fine is None else f"{result.snr_fine:.1f}")
        if (stats.frequency_offset is not None
                and abs(stats.frequency_offset) > 0.8 * search.MAX_FREQUENCY):
            log.warning("frequency offset %.4g found in epochs %08x..%08x is near the search "
                        "limit of %.4g; a slightly larger offset will not be found, so check "
                        "the clocks of both nodes", stats.frequency_offset, epochs[0],
                        epochs[-1], search.MAX_FREQUENCY)
        # costream tracks the offset from here on; the next search starts from scratch.
        self.search = None
        start = epochs[0]
        # NOTE: the frequency is measured once per search. A rate that changes during the
        # run is left to the tracking servo, unlike the reference's feedback to freqcd.
        self.costream = stages.Costream(start, result,
                                        self.config["remote_coincidence_window"],
                                        self.config["tracking_window"],
                                        self.config["track_filter_time_constant"])
        self.skipped.clear()
        for store in (self.t1, self.t2):
            for old in [e for e in store if e < start]:
                store.discard(old)
                self.remove_files(old)
        self.passed_epoch = max(self.passed_epoch, start)
        self.node.send_control({"msg": "peak_found", "offset_ticks": result.offset_ticks,
                                "start_epoch": start, "snr_fine": result.snr_fine,
                                "snr_coarse": result.snr_coarse,
                                "frequency_offset": stats.frequency_offset})
        self.node.engine.move(S.SERVICE_MODE, f"time offset {result.offset_ticks} ticks found")
        self.search_since = self.overlap_warned_at = None
        return False

    def check_overlap(self, common: int, needed: int) -> None:
        """Warn when peak finding has waited OVERLAP_WARNING_S for enough common epochs.

        Without a warning an operator would see PEAK_FINDING forever, for example when
        the two time taggers were not started together.
        """
        now = time.monotonic()
        if self.search_since is None:
            self.search_since = now
        waited = now - self.search_since
        if waited < OVERLAP_WARNING_S:
            return
        if self.overlap_warned_at is not None and now - self.overlap_warned_at < OVERLAP_REPEAT_S:
            return
        self.overlap_warned_at = now
        state = (f"{common} common epochs of both sides after {waited:.0f} s of peak finding, "
                 f"{needed} consecutive ones needed; this side has epochs "
                 f"{epoch_range(self.t1)}, the peer {epoch_range(self.t2)}")
        log.warning("%s. Check that both time taggers run and were started together, that "
                    "their clocks differ by less than the offset search covers, and that both "
                    "sides use the same source settings (for the simulator: source.seed and "
                    "source.start_time)", state)
        self.node.engine.note(f"{state}; see the log for likely causes")

    def drop_epoch(self, epoch: int) -> None:
        """Drop the oldest common epoch from the offset search; older type-2 epochs have no
        type-1 file, so no search uses them either."""
        for store in (self.t1, self.t2):
            store.discard(epoch)
        self.remove_files(epoch)
        self.passed_epoch = max(self.passed_epoch, epoch + 1)

    def advance(self) -> bool:
        """Push the epoch files costream needs next, in order, and handle the closed epochs.

        Returns True when the clock lock was lost and costream dropped.
        """
        costream = self.costream
        assert costream is not None
        pushed = True
        while pushed:
            pushed = False
            epoch = costream.next_type1_epoch
            if epoch in self.t1:
                self.t1.discard(epoch)
                pushed = True
                try:
                    costream.push_type1(self.take_file("t1", epoch))
                except (qkd_core.FormatError, OSError) as error:
                    # Corrupt, labelled with another epoch, or removed from data_root.
                    self.skip_type1(epoch, str(error))
            elif any(e > epoch for e in self.t1):
                # chopper2 writes its epochs in order, so this one will never come: it had
                # no events, or a costream worker that failed took its file. Waiting for
                # it would stall costream for good.
                self.skip_type1(epoch, "no type-1 file of it reached costream, but later "
                                       "ones did (chopper2 writes none for an epoch "
                                       "without events)")
                pushed = True
            epoch = costream.next_type2_epoch
            if epoch in self.t2:
                self.t2.discard(epoch)
                pushed = True
                if epoch == self.t2_missing and self.t2_timer is not None:
                    self.t2_timer.cancel()
                try:
                    costream.push_type2(self.take_file("t2", epoch))
                except (qkd_core.FormatError, OSError) as error:
                    # Corrupt, labelled with another epoch, of another protocol, or
                    # removed from data_root.
                    self.skip_type2(epoch, str(error))
            elif self.type2_overdue(epoch):
                self.skip_type2(epoch, f"no type-2 file arrived within "
                                       f"{self.config['type2_timeout_s']:g} s "
                                       "(type2_timeout_s) after a later epoch")
                pushed = True
        self.drop_late_type2(costream.next_type2_epoch)
        for result in costream.advance():
            self.match_epoch(result)
            if self.costream is None:
                return True
        return False

    def type2_overdue(self, epoch: int) -> bool:
        """Tell whether costream should stop waiting for the peer's type-2 file of epoch.

        The peer sends its epochs in order over one connection, so a later epoch that
        arrived first means this one was lost or never written. The file is overdue once
        type2_timeout_s passed since this side noticed that. A timer then queues an item
        on the costream worker, which never polls.
        """
        if epoch == self.t2_overdue_epoch:
            return True
        if epoch != self.t2_missing and any(e > epoch for e in self.t2):
            self.t2_missing = epoch
            if self.t2_timer is not None:
                self.t2_timer.cancel()
            self.t2_timer = threading.Timer(self.config["type2_timeout_s"],
                                            self.costream_worker.put,
                                            args=(("t2_overdue", epoch),))
            self.t2_timer.daemon = True
            self.t2_timer.start()
        return False

    def skip_type2(self, epoch: int, reason: str) -> None:
        """Let costream step over a type-2 epoch it cannot use, so that neither side
        takes raw key from it, and log the epoch once with the reason."""
        assert self.costream is not None
        self.costream.skip_type2()
        self.skipped.add(epoch)
        self.node.stats.skipped_epochs += 1
        log.warning("type-2 epoch %08x skipped, no raw key from it on either side: %s",
                    epoch, reason)

    def skip_type1(self, epoch: int, reason: str) -> None:
        """Let costream step over a type-1 epoch it cannot use and log the epoch once.

        The peer's type-2 events of that epoch find no partner here, apart from pairs
        across the epoch's edges. The type-4 file lists those pairs for the peer's
        splicer, so both sides keep the same bits.
        """
        assert self.costream is not None
        self.costream.skip_type1()
        self.skipped.add(epoch)
        self.node.stats.skipped_epochs += 1
        log.warning("type-1 epoch %08x skipped, its events left out on both sides: %s",
                    epoch, reason)

    def drop_late_type2(self, next_epoch: int) -> None:
        """Remove type-2 files of epochs that costream has passed, such as a skipped
        epoch's file that arrived after all."""
        for late in [e for e in self.t2 if e < next_epoch]:
            log.warning("type-2 file of epoch %08x arrived after costream passed that epoch; "
                        "removed unused", late)
            self.t2.discard(late)
            self.remove_files(late)

    def match_epoch(self, result: stages.CoincidenceEpoch) -> None:
        epoch = result.epoch
        with self.raw_keys_lock:
            self.raw_keys[epoch] = result.raw_bits
            self.key_bases[epoch] = result.key_bases
            retention = raw_key_retention_epochs(self.config)
            for old in [e for e in self.raw_keys if e < epoch - retention]:
                del self.raw_keys[old]
                self.key_bases.pop(old, None)
        if result.t4 is not None:
            self.node.send_file_bytes(4, epoch, result.t4)
        self.passed_epoch = max(self.passed_epoch, epoch + 1)
        if epoch in self.skipped:
            # No pairs were looked for, so the epoch is no evidence about the clock lock.
            self.skipped.discard(epoch)
            self.node.progress("epoch", role="high", epoch=epoch,
                               coincidences=result.coincidences, accidentals=result.accidentals,
                               raw_bits=int(len(result.raw_bits)))
            self.send_epoch_stats(skipped_epochs=self.node.stats.skipped_epochs)
            return
        stats = self.node.stats
        stats.coincidences = result.coincidences
        stats.accidentals = result.accidentals
        stats.tracked_offset_ticks = result.tracked_offset_ticks
        stats.histogram = result.histogram
        stats.histogram_epoch = epoch
        stats.histogram_offset_ticks = result.tracked_offset_ticks
        stats.histogram_from_peer = False
        self.node.progress("epoch", role="high", epoch=epoch, coincidences=result.coincidences,
                           accidentals=result.accidentals, raw_bits=int(len(result.raw_bits)))
        self.send_epoch_stats(epoch=epoch, coincidences=result.coincidences,
                              accidentals=result.accidentals,
                              tracked_offset_ticks=result.tracked_offset_ticks,
                              histogram=list(result.histogram), basis_qber=stats.basis_qber,
                              skipped_epochs=stats.skipped_epochs)
        self.check_lock(result)

    def check_lock(self, result: stages.CoincidenceEpoch) -> None:
        # As the reference: a running mean (weight 1/5) of coincidences/(accidentals + 1)
        # below 2.5 means the clocks are no longer locked. The + 1 lets an epoch without
        # any pair in either window count as unlocked.
        ratio = result.coincidences / (result.accidentals + 1)
        self.pair_ratio += (ratio - self.pair_ratio) / 5
        window = self.config["remote_coincidence_window"]
        peak = histogram_peak_ticks(result.histogram)
        if peak is not None and not -window < peak < window:
            self.peak_outside_epochs += 1
        else:
            self.peak_outside_epochs = 0
        reason = None
        if self.pair_ratio < LOCK_LOST_PAIR_RATIO:
            reason = (f"clock lock lost in epoch {result.epoch:08x}: running mean of "
                      f"coincidences/(accidentals + 1) {self.pair_ratio:.2f} below "
                      f"{LOCK_LOST_PAIR_RATIO}")
        elif self.peak_outside_epochs >= LOCK_LOST_PEAK_EPOCHS:
            reason = (f"clock lock lost in epoch {result.epoch:08x}: peak of the examined "
                      f"pairs at {peak} ticks, outside the coincidence window of ±{window} "
                      f"ticks for {self.peak_outside_epochs} epochs")
        if reason is not None:
            log.warning("%s; searching the offset again", reason)
            self.costream = None
            self.pair_ratio = INITIAL_PAIR_RATIO
            self.peak_outside_epochs = 0
            self.node.send_control({"msg": "lock_lost", "reason": reason})
            self.node.engine.move(S.PEAK_FINDING, reason)

    def take_raw_key(self, epoch: int) -> Optional[np.ndarray]:
        with self.raw_keys_lock:
            self.key_bases.pop(epoch, None)
            return self.raw_keys.pop(epoch, None)


class LowPipeline(Pipeline):
    """chopper and splicer; decides service mode or key generation and forms blocks."""

    role = "low"

    def __init__(self, node: "Node", run: int):
        super().__init__(node, run)
        self.t3: set[int] = set()          # epochs with a type-3 file in folders["t3"]
        self.t4: dict[int, bytes] = {}     # type-4 files from the peer, by epoch
        self.last_spliced = -1             # latest epoch that gave a raw key here
        self.peer_passed = 0               # the peer matches no epoch before this one
        self.t3_removed_through = -1       # latest type-3 epoch removed unmatched
        self.t3_removed_dropped = 0        # type-4 epochs dropped because of that removal
        self.pacer: ReadPacer = ReadPacer(max_lead_epochs(self.config), self.stopping)
        self.splicer: Optional[stages.Splicer] = None
        self.servo = QberServo(self.config["QBER_limit"], self.config["servo_blocks"],
                               self.config["default_QBER"])
        self.service_results: list[tuple[int, int]] = []
        self.source_worker = self.worker("readevents", self.read_events,
                                         on_restart=lambda: self.source_worker.put("resume"))
        self.chopper_worker = self.worker("chopper", self.chop)
        self.splicer_worker = self.worker("splicer", self.splice)
        self.blocks = BlockManager(node, self)
        self.ec_worker = self.worker("error_correction", self.correct)

    def start(self) -> None:
        super().start()
        self.source_worker.put("start")

    def release_stages(self) -> None:
        super().release_stages()
        self.splicer = None
        self.t4.clear()

    def handle_chopped(self, chopped: stages.ChoppedEpoch) -> None:
        self.pacer.keep(chopped.epoch)
        self.splicer_worker.put(("t3", chopped.epoch, None))
        self.node.send_file(2, chopped.epoch, self.folders["t2"] / f"{chopped.epoch:08x}")

    def on_file(self, file_type: int, epoch: int, content: bytes) -> None:
        if file_type != 4:
            # FrameError drops and acknowledges the frame: a ValueError would close the
            # connection, and the peer would send the same file again after reconnecting.
            raise FrameError(f"low-count side received a type-{file_type} file for epoch "
                             f"{epoch:08x}; it expects type 4")
        self.node.stats.last_received_epoch = epoch
        self.splicer_worker.put(("t4", epoch, content))

    def on_control(self, message: dict) -> None:
        kind = message["msg"]
        stats = self.node.stats
        if kind == "peak_found":
            offset = peer_int(message.get("offset_ticks"), "offset_ticks", -MAX_PEER_COUNT,
                              MAX_PEER_COUNT)
            snr_fine = peer_float(message, "snr_fine", 0.0, math.inf)
            snr_coarse = peer_float(message, "snr_coarse", 0.0, math.inf)
            frequency = peer_float(message, "frequency_offset", -MAX_FREQUENCY_OFFSET,
                                   MAX_FREQUENCY_OFFSET)
            stats.initial_offset_ticks = offset
            stats.snr_fine, stats.snr_coarse = snr_fine, snr_coarse
            stats.frequency_offset = frequency
            self.node.engine.move(S.SERVICE_MODE, f"peer found the time offset "
                                                  f"{message.get('offset_ticks')} ticks")
        elif kind == "lock_lost":
            self.node.engine.move(S.PEAK_FINDING, message.get("reason", "peer lost the clock lock"))
        elif kind == "service_result":
            self.ec_worker.put(("service_result", message))
        elif kind == "passed":
            self.splicer_worker.put(("passed", peer_epoch(message, "epoch"), None))
        elif kind == "epoch_stats":
            self.on_epoch_stats(message)

    def send_epoch_stats(self, **fields) -> None:
        # The link's QBER figures are computed here; the peer shows them too.
        stats = self.node.stats
        super().send_epoch_stats(service_qber=stats.service_qber,
                                 servoed_qber=self.servo.servoed, **fields)

    # ---- splicer worker -----------------------------------------------------------------

    def splice(self, item) -> None:
        kind, epoch, content = item
        if kind == "passed":
            self.peer_passed = max(self.peer_passed, epoch)
            self.remove_passed_type3()
            return
        if kind == "t3":
            self.t3.add(epoch)
            # The chopper may write an epoch after the peer passed it.
            self.remove_passed_type3()
        else:
            self.t4[epoch] = content
        if self.splicer is None:
            self.splicer = stages.Splicer()
        # The chopper writes its epochs in order, so a type-4 epoch older than the newest
        # type-3 one without a type-3 file of its own had no events on this side.
        newest = max(self.t3, default=-1)
        without_t3 = {e for e in self.t4 if e not in self.t3 and e < newest}
        for ready in sorted((self.t3 & self.t4.keys()) | without_t3):
            t4 = self.t4.pop(ready)
            if ready <= self.last_spliced:
                log.warning("type-4 file of epoch %08x dropped: that epoch was spliced before",
                            ready)
                continue
            if ready in without_t3:
                bits = self.splice_without_type3(ready, t4)
                if bits is None:
                    continue
            else:
                self.t3.discard(ready)
                bits = None
                try:
                    bits = self.splice_with_type3(ready, t4)
                finally:
                    if bits is None:
                        # Error correction, which releases the epochs it takes, gets none.
                        self.pacer.release(ready)
                if bits is None:
                    continue
            self.last_spliced = ready
            self.node.progress("epoch", role="low", epoch=ready, raw_bits=int(len(bits)))
            if ready in without_t3:
                self.pacer.keep(ready)   # the chopper kept the epochs with a type-3 file
            self.ec_worker.put(("raw_key", ready, bits))
            # Carries the servoed QBER of the blocks corrected since the last one.
            self.send_epoch_stats()

    def remove_passed_type3(self) -> None:
        """Remove the type-3 files of epochs the peer passed: no type-4 file comes for them."""
        passed = sorted(e for e in self.t3 if e < self.peer_passed)
        if not passed:
            return
        for epoch in passed:
            self.t3.discard(epoch)
            self.remove_files(epoch)
        self.t3_removed_through = max(self.t3_removed_through, passed[-1])
        self.pacer.release(*passed)
        log.debug("type-3 epochs %08x..%08x removed unmatched: the peer passed them",
                  passed[0], passed[-1])

    def correct(self, item) -> None:
        """Run error correction on an item, then update what the reader waits for."""
        try:
            self.blocks.process(item)
        finally:
            if item[0] == "raw_key":
                self.pacer.release(item[1])
            self.pacer.set_held(epoch for epoch, _ in self.blocks.held)

    def splice_with_type3(self, epoch: int, t4: bytes) -> Optional[np.ndarray]:
        """Return the raw key of an epoch from this side's type-3 file and the peer's
        type-4 file, or None (logged) when either file is invalid."""
        assert self.splicer is not None
        try:
            return self.splicer.process(epoch, self.take_file("t3", epoch), t4)
        except (qkd_core.FormatError, OSError) as error:
            # Raising would lose the epoch too, but with a traceback and a worker restart
            # that counts towards stopping key generation. The raw key epochs around it
            # then do not join one block on either side.
            log.error("epoch %08x dropped, no raw key from it: %s", epoch, error)
            return None

    def splice_without_type3(self, epoch: int, t4: bytes) -> Optional[np.ndarray]:
        """Return the raw key of an epoch without events on this side: empty when the
        peer skipped it or kept nothing of it, None (logged) when the peer kept events."""
        assert self.splicer is not None
        try:
            bits = self.splicer.process_without_type3(epoch, t4)
        except qkd_core.FormatError as error:
            # The raw key epochs around it then do not join one block on either side.
            if epoch <= self.t3_removed_through:
                # This side had events there, but the peer had reported that it passed
                # the epoch. Only the first such epoch is a warning.
                level = logging.INFO if self.t3_removed_dropped else logging.WARNING
                self.t3_removed_dropped += 1
                log.log(level, "type-4 file of epoch %08x dropped: this side removed the type-3 "
                        "files up to epoch %08x unmatched, because the peer reported that it "
                        "passed epoch %08x", epoch, self.t3_removed_through, self.peer_passed)
                return None
            log.error("type-4 file of epoch %08x dropped: this side has no events in that "
                      "epoch, but the peer kept some (%s)", epoch, error)
            return None
        log.info("epoch %08x has no events on this side and no kept events at the peer; "
                 "its raw key is empty", epoch)
        return bits


def encode_bits(bits: np.ndarray) -> str:
    return base64.b64encode(np.packbits(bits).tobytes()).decode("ascii")


def decode_bits(text: str, count: int) -> np.ndarray:
    packed = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    return np.unpackbits(packed)[:count]
