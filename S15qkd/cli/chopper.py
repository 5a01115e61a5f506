"""``qkd-chopper``: the low-count side chopper with the options of qcrypto ``chopper``.

Reads raw events in the legacy serialisation (``readevents -a 1 -X``) from ``-i`` or
stdin and writes one type-2 file (compressed times and basis bits, for the peer) and one
type-3 file (local results) per epoch, plus one log line per epoch.

Options (as the reference; later options override earlier ones)::

    -i file    input file or FIFO (default stdin)
    -D dir     type-2 files, one per epoch in dir     -O file   all type-2 packets in one file
    -d dir     type-3 files, one per epoch in dir     -o file   all type-3 packets in one file
    -l file    append log lines to file (default stdout)
    -V n       log verbosity: 0 epoch, 1 +count, 2 labelled, 3 +type2bits, 4 detector counts
    -F         flush the log after every line
    -U / -L    extended (Unix-based) / local 17-bit epochs (default -L)
    -p n       protocol 0..6 (default 1; 0 service, 1 BBM92)
    -q n       initial type-2 time order T, 4..32 (default 17)
    -Q n       time-order servo filter constant, 0 = fixed T (default 0)
    -m n       maximum gap between events in microseconds, 0 = off (default 0)
    -y n       discard the first n input reads of 1024 events
    -4 / -6    4 or 6 detector columns at -V 4 with protocol 0
    -e file    append a line per written epoch to this debug log
    --flush    write the epoch still open at end of input (the reference never does)

Differences from the reference: it exits 0 at end of input instead of waiting forever,
and it rejects unknown options instead of ignoring them. Epoch files are written to a
temporary name and renamed, so a reader never sees a partial file. An input whose events
are all dropped, or are all zero words, ends with a message and exit status 3.
"""

from __future__ import annotations

import getopt
import logging
import os
import sys

from .reference_options import (ReferenceExit, c_int, dropped_everything_message,
                                plain_text, read_records, run)

PROGRAM = "qkd-chopper"


def _parse(argv: list[str]) -> dict:
    try:
        opts, rest = getopt.getopt(argv, "i:O:D:o:d:l:V:FULp:q:Q:m:y:46e:", ["flush"])
    except getopt.GetoptError as exc:
        raise ReferenceExit(2, f"{exc}; see qkd-chopper --help") from None
    if rest:
        raise ReferenceExit(2, f"unexpected argument {rest[0]!r}; all input comes from -i or stdin")
    o = dict(input=None, t2=None, t3=None, log=None, verbosity=0, flush_log=False,
             extended=False, protocol=1, time_order=17, servo=0, max_gap=0, skip=0,
             six=False, debug=None, flush_at_end=False)
    for flag, value in opts:
        if flag == "-i":
            o["input"] = value
        elif flag in ("-O", "-D"):
            if o["t2"] is not None:
                raise ReferenceExit(252, "type-2 destination given twice; use one of -O and -D once")
            o["t2"] = (flag, value)
        elif flag in ("-o", "-d"):
            if o["t3"] is not None:
                raise ReferenceExit(250, "type-3 destination given twice; use one of -o and -d once")
            o["t3"] = (flag, value)
        elif flag == "-l":
            o["log"] = value
        elif flag == "-V":
            o["verbosity"] = c_int(value, "-V", 255)
        elif flag == "-F":
            o["flush_log"] = True
        elif flag == "-U":
            o["extended"] = True
        elif flag == "-L":
            o["extended"] = False
        elif flag == "-p":
            o["protocol"] = c_int(value, "-p", 231)
            if not 0 <= o["protocol"] <= 6:
                raise ReferenceExit(230, f"protocol -p {o['protocol']} is not 0 to 6")
        elif flag == "-q":
            o["time_order"] = c_int(value, "-q", 228)
            if not 4 <= o["time_order"] <= 32:
                raise ReferenceExit(227, f"time order -q {o['time_order']} is not 4 to 32")
        elif flag == "-Q":
            o["servo"] = c_int(value, "-Q", 226)
            if o["servo"] < 0:
                raise ReferenceExit(225, f"servo filter constant -Q {o['servo']} is negative")
        elif flag == "-m":
            o["max_gap"] = max(0, c_int(value, "-m", 221))
        elif flag == "-y":
            o["skip"] = c_int(value, "-y", 223)
            if o["skip"] < 0:
                raise ReferenceExit(222, f"number of reads to skip -y {o['skip']} is negative")
        elif flag == "-4":
            o["six"] = False
        elif flag == "-6":
            o["six"] = True
        elif flag == "-e":
            o["debug"] = value
        elif flag == "--flush":
            o["flush_at_end"] = True
    if o["t2"] is None:
        raise ReferenceExit(248, "no type-2 destination; give -D dir or -O file")
    if o["t3"] is None:
        raise ReferenceExit(247, "no type-3 destination; give -d dir or -o file")
    return o


