"""One QKDServer node: channel, engine state machine, stage workers, keystore, watchdog.

:class:`Node` implements :class:`~S15qkd.status.NodeControl` for the web page and the
HTTP routes. Control messages between the two nodes are JSON objects in CONTROL frames
with a ``msg`` field, named after the reference's where they mean the same:

==============  ===========  ==============================================================
msg             direction    meaning
==============  ===========  ==============================================================
st1             low -> high  request to start key generation
st2             high -> low  the high-count side started run ``run``; start the same run
st3             low -> high  the low-count side started run ``run``
stop            either       stop key generation, keep the channel (``reason``)
peak_found      high -> low  time offset found (``offset_ticks``, ``start_epoch``, SNR)
lock_lost       high -> low  clock lock lost, back to peak finding
passed          high -> low  no type-4 file will come for an epoch before ``epoch``: costream
                             closed it, or the offset search dropped it
mode            low -> high  service mode or key generation decided (``state``, ``reason``)
service_bits    low -> high  disclosed raw key of one epoch (service QBER)
service_result  high -> low  errors counted in a disclosed epoch
key_staged      high -> low  final key of block ``block`` staged (``ok``) or not
epoch_stats     either       figures of one epoch for the peer's status page: detector
                             counts; from the high-count side also coincidences,
                             accidentals, tracked offset, histogram, QBER per basis; from
                             the low-count side also the service and servoed QBER
==============  ===========  ==============================================================

Every message after ``st2`` carries the run id; messages and files of another run are
dropped. The messages that release final keys (:mod:`S15qkd.release`) belong to no run.
When the channel starts a new link session because a node restarted, the two nodes
settle their staged keys first, then a running key generation stops (its in-flight
blocks are lost on the restarted side) and, with auto start, the high-count side starts
a new run. While the channel is down, a run pauses and the engine shows ``OFF`` with
the reason; it continues when the channel resumes the same session.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import secrets
import select
import shutil
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .blocks import decode_reconcile
from .channel import (ChannelError, FrameTooLargeError, FrameType, Link, LinkSettings, LinkState,
                      make_context)
from .channel.frames import decode_file, decode_json, encode_file, encode_json
from .config import SCHEMA, Config, ConfigError, missing_keys
from .controller import Engine, TransitionError
from .folder_lock import FolderInUseError, FolderLock
from .keystore import (NOTIFY_PIPE, STATE_FILE, KeyStore, KeyStoreError, check_notify_pipe,
                       read_keystore_state, write_atomic)
from .peer_fields import (DETECTORS, MAX_PEER_COUNT, peer_epoch, peer_int, peer_list,
                          peer_qber, shown)
from .pipeline import BASIS_NAMES, HighPipeline, LowPipeline, Pipeline
from .release import RELEASE_MESSAGES, KeyRelease
from .stages import HISTOGRAM_FIRST_TICK
from .status import (HISTORY_LENGTH, BlockRecord, CoincidenceHistogram, ConfigProblem, ConfigRejected, ConfigSaveResult,
                     ControlError, DetectorStatus, EngineState, ErrorCorrectionStatus, KeyProtocol,
                     NodeCounts, RawKeyStatus, Role, StatusSnapshot, UnknownConnectionError,
                     WorkerBadge, WorkerState, flatten_config)
from .watchdog import Watchdog

log = logging.getLogger(__name__)

S = EngineState

#: Configuration keys that a running node applies at once; others need a restart of
#: key generation (or of the node, for the channel settings).
LIVE_KEYS = frozenset({"identity", "QBER_limit", "QBER_threshold", "default_QBER", "servo_blocks",
                       "service_epochs", "minimal_block_size", "max_blocks_in_flight",
                       "maximal_block_size"})

#: Maximum number of histogram bins accepted from the peer. costream sends 128, and the
#: page redraws the histogram every second.
MAX_PEER_HISTOGRAM_BINS = 1024

#: Run ids are 1 to MAX_RUN_ID; 0 means no run.
MAX_RUN_ID = 2**31

#: How often a start request is sent when the peer does not reply.
START_ATTEMPTS = 5


@dataclass
class LiveStats:
    """Latest values for the status snapshot, written by the workers."""

    last_local_epoch: Optional[int] = None
    last_received_epoch: Optional[int] = None
    detector_counts: tuple = ()
    initial_offset_ticks: Optional[int] = None
    tracked_offset_ticks: Optional[int] = None
    snr_coarse: Optional[float] = None
    snr_fine: Optional[float] = None
    coincidences: Optional[int] = None
    accidentals: Optional[int] = None
    #: Type-2 epochs the high-count side skipped since this node started (on the
    #: low-count side, as the peer reported it).
    skipped_epochs: int = 0
    service_qber: Optional[float] = None
    #: Relative frequency offset the high-count side corrects; None without the search.
    frequency_offset: Optional[float] = None
    #: costream's histogram of the last epoch (high-count side, or received from it).
    histogram: Optional[tuple] = None
    histogram_epoch: Optional[int] = None
    histogram_offset_ticks: Optional[int] = None
    histogram_from_peer: bool = False
    #: QBER per basis over the last service epochs, computed by the high-count side.
    basis_qber: dict = field(default_factory=dict)
    #: The peer's detector counts of its last epoch, as it sent them.
    peer_detector_counts: tuple = ()
    peer_counts_epoch: Optional[int] = None
    #: The low-count side's servoed QBER, as seen on the high-count side.
    peer_servoed_qber: Optional[float] = None
    blocks: deque = field(default_factory=lambda: deque(maxlen=HISTORY_LENGTH))
    block_count: int = 0
    total_final_bits: int = 0

    def update_from_peer(self, message: Mapping[str, Any]) -> None:
        """Take the figures of the peer's ``epoch_stats`` message; absent ones stay.

        Every field is checked before any is stored, so a malformed message changes
        nothing and raises ValueError or TypeError naming the field.
        """
        values: dict[str, Any] = {}
        if "detector_counts" in message:
            counts = peer_list(message, "detector_counts", DETECTORS, DETECTORS)
            values["peer_detector_counts"] = tuple(
                peer_int(count, "detector_counts", 0, MAX_PEER_COUNT) for count in counts)
            values["peer_counts_epoch"] = peer_epoch(message, "counts_epoch")
        if "service_qber" in message:
            values["service_qber"] = peer_qber(message, "service_qber")
            values["peer_servoed_qber"] = peer_qber(message, "servoed_qber")
        if "skipped_epochs" in message:
            values["skipped_epochs"] = peer_int(message["skipped_epochs"], "skipped_epochs", 0,
                                                MAX_PEER_COUNT)
        if "histogram" in message:
            bins = peer_list(message, "histogram", 0, MAX_PEER_HISTOGRAM_BINS)
            values["histogram"] = tuple(peer_int(count, "histogram", 0, MAX_PEER_COUNT)
                                        for count in bins)
            values["coincidences"] = peer_int(message["coincidences"], "coincidences", 0,
                                               MAX_PEER_COUNT)
            values["accidentals"] = peer_int(message["accidentals"], "accidentals", 0,
                                              MAX_PEER_COUNT)
            offset = peer_int(message["tracked_offset_ticks"], "tracked_offset_ticks",
                               -MAX_PEER_COUNT, MAX_PEER_COUNT)
            values["tracked_offset_ticks"] = values["histogram_offset_ticks"] = offset
            values["histogram_epoch"] = peer_epoch(message, "epoch")
            values["histogram_from_peer"] = True
            basis_qber = message["basis_qber"]
            if not isinstance(basis_qber, Mapping) or not set(basis_qber) <= set(BASIS_NAMES):
                raise ValueError(f"invalid basis_qber: expected a mapping from "
                                 f"{' or '.join(BASIS_NAMES)} to a QBER, got {shown(basis_qber)}")
            values["basis_qber"] = {name: peer_qber(basis_qber, name, f"basis_qber.{name}")
                                    for name in basis_qber}
        for name, value in values.items():
            setattr(self, name, value)


class Node:
    """A running node; ``start()`` connects it, ``close()`` stops everything."""

    def __init__(self, config: Config, *, progress: Optional[Callable[..., None]] = None,
                 auto_start: bool = False, source_factory: Optional[Callable] = None):
        self.config = config
        #: Builds the event source of a run from the role; None: from the configuration.
        self.source_factory = source_factory
        if source_factory is None:
            config.require_event_source()
        self.role = config["role"]
        self.auto_start = auto_start
        self._progress = progress
        config.require_folders()
        self.data_root = Path(config["data_root"])
        self.data_root.mkdir(parents=True, exist_ok=True)
        # The lock comes before any change in data_root, because a second node there
        # would delete this node's epoch files.
        try:
            self._data_root_lock = FolderLock(self.data_root, "node.lock")
        except FolderInUseError as error:
            raise FolderInUseError(error.folder, error.holder, label="data_root",
                                   advice="give each node its own data_root") from None
        self._key_folder_lock = self._lock_key_folder(Path(config["final_key_folder"]))
        self._drop_stale_runs()
        self.keystore = KeyStore(config["final_key_folder"], self.data_root,
                                 config["local_connection_id"], config["remote_connection_id"])
        self.watchdog = Watchdog(self.data_root / "watchdog.log", on_give_up=self._on_give_up)
        self.engine = Engine(on_change=self._on_engine_change)
        self.stats = LiveStats()
        self.release = KeyRelease(self, self.keystore, coordinator=self.role == "low")
        self.pipeline: Optional[Pipeline] = None
        self.run = 0
        # Run id of the last st2 received (low-count side). _join_run sets self.run in a
        # thread, so a stop that follows st2 at once may arrive before self.run changes.
        self._announced_run = 0
        self.stop_reason = ""
        self._lock = threading.RLock()
        # Serializes start() and set_conn(), which both replace or start self.link. The web
        # page is served before start() runs, so a request may arrive in between.
        self._channel_lock = threading.Lock()
        self._channel_started = False
        self._start_timer: Optional[threading.Timer] = None
        self._start_attempts = 0
        self._closed = False
        self._link_was_reset = False   # the current connection started a new link session
        # Run of the last frame too large for the peer, and how many of that run.
        self._oversized_lock = threading.Lock()
        self._oversized_run = -1
        self._oversized_frames = 0
        self.link = self._make_link(config)

    # ---- life cycle ---------------------------------------------------------------------

    def _make_link(self, config: Config) -> Link:
        config.require_channel_files()
        server = self.role == "high"
        context = make_context(server, config["local_cert"], config["local_key"], config["remote_cert"])
        settings = LinkSettings(
            role=self.role,
            host=config["listen_address"] if server else config["target_hostname"],
            port=config["port_authd"],
            server_context=context if server else None,
            client_context=None if server else context,
            remote_cert=config["remote_cert"], local_cert=config["local_cert"],
            identity=config["identity"],
            max_frame_bytes=config["max_frame_bytes"],
            reconnect_min_s=config["reconnect_min_s"], reconnect_max_s=config["reconnect_max_s"])
        return Link(settings, self._on_frame, on_link_reset=self._on_link_reset,
                    on_state=self._on_link_state, on_oversized=self._on_frame_too_large)

    def start(self) -> None:
        """Start the channel; raise ChannelError if the high-count side cannot listen."""
        name = self.config["identity"] or self.role
        self.watchdog.record(f"node {name} started as {self.role}-count side")
        settings = self.link.settings
        channel = ("listening on" if self.role == "high" else "connecting to")
        log.info("node %s: %s-count side, event source %s, data_root %s, final keys in %s, "
                 "channel %s %s:%d", name, self.role, self._source_description(), self.data_root,
                 self.config["final_key_folder"], channel, settings.host, settings.port)
        with self._channel_lock:
            self.link.start()
            self._channel_started = True

    def _source_description(self) -> str:
        kind = self.config["source.kind"]
        if kind == "tdc1":
            return f"tdc1 at {self.config['source.device']}"
        if kind in ("file", "pipe"):
            return f"{kind} {self.config['source.events_file']}"
        return f"simulator with seed {self.config['source.seed']}"

    def close(self) -> None:
        """Stop the run on both sides, settle the staged keys with the peer, then stop."""
        # Under the lock, so that a start request of the peer or the web page that runs
        # meanwhile either ends before the pipeline stops or begins no run at all.
        with self._lock:
            self._closed = True
            self._cancel_start_timer()
            connected = self.link.state is LinkState.CONNECTED
            if connected and self.pipeline is not None:
                name = self.config["identity"] or f"{self.role}-count node"
                self.send_control({"msg": "stop", "reason": f"{name} shut down"})
            self._stop_pipeline("node shut down")
        if connected:
            self.release.settle_at_close(min(self.config["reply_timeout_s"], 5.0))
        self.link.stop()
        self.watchdog.close()
        self.watchdog.record("node stopped")
        self._key_folder_lock.release()
        self._data_root_lock.release()

    @staticmethod
    def _lock_key_folder(folder: Path) -> FolderLock:
        # Two nodes on one keys folder would settle or remove each other's staged keys
        # and write to the same notify.pipe. The lock comes before KeyStore, which cleans
        # the staging folder. Its name differs from the data_root lock, so that one folder
        # can serve as both.
        folder.mkdir(parents=True, exist_ok=True)
        try:
            return FolderLock(folder, "keys.lock")
        except FolderInUseError as error:
            raise FolderInUseError(error.folder, error.holder, label="final_key_folder",
                                   advice="give each node its own final_key_folder") from None

    def _drop_stale_runs(self) -> None:
        # Epoch files of an earlier run or process belong to a run that the peer no longer has.
        for path in self.data_root.glob("run-*"):
            shutil.rmtree(path, ignore_errors=True)

    # ---- sending ------------------------------------------------------------------------

    def send_control(self, message: dict) -> None:
        message = dict(message)
        message.setdefault("run", self.run)
        self._send(FrameType.CONTROL, encode_json(message))

    def send_reconcile(self, payload: bytes) -> None:
        self._send(FrameType.RECONCILE, payload)

    def _send(self, frame_type: FrameType, payload: bytes, **callbacks) -> None:
        try:
            self.link.send(frame_type, payload, **callbacks)
        except FrameTooLargeError as error:
            self._on_frame_too_large(error)

    def _on_frame_too_large(self, error: FrameTooLargeError) -> None:
        """Stop the run once for a frame the peer cannot receive; count the others.

        Sending it again cannot help, and leaving out an epoch file or reconciliation
        message would leave the peer waiting for it.
        """
        with self._oversized_lock:
            first = self._oversized_run != self.run
            self._oversized_run = self.run
            self._oversized_frames = 1 if first else self._oversized_frames + 1
            count = self._oversized_frames
        if first:
            self.fatal(str(error))
        elif count & (count - 1) == 0:
            log.info("%d frames of run %d not sent because the peer cannot receive them, "
                     "latest: %s", count, self.run, error.what)

    def send_file_bytes(self, file_type: int, epoch: int, content: bytes) -> None:
        """Write an epoch file into the run's folder of its type, then send it."""
        pipeline = self.pipeline
        if pipeline is None:
            return
        folder = pipeline.folder / f"t{file_type}"
        folder.mkdir(exist_ok=True)
        path = folder / f"{epoch:08x}"
        write_atomic(path, content, mode=0o644)
        self.send_file(file_type, epoch, path)

    def send_file(self, file_type: int, epoch: int, path: Path) -> None:
        """Send an epoch file; the file is deleted once the peer acknowledged it."""
        # NOTE: the queued frame keeps a copy of the file in memory until the peer's
        # acknowledgement, so a long channel cut at a high event rate costs memory.
        content = path.read_bytes()

        def remove() -> None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

        self._send(FrameType.FILE, encode_file(file_type, epoch, self.run, content),
                   on_acked=remove, on_discarded=remove)

    @property
    def idle(self) -> bool:
        """True when no worker has work or a timer due, and no block or frame is in flight."""
        pipeline = self.pipeline
        if self.link.queued_frames:
            return False
        if pipeline is None:
            return True
        blocks = pipeline.blocks
        return (all(worker.idle for worker in pipeline.workers if worker.name != "readevents")
                and not blocks.blocks and not blocks.awaiting and not pipeline.timer_pending)

    def progress(self, kind: str, **fields) -> None:
        if self._progress is not None:
            try:
                self._progress(kind, node=self.role, **fields)
            except Exception:
                log.exception("progress callback failed for %s", kind)

    # ---- receiving (runs on the channel thread; only queues work) ---------------------------

    def _on_frame(self, frame_type: FrameType, payload: bytes) -> None:
        if frame_type is FrameType.CONTROL:
            self._on_control(decode_json(payload, "CONTROL"))
        elif frame_type is FrameType.FILE:
            file_type, epoch, run, content = decode_file(payload)
            pipeline = self.pipeline
            if pipeline is None or run != self.run:
                log.debug("type-%d file of epoch %08x from run %d dropped", file_type, epoch, run)
                return
            pipeline.on_file(file_type, epoch, content)
        elif frame_type is FrameType.RECONCILE:
            header, body = decode_reconcile(payload)
            pipeline = self.pipeline
            if pipeline is None or header.get("run") != self.run:
                return
            pipeline.ec_worker.put(("reconcile", header, body))

    def _on_control(self, message: dict) -> None:
        # A malformed message is dropped (and acknowledged): sending it again would not
        # repair it, and refusing it would close the connection over and over.
        try:
            self._dispatch_control(message)
        except (KeyError, ValueError, TypeError) as error:
            log.error("malformed control message %.200r dropped: %s", message, error)

    def _dispatch_control(self, message: dict) -> None:
        kind = message.get("msg")
        if not isinstance(kind, str):
            raise ValueError("no msg field")
        if kind == "st1":
            if self.role != "high":
                log.error("st1 received on the low-count side; both nodes claim the same role")
                return
            self._in_thread(self.start_keygen)
            return
        if kind == "st2":
            if self.role != "low":
                log.error("st2 received on the high-count side; both nodes claim the same role")
                return
            run = peer_int(message.get("run"), "run", 1, MAX_RUN_ID)
            self._announced_run = run
            self._in_thread(lambda: self._join_run(run))
            return
        if kind == "stop":
            # A stop of an earlier run, delivered again after a reconnection, must not end
            # the run that followed it.
            if message.get("run") not in (self.run, self._announced_run):
                log.info("stop of run %s from the peer dropped: current run is %d",
                         shown(message.get("run")), self.run)
                return
            reason = f"peer stopped key generation: {message.get('reason', 'no reason given')}"
            if message.get("error") is True:
                log.error("key generation stopped by the peer (%s): %.500s",
                          self.link.stats.peer_identity or "no identity",
                          message.get("reason", "no reason given"))
            self._in_thread(lambda: self._stop_local(reason))
            return
        if kind in RELEASE_MESSAGES:
            self.release.on_message(message)
            return
        if message.get("run") != self.run:
            log.debug("control message %s of run %s dropped (current run %d)", kind,
                      message.get("run"), self.run)
            return
        pipeline = self.pipeline
        if kind == "st3":
            self._cancel_start_timer()
        elif kind == "mode":
            state = S(message["state"])
            # The peer decides only between these two; OFF and the others follow from
            # this node's own channel and workers.
            if state not in (S.SERVICE_MODE, S.KEY_GENERATION):
                raise ValueError(f"invalid state {state.value} in a mode message: expected "
                                 f"{S.SERVICE_MODE.value} or {S.KEY_GENERATION.value}")
            try:
                self.engine.move(state, f"peer decided: {message.get('reason', '')}")
            except TransitionError as error:
                # The peer decided before it received news of a change here, such as a
                # lost clock lock. The message that reports the change is already sent.
                log.info("mode decision of the peer ignored: %s", error)
        elif kind == "key_staged" and pipeline is not None:
            peer_int(message.get("block"), "block", 0, 2**32 - 1)
            if not isinstance(message.get("ok"), bool):
                raise ValueError(f"invalid ok: expected true or false, got {shown(message.get('ok'))}")
            pipeline.ec_worker.put(("key_staged", message))
        elif pipeline is not None:
            pipeline.on_control(message)

    def _on_link_state(self, state: LinkState) -> None:
        engine = self.engine
        if state is LinkState.CONNECTED:
            if engine.suspended is not None and not self._link_was_reset:
                engine.resume(f"channel to the peer reconnected; run {self.run} continues")
            elif engine.state is S.OFF and engine.suspended is None:
                engine.move(S.ONLY_COMMUNICATION, "channel to the peer connected")
            # After a new session, the stop of the old run ends the pause instead.
            self._link_was_reset = False
            self._maybe_auto_start()
        elif state is LinkState.DISCONNECTED:
            error = self.link.stats.last_error or "connection closed"
            if engine.state is S.ONLY_COMMUNICATION:
                engine.move(S.OFF, f"channel lost: {error}")
            elif engine.running and not self._closed:
                engine.suspend(f"channel to the peer lost ({error}); run {self.run} paused "
                               "until it reconnects")

    def _on_link_reset(self, reason: str) -> None:
        self._link_was_reset = True
        # Sent before anything of a new run, so staged keys are settled before new blocks.
        self.release.on_new_session()
        if self.pipeline is not None:
            self._in_thread(lambda: self._stop_local(f"new link session ({reason})", restart=True))

    @staticmethod
    def _in_thread(action: Callable[[], None]) -> None:
        def run() -> None:
            try:
                action()
            except ControlError as error:
                log.error("control action failed: %s", error)

        threading.Thread(target=run, daemon=True).start()

    # ---- runs ---------------------------------------------------------------------------

    def start_keygen(self) -> None:
        """Stop any run on both sides, then start a new key generation run."""
        self._reject_if_closed()
        if self.link.state is not LinkState.CONNECTED:
            raise ControlError("cannot start key generation: the channel to the peer is not "
                               f"connected ({self.link.stats.last_error or 'no connection yet'})")
        if self.role == "low":
            self.send_control({"msg": "st1"})
            self._arm_start_timer()
            return
        with self._lock:
            self._reject_if_closed()
            self._stop_pipeline("new run requested")
            self.run = secrets.randbelow(MAX_RUN_ID) + 1
            self._begin(HighPipeline)
            self.send_control({"msg": "st2"})
        self._arm_start_timer()

    def _reject_if_closed(self) -> None:
        if self._closed:
            raise ControlError("cannot start key generation: the node is shutting down")

    def _join_run(self, run: int) -> None:
        with self._lock:
            if self._closed:
                log.info("run %d of the peer not joined: the node is shutting down", run)
                return
            self._cancel_start_timer()
            self._stop_pipeline("peer started a new run")
            self.run = run
            self._begin(LowPipeline)
            self.send_control({"msg": "st3"})

    def _begin(self, pipeline_class) -> None:
        self.stop_reason = ""
        if self.engine.state is S.OFF:
            self.engine.move(S.ONLY_COMMUNICATION, "channel connected")
        self.engine.move(S.INITIATING, f"run {self.run} starting")
        # Folders of stopped runs contain only type-2 and type-4 files waiting for the peer's
        # acknowledgement, whose queued frames keep their own copy, and would otherwise
        # pile up one per run.
        self._drop_stale_runs()
        self.pipeline = pipeline_class(self, self.run)
        self.pipeline.start()
        self.watchdog.record(f"run {self.run} started")

    def _arm_start_timer(self) -> None:
        self._cancel_start_timer()
        timer = threading.Timer(self.config["reply_timeout_s"], self._on_start_timeout)
        timer.daemon = True
        self._start_timer = timer
        timer.start()

    def _cancel_start_timer(self) -> None:
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        self._start_attempts = 0

    def _on_start_timeout(self) -> None:
        self._start_attempts += 1
        attempts = self._start_attempts
        if self._closed:
            return
        if attempts >= START_ATTEMPTS:
            self._stop_local(f"peer did not reply to {attempts} start requests within "
                             f"{self.config['reply_timeout_s']} s each")
            return
        log.warning("no reply to the start request within %.1f s; sending it again (attempt %d)",
                    self.config["reply_timeout_s"], attempts + 1)
        try:
            self.start_keygen()
        except ControlError as error:
            log.error("repeating the start request failed: %s", error)
        self._start_attempts = attempts

    def stop_keygen(self, reason: str = "stop requested", error: bool = False) -> None:
        """Stop key generation on both sides; the channel stays up.

        With error, the peer logs the reason as an error too, because the stop needs an
        operator.
        """
        message = {"msg": "stop", "reason": reason}
        if error:
            message["error"] = True
        self.send_control(message)
        self._stop_local(reason)

    def _stop_local(self, reason: str, restart: bool = False) -> None:
        with self._lock:
            self._cancel_start_timer()
            self._stop_pipeline(reason)
            self.stop_reason = reason
            connected = self.link.state is LinkState.CONNECTED
            target = S.ONLY_COMMUNICATION if connected else S.OFF
            paused = self.engine.suspended is not None
            if paused or (self.engine.state is not target
                          and (self.engine.state is not S.OFF or connected)):
                self.engine.move(target, reason)
            else:
                self.engine.note(reason)
        if restart:
            self._maybe_auto_start()

    def _maybe_auto_start(self) -> None:
        """With auto start, start a run from the high-count side when none is running."""
        if not (self.auto_start and self.role == "high") or self._closed:
            return

        def start_if_idle() -> None:
            with self._lock:
                connected = self.link.state is LinkState.CONNECTED
                if self.pipeline is None and connected and not self._closed:
                    self.start_keygen()

        self._in_thread(start_if_idle)

    def _stop_pipeline(self, reason: str) -> None:
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.stop()
            self.watchdog.record(f"run {pipeline.run} stopped: {reason}")
            self.release.after_run_stopped()

    def fatal(self, reason: str) -> None:
        """Stop key generation on both sides because of an error this node cannot fix."""
        log.error("key generation stopped: %s", reason)
        self._in_thread(lambda: self.stop_keygen(reason, error=True))

    def restart_keygen(self, reason: str) -> None:
        """Start a new key generation run on both sides, which searches the offset again."""
        log.warning("restarting key generation: %s", reason)
        self._in_thread(self.start_keygen)

    def set_mode(self, state: EngineState, reason: str) -> None:
        self.engine.move(state, reason)
        self.send_control({"msg": "mode", "state": state.value, "reason": reason})

    def record_block(self, record: BlockRecord) -> None:
        self.stats.blocks.append(record)
        self.stats.block_count += 1
        self.stats.total_final_bits += record.final_bits
        self.progress("block", record=record)

    def _on_give_up(self, worker: str, message: str) -> None:
        self.fatal(message)

    def _on_engine_change(self, old: EngineState, new: EngineState, reason: str) -> None:
        if new is old:
            self.watchdog.record(f"engine stays in {new.value}: {reason}")
        else:
            self.watchdog.record(f"engine {old.value} -> {new.value}: {reason}")
        self.progress("state", state=new.value, reason=reason)

    # ---- NodeControl --------------------------------------------------------------------

    def status(self) -> StatusSnapshot:
        stats = self.stats
        link_badge = WorkerBadge("transferd", WorkerState.RUNNING if self.link.state is LinkState.CONNECTED
                                 else WorkerState.RESTARTING if self.link.state is LinkState.DISCONNECTED
                                 else WorkerState.STOPPED, self.link.stats.connections,
                                 self.link.stats.last_error)
        blocks = tuple(stats.blocks)
        pipeline = self.pipeline
        manager = pipeline.blocks if pipeline is not None else None
        servo = getattr(pipeline, "servo", None)
        servoed_qber = servo.servoed if servo is not None else stats.peer_servoed_qber
        return StatusSnapshot(
            time=time.time(),
            identity=self.config["identity"],
            engine_state=self.engine.state,
            connected=self.link.state is LinkState.CONNECTED,
            active_connection=self.config["remote_connection_id"],
            connections=tuple(self.config["connections"]),
            workers=(link_badge,) + self.watchdog.badges(),
            raw_key=RawKeyStatus(
                peer=self.link.stats.peer_identity or self.link.stats.peer_address,
                role=Role.HIGH_COUNT if self.role == "high" else Role.LOW_COUNT,
                protocol=KeyProtocol.BBM92 if self.engine.mode is S.KEY_GENERATION else KeyProtocol.SERVICE,
                initial_time_offset_ticks=stats.initial_offset_ticks,
                tracked_time_offset_ticks=stats.tracked_offset_ticks,
                offset_search_snr=stats.snr_coarse, offset_search_snr_fine=stats.snr_fine,
                coincidences_per_epoch=stats.coincidences, accidentals_per_epoch=stats.accidentals,
                last_received_epoch=stats.last_received_epoch, service_qber=stats.service_qber,
                skipped_epochs=stats.skipped_epochs,
                frequency_offset=stats.frequency_offset),
            error_correction=ErrorCorrectionStatus(
                blocks=stats.block_count, total_final_bits=stats.total_final_bits,
                servoed_qber=servoed_qber,
                qber_limit=self.config["QBER_limit"], recent_blocks=blocks,
                undigested_epochs=len(manager.collected) if manager is not None else 0,
                undigested_raw_bits=manager.collected_bits if manager is not None else 0,
                blocks_in_flight=manager.blocks_in_flight if manager is not None else 0),
            detectors=self._detector_status(),
            config_note=self.engine.reason,
        )

    def _detector_status(self) -> DetectorStatus:
        stats = self.stats
        counts = [NodeCounts(self.config["identity"] or self.role, stats.last_local_epoch,
                             tuple(stats.detector_counts))]
        if stats.peer_detector_counts:
            peer = self.link.stats.peer_identity or ("low" if self.role == "high" else "high")
            counts.append(NodeCounts(peer, stats.peer_counts_epoch, stats.peer_detector_counts))
        histogram = None
        if stats.histogram is not None:
            source = (f"the high-count side {self.link.stats.peer_identity}".rstrip()
                      if stats.histogram_from_peer else "")
            histogram = CoincidenceHistogram(
                tracked_offset_ticks=stats.histogram_offset_ticks or 0,
                first_bin_ticks=HISTOGRAM_FIRST_TICK, bin_width_ticks=1,
                counts=stats.histogram, epoch=stats.histogram_epoch, computed_by=source)
        return DetectorStatus(counts=tuple(counts),
                              skew_corrections_ticks=tuple(self.config.skew_corrections()),
                              histogram=histogram, basis_qber=dict(stats.basis_qber))

    def restart_connection(self) -> None:
        self.link.drop_connection("restart requested")

    def restart_transferd(self) -> None:
        self.link.drop_connection("file transfer restart requested")

    def set_conn(self, conn_id: str) -> None:
        try:
            selected = self.config.with_connection(conn_id)
        except ConfigError:
            raise UnknownConnectionError(conn_id, tuple(self.config["connections"])) from None
        with self._channel_lock:
            if not self._channel_started:
                raise ControlError(f"cannot switch to connection {conn_id}: the node has not "
                                   "started its channel yet; try again once it has started")
            self._switch_connection(conn_id, selected)

    def _switch_connection(self, conn_id: str, selected: Config) -> None:
        self._stop_local(f"switching to connection {conn_id}")
        self.link.stop()
        self.config = selected
        self.keystore.remote_id = selected["remote_connection_id"]
        self.link = self._make_link(selected)
        try:
            self.link.start()
        except ChannelError as error:
            raise ControlError(f"cannot switch to connection {conn_id}: {error}") from None

    def get_config(self) -> dict[str, Any]:
        return self.config.as_dict()

    def validate_config(self, config: Mapping[str, Any]) -> list[ConfigProblem]:
        problems = []
        # A key left out would fall back to its default, not keep its current value, so
        # a partial configuration is rejected rather than merged.
        missing = missing_keys(config)
        if missing:
            problems.append(ConfigProblem("", (
                f"missing {len(missing)} of the {len(SCHEMA)} configuration keys: "
                f"{', '.join(missing)}; send the whole configuration as GET /api/config "
                "returns it, with your changes")))
        try:
            Config(config)
        except ConfigError as error:
            match = re.search(r"'([^']+)'", str(error))
            problems.append(ConfigProblem(match.group(1) if match else "", str(error)))
        return problems

    def save_config(self, config: Mapping[str, Any]) -> ConfigSaveResult:
        problems = self.validate_config(config)
        if problems:
            raise ConfigRejected(problems)
        candidate = Config(config, path=self.config.path)
        # The site file keeps the keys it named and gains the changed ones. A key that
        # was only at its default stays out, so `qkdserver node` still rejects a site
        # file that does not name source.kind.
        candidate.explicit_keys = self.config.explicit_keys | {
            key for key in SCHEMA if candidate[key] != self.config[key]}
        old, new = flatten_config(self.config.as_dict()), flatten_config(candidate.as_dict())
        changed = tuple(sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key)))
        if self.config.path is not None:
            text = _dump_config(candidate.explicit_dict(), self.config.path)
            write_atomic(self.config.path, text.encode("utf-8"), mode=0o644)
        applied = tuple(key for key in changed if key in LIVE_KEYS)
        restart = tuple(key for key in changed if key not in LIVE_KEYS)
        self.config = candidate
        pipeline = self.pipeline
        if pipeline is not None:
            pipeline.config = candidate
            pipeline.blocks.config = candidate
            servo = getattr(pipeline, "servo", None)
            if servo is not None:
                servo.limit, servo.blocks = candidate["QBER_limit"], candidate["servo_blocks"]
        note = (f"Saved; restart key generation to apply {', '.join(restart)}." if restart else "")
        return ConfigSaveResult(changed, applied, restart, note)


