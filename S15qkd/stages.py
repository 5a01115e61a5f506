"""The Rust stages as the node's workers call them, one small adapter per stage.

The stage objects live in ``qkd_core``; this module only turns their results into the
shapes the node passes between workers (epoch numbers, file bytes, key bits as uint8
arrays, per-epoch statistics), so that a change in one binding touches one class here.
Every heavy call runs in Rust with the GIL released.

Epoch files travel as the bytes of the reference's file formats (types 1 to 4), which
is also what goes over the classical channel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

import qkd_core

log = logging.getLogger(__name__)

#: Time difference in ticks of the first bin of costream's per-epoch histogram.
HISTOGRAM_FIRST_TICK = getattr(qkd_core, "HISTOGRAM_FIRST_TICK", -64)

#: Ticks of 1/8 ns per epoch: an epoch is the top 17 bits of the 49-bit time.
EPOCH_TICKS = 1 << 32
EPOCH_SECONDS = 2**29 * 1e-9


#: Raised by the reconciliation engine for a message that belongs to no block in progress.
ReconcileError = getattr(qkd_core, "ReconcileError", qkd_core.QkdError)


class StageUnavailable(RuntimeError):
    """The installed qkd_core lacks a stage the node needs."""


def _require(name: str):
    stage = getattr(qkd_core, name, None)
    if stage is None:
        raise StageUnavailable(f"qkd_core {getattr(qkd_core, '__version__', '?')} has no {name}; "
                               "install a qkd_core built with that stage (make install)")
    return stage


# ---- results passed between workers ---------------------------------------------------------

@dataclass
class ChoppedEpoch:
    """One finished epoch of the chopper (low-count side) or chopper2 (high-count side).

    The files are in the folders given to :class:`Chopper`, named by the epoch in 8 hex
    digits: type 1 on the high-count side, types 2 and 3 on the low-count side.
    """

    epoch: int
    events: int
    detector_counts: tuple[int, ...]  # events per detector 1..4 (bit 0..3 of the pattern)


@dataclass
class OffsetResult:
    """Clock offset between the sides: ``t_L - t_H`` in ticks, after side H's times are
    rescaled by ``1 + frequency_offset`` around ``origin_ticks`` (no rescaling when the
    frequency offset is 0)."""

    offset_ticks: int
    snr_coarse: float
    snr_fine: Optional[float]
    frequency_offset: float = 0.0
    origin_ticks: Optional[int] = None


@dataclass
class CoincidenceEpoch:
    """costream's result for one epoch: the type-4 file for the peer and the local raw key."""

    epoch: int
    t4: Optional[bytes]
    raw_bits: np.ndarray           # uint8 0/1, sifted key of this side
    coincidences: int
    accidentals: int
    tracked_offset_ticks: int
    #: Examined pairs per time difference from the tracked offset, bins of 1 tick from
    #: HISTOGRAM_FIRST_TICK on.
    histogram: tuple[int, ...] = ()
    #: Basis of each raw key bit (uint8, 0 for H/V, 1 for diagonal).
    key_bases: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))


# ---- adapters -------------------------------------------------------------------------------

def detector_counts(pattern_counts) -> tuple[int, ...]:
    """Events per detector 1..4 from the events per pattern 0..15."""
    counts = np.asarray(pattern_counts, dtype=np.int64)
    patterns = np.arange(16)
    return tuple(int(counts[(patterns >> bit) & 1 == 1].sum()) for bit in range(4))


