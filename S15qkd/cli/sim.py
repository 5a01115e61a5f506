"""``qkd-sim``: simulate a two-node BBM92 link and write both nodes' raw event streams.

The short options are those of the event simulator the reference test cases were made
with (``esim``), so its command lines run unchanged::

    qkd-sim -r -s 123456789 -t 1587318692304817123 -n 1.2E6 -e 1E5 -c 1E-9 \\
        -o 4.321E3 -L 0.0 -l 0.8 -m 0.03 -F events.hec.out -f events.lec.out -v

Outputs are legacy raw events (readevents -a1 -X), what chopper and chopper2 read. A
regular output file is written to a temporary name and renamed when complete; a named
pipe or ``-`` (standard output, high-count side only) is streamed batch by batch.
The event sequence differs from esim's: equal parameters give statistically equal, not
identical, streams.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import BinaryIO, Optional

import qkd_core

log = logging.getLogger("S15qkd.cli.sim")


def parse_nanoseconds(text: str) -> int:
    """Parse a time in ns: an integer is taken exactly (a float would lose the last
    digits of a Unix time in ns), other numbers such as 1.5E18 are rounded."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return int(round(float(text)))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"invalid time {text!r}: expected ns, such as 1587318692304817123")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qkd-sim",
        description="Simulate a two-node BBM92 link and write both nodes' raw event streams.",
    )
    p.add_argument("-s", "--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("-t", "--start-time", type=parse_nanoseconds, default=None,
                   help="clock reading of the high-count node at the start, in ns since the "
                        "Unix epoch (default: the reference simulator's fixed start)")
    p.add_argument("-n", "--pairs", type=float, default=None,
                   help="number of emitted pairs; the run ends after the last one")
    p.add_argument("-d", "--duration", type=float, default=None,
                   help="simulated time in seconds (instead of -n)")
    p.add_argument("-e", "--rate", type=float, default=1e3, help="pair emission rate in pairs/s")
    p.add_argument("-c", "--drift", type=float, default=0.0,
                   help="relative clock frequency difference of the low-count node (positive: fast)")
    p.add_argument("-o", "--offset", type=float, default=0.0,
                   help="clock offset of the low-count node in ns")
    p.add_argument("-L", "--high-loss", type=float, default=0.0,
                   help="photon loss fraction at the high-count node (0..1)")
    p.add_argument("-l", "--low-loss", type=float, default=0.0,
                   help="photon loss fraction at the low-count node (0..1)")
    p.add_argument("-m", "--qber", type=float, default=0.0,
                   help="error fraction in matching bases (0..0.5)")
    p.add_argument("-F", "--high-output", default=None,
                   help="high-count node events: file, named pipe or - for standard output")
    p.add_argument("-f", "--low-output", default=None,
                   help="low-count node events: file or named pipe")
    p.add_argument("-r", "--reproducible", action="store_true",
                   help="accepted for esim compatibility: runs are always reproducible per seed")
    p.add_argument("-v", "--verbose", action="store_true", help="print run statistics on standard error")
    p.add_argument("--efficiency", type=float, default=1.0, help="detector efficiency (0..1)")
    p.add_argument("--dark-count-rate", type=float, default=0.0,
                   help="dark counts per second of each detector")
    p.add_argument("--background-rate", type=float, default=0.0,
                   help="extra background counts per second of each node")
    p.add_argument("--jitter-ps", type=float, default=0.0, help="timing jitter (standard deviation) in ps")
    p.add_argument("--dead-time-ps", type=float, default=0.0, help="detector dead time in ps")
    p.add_argument("--batch", type=float, default=0.05,
                   help="simulated seconds per written batch (default 0.05)")
    p.add_argument("--serialisation", choices=["legacy", "native"], default="legacy",
                   help="byte order of the 64-bit events (default legacy, readevents -X)")
    return p


# Largest dark count or background rate in counts per second.
MAX_NOISE_RATE = 1e8
# Shortest simulated batch in seconds.
MIN_BATCH_S = 1e-6
# Largest clock offset in ns whose tick count (8 per ns) fits a signed 64-bit integer.
MAX_OFFSET_NS = float(2**60)