def _dump_config(values: dict, path: Path) -> str:
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        return yaml.safe_dump(values, sort_keys=True)
    return json.dumps(values, indent=2, sort_keys=True) + "\n"


def check_start_up(config: Config) -> None:
    """Run the start-up checks of `qkdserver node` that need no network and write nothing.

    Raises ConfigError or KeyStoreError with the message the node gives. Not checked:
    free ports, an address of listen_address on this machine, the peer, the TDC1 device
    (a node looks for it when key generation starts) and another node on data_root.
    """
    config.require_explicit_source_kind()
    config.require_event_source()
    config.require_folders()
    config.require_channel_files()
    make_context(config["role"] == "high", config["local_cert"], config["local_key"],
                 config["remote_cert"])
    read_keystore_state(Path(config["data_root"]) / STATE_FILE)
    check_notify_pipe(Path(config["final_key_folder"]) / NOTIFY_PIPE)


def run_node_until_signal(config: Config, start: bool = False, web_port: Optional[int] = None,
                          web_host: str = "0.0.0.0", web_certfile: Optional[str] = None,
                          web_keyfile: Optional[str] = None) -> int:
    """Run one node (and its web page on web_port, unless None) until SIGINT or SIGTERM.

    With web_certfile and web_keyfile (PEM) the web page is served over HTTPS. Returns
    the process exit status: 0 after a signal, 2 when the node or its web page cannot start.
    Must run in the main thread, because only that thread can install signal handlers.
    """
    with StopSignals((signal.SIGINT, signal.SIGTERM)) as stop:
        return _run_node(config, stop, start, web_port, web_host, web_certfile, web_keyfile)