class Chopper:
    """chopper (low-count side) or chopper2 (high-count side), fed event batches.

    chopper2 writes type-1 files into ``folders["t1"]``; chopper writes type-2 files into
    ``folders["t2"]`` and type-3 files into ``folders["t3"]``. Files are written atomically.
    """

    def __init__(self, role: str, folders: dict, max_event_diff_us: int):
        self.role = role
        if role == "high":
            self._stage = _require("Chopper2")(str(folders["t1"]), max_gap_us=max_event_diff_us)
        else:
            self._stage = _require("Chopper")(str(folders["t2"]), str(folders["t3"]), protocol=1,
                                              max_gap_us=max_event_diff_us)

    def feed(self, times: np.ndarray, patterns: np.ndarray) -> list[ChoppedEpoch]:
        return [self._convert(item) for item in self._stage.feed(times, patterns)]

    def stats(self) -> dict:
        """Return the chopper's event counters since it started, such as
        ``events_in`` and ``dropped_backward``."""
        return self._stage.stats

    def finish(self) -> list[ChoppedEpoch]:
        """Write the epoch still open at the end of the input (the reference drops it)."""
        item = self._stage.flush()
        return [] if item is None else [self._convert(item)]

    @staticmethod
    def _convert(item: dict) -> ChoppedEpoch:
        return ChoppedEpoch(int(item["epoch"]), int(item["events"]), detector_counts(item["patterns"]))


class OffsetFinder:
    """Time offset (pfind) between the high side's type-1 and the peer's type-2 epochs."""

    def __init__(self, buffer_order: int, fine_resolution_ns: int, coarse_resolution_ns: int):
        self._finder = _require("OffsetFinder")(buffer_order, fine_resolution_ns, coarse_resolution_ns)

    def find(self, t1_folder, t2_folder, start_epoch: int, epochs: int) -> OffsetResult:
        """Search epochs start_epoch .. start_epoch + epochs - 1 of the two folders."""
        result = self._finder.find_in_folders(str(t1_folder), str(t2_folder), start_epoch, epochs)
        return OffsetResult(int(result.offset_ticks), float(result.coarse_snr), float(result.fine_snr))


class FrequencySearch:
    """Frequency and time offset together (the fpfind method) between the high side's
    type-1 and the peer's type-2 epochs, for clocks whose rates differ by up to 1e-4."""

    #: Largest relative frequency the search accepts (its default, 2^-13, about 122 ppm).
    MAX_FREQUENCY = 2.0**-13

    #: Distance of the late correlation window from the early one, in coarse spans
    #: (coarse bin width times 2^buffer_order); the reference server passes fpfind -s 5.
    SEPARATION = 5

    def __init__(self, buffer_order: int, fine_resolution_ns: int, coarse_resolution_ns: int):
        self.buffer_order = buffer_order
        self.coarse_resolution_ns = coarse_resolution_ns
        self._finder = _require("FrequencyFinder")(
            buffer_order=buffer_order, coarse_resolution_ns=float(coarse_resolution_ns),
            fine_resolution_ns=float(fine_resolution_ns), separation=float(self.SEPARATION))

    def epochs_needed(self) -> int:
        """Epochs that cover both windows with one span to spare, as fpfind reads them."""
        return self.epochs_for(self.coarse_resolution_ns, self.buffer_order)

    @classmethod
    def epochs_for(cls, coarse_resolution_ns: int, buffer_order: int) -> int:
        """Return epochs_needed() of a search with these settings, without planning its FFTs."""
        span_ns = coarse_resolution_ns * 2**buffer_order
        return int(np.ceil((cls.SEPARATION + 2) * span_ns / 2**29)) + 1

    def find(self, t1_folder, t2_folder, start_epoch: int, epochs: int) -> OffsetResult:
        """Search epochs start_epoch .. start_epoch + epochs - 1 of the two folders."""
        result = self._finder.find_in_folders(str(t1_folder), str(t2_folder), start_epoch, epochs)
        # The search reports one significance, of its last (finest) peak; it is given as
        # the coarse figure, and the fine one stays empty.
        return OffsetResult(int(round(result.offset_ticks)), float(result.significance), None,
                            float(result.relative_frequency), int(result.origin_ticks))


