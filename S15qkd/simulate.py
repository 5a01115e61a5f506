"""``qkdserver simulate``: both nodes of a link in one process, on loopback.

The command creates a certificate pair per node, starts a high-count and a low-count
:class:`~S15qkd.node.Node` joined by mutual TLS on 127.0.0.1, feeds them from the link
simulator or from two recorded event files, and prints one line per epoch (coincidences,
accidentals, raw key bits, service QBER) and one per block (QBER, raw and final bits,
key rate). When the input is used up and the link is idle, it compares the two keys
folders and exits with status 0 only if they hold the same non-empty set of keys.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, TextIO

from .channel import ChannelError
from .config import Config, ConfigError
from .folder_lock import FolderInUseError, FolderLock
from .node import Node
from .stages import EPOCH_SECONDS

log = logging.getLogger(__name__)

#: Engine states before service mode: a run that ends in one of them never measured a QBER.
STATES_BEFORE_SERVICE = {"OFF", "ONLY_COMMUNICATION", "INITIATING", "PEAK_FINDING"}

#: Exit status after Ctrl-C or SIGTERM, as shells report a SIGINT: 128 + 2.
EXIT_INTERRUPTED = 130


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events-high", metavar="FILE",
                        help="raw events of the high-count side (readevents legacy words); "
                             "with --events-low replaces the simulator")
    parser.add_argument("--events-low", metavar="FILE", help="raw events of the low-count side")
    parser.add_argument("--epochs", type=int, default=40,
                        help="simulated epochs of 0.537 s (default 40)")
    parser.add_argument("--pair-rate", type=float, default=2e5,
                        help="simulated pairs per second (default 2e5)")
    parser.add_argument("--qber", type=float, default=0.03, help="simulated QBER (default 0.03)")
    parser.add_argument("--seed", type=int, default=1, help="simulator seed (default 1)")
    parser.add_argument("--drift", type=float, default=0.0,
                        help="simulated rate of the low-count side's clock against the "
                             "high-count side's, minus 1 (default 0; 1e-6 is 1 µs per second)")
    parser.add_argument("--frequency-search", action="store_true",
                        help="search and correct the clocks' frequency offset, as "
                             "qcrypto.pfind.frequency_search does")
    parser.add_argument("--real-time", action="store_true",
                        help="pace the events at the wall clock, as time taggers deliver them")
    parser.add_argument("--block-bits", type=int, default=20000,
                        help="raw key bits per reconciliation block (default 20000)")
    parser.add_argument("--workdir", metavar="DIR",
                        help="folder for both nodes' data and keys (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="give up after this many seconds (default 300)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


class Progress:
    """Prints the per-epoch and per-block lines and tracks when the link went idle."""

    def __init__(self, out: TextIO, quiet: bool):
        self.out = out
        self.quiet = quiet
        self.lock = threading.Lock()
        self.last_event = time.monotonic()
        self.sources_finished: set[str] = set()
        self.final_bits = 0
        self.key_epochs = 0
        self.blocks = 0
        self.failed_blocks = 0
        self.first_epoch: Optional[int] = None
        self.last_qber: Optional[float] = None
        self.raw_bits = 0
        self.states: dict[str, str] = {}
        self.events = {"high": 0, "low": 0}
        self.matched_at: list[float] = []   # wall time of each epoch costream closed
        self.finished_at: dict[str, float] = {}  # wall time each node's source ended
        # Wall time and epoch count of each block released on the low-count side.
        self.released: list[tuple[float, int]] = []

    def __call__(self, kind: str, node: str, **fields) -> None:
        with self.lock:
            self.last_event = time.monotonic()
            if kind == "chopped":
                self.events[node] += fields["events"]
            elif kind == "source_finished":
                self.sources_finished.add(node)
                self.finished_at[node] = self.last_event
            elif kind == "epoch" and node == "high":
                self.matched_at.append(self.last_event)
                self.raw_bits += fields["raw_bits"]
                if self.first_epoch is None:
                    self.first_epoch = fields["epoch"]
                seconds = max(fields["epoch"] - self.first_epoch + 1, 1) * EPOCH_SECONDS
                qber = f"{self.last_qber:.4f}" if self.last_qber is not None else "  -   "
                self.print(f"epoch {fields['epoch']:08x}  coincidences {fields['coincidences']:7d}  "
                           f"accidentals {fields['accidentals']:5d}  raw bits {fields['raw_bits']:6d}  "
                           f"QBER {qber}  final bits {self.final_bits:8d}  "
                           f"key rate {self.final_bits / seconds:9.1f} bit/s")
            elif kind == "service" and node == "low":
                self.last_qber = fields["qber"]
                epochs = fields["epochs"]
                self.print(f"service  epochs {epochs[0]:08x}..{epochs[-1]:08x} disclosed: "
                           f"QBER {fields['qber']:.4f} over {fields['bits']} bits")
            elif kind == "block" and node == "low":
                record = fields["record"]
                self.released.append((self.last_event, record.num_epochs))
                self.blocks += 1
                self.final_bits += record.final_bits
                self.key_epochs += record.num_epochs
                self.last_qber = record.qber
                self.print(f"block  {record.first_epoch:08x} ({record.num_epochs} epochs): "
                           f"QBER {record.qber:.4f}  raw bits {record.raw_bits}  "
                           f"leaked {record.leaked_bits}  final bits {record.final_bits}  "
                           f"key rate {record.key_rate_bps:.1f} bit/s")
            elif kind == "block_failed" and node == "low":
                self.failed_blocks += 1
                self.print(f"block  {fields['block']:08x} discarded: {fields['reason']}")
            elif kind == "state":
                self.states[node] = fields["state"]
                self.print(f"{node:>4}-count side: {fields['state']} ({fields['reason']})")

    def print(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.out, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Configuration keys that the options of qkdserver simulate set, so that an error about
#: a value names the option the user typed.
OPTION_OF_KEY = {
    "source.seed": "--seed", "source.epochs": "--epochs", "source.pair_rate": "--pair-rate",
    "source.qber": "--qber", "source.drift": "--drift", "minimal_block_size": "--block-bits",
}


def name_options(message: str) -> str:
    """Replace each quoted configuration key in message by the option that sets it."""
    for key, option in OPTION_OF_KEY.items():
        message = message.replace(repr(key), option)
    return message


def node_configs(workdir: Path, args: argparse.Namespace) -> tuple[Config, Config]:
    """Build the two nodes' configurations: certificates, folders, port and event source."""
    from .channel.tls import create_node_certificate

    certs = workdir / "certs"
    pairs = {}
    for name in ("high", "low"):
        if (certs / f"{name}.crt").exists():
            pairs[name] = (certs / f"{name}.crt", certs / f"{name}.key")
        else:
            pairs[name] = create_node_certificate(certs, name)
    port = free_port()
    configs = []
    for role, other in (("high", "low"), ("low", "high")):
        values = {
            "identity": f"sim-{role}", "role": role,
            "local_connection_id": f"SIM{role.upper()}", "remote_connection_id": f"SIM{other.upper()}",
            "listen_address": "127.0.0.1", "target_hostname": "127.0.0.1", "port_authd": port,
            "local_cert": str(pairs[role][0]), "local_key": str(pairs[role][1]),
            "remote_cert": str(pairs[other][0]),
            "data_root": str(workdir / role / "data"), "final_key_folder": str(workdir / role / "keys"),
            "minimal_block_size": args.block_bits,
            "source": {"real_time": args.real_time},
            "qcrypto": {"pfind": {"frequency_search": getattr(args, "frequency_search", False)}},
        }
        events = args.events_high if role == "high" else args.events_low
        if events:
            values["source"].update({"kind": "file", "events_file": events})
        else:
            values["source"].update({"kind": "simulator", "seed": args.seed, "epochs": args.epochs,
                                     "pair_rate": args.pair_rate, "qber": args.qber,
                                     "drift": getattr(args, "drift", 0.0)})
        configs.append(Config(values))
    return configs[0], configs[1]


