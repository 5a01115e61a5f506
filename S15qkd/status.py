"""Status snapshot and control protocol between a running node and its web page.

The node owns the engine; the web page (``S15qkd.web``) and the HTTP routes only read
:class:`StatusSnapshot` objects and call the methods of :class:`NodeControl`. The real
node implements :class:`NodeControl`; :class:`InMemoryNode` is a
small stand-in that exists only so the contract and the HTTP layer can be unit-tested
without an engine.

Rules of the contract:

- ``status()`` is called about once per second per open page and by scripts, from web
  server threads. It must return quickly (well under 200 ms) and never block on the
  engine, so the node keeps the latest values and hands out an immutable snapshot:
  every dataclass here is frozen and every sequence is a tuple.
- Units are in the field names: ticks of 1/8 ns, epochs of 2^29 ns (about 0.537 s),
  bits, counts per epoch, bits per second. QBER values are fractions (0.05 = 5 %).
- Control methods may block for a few seconds (the reference's start blocks at least
  2 s) and are called from web server threads. They raise :class:`ControlError` when
  the node cannot carry out the request in its current state, and
  :class:`UnknownConnectionError` for a connection id that the configuration lacks.
- The configuration is a nested ``dict`` of JSON types. Dotted paths such as
  ``"local_detector_skew_correction.det1corr"`` name leaves in problems and results.
  ``save_config`` validates, writes the file atomically, and applies what it can to the
  running engine; it reports the keys that only take effect after key generation is
  restarted.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

#: Length of one epoch in seconds: 2^29 ns, the top 17 bits of the 49-bit time in 1/8 ns.
EPOCH_SECONDS = 2**29 * 1e-9

#: How many error-correction blocks the histories keep (the reference graphs show 100).
HISTORY_LENGTH = 100


class EngineState(str, enum.Enum):
    """State of the key-generation engine.

    The names are those of the reference server; external watchers compare them
    between the two nodes (``status_info.state`` in ``/status_data``).
    """

    OFF = "OFF"
    ONLY_COMMUNICATION = "ONLY_COMMUNICATION"
    INITIATING = "INITIATING"
    SERVICE_MODE = "SERVICE_MODE"
    PEAK_FINDING = "PEAK_FINDING"
    KEY_GENERATION = "KEY_GENERATION"


class WorkerState(str, enum.Enum):
    """Condition of one stage worker, shown as a badge on the status page."""

    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


class Role(str, enum.Enum):
    """Which side of the link this node is: it decides which stages run here."""

    HIGH_COUNT = "high_count"
    LOW_COUNT = "low_count"
    UNDECIDED = "undecided"


class KeyProtocol(int, enum.Enum):
    """Protocol of the raw key stream; values are the reference's (0 service, 1 BBM92)."""

    SERVICE = 0
    BBM92 = 1


@dataclass(frozen=True)
class WorkerBadge:
    """One stage worker (channel, source, chopper, costream, splicer, error correction).

    ``name`` uses the reference's process names where one exists (``transferd``,
    ``readevents``, ``chopper``, ``chopper2``, ``costream``, ``splicer``,
    ``error_correction``) so that ``/status_data`` keeps its keys.
    """

    name: str
    state: WorkerState
    restarts: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class RawKeyStatus:
    """Raw key generation: the link, the time offset between the clocks, the rates.

    Values that are not known yet (before peak finding, or on the side that does not
    compute them) are ``None``.
    """

    peer: str = ""
    role: Role = Role.UNDECIDED
    protocol: KeyProtocol = KeyProtocol.SERVICE
    initial_time_offset_ticks: int | None = None
    tracked_time_offset_ticks: int | None = None
    frequency_offset: float | None = None
    offset_search_snr: float | None = None
    offset_search_snr_fine: float | None = None
    coincidences_per_epoch: int | None = None
    accidentals_per_epoch: int | None = None
    last_received_epoch: int | None = None
    service_qber: float | None = None
    #: Type-2 epochs skipped because the peer's file was invalid or never arrived.
    skipped_epochs: int = 0


