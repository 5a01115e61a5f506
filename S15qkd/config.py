"""Configuration of one node: defaults, a site file (YAML or JSON), validation.

A node reads its defaults from :data:`SCHEMA` and overrides them with a site file. The
keys keep the reference server's names where they still mean the same thing
(``target_hostname``, ``local_cert``, ``local_key``, ``remote_cert``, ``identity``,
``local_detector_skew_correction``, ``QBER_limit``, ...). Nested keys are written as
nested mappings in the file and as dotted names (``source.kind``) in code and errors.

Every value is checked when the file is loaded, and the first invalid value raises
:class:`ConfigError` with the key, the expected form and the value found. Keys that the
reference used but this node does not (``program_root``, ``kill_option``, ...) are
accepted and ignored with one log line, so an old site file still loads.

``connections`` maps a peer's connection id to a partial configuration that overrides
the site file while that peer is selected, as the reference's ``/set_conn/<id>`` does.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

log = logging.getLogger(__name__)

ROLES = ("high", "low")
SOURCE_KINDS = ("simulator", "file", "tdc1", "pipe")

#: Input of each source.kind, listed in the site file that qkdserver config writes with
#: source.kind left for the user to choose. Real sources come first.
SOURCE_KIND_CHOICES = {
    "tdc1": "TDC1 time tagger at source.device",
    "pipe": "raw events from the named pipe at source.events_file",
    "file": "raw events from the file at source.events_file",
    "simulator": "test link only: anyone with source.seed can compute its keys",
}


class ConfigError(ValueError):
    """An invalid, missing or unreadable configuration value; the message names the key."""


@dataclass(frozen=True)
class Option:
    """One configuration key: default, check, and the expected form for error messages."""

    default: Any
    check: Callable[[Any], bool]
    expected: str
    help: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _int_range(low: int, high: int) -> Callable[[Any], bool]:
    return lambda value: _is_int(value) and low <= value <= high


def _number_range(low: float, high: float) -> Callable[[Any], bool]:
    return lambda value: _is_number(value) and low <= value <= high


def _power_of_two(value: Any) -> bool:
    return _is_int(value) and 1 <= value <= 1 << 20 and value & (value - 1) == 0


# Longest path or name accepted, as Linux's PATH_MAX.
MAX_TEXT_LENGTH = 4096


def _is_line(value: Any) -> bool:
    # Values end up in log lines, file names and the web page, so they must be one line
    # of printable text.
    return (isinstance(value, str) and len(value) <= MAX_TEXT_LENGTH
            and not any(ord(c) < 32 or ord(c) == 127 for c in value))


def _is_path(value: Any) -> bool:
    return _is_line(value) and value != ""


def _is_host(value: Any) -> bool:
    # Empty is allowed: only the low-count side needs a peer host.
    return _is_line(value) and re.fullmatch(r"[A-Za-z0-9._:\[\]-]*", value) is not None


def _is_ip_address(value: Any) -> bool:
    # ipaddress also accepts integers, which a site file must not give.
    if not _is_line(value):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda value: value in choices


def _is_connection_id(value: Any) -> bool:
    # The id is written into the key manager's notification line, so it must be one
    # word: no white space, no line break.
    return _is_line(value) and not any(c.isspace() for c in value)


PORT = _int_range(1, 65535)

#: Every known key with its default. Dotted names are nested mappings in the file.
SCHEMA: dict[str, Option] = {
    # Identity and role.
    "identity": Option("", _is_line, "one line of text, at most 4096 characters",
                       "name of this node shown on the web page"),
    "role": Option("high", _one_of(*ROLES), "'high' or 'low'",
                   "high-count side (chopper2, offset search, costream; accepts the peer's "
                   "connection) or low-count side (chopper, splicer; connects to the peer)"),
    "local_connection_id": Option("", _is_connection_id,
                                  "a string without white space or control characters",
                                  "this node's id in key notifications and key direction"),
    "remote_connection_id": Option("", _is_connection_id,
                                   "a string without white space or control characters",
                                   "the peer's id in key notifications and key direction"),
    # Classical channel.
    "target_hostname": Option("", _is_host, "a host name or IP address, without spaces",
                              "peer host that the low-count side connects to"),
    "port_authd": Option(4853, PORT, "a TCP port number from 1 to 65535",
                         "TLS port of the classical channel (listen on the high-count side, "
                         "connect on the low-count side)"),
    "listen_address": Option("0.0.0.0", _is_ip_address, "an IP address such as 0.0.0.0",
                             "address the high-count side listens on"),
    "local_cert": Option("", _is_line, "a path to a PEM certificate, on one line",
                         "this node's certificate, presented to the peer"),
    "local_key": Option("", _is_line, "a path to a PEM private key, on one line",
                        "private key of local_cert"),
    "remote_cert": Option("", _is_line, "a path to a PEM certificate, on one line",
                          "the peer's certificate: the only one the channel accepts"),
    "max_frame_bytes": Option(16 << 20, _int_range(1 << 16, 1 << 30),
                              "an integer from 65536 to 1073741824",
                              "largest frame payload accepted from the peer, in bytes"),
    "reconnect_min_s": Option(0.2, _number_range(0.01, 60.0), "a number of seconds, 0.01 to 60",
                              "first wait before reconnecting after a lost connection"),
    "reconnect_max_s": Option(10.0, _number_range(0.1, 600.0), "a number of seconds, 0.1 to 600",
                              "longest wait between reconnection attempts"),
    "reply_timeout_s": Option(10.0, _number_range(0.5, 600.0), "a number of seconds, 0.5 to 600",
                              "how long a start request waits for the peer's reply"),
    "block_timeout_s": Option(60.0, _number_range(1.0, 3600.0), "a number of seconds, 1 to 3600",
                              "how long a reconciliation block waits for the peer's next message "
                              "before both nodes discard it"),
    "type2_timeout_s": Option(10.0, _number_range(1.0, 3600.0), "a number of seconds, 1 to 3600",
                              "how long the high-count side waits for a missing type-2 epoch of "
                              "the peer, once a later epoch arrived, before it skips the missing "
                              "one (neither side takes raw key from a skipped epoch)"),
    # Folders.
    "data_root": Option("/tmp/cryptostuff", _is_path, "a folder path, on one line and not empty",
                        "working folder: epoch files, channel outbox, node state"),
    "final_key_folder": Option("/epoch_files", _is_path, "a folder path, on one line and not empty",
                               "final keys (type-7 files), notify.pipe and notified"),
    # Event source.
    "source.kind": Option("simulator", _one_of(*SOURCE_KINDS),
                          "'simulator', 'file', 'tdc1' or 'pipe'",
                          "where the timestamps come from: 'tdc1', 'pipe' or 'file' for a real "
                          "link, 'simulator' for a test link whose keys anyone with source.seed "
                          "can compute. qkdserver node starts only if the site file names it"),
    "source.events_file": Option("", _is_line, "a path to a raw event file or named pipe, on one line",
                                 "recorded raw events (readevents -X legacy words), or the "
                                 "named pipe of source.kind 'pipe'"),
    "source.device": Option("/dev/ttyACM0", _is_path, "a serial device path, on one line and not empty",
                            "TDC1 time tagger"),
    "source.real_time": Option(True, _is_bool, "true or false",
                               "pace recorded or simulated events at the epoch rate "
                               "(one epoch per 0.537 s) instead of as fast as possible"),
    "source.seed": Option(1, _int_range(0, 2**63 - 1),
                          "an integer from 0 to 9223372036854775807",
                          "simulator seed, equal on both nodes"),
    "source.pair_rate": Option(1e5, _number_range(1.0, 1e8), "pairs per second, 1 to 1e8",
                               "simulated entangled-pair rate"),
    "source.qber": Option(0.03, _number_range(0.0, 0.5), "a fraction from 0 to 0.5",
                          "simulated basis misalignment as a QBER"),
    "source.loss_low": Option(0.8, _number_range(0.0, 0.999), "a fraction from 0 to 0.999",
                              "simulated photon loss towards the low-count side"),
    "source.offset_ticks": Option(34568, _int_range(-(2**40), 2**40),
                                  "an integer number of ticks of 1/8 ns from "
                                  "-1099511627776 to 1099511627776",
                                  "simulated clock offset of the low-count side"),
    "source.drift": Option(0.0, _number_range(-1e-4, 1e-4), "a relative frequency from -1e-4 to 1e-4",
                           "simulated rate of the low-count side's clock against the "
                           "high-count side's, minus 1 (1e-6: 1 µs per second fast)"),
    "source.jitter_ps": Option(0.0, _number_range(0.0, 10000.0), "picoseconds from 0 to 10000",
                              "simulated timing jitter (standard deviation) of every detection"),
    "source.background_rate": Option(0.0, _number_range(0.0, 1e7), "counts per second, 0 to 1e7",
                                     "simulated uncorrelated counts of each node, over its four "
                                     "detectors"),
    "source.start_time": Option(0.0, _number_range(0.0, 1e11),
                                "a Unix time in seconds from 0 to 1e11",
                                "simulator in real time: when both nodes' simulated clocks "
                                "started, at most 6.5 days before a run starts; a node started "
                                "later skips ahead to the same epoch (0: when the source opens)"),
    "source.epochs": Option(0, _int_range(0, 2**31), "an integer from 0 to 2147483648",
                            "stop the source after this many epochs (0: run until stopped)"),
    **{f"local_detector_skew_correction.det{detector}corr":
       Option(0, _int_range(-100000, 100000),
              "an integer number of ticks of 1/8 ns from -100000 to 100000",
              f"delay added to the times of detector {detector}")
       for detector in range(1, 5)},
    # Chopping, offset search, coincidences.
    "max_event_diff": Option(20000, _int_range(1, 2**31),
                             "an integer number of microseconds from 1 to 2147483648",
                             "larger gaps between events are treated as timing errors"),
    "pfind_epochs": Option(4, _int_range(1, 64), "an integer from 1 to 64",
                           "epochs used by the time offset search"),
    "qcrypto.pfind.coarse_resolution": Option(32, _power_of_two,
                                              "a power of two number of nanoseconds "
                                              "from 1 to 1048576",
                                              "coarse bin width of the time offset search"),
    "qcrypto.pfind.fine_resolution": Option(4, _power_of_two,
                                            "a power of two number of nanoseconds "
                                            "from 1 to 1048576",
                                            "fine bin width of the time offset search"),
    "qcrypto.pfind.frequency_search": Option(False, _is_bool, "true or false",
                                             "search the clocks' frequency offset together with "
                                             "the time offset (the fpfind method) and correct "
                                             "the high-count side's event times by it"),
    "FFT_buffer_order": Option(23, _int_range(12, 26), "an integer from 12 to 26",
                               "log2 of the offset search FFT length"),
    "remote_coincidence_window": Option(6, _int_range(1, 4096),
                                        "an integer number of ticks of 1/8 ns from 1 to 4096",
                                        "coincidence window of costream"),
    "tracking_window": Option(30, _int_range(1, 65536),
                              "an integer number of ticks of 1/8 ns from 1 to 65536",
                              "window of the clock-tracking servo"),
    "track_filter_time_constant": Option(200000, _int_range(1, 2**31),
                                         "an integer number of microseconds from 1 to "
                                         "2147483648",
                                         "time constant of the clock-tracking filter"),
    # Error correction and keys.
    "error_correction": Option(True, _is_bool, "true or false",
                               "run reconciliation in key generation"),
    "minimal_block_size": Option(20000, _int_range(256, 10_000_000),
                                 "an integer number of bits from 256 to 10000000",
                                 "raw key bits collected before one reconciliation block"),
    # The upper bound only rejects nonsense: every running block holds its raw key and
    # working memory on both sides.
    "max_blocks_in_flight": Option(2, _int_range(1, 64), "an integer from 1 to 64",
                                   "reconciliation blocks the low-count side runs at once; while "
                                   "that many run, the next block takes in the following epochs "
                                   "until one of them ends or it reaches maximal_block_size"),
    # A block may pass the maximum by less than one epoch of raw key. The reconciler takes
    # up to 2**26 bits, so 2**25 leaves room for an epoch of 3e7 raw key bits (a raw key
    # rate of 6e7 bit/s). Memory bounds the default: a running block needs about 13 bytes
    # per raw bit on each side, about 125 MB for 10**7 bits. Both roles of a 10**7-bit
    # block in one process peaked 250 MB above their start.
    "maximal_block_size": Option(10_000_000, _int_range(256, 1 << 25),
                                 "an integer number of bits from 256 to 33554432",
                                 "raw key bits at which a block that waits for "
                                 "max_blocks_in_flight starts anyway"),
    "QBER_limit": Option(0.1, _number_range(0.0, 0.5), "a fraction from 0 to 0.5",
                         "mean QBER over servo_blocks above which key generation returns "
                         "to service mode"),
    "QBER_threshold": Option(0.085, _number_range(0.0, 0.5), "a fraction from 0 to 0.5",
                             "service-mode QBER below which key generation starts"),
    "default_QBER": Option(0.06, _number_range(0.005, 0.5), "a fraction from 0.005 to 0.5",
                           "QBER assumed before the first block is corrected"),
    "servo_blocks": Option(5, _int_range(1, 1000), "an integer from 1 to 1000",
                           "blocks in the QBER running mean"),
    "service_epochs": Option(2, _int_range(1, 1000), "an integer from 1 to 1000",
                             "service-mode epochs measured before deciding on key generation"),
    "connections": Option({}, lambda value: isinstance(value, dict),
                          "a mapping of connection ids to partial configurations",
                          "per-peer overrides, selected by connection id"),
}

#: Keys of the reference server that this node accepts but does not use.
IGNORED_KEYS = {
    "port_transd", "local_authd_ip", "program_root", "kill_option", "costream_histo_option",
    "costream_histo_number", "errcd_killfile_option", "do_polarization_compensation",
    "LCR_polarization_compensator_path", "LCR_volt_info", "motor_angles", "qcrypto",
    "ENVIRONMENT", "max_event_time_pause", "autorestart_costream", "costream_general_log",
    "freqcd_threshold", "clock_source", "protocol", "error_correction_program_path",
    "target_bit_error", "port_num", "target_ip", "port_num_authd",
    # Privacy amplification is always on: a key without it is not secret.
    "privacy_amplification",
}


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise ConfigError(f"invalid key {key!r}{' under ' + prefix if prefix else ''}: "
                              "expected a string")
        name = f"{prefix}{key}"
        is_nested = any(known.startswith(name + ".") for known in SCHEMA)
        if is_nested and isinstance(value, Mapping):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


class Config:
    """Validated configuration values of one node, looked up by (dotted) key."""

    def __init__(self, values: Mapping[str, Any] | None = None, *, path: Path | None = None):
        self.path = path
        self._values: dict[str, Any] = {key: copy.deepcopy(opt.default)
                                        for key, opt in SCHEMA.items()}
        #: Keys set by a site file or an update, as opposed to left at their default.
        self.explicit_keys: set[str] = set()
        if values:
            self.update(values)

    def update(self, values: Mapping[str, Any]) -> None:
        """Check and apply a nested mapping of overrides; raise ConfigError on the first bad one."""
        staged = dict(self._values)
        updated_keys: set[str] = set()
        for key, value in _flatten(values):
            top = key.split(".", 1)[0]
            if key not in SCHEMA:
                if top in IGNORED_KEYS:
                    log.info("configuration key %r is not used by this node; ignored", key)
                    continue
                raise ConfigError(_unknown_key_message(key, value))
            option = SCHEMA[key]
            if isinstance(option.default, float) and _is_int(value):
                value = float(value)
            if not option.check(value):
                raise ConfigError(f"invalid value for {key!r}: expected {option.expected}, "
                                  f"got {_shorten(value)}")
            staged[key] = value
            updated_keys.add(key)
        self._values = staged
        self._check_consistency()
        self.explicit_keys |= updated_keys

    def _check_consistency(self) -> None:
        for smaller, larger in (("reconnect_min_s", "reconnect_max_s"),
                                ("minimal_block_size", "maximal_block_size"),
                                ("qcrypto.pfind.fine_resolution",
                                 "qcrypto.pfind.coarse_resolution")):
            if self[smaller] > self[larger]:
                raise ConfigError(f"invalid value for {smaller!r}: expected at most {larger} "
                                  f"({self[larger]}), got {self[smaller]}")
        for conn_id, override in self["connections"].items():
            self._check_connection(conn_id, override)

    def _check_connection(self, conn_id: Any, override: Any) -> None:
        """Raise ConfigError unless ``connections.<conn_id>`` would apply without error."""
        name = f"connections.{conn_id}"
        if not _is_connection_id(conn_id) or not conn_id:
            raise ConfigError(f"invalid key {name!r}: expected a connection id without white "
                              "space")
        if not isinstance(override, Mapping):
            raise ConfigError(f"invalid value for {name!r}: expected a mapping, "
                              f"got {_shorten(override)}")
        if "connections" in override:
            raise ConfigError(f"invalid key {name + '.connections'!r}: a connection cannot "
                              "contain connections")
        selected = {key: value for key, value in self.as_dict().items() if key != "connections"}
        try:
            Config(selected).update(override)
        except ConfigError as error:
            raise ConfigError(f"in {name}: {error}") from None

    def __getitem__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise KeyError(f"unknown configuration key {key!r}") from None

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def as_dict(self) -> dict[str, Any]:
        """Return the values as a nested mapping, the shape of a site file."""
        return self._nested(self._values)

    def explicit_dict(self) -> dict[str, Any]:
        """Return the values of :attr:`explicit_keys` as a nested mapping.

        Saving writes this, not :meth:`as_dict`, so a key left at its default stays out
        of the site file, and rules about keys the file must name (``source.kind``)
        still hold after a save.
        """
        return self._nested({key: value for key, value in self._values.items()
                             if key in self.explicit_keys})

    @staticmethod
    def _nested(values: Mapping[str, Any]) -> dict[str, Any]:
        nested: dict[str, Any] = {}
        for key, value in values.items():
            node = nested
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = copy.deepcopy(value)
        return nested

    def with_connection(self, connection_id: str) -> "Config":
        """Return a copy with the overrides of ``connections.<connection_id>`` applied."""
        overrides = self["connections"].get(connection_id)
        if overrides is None:
            known = ", ".join(sorted(self["connections"])) or "none"
            raise ConfigError(f"unknown connection id {connection_id!r}; configured: {known}")
        selected = Config(self.as_dict(), path=self.path)
        selected.update(overrides)
        selected.update({"remote_connection_id": connection_id})
        # Config(self.as_dict()) marks every key as explicit, but only the site file's
        # keys, the overrides and the connection id are.
        selected.explicit_keys = (self.explicit_keys | {name for name, _ in _flatten(overrides)}
                                  | {"remote_connection_id"})
        return selected

    def skew_corrections(self) -> list[int]:
        """Return the four detector delays in ticks of 1/8 ns, detector 1 first."""
        return [self[f"local_detector_skew_correction.det{i}corr"] for i in range(1, 5)]

    def require_channel_files(self) -> None:
        """Raise ConfigError unless the certificate and key files of the channel exist."""
        for key in ("local_cert", "local_key", "remote_cert"):
            if not self[key]:
                raise ConfigError(f"missing value for {key!r}: expected a path to a PEM file; "
                                  "create a pair with `qkdserver certs`")
            path = Path(self[key])
            if not path.exists():
                raise ConfigError(f"invalid value for {key!r}: file {self[key]!r} not found")
            if not path.is_file():
                kind = "a folder" if path.is_dir() else "not a regular file"
                raise ConfigError(f"invalid value for {key!r}: {self[key]!r} is {kind}; give "
                                  "the path of the PEM file")
        if self["role"] == "low" and not self["target_hostname"]:
            raise ConfigError("missing value for 'target_hostname': the low-count side "
                              "connects to the peer and needs its host name or address")

    def require_folders(self) -> None:
        """Raise ConfigError if data_root or final_key_folder, or a folder above, is a file."""
        for key in ("data_root", "final_key_folder"):
            path = Path(self[key])
            for part in (path, *path.parents):
                if not part.exists():
                    continue
                if part.is_dir():
                    break
                if part == path:
                    raise ConfigError(f"invalid value for {key!r}: {str(path)!r} is a file, "
                                      "not a folder; give a folder path")
                raise ConfigError(f"invalid value for {key!r}: {str(part)!r} is a file, so "
                                  f"the folder {str(path)!r} cannot be created; give a "
                                  "folder path")

    def require_explicit_source_kind(self) -> None:
        """Raise ConfigError unless the site file names source.kind.

        The default kind is the built-in simulator, whose keys anyone with
        source.seed can compute, so a node of a real link must not fall back to it.
        """
        if "source.kind" in self.explicit_keys:
            return
        raise ConfigError("missing value for 'source.kind': a node needs its event source named "
                          "in the site file. Set it to 'tdc1' (time tagger at source.device), "
                          "'pipe' or 'file' (raw events at source.events_file), or 'simulator' "
                          "for a test link whose keys are not secret")

    def require_event_source(self) -> None:
        """Raise ConfigError unless the event file or named pipe of source.kind exists.

        A time tagger (source.kind 'tdc1') may be plugged in after the node starts, so
        its device is only looked for when key generation starts.
        """
        kind, path = self["source.kind"], self["source.events_file"]
        if kind not in ("file", "pipe"):
            return
        if not path:
            raise ConfigError(f"missing value for 'source.events_file': source.kind {kind!r} "
                              "reads events from this file")
        if not Path(path).exists():
            raise ConfigError(f"invalid value for 'source.events_file': {path!r} not found")
        if Path(path).is_dir():
            raise ConfigError(f"invalid value for 'source.events_file': {path!r} is a folder")


def missing_keys(values: Mapping[str, Any]) -> list[str]:
    """Return the keys of :data:`SCHEMA` that a nested mapping lacks, in SCHEMA order."""
    missing = []
    for key in SCHEMA:
        node: Any = values
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                missing.append(key)
                break
            node = node[part]
    return missing


def _shorten(value: Any, limit: int = 80) -> str:
    """Return repr(value), cut to about ``limit`` characters for an error message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _unknown_key_message(key: str, value: Any) -> str:
    section = [known for known in SCHEMA if known.startswith(key + ".")]
    if section:
        names = ", ".join(known[len(key) + 1:] for known in section)
        return (f"invalid value for {key!r}: expected a mapping with the keys {names}, "
                f"got {_shorten(value)}")
    close = difflib.get_close_matches(key, list(SCHEMA) + sorted(IGNORED_KEYS), n=1, cutoff=0.75)
    if close:
        return f"unknown configuration key {key!r}; did you mean {close[0]!r}?"
    return f"unknown configuration key {key!r}; known keys: {', '.join(sorted(SCHEMA))}"