class Costream:
    """costream on the high-count side: coincidences, clock tracking, sifting, type 4.

    Files are pushed in epoch order (type-1 about one epoch ahead of type-2) and
    :meth:`advance` returns the epochs it could close. With a frequency offset, the
    type-1 times are rescaled by it before matching.
    """

    def __init__(self, start_epoch: int, offset: OffsetResult, coincidence_window: int,
                 tracking_window: int, filter_time_constant_us: int):
        # Options as the reference server runs costream: -p 1 -T 2 -R 5 -Q -<time constant>.
        # The servo carries its division remainders: truncated steps, as the reference
        # computes them, let the offset walk off the peak at 1e7 pairs/s.
        self._stage = _require("Costream")(
            start_epoch, offset.offset_ticks, protocol=1, coincidence_window=coincidence_window,
            tracking_window=tracking_window, track_filter=-filter_time_constant_us,
            width_filter=5, zero_policy=2, relative_frequency=offset.frequency_offset,
            frequency_origin_ticks=offset.origin_ticks, servo_remainder=True)

    @property
    def next_type1_epoch(self) -> int:
        return self._stage.next_type1_epoch

    @property
    def next_type2_epoch(self) -> int:
        return self._stage.next_type2_epoch

    def push_type1(self, content: bytes) -> None:
        self._stage.push_type1(content)

    def push_type2(self, content: bytes) -> None:
        self._stage.push_type2(content)

    def skip_type1(self) -> int:
        """Queue the next type-1 epoch without events and return it; see qkd_core.Costream."""
        return self._stage.skip_type1()

    def skip_type2(self) -> int:
        """Queue the next type-2 epoch without events and return it; see qkd_core.Costream.

        The epoch closes with no raw key here, and its type-4 file has no entries, so the
        peer's splicer takes no bits from it either.
        """
        return self._stage.skip_type2()

    def advance(self) -> list[CoincidenceEpoch]:
        closed, _need, _epoch = self._stage.advance()
        offset = self._stage.current_offset
        return [CoincidenceEpoch(item.epoch, item.type4, raw_key_bits(item.type3),
                                 int(item.coincidences), int(item.accidentals), int(offset),
                                 tuple(item.histogram),
                                 np.frombuffer(item.key_bases, dtype=np.uint8))
                for item in closed]


class Splicer:
    """splicer on the low-count side: the local bits of the coincidences costream found."""

    def __init__(self):
        self._stage = _require("Splicer")(protocol=1)

    def process(self, epoch: int, t3: bytes, t4: bytes) -> np.ndarray:
        return raw_key_bits(self._stage.splice(epoch, t3, t4).type3)

    def process_without_type3(self, epoch: int, t4: bytes) -> np.ndarray:
        """Splice an epoch that this side's chopper never wrote (no events in it).

        Returns the empty raw key when the peer kept no event of the epoch, as for an
        epoch it skipped. Raises qkd_core.FormatError when it kept some, because their
        bits are not on this side.
        """
        # A raw-key file of BBM92 (1 bit per entry) with no entries.
        empty_type3 = np.array([3, epoch, 0, 1], dtype="<u4").tobytes()
        return self.process(epoch, empty_type3, t4)


def raw_key_bits(type3: Optional[bytes]) -> np.ndarray:
    """Unpack a BBM92 raw-key file (type 3, one bit per entry) into uint8 key bits."""
    from .keystore import unpack_key_bits

    if not type3:
        return np.zeros(0, dtype=np.uint8)
    if len(type3) < 16:
        raise ValueError(f"raw-key file of {len(type3)} bytes is shorter than its 16-byte header")
    _tag, epoch, length, bits_per_entry = np.frombuffer(type3[:16], dtype="<u4")
    if bits_per_entry != 1:
        raise ValueError(f"raw key of epoch {int(epoch):08x} has {int(bits_per_entry)} bits per "
                         "entry; key generation needs 1 (BBM92 protocol)")
    return unpack_key_bits(type3[16:], int(length))


def skew_correct(times: np.ndarray, patterns: np.ndarray, skews: list[int]) -> np.ndarray:
    """Add each detector's delay (ticks of 1/8 ns) to the times of its events, as
    readevents does: only single-detector events move, modulo 2^49."""
    if not any(skews):
        return times
    return qkd_core.apply_detector_skew(times, patterns, list(skews))


# ---- event sources --------------------------------------------------------------------------