@dataclass(frozen=True)
class BlockRecord:
    """Outcome of one error-corrected, verified and privacy-amplified block.

    ``efficiency`` is the reconciliation efficiency: leaked bits divided by
    ``raw_bits * h(qber)`` with h the binary entropy; 1.0 is the Shannon limit.
    ``key_rate_bps`` is ``final_bits / (num_epochs * EPOCH_SECONDS)``.
    """

    first_epoch: int
    num_epochs: int
    raw_bits: int
    qber: float
    leaked_bits: int
    efficiency: float
    final_bits: int
    key_rate_bps: float
    finished_at: float = 0.0  # Unix time in seconds


@dataclass(frozen=True)
class ErrorCorrectionStatus:
    """Error correction totals, the last block, and the recent blocks for the graphs."""

    blocks: int = 0
    total_final_bits: int = 0
    undigested_epochs: int = 0       # raw key epochs collected for the next block
    undigested_raw_bits: int = 0
    blocks_in_flight: int = 0        # blocks started, not yet released or discarded
    servoed_qber: float | None = None
    qber_limit: float = 0.1
    recent_blocks: tuple[BlockRecord, ...] = ()

    @property
    def last_block(self) -> BlockRecord | None:
        return self.recent_blocks[-1] if self.recent_blocks else None


@dataclass(frozen=True)
class NodeCounts:
    """Detector counts of one node in its last epoch, one entry per detector."""

    node: str
    epoch: int | None
    counts_per_epoch: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts_per_epoch)


@dataclass(frozen=True)
class CoincidenceHistogram:
    """Histogram of time differences around the tracked time offset.

    Bin ``i`` counts pairs whose time difference minus the tracked offset lies in
    ``[first_bin_ticks + i * bin_width_ticks, first_bin_ticks + (i + 1) * bin_width_ticks)``.
    costream computes it on the high-count side, one epoch at a time. ``computed_by`` is
    empty when this node computed it, else it names the peer that sent it.
    """

    tracked_offset_ticks: int
    first_bin_ticks: int
    bin_width_ticks: int
    counts: tuple[int, ...]
    epoch: int | None = None
    computed_by: str = ""

    def bin_starts_ticks(self) -> tuple[int, ...]:
        return tuple(self.first_bin_ticks + i * self.bin_width_ticks for i in range(len(self.counts)))


@dataclass(frozen=True)
class DetectorStatus:
    """Detector view: counts per detector and node, skews, histogram, per-basis QBER.

    ``skew_corrections_ticks`` is the delay added to each local detector's
    timestamps, in ticks of 1/8 ns. ``basis_qber`` maps a basis name (for example
    ``"HV"``, ``"DA"``) to its QBER and is filled only in service mode.
    """

    counts: tuple[NodeCounts, ...] = ()
    skew_corrections_ticks: tuple[int, ...] = ()
    histogram: CoincidenceHistogram | None = None
    basis_qber: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StatusSnapshot:
    """Everything the web page and the status routes show, taken at one instant."""

    time: float
    identity: str = ""
    engine_state: EngineState = EngineState.OFF
    connected: bool = False
    active_connection: str = ""
    connections: tuple[str, ...] = ()
    workers: tuple[WorkerBadge, ...] = ()
    raw_key: RawKeyStatus = field(default_factory=RawKeyStatus)
    error_correction: ErrorCorrectionStatus = field(default_factory=ErrorCorrectionStatus)
    detectors: DetectorStatus = field(default_factory=DetectorStatus)
    blinded: bool = False
    config_note: str = ""

    def worker(self, name: str) -> WorkerBadge | None:
        """Return the badge of the named worker, or None when the node has no such worker."""
        for badge in self.workers:
            if badge.name == name:
                return badge
        return None

    def is_running(self, name: str) -> bool:
        badge = self.worker(name)
        return badge is not None and badge.state is WorkerState.RUNNING

    def to_dict(self) -> dict[str, Any]:
        """Convert to JSON types: enums become their values, tuples become lists."""
        return _to_json(self)


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


class ControlError(RuntimeError):
    """The node cannot carry out a control request in its current state."""