def _describe_yaml_error(error: Exception) -> str:
    """Return PyYAML's problem and position on one line (its own message spans several)."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


#: Largest site file read. `qkdserver config` writes every key with comments in about 7 kB.
MAX_SITE_FILE_BYTES = 1 << 20


def read_site_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml, .yml) or JSON site file into a mapping."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            # Bounded, so a device such as /dev/zero given by mistake cannot fill the memory.
            content = handle.read(MAX_SITE_FILE_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"cannot read configuration file {str(path)!r}: {error.strerror}") from None
    if len(content) > MAX_SITE_FILE_BYTES:
        raise ConfigError(f"configuration file {str(path)!r} is larger than "
                          f"{MAX_SITE_FILE_BYTES} bytes, so it is not a site file; check --config")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = error.object.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"configuration file {str(path)!r} is not UTF-8 text: byte "
                          f"0x{error.object[error.start]:02x} at line {line} (offset "
                          f"{error.start}); save it as UTF-8 YAML or JSON") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"cannot read {str(path)!r}: YAML needs the PyYAML package "
                              "(pip install pyyaml), or write the file as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"invalid YAML in {str(path)!r}: {_describe_yaml_error(error)}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"invalid JSON in {str(path)!r}: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration file {str(path)!r}: expected a mapping of "
                          f"keys to values, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a Config from the defaults, an optional site file and optional overrides."""
    config = Config(path=Path(path) if path else None)
    if path is not None:
        config.update(read_site_file(path))
    if overrides:
        config.update(overrides)
    return config