def shared_simulator_factory(config: Config):
    """Return a source factory that serves both nodes from one simulator per run."""
    from .stages import SharedSimulator, simulator_arguments

    simulators: dict[int, SharedSimulator] = {}

    def factory(role: str):
        # A new run of the high-count side gets a new simulator and the low-count side
        # joins the newest one. Should the low-count side ask first, each side gets its
        # own simulator, which yields the same events because both use the same seed.
        if role == "high" or not simulators:
            simulators.clear()
            simulators[0] = SharedSimulator(config["source.epochs"], **simulator_arguments(config))
        return simulators[0].source(role, config["source.real_time"])

    return factory


def check_arguments(args: argparse.Namespace) -> Optional[str]:
    """Return what is wrong with the command-line values, or None if they can run."""
    if bool(args.events_high) != bool(args.events_low):
        return "give both --events-high and --events-low, or neither"
    if args.epochs < 1:
        # The simulator reads 0 as "run until stopped", which would only end at --timeout.
        return f"invalid --epochs {args.epochs}: give a number of epochs of at least 1"
    if not args.timeout > 0:
        return f"invalid --timeout {args.timeout}: give a number of seconds greater than 0"
    for option, name in (("--events-high", args.events_high), ("--events-low", args.events_low)):
        if name:
            problem = check_events_file(Path(name))
            if problem:
                return f"invalid {option} {name!r}: {problem}"
    return None