class UnknownConnectionError(LookupError):
    """A connection id that the configuration's ``connections`` map does not contain."""

    def __init__(self, conn_id: str, known: tuple[str, ...] = ()):
        self.conn_id = conn_id
        self.known = tuple(known)
        choices = ", ".join(self.known) if self.known else "none configured"
        super().__init__(f"unknown connection id {conn_id!r}; known ids: {choices}")


@dataclass(frozen=True)
class ConfigProblem:
    """One invalid configuration value: its dotted path and what is wrong with it.

    The path is empty for a problem of the whole configuration, such as missing keys.
    """

    key: str
    message: str


class ConfigRejected(ValueError):
    """``save_config`` found invalid values and saved nothing."""

    def __init__(self, problems: list[ConfigProblem] | tuple[ConfigProblem, ...]):
        self.problems = tuple(problems)
        detail = "; ".join(f"{p.key}: {p.message}" if p.key else p.message for p in self.problems)
        super().__init__(f"configuration rejected, nothing saved: {detail}")


@dataclass(frozen=True)
class ConfigSaveResult:
    """What saving a configuration changed.

    ``applied_keys`` took effect in the running engine at once. ``restart_needed_keys``
    are saved but take effect only when key generation is restarted. ``note`` is a
    sentence for the page that states this.
    """

    changed_keys: tuple[str, ...]
    applied_keys: tuple[str, ...]
    restart_needed_keys: tuple[str, ...]
    note: str = ""


@runtime_checkable
class NodeControl(Protocol):
    """Interface a node offers its web page; the node's controller implements it."""

    def status(self) -> StatusSnapshot:
        """Return the latest snapshot without waiting for the engine."""

    def start_keygen(self) -> None:
        """Stop both sides, then start key generation (service mode first)."""

    def stop_keygen(self) -> None:
        """Stop key generation on both sides; keep the classical channel."""

    def restart_connection(self) -> None:
        """Re-establish the authenticated channel to the peer and the file transfer."""

    def restart_transferd(self) -> None:
        """Restart the file transfer over the existing channel."""

    def set_conn(self, conn_id: str) -> None:
        """Switch to the peer ``connections.<conn_id>`` of the configuration.

        Raises :class:`UnknownConnectionError` for an id the configuration lacks.
        """

    def get_config(self) -> dict[str, Any]:
        """Return a deep copy of the configuration in force."""

    def validate_config(self, config: Mapping[str, Any]) -> list[ConfigProblem]:
        """Return the problems of a candidate configuration; empty when it is valid."""

    def save_config(self, config: Mapping[str, Any]) -> ConfigSaveResult:
        """Validate, save and apply a configuration; raise :class:`ConfigRejected` if invalid."""


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted paths; leaves keep their values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{path}."))
        else:
            flat[path] = value
    return flat


def set_config_path(config: dict[str, Any], path: str, value: Any) -> None:
    """Set the leaf at a dotted path, creating the mappings on the way."""
    parts = path.split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"config path {path!r} runs through the non-mapping value at {part!r}")
    node[parts[-1]] = value