class Output:
    """One node's output: a temporary file renamed on success, or a stream."""

    def __init__(self, target: Optional[str]) -> None:
        self.target = target
        self.final: Optional[Path] = None
        self.temp: Optional[Path] = None
        self.handle: Optional[BinaryIO] = None
        if target is None:
            return
        if target == "-":
            self.handle = sys.stdout.buffer
            return
        path = Path(target)
        if path.exists() and stat.S_ISFIFO(path.stat().st_mode):
            self.handle = open(path, "wb")  # blocks until a reader opens the pipe
            return
        self.final = path
        self.temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            self.handle = open(self.temp, "wb")
        except OSError as error:
            raise OSError(error.errno, f"cannot create output {target}: {error.strerror}; "
                                       "check that its folder exists and is writable") from None

    def write(self, data: bytes) -> None:
        if self.handle is None:
            return
        try:
            self.handle.write(data)
        except OSError as error:
            raise OSError(error.errno, f"writing output {self.target} failed: "
                                       f"{error.strerror}; free space or choose another "
                                       "output") from None

    def commit(self) -> None:
        if self.handle is None:
            return
        try:
            self.handle.flush()
            if self.final is not None and self.temp is not None:
                os.fsync(self.handle.fileno())
                self.handle.close()
                os.replace(self.temp, self.final)
            elif self.handle is not sys.stdout.buffer:
                self.handle.close()
        except OSError as error:
            raise OSError(error.errno, f"writing output {self.target} failed: "
                                       f"{error.strerror}; free space or choose another "
                                       "output") from None

    def discard(self) -> None:
        # Closing flushes buffered data, which fails again on a full disk: the temporary
        # file is removed whatever close raises.
        try:
            if self.handle is not None and self.handle is not sys.stdout.buffer:
                self.handle.close()
        except OSError:
            pass
        finally:
            if self.temp is not None:
                self.temp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    if args.pairs is None and args.duration is None:
        raise ValueError("give the number of pairs (-n) or the simulated duration (-d)")
    # A batch below one microsecond lets the simulated clock stall on float rounding
    # (1e-300 s never advances it), so the run would never end.
    if not args.batch >= MIN_BATCH_S:
        raise ValueError(f"invalid --batch {args.batch}: expected at least {MIN_BATCH_S} "
                         "seconds")
    if not abs(args.offset) <= MAX_OFFSET_NS:
        raise ValueError(f"invalid --offset {args.offset}: expected a clock offset of at most "
                         f"{MAX_OFFSET_NS:g} ns in magnitude")
    if args.high_output == "-" and args.low_output == "-":
        raise ValueError("only one of -F and -f can be standard output")
    if not 0 <= args.seed < 2**64:
        raise ValueError(f"invalid --seed {args.seed}: expected an integer from 0 to {2**64 - 1}")
    # Infinity is allowed, so that the simulator can stream into a named pipe until stopped.
    if args.duration is not None and not args.duration >= 0:
        raise ValueError(f"invalid --duration {args.duration}: expected a number of seconds "
                         "from 0 up, or inf")
    # The simulator keeps a batch's counts in memory, so 1e300 counts/s never ended and
    # 2e9 took gigabytes. Real detectors stay far below MAX_NOISE_RATE.
    for option, rate in (("--dark-count-rate", args.dark_count_rate),
                         ("--background-rate", args.background_rate)):
        if not 0 <= rate <= MAX_NOISE_RATE:
            raise ValueError(f"invalid {option} {rate}: expected counts per second from 0 "
                             f"to {MAX_NOISE_RATE:g}")
    for option, loss in (("--high-loss", args.high_loss), ("--low-loss", args.low_loss)):
        if not 0 <= loss <= 1:
            raise ValueError(f"invalid {option} {loss}: expected a loss fraction from 0 to 1")
    kwargs = dict(
        seed=args.seed,
        pair_rate=args.rate,
        qber=args.qber,
        offset_ticks=int(round(args.offset * 8)),
        drift=args.drift,
        transmission=(1.0 - args.high_loss, 1.0 - args.low_loss),
        efficiency=args.efficiency,
        dark_count_rate=args.dark_count_rate,
        background_rate=args.background_rate,
        jitter_ps=args.jitter_ps,
        dead_time_ps=args.dead_time_ps,
    )
    if args.start_time is not None:
        kwargs["start_ticks"] = (args.start_time * 8) % (1 << 64)
    if args.pairs is not None:
        if not 0 <= args.pairs < 2**64:
            raise ValueError(f"invalid --pairs {args.pairs}: expected a number of pairs from 0 "
                             f"to {2**64 - 1}")
        kwargs["pair_limit"] = int(args.pairs)
    simulator = qkd_core.LinkSimulator(**kwargs)

    outputs: list[Output] = []
    counts = [0, 0]
    elapsed = 0.0
    try:
        for target in (args.high_output, args.low_output):
            outputs.append(Output(target))
        while not simulator.finished:
            if args.duration is not None and elapsed >= args.duration:
                break
            step = args.batch if args.duration is None else min(args.batch, args.duration - elapsed)
            high_t, high_p, low_t, low_p = simulator.next_batch(step)
            elapsed += step
            for k, (times, patterns) in enumerate([(high_t, high_p), (low_t, low_p)]):
                counts[k] += len(times)
                if len(times):
                    outputs[k].write(qkd_core.encode_raw_events(times, patterns, args.serialisation))
        for out in outputs:
            out.commit()
    except BaseException:
        for out in outputs:
            out.discard()
        raise

    stats = simulator.stats()
    log.info("simulated %d pairs: %d high-count events, %d low-count events",
             stats["pairs"], counts[0], counts[1])
    if args.verbose:
        matching = stats["matching_basis"]
        qber = stats["errors"] / matching if matching else 0.0
        print(f"[INFO] Number of simulated pairs:        {stats['pairs']}", file=sys.stderr)
        print(f"[INFO] Number of HEC events:             {counts[0]}", file=sys.stderr)
        print(f"[INFO] Number of LEC events:             {counts[1]}", file=sys.stderr)
        print(f"[INFO] Pairs detected on both sides:     {stats['both_detected']}", file=sys.stderr)
        print(f"[INFO] Of those in matching bases:       {matching}", file=sys.stderr)
        print(f"[INFO] QBER of matching-basis pairs:     {qber:.6f}", file=sys.stderr)
        print(f"[INFO] Simulation Time Delta [ns]:       {simulator.elapsed_ticks // 8}", file=sys.stderr)
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    # SystemExit unwinds through run(), which removes the temporary output files.
    raise SystemExit(128 + signum)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # Without a handler SIGTERM ends the process at once and leaves the temporary files.
    # Python accepts signal handlers only in the main thread.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return run(args)
    except (ValueError, OSError, qkd_core.QkdError) as exc:
        print(f"qkd-sim: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