def _destination(spec: tuple[str, str], status: int, what: str) -> dict:
    """Check a destination like the reference does when it opens it; return its keyword."""
    flag, value = spec
    kind = "t2" if what == "type-2" else "t3"
    if flag in ("-D", "-d"):
        if not os.path.isdir(value):
            raise ReferenceExit(status, f"{what} folder {value} does not exist; create it first")
        if not os.access(value, os.W_OK | os.X_OK):
            raise ReferenceExit(status, f"{what} folder {value} is not writable")
        return {f"{kind}_dir": value}
    try:
        open(value, "wb").close()
    except OSError as exc:
        raise ReferenceExit(status, f"cannot open {what} file {value}: {exc.strerror}") from None
    return {f"{kind}_file": value}


def _main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(plain_text(__doc__))
        return 0
    o = _parse(argv)
    # The reference's stderr carries only errors (and chopper2's dropped-event lines), so
    # the per-epoch summaries that qkd_core logs stay quiet here.
    logging.basicConfig(level=logging.ERROR, format=f"{PROGRAM}: %(message)s")
    import qkd_core

    log = None
    if o["verbosity"] >= 0:
        try:
            log = open(o["log"], "a") if o["log"] else sys.stdout
        except OSError as exc:
            raise ReferenceExit(224, f"cannot open log {o['log']}: {exc.strerror}") from None
    debug = None
    if o["debug"]:
        try:
            debug = open(o["debug"], "a")
        except OSError as exc:
            raise ReferenceExit(219, f"cannot open debug log {o['debug']}: {exc.strerror}") from None

    kwargs = dict(protocol=o["protocol"], time_order=o["time_order"], servo_filter=o["servo"],
                  max_gap_us=o["max_gap"], extended=o["extended"], six_detectors=o["six"],
                  verbosity=o["verbosity"])
    t2 = _destination(o["t2"], 246, "type-2")
    t3 = _destination(o["t3"], 245, "type-3")
    try:
        chopper = qkd_core.Chopper(**t2, **t3, **kwargs)
    except (OSError, qkd_core.FormatError) as exc:
        raise ReferenceExit(246, f"cannot use the output destinations: {exc}") from None
    except ValueError as exc:
        raise ReferenceExit(2, str(exc)) from None

    try:
        fd = os.open(o["input"], os.O_RDONLY) if o["input"] else sys.stdin.fileno()
    except OSError as exc:
        raise ReferenceExit(244, f"cannot open input {o['input']}: {exc.strerror}") from None

    def emit(summaries: list) -> None:
        for s in summaries:
            if log is not None and s["log_line"] is not None:
                log.write(s["log_line"])
                if o["flush_log"]:
                    log.flush()
            if debug is not None:
                debug.write(f"{s['name']}\t{s['events']}\n")
                debug.flush()

    all_zero = True
    try:
        for block in read_records(fd, o["skip"]):
            all_zero = all_zero and block.count(0) == len(block)
            emit(chopper.feed_bytes(block))
        if o["flush_at_end"]:
            last = chopper.flush()
            emit([last] if last else [])
    except qkd_core.ChopError as exc:
        raise ReferenceExit(240, str(exc)) from None
    except (OSError, qkd_core.FormatError) as exc:
        status = 245 if o["t3"][1] in str(exc) else 246
        raise ReferenceExit(status, f"writing an epoch file failed: {exc}") from None
    finally:
        if log is not None:
            log.flush()
    # Divergence from the reference, which exits 0 without a word.
    message = dropped_everything_message(chopper.stats, all_zero)
    if message is not None:
        raise ReferenceExit(3, message)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(PROGRAM, lambda: _main(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