class EventSource:
    """Timestamps of one node in batches: ``next_batch()`` returns (times, patterns) or None.

    ``real_time`` paces the batches so that the event times advance no faster than the
    wall clock, as a time tagger delivers them; otherwise batches come as fast as the
    consumer takes them.
    """

    #: True when the source already added the detector skews to the times.
    applies_skew = False
    #: False for a time tagger, which goes on counting while the node does not read it.
    #: The reader then drops batches instead of waiting when the peer falls behind.
    can_pause = True

    def __init__(self, real_time: bool):
        self.real_time = real_time
        self._wall_start: Optional[float] = None
        self._first_tick: Optional[int] = None

    def next_batch(self, stop_event) -> Optional[tuple[np.ndarray, np.ndarray]]:
        batch = self._read()
        if batch is None:
            return None
        times = batch[0]
        if self.real_time and len(times):
            import time

            if self._wall_start is None:
                self._wall_start, self._first_tick = time.monotonic(), int(times[0])
            due = self._wall_start + (int(times[-1]) - self._first_tick) / 8e9
            delay = due - time.monotonic()
            if delay > 0:
                stop_event.wait(delay)
        return batch

    def _read(self):
        raise NotImplementedError


class SimulatedSource(EventSource):
    """This node's side of a qkd_core.LinkSimulator; both nodes use the same seed.

    In real time with ``start_time`` set, the simulator begins at the source time that
    passed since then, as a running time tagger would have, so that both nodes see the
    same epochs however late each one starts. The simulator skips there directly: the
    cost is at most 134 ms of simulated time, not the time since ``start_time``.
    """

    BATCH_SECONDS = EPOCH_SECONDS / 4
    #: Largest skip that qkd_core.LinkSimulator accepts: 2^52 ticks, about 6.5 days.
    MAX_SKIP_TICKS = 1 << 52

    def __init__(self, role: str, real_time: bool, epochs: int, start_time: float = 0.0,
                 **simulator_arguments):
        super().__init__(real_time)
        self.role = role
        skip_ticks = self._ticks_since(start_time) if real_time and start_time > 0 else 0
        self._simulator = _require("LinkSimulator")(skip_ticks=skip_ticks, **simulator_arguments)
        self._limit_ticks = skip_ticks + epochs * EPOCH_TICKS if epochs else None
        stats = self._simulator.stats()
        #: Pairs simulated before the first batch, the cost of beginning at start_time.
        self.opening_pairs = stats["pairs"] + stats["warmup_pairs"]
        if skip_ticks:
            log.info("simulated %s-count side begins %.3f s after source.start_time; "
                     "%d pairs simulated before that to rebuild the detector state", role,
                     skip_ticks / 8e9, stats["warmup_pairs"])

    @classmethod
    def _ticks_since(cls, start_time: float) -> int:
        """Return the ticks of 1/8 ns from start_time to now, 0 if start_time is ahead."""
        import time

        behind = time.time() - start_time
        if behind <= 0:
            return 0
        ticks = int(behind * 8e9)
        if ticks > cls.MAX_SKIP_TICKS:
            limit_days = cls.MAX_SKIP_TICKS / 8e9 / 86400
            raise ValueError(f"invalid source.start_time {start_time}: it is "
                             f"{behind / 86400:.1f} days ago, but the simulator can begin at "
                             f"most {limit_days:.1f} days after it; set source.start_time to "
                             "a more recent Unix time, the same on both nodes")
        return ticks

    def _read(self):
        if self._limit_ticks is not None and self._simulator.elapsed_ticks >= self._limit_ticks:
            return None
        high_times, high_patterns, low_times, low_patterns = self._simulator.next_batch(
            self.BATCH_SECONDS)
        if self.role == "high":
            return high_times, high_patterns
        return low_times, low_patterns