def _run_node(config: Config, stop: "StopSignals", start: bool, web_port: Optional[int],
              web_host: str, web_certfile: Optional[str], web_keyfile: Optional[str]) -> int:
    try:
        node = Node(config, auto_start=start)
    except (ConfigError, FolderInUseError, KeyStoreError) as error:
        # KeyStoreError: a damaged keystore_state.json, or a notify.pipe that is not a FIFO.
        return _start_failed(str(error))
    except OSError as error:
        return _start_failed(f"cannot use {error.filename}: {error.strerror}; check data_root "
                             "and final_key_folder")
    web = None
    try:
        # The web page starts first, so a taken port stops the node before it connects.
        if web_port is not None:
            from .web.server import serve

            try:
                web = serve(node, secrets_dir=node.data_root, host=web_host, port=web_port,
                            certfile=web_certfile, keyfile=web_keyfile)
            except (OSError, ValueError) as error:
                # Port in use, a certificate or key that is missing or invalid, or a web
                # token that is too short.
                if getattr(error, "errno", None) == errno.EADDRINUSE:
                    error = "another process uses the port; stop it, or choose another --web-port"
                elif getattr(error, "errno", None) == errno.EADDRNOTAVAIL:
                    error = (f"{web_host} is not an address of this machine; give one of its "
                             "addresses as --web-host, or 0.0.0.0 for all of them")
                return _start_failed(f"cannot start the web page on {web_host}:{web_port}: {error}")
            log.info("web page on %s (%s)", web.url, web.bind_description)
        try:
            node.start()
        except ChannelError as error:
            return _start_failed(f"classical channel: {error}")
        if config["source.kind"] == "simulator":
            # Both nodes derive their keys from the simulator's seed, so a test link only.
            log.warning("source.kind is 'simulator': the keys come from "
                        "simulated detections that anyone with source.seed %d can compute, "
                        "so they are not secret; set source.kind to 'tdc1' or 'pipe' for a "
                        "real link", config["source.seed"])
        received = stop.wait()
        log.info("received %s; stopping the node", signal.Signals(received).name)
    finally:
        if web is not None:
            web.stop()
        node.close()
    log.info("node stopped")
    return 0