class InMemoryNode:
    """Stand-in node for unit tests of the contract and of the HTTP layer.

    It runs no engine: control calls only move ``engine_state`` and record the call in
    ``calls``. Tests add error-correction blocks with :meth:`add_block`. Validation
    checks only that a changed value keeps the type of the value it replaces, and that
    ``QBER_limit`` lies in (0, 0.5). Keys listed in ``live_keys`` count as applied at
    once, and the others as needing a restart.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        identity: str = "test-node",
        live_keys: tuple[str, ...] = ("QBER_limit",),
    ):
        self._lock = threading.Lock()
        self._config: dict[str, Any] = copy.deepcopy(dict(config or {"QBER_limit": 0.1, "connections": {}}))
        self._live_keys = live_keys
        self._identity = identity
        self._state = EngineState.ONLY_COMMUNICATION
        self._active_connection = ""
        self._blocks: list[BlockRecord] = []
        self._block_count = 0
        self._total_final_bits = 0
        self._note = ""
        self._overrides: dict[str, Any] = {}
        self.calls: list[tuple[str, ...]] = []

    def status(self) -> StatusSnapshot:
        with self._lock:
            running = self._state in (EngineState.SERVICE_MODE, EngineState.KEY_GENERATION)
            keygen_state = WorkerState.RUNNING if running else WorkerState.STOPPED
            ec_state = WorkerState.RUNNING if self._state is EngineState.KEY_GENERATION else WorkerState.STOPPED
            workers = (
                WorkerBadge("transferd", WorkerState.RUNNING),
                WorkerBadge("readevents", keygen_state),
                WorkerBadge("chopper2", keygen_state),
                WorkerBadge("costream", keygen_state),
                WorkerBadge("error_correction", ec_state),
            )
            snapshot = StatusSnapshot(
                time=time.time(),
                identity=self._identity,
                engine_state=self._state,
                connected=True,
                active_connection=self._active_connection,
                connections=tuple(self._config.get("connections", {})),
                workers=workers,
                raw_key=RawKeyStatus(peer="peer", role=Role.HIGH_COUNT),
                error_correction=ErrorCorrectionStatus(
                    blocks=self._block_count,
                    total_final_bits=self._total_final_bits,
                    qber_limit=float(self._config.get("QBER_limit", 0.1)),
                    recent_blocks=tuple(self._blocks[-HISTORY_LENGTH:]),
                ),
                config_note=self._note,
            )
            return dataclasses.replace(snapshot, **self._overrides)

    def override_status(self, **fields: Any) -> None:
        """Replace snapshot fields (``raw_key``, ``detectors``, ``blinded`` ...) in later snapshots."""
        with self._lock:
            self._overrides.update(fields)

    def add_block(self, block: BlockRecord) -> None:
        with self._lock:
            self._blocks.append(block)
            del self._blocks[:-HISTORY_LENGTH]
            self._block_count += 1
            self._total_final_bits += block.final_bits

    def start_keygen(self) -> None:
        self._record("start_keygen", EngineState.KEY_GENERATION)

    def stop_keygen(self) -> None:
        self._record("stop_keygen", EngineState.ONLY_COMMUNICATION)

    def restart_connection(self) -> None:
        self._record("restart_connection", EngineState.ONLY_COMMUNICATION)

    def restart_transferd(self) -> None:
        self._record("restart_transferd", EngineState.ONLY_COMMUNICATION)

    def set_conn(self, conn_id: str) -> None:
        with self._lock:
            known = tuple(self._config.get("connections", {}))
            if conn_id not in known:
                raise UnknownConnectionError(conn_id, known)
            self._active_connection = conn_id
            self.calls.append(("set_conn", conn_id))

    def get_config(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._config)

    def validate_config(self, config: Mapping[str, Any]) -> list[ConfigProblem]:
        with self._lock:
            current = flatten_config(self._config)
        problems = []
        for key, value in flatten_config(config).items():
            old = current.get(key)
            if old is not None and not _same_kind(old, value):
                problems.append(
                    ConfigProblem(key, f"expected {type(old).__name__}, got {type(value).__name__} {value!r}")
                )
        limit = config.get("QBER_limit")
        if isinstance(limit, (int, float)) and not 0 < limit < 0.5:
            problems.append(ConfigProblem("QBER_limit", f"must lie between 0 and 0.5, got {limit}"))
        return problems

    def save_config(self, config: Mapping[str, Any]) -> ConfigSaveResult:
        problems = self.validate_config(config)
        if problems:
            raise ConfigRejected(problems)
        with self._lock:
            old = flatten_config(self._config)
            new = flatten_config(config)
            changed = tuple(sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k)))
            applied = tuple(k for k in changed if k in self._live_keys)
            restart = tuple(k for k in changed if k not in self._live_keys)
            self._config = copy.deepcopy(dict(config))
            self._note = (
                f"Saved; restart key generation to apply {', '.join(restart)}." if restart else ""
            )
            self.calls.append(("save_config",) + changed)
            return ConfigSaveResult(changed, applied, restart, self._note)

    def _record(self, name: str, state: EngineState) -> None:
        with self._lock:
            self._state = state
            self.calls.append((name,))


def _same_kind(old: Any, new: Any) -> bool:
    """Check that ``new`` may replace ``old``: bools stay bools, an int may become a float."""
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)):
        return isinstance(new, (int, float))
    return isinstance(new, type(old))