class SharedSimulator:
    """One LinkSimulator whose two sides feed the two nodes of ``qkdserver simulate``.

    Simulating the link once instead of once per node halves the simulator's cost.
    A side that reads ahead generates batches for both; the other side's halves wait in
    its queue until that node reads them.
    """

    def __init__(self, epochs: int, **simulator_arguments):
        import threading
        from collections import deque

        self._simulator = _require("LinkSimulator")(**simulator_arguments)
        self._limit_ticks = epochs * EPOCH_TICKS if epochs else None
        self._lock = threading.Lock()
        self._queues = {"high": deque(), "low": deque()}

    def source(self, role: str, real_time: bool) -> EventSource:
        shared = self

        class Side(EventSource):
            def _read(self):
                return shared.take(role)

        return Side(real_time)

    def take(self, role: str):
        with self._lock:
            queue = self._queues[role]
            if not queue:
                if self._limit_ticks is not None and self._simulator.elapsed_ticks >= self._limit_ticks:
                    return None
                high_times, high_patterns, low_times, low_patterns = self._simulator.next_batch(
                    SimulatedSource.BATCH_SECONDS)
                self._queues["high"].append((high_times, high_patterns))
                self._queues["low"].append((low_times, low_patterns))
            return queue.popleft()


class FileSource(EventSource):
    """Recorded raw events (readevents legacy 64-bit words), read in chunks.

    With ``real_time`` a chunk is handed on in batches of at most SLICE_TICKS of event
    time. Pacing waits until the last event of a batch is due, so a whole chunk in one
    batch would hold back its first epochs until its end: 2^18 events are the whole
    12 s golden recording of the low-count side.
    """

    CHUNK_EVENTS = 1 << 18
    SLICE_TICKS = EPOCH_TICKS // 4

    def __init__(self, path: str, real_time: bool):
        super().__init__(real_time)
        self.path = path
        self._pending: Optional[tuple[np.ndarray, np.ndarray]] = None
        try:
            self._file = open(path, "rb")
        except OSError as error:
            raise FileNotFoundError(f"cannot open event file {path!r}: {error.strerror}") from None

    def _read(self):
        while self._pending is None or not len(self._pending[0]):
            data = self._file.read(8 * self.CHUNK_EVENTS)
            if not data:
                self._file.close()
                return None
            self._pending = qkd_core.decode_raw_events(data, "legacy")
        times, patterns = self._pending
        if not self.real_time:
            self._pending = None
            return times, patterns
        # Events are in time order, apart from rare glitches; at least one event goes,
        # so a glitch cannot stop the replay.
        end = max(1, int(np.searchsorted(times, times[0] + np.uint64(self.SLICE_TICKS))))
        self._pending = times[end:], patterns[end:]
        return times[:end], patterns[:end]


def simulator_arguments(config) -> dict:
    """The LinkSimulator arguments of the configuration's ``source.*`` keys."""
    return dict(seed=config["source.seed"], pair_rate=config["source.pair_rate"],
                qber=config["source.qber"], offset_ticks=config["source.offset_ticks"],
                drift=config["source.drift"], jitter_ps=config["source.jitter_ps"],
                background_rate=config["source.background_rate"],
                transmission=(1.0, 1.0 - config["source.loss_low"]))


def open_source(config, role: str) -> EventSource:
    """Build the event source that the configuration names for this node's role."""
    kind = config["source.kind"]
    real_time = config["source.real_time"]
    if kind == "file":
        if not config["source.events_file"]:
            raise ValueError("missing value for 'source.events_file': source.kind is 'file'")
        return FileSource(config["source.events_file"], real_time)
    if kind == "simulator":
        return SimulatedSource(role, real_time, config["source.epochs"],
                               start_time=config["source.start_time"],
                               **simulator_arguments(config))
    from . import sources

    if kind == "tdc1":
        device = sources.DeviceSource(config["source.device"],
                                      skew_ticks=config.skew_corrections())
        return DeviceEvents(device, applies_skew=True)
    return DeviceEvents(sources.PipeSource(config["source.events_file"]), applies_skew=False,
                        pipe=config["source.events_file"])