class StopSignals:
    """Handlers that turn the given signals into a stop request the main thread waits for.

    The kernel delivers a signal sent to the process to any thread that does not block
    it. CPython's C handler then only sets a flag, and the Python handler runs once the
    main thread executes bytecode again, so a main thread blocked on a lock or an event
    misses a signal that another thread received. The C handler also writes the
    signal number to the wake-up file descriptor (``signal.set_wakeup_fd``) on whichever
    thread it runs, and :meth:`wait` waits on that descriptor. Signals that arrive while
    the node stops are ignored, so a second Ctrl-C does not cut the settlement of staged
    keys short.
    """

    def __init__(self, signals: tuple[int, ...]):
        self.signals = frozenset(signals)
        self._reader, self._writer = socket.socketpair()
        self._previous_handlers: dict[int, Any] = {}
        self._previous_fd = -1

    def __enter__(self) -> "StopSignals":
        for sock in (self._reader, self._writer):
            sock.setblocking(False)
        # The handler does nothing, because the byte on the wake-up descriptor is the request.
        for number in self.signals:
            self._previous_handlers[number] = signal.signal(number, lambda *_: None)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(),
                                                 warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._reader.close()
        self._writer.close()

    def wait(self) -> int:
        """Block until one of the signals arrives, or has arrived since entering, and return it."""
        while True:
            select.select([self._reader], [], [])
            try:
                received = self._reader.recv(64)
            except BlockingIOError:
                continue
            for number in received:
                if number in self.signals:
                    return number


def _start_failed(message: str) -> int:
    """Print why the node cannot start, once, and return the exit status 2."""
    print(f"qkdserver node: {message}", file=sys.stderr)
    return 2