def check_events_file(path: Path) -> Optional[str]:
    """Return why path cannot be a raw event file (8-byte readevents words), or None."""
    try:
        size = path.stat().st_size
    except OSError as error:
        return f"{error.strerror}; give the path of a raw event file"
    if path.is_dir():
        return "is a folder; give the path of a raw event file"
    if not path.is_file():
        return None  # a named pipe or device: its length is known only when read
    if size == 0:
        return "the file is empty"
    if size % 8:
        return (f"{size} bytes is not a multiple of 8, so it is not a file of raw events "
                "(8-byte readevents words)")
    return None


def run_simulation(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    problem = check_arguments(args)
    if problem:
        print(f"qkdserver simulate: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="qkd-simulate-") as temporary:
        workdir = Path(args.workdir) if args.workdir else Path(temporary)
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            lock = FolderLock(workdir, "simulate.lock")
        except FolderInUseError as error:
            print(f"qkdserver simulate: --workdir {str(workdir)!r} is in use by {error.holder}; "
                  "give each simulation its own --workdir", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"qkdserver simulate: cannot create the node folders in --workdir "
                  f"{str(workdir)!r}: {error.strerror}; give a writable folder", file=sys.stderr)
            return 2
        try:
            return simulate_in(workdir, args, out)
        finally:
            lock.release()


def earlier_run_state(workdir: Path) -> str:
    """Describe the node folders that an earlier run left in workdir, or return ""."""
    found = []
    for role in ("high", "low"):
        folder = workdir / role
        if folder.is_dir() and any(folder.iterdir()):
            found.append(f"{folder}")
    return ", ".join(found)


def simulate_in(workdir: Path, args: argparse.Namespace, out: TextIO) -> int:
    """Run the simulation with both nodes' folders in workdir, which this process has locked."""
    earlier = earlier_run_state(workdir)
    if earlier:
        print(f"qkdserver simulate: --workdir {str(workdir)!r} holds the state of an earlier "
              f"run ({earlier}); its keys would be counted with this run's and its used epochs "
              "would be skipped. Give an empty --workdir, or delete its high and low folders",
              file=sys.stderr)
        return 2
    try:
        high_config, low_config = node_configs(workdir, args)
    except ConfigError as error:
        print(f"qkdserver simulate: {name_options(str(error))}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"qkdserver simulate: cannot create the node folders in --workdir "
              f"{str(workdir)!r}: {error.strerror}; give a writable folder", file=sys.stderr)
        return 2
    progress = Progress(out, args.quiet)
    factory = shared_simulator_factory(high_config) if not args.events_high else None
    high = Node(high_config, progress=progress, auto_start=True, source_factory=factory)
    low = Node(low_config, progress=progress, source_factory=factory)
    try:
        high.start()
    except ChannelError as error:
        # The port came from free_port(), so another process took it in between.
        high.close()
        low.close()
        print(f"qkdserver simulate: classical channel: {error}; run the command again",
              file=sys.stderr)
        return 2
    low.start()
    started = time.monotonic()
    interrupted = False
    with InterruptOnce() as interrupts:
        try:
            try:
                outcome = wait_until_idle(high, low, progress, args.timeout)
            finally:
                interrupts.disarm()
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: close both nodes and remove the temporary folder (it
            # contains private keys and final keys) instead of dying with a traceback.
            outcome = "interrupted"
            interrupted = True
        try:
            states = {"high": (high.engine.state.value, high.engine.reason),
                      "low": (low.engine.state.value, low.engine.reason)}
        finally:
            # Each node logs the other closing its channel, which is expected at the end
            # of a run.
            channel_log = logging.getLogger("S15qkd.channel.link")
            level = channel_log.level
            channel_log.setLevel(logging.ERROR)
            try:
                high.close()
                low.close()
            finally:
                channel_log.setLevel(level)
        status = report(high, low, progress, outcome, states, time.monotonic() - started, out)
    return EXIT_INTERRUPTED if interrupted else status


class InterruptOnce:
    """SIGINT and SIGTERM as one KeyboardInterrupt, then ignored until the block ends.

    The first signal before :meth:`disarm` raises KeyboardInterrupt, so the wait ends
    and the nodes close as after Ctrl-C. Later signals are ignored, because one during
    the close would cut it short: SIGINT with a traceback and a channel still open,
    SIGTERM by ending the process and leaving the temporary folder with the nodes'
    private keys behind. Outside the main thread, which alone can install signal
    handlers, nothing changes.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.armed = True
        self._previous: dict = {}

    def __enter__(self) -> "InterruptOnce":
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def disarm(self) -> None:
        """Ignore every signal from now on."""
        self.armed = False

    def _handle(self, signum, frame) -> None:
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt


def wait_until_idle(high: Node, low: Node, progress: Progress, timeout: float,
                    quiet_seconds: float = 1.0) -> str:
    """Wait until both sources ended and both nodes are idle, or key generation stopped.

    Idle means: no worker has work, no block or frame is in flight, and nothing
    happened for quiet_seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        with progress.lock:
            finished = progress.sources_finished >= {"high", "low"}
            idle = time.monotonic() - progress.last_event > quiet_seconds
        if finished and idle and high.idle and low.idle:
            return "input used up"
        if high.stop_reason and low.stop_reason and idle:
            return f"key generation stopped: {high.stop_reason}"
    return f"timed out after {timeout:.0f} s"


def report(high: Node, low: Node, progress: Progress, outcome: str, states: dict,
           seconds: float, out: TextIO) -> int:
    high_keys, low_keys = high.keystore.keys(), low.keystore.keys()
    bits = sum(int.from_bytes(content[12:16], "little") for content in high_keys.values())
    print(f"\nfinished ({outcome}) after {seconds:.1f} s", file=out)
    for role in ("high", "low"):
        state, reason = states[role]
        print(f"{role}-count side: {state} ({reason})", file=out)
    print(f"blocks: {progress.blocks} released, {progress.failed_blocks} discarded; "
          f"final key bits: {bits}", file=out)
    if progress.key_epochs:
        print(f"key rate: {bits / (progress.key_epochs * EPOCH_SECONDS):.1f} bit/s over the "
              f"{progress.key_epochs} epochs that went into keys", file=out)
    if not high_keys:
        print("FAIL: no final keys were released", file=out)
        if outcome == "input used up" and any(states[role][0] in STATES_BEFORE_SERVICE for role in states):
            print("the input ended before the link measured its QBER: give more --epochs "
                  "or longer event files", file=out)
        return 1
    if high_keys != low_keys:
        only_high = sorted(set(high_keys) - set(low_keys))
        only_low = sorted(set(low_keys) - set(high_keys))
        differing = sorted(name for name in set(high_keys) & set(low_keys)
                           if high_keys[name] != low_keys[name])
        print(f"FAIL: keystores differ: only high {only_high}, only low {only_low}, "
              f"different content {differing}", file=out)
        return 1
    print(f"OK: both keystores hold the same {len(high_keys)} keys "
          f"({', '.join(sorted(high_keys))})", file=out)
    return 0