class DeviceEvents(EventSource):
    """A started :mod:`S15qkd.sources` source (TDC1 device or named pipe), read in batches.

    Events arrive at the device's own pace, so no pacing is added. For a pipe, the node
    logs when events stop for PIPE_IDLE_S and when they come again. The node keeps the
    pipe open for writing too, so a writer that closes it causes no end of file.
    """

    can_pause = False

    #: Seconds without events from a pipe after which the node logs that they stopped.
    PIPE_IDLE_S = 2.0

    def __init__(self, source, applies_skew: bool, pipe: Optional[str] = None):
        super().__init__(real_time=False)
        self.applies_skew = applies_skew
        self.pipe = pipe
        self._last_events: Optional[float] = None   # monotonic time of the last events
        self._idle_logged = False
        self._source = source.start()

    def _read(self):
        batch = self._source.read_batch()
        if self.pipe is not None and batch is not None:
            self._watch_pipe(len(batch[0]))
        return batch

    def _watch_pipe(self, events: int) -> None:
        import time

        now = time.monotonic()
        if events:
            if self._idle_logged:
                log.info("pipe %s: events arrive again, %.1f s after the last ones",
                         self.pipe, now - self._last_events)
            self._last_events, self._idle_logged = now, False
        elif (self._last_events is not None and not self._idle_logged
              and now - self._last_events >= self.PIPE_IDLE_S):
            log.info("pipe %s: no events for %g s; its writer closed the pipe or stopped "
                     "writing", self.pipe, self.PIPE_IDLE_S)
            self._idle_logged = True


# ---- reconciliation -------------------------------------------------------------------------

@dataclass
class BlockResult:
    """Outcome of one block on one side. ``final_bits`` is None when the block was discarded."""

    block_id: int
    final_bits: Optional[np.ndarray]
    qber: Optional[float]
    leaked_bits: int
    efficiency: float
    reason: str = ""


@dataclass
class ReconcileStep:
    """Messages for the peer, in order, and the outcome of a block that ended."""

    block_id: Optional[int]
    messages: list[bytes]
    outcome: Optional[BlockResult]


def binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return float(-p * np.log2(p) - (1 - p) * np.log2(1 - p))


class Reconciler:
    """This side's reconciliation engine (error correction, verification, privacy
    amplification) for every block of a run.

    It owns no socket: each call returns the messages for the peer. The low-count side
    is the initiator (it opens blocks and holds the reference key); the high-count side
    corrects its key. Both use the engine's defaults for the QBER limit and the security
    parameters, which must be equal on the two sides.
    """

    def __init__(self, initiator: bool, config):
        engine_class = _require("Reconciler")
        self._engine = engine_class("initiator" if initiator else "responder")

    def start_block(self, block_id: int, bits: np.ndarray) -> ReconcileStep:
        return self._convert(block_id, self._engine.start_block(block_id, bits))

    def handle_message(self, block_id: int, message: bytes) -> ReconcileStep:
        return self._convert(block_id, self._engine.handle_message(message))

    def abort_block(self, block_id: int, reason: str) -> ReconcileStep:
        return self._convert(block_id, self._engine.abort_block(block_id, reason))

    @staticmethod
    def _convert(block_id: int, step) -> ReconcileStep:
        messages, outcome = step
        result = None
        if outcome is not None:
            final = None
            if outcome.verified:
                packed = np.frombuffer(outcome.key, dtype=np.uint8)
                final = np.unpackbits(packed)[:outcome.key_bits]
            reconciled = int(outcome.reconciled_bits)
            qber = float(outcome.qber) if reconciled else None
            leak_ec = int(outcome.leaked_bits)
            leaked = leak_ec + int(outcome.sample_bits) + int(outcome.tag_bits)
            entropy = binary_entropy(qber or 0.0)
            efficiency = leak_ec / (reconciled * entropy) if entropy > 0 else 0.0
            reason = "" if outcome.verified else f"{outcome.reason}: {outcome.detail}"
            result = BlockResult(int(outcome.block_id), final, qber, leaked, efficiency, reason)
        return ReconcileStep(block_id, [bytes(m) for m in messages], result)
