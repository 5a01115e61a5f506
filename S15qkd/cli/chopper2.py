"""``qkd-chopper2``: the high-count side chopper with the options of qcrypto ``chopper2``.

Reads raw events in the legacy serialisation (``readevents -a 1 -X``) from ``-i`` or
stdin and writes each epoch's events verbatim as a type-1 file, plus one log line per
epoch. Events earlier than a previous one are dropped with a line on stderr.

Options (as the reference; later options override earlier ones)::

    -i file    input file or FIFO (default stdin)
    -D dir     type-1 files, one per epoch in dir     -O file   all type-1 packets in one file
    -l file    append log lines to file (default stdout)
    -V n       log verbosity: 0 epoch, 1 +count, 2 labelled, 3 detector counts
    -F         flush the log after every line
    -U / -L    extended (Unix-based) / local 17-bit epochs (default -L)
    -m n       maximum gap between events in microseconds, 0 = off (default 0)
    -4         four-detector sums at -V 3 instead of seven columns
    -d file    append a line per written epoch to this debug log
    --flush    write the epoch still open at end of input (the reference never does)

Differences from the reference: it rejects unknown options instead of ignoring them.
Epoch files are written to a temporary name and renamed, so a reader never sees a partial
file. An input whose events are all dropped, or are all zero words, ends with a message
and exit status 3.
"""

from __future__ import annotations

import getopt
import logging
import os
import sys

from .reference_options import (ReferenceExit, c_int, dropped_everything_message,
                                plain_text, read_records, run)

PROGRAM = "qkd-chopper2"


def _parse(argv: list[str]) -> dict:
    try:
        opts, rest = getopt.getopt(argv, "i:O:D:l:V:FULm:4d:", ["flush"])
    except getopt.GetoptError as exc:
        raise ReferenceExit(2, f"{exc}; see qkd-chopper2 --help") from None
    if rest:
        raise ReferenceExit(2, f"unexpected argument {rest[0]!r}; all input comes from -i or stdin")
    o = dict(input=None, t1=None, log=None, verbosity=0, flush_log=False, extended=False,
             max_gap=0, four=False, debug=None, flush_at_end=False)
    for flag, value in opts:
        if flag == "-i":
            o["input"] = value
        elif flag in ("-O", "-D"):
            if o["t1"] is not None:
                raise ReferenceExit(252, "type-1 destination given twice; use one of -O and -D once")
            o["t1"] = (flag, value)
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
        elif flag == "-m":
            o["max_gap"] = max(0, c_int(value, "-m", 239))
        elif flag == "-4":
            o["four"] = True
        elif flag == "-d":
            o["debug"] = value
        elif flag == "--flush":
            o["flush_at_end"] = True
    return o


def _main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(plain_text(__doc__))
        return 0
    o = _parse(argv)
    # The reference's stderr carries only errors (and chopper2's dropped-event lines), so
    # the per-epoch summaries that qkd_core logs stay quiet here.
    logging.basicConfig(level=logging.ERROR, format=f"{PROGRAM}: %(message)s")
    import qkd_core

    debug = None
    if o["debug"]:
        try:
            debug = open(o["debug"], "a")
        except OSError as exc:
            raise ReferenceExit(237, f"cannot open debug log {o['debug']}: {exc.strerror}") from None
    try:
        fd = os.open(o["input"], os.O_RDONLY) if o["input"] else sys.stdin.fileno()
    except OSError as exc:
        raise ReferenceExit(248, f"cannot open input {o['input']}: {exc.strerror}") from None
    log = None
    if o["verbosity"] >= 0:
        try:
            log = open(o["log"], "a") if o["log"] else sys.stdout
        except OSError as exc:
            raise ReferenceExit(247, f"cannot open log {o['log']}: {exc.strerror}") from None
    if o["t1"] is None:
        raise ReferenceExit(246, "no type-1 destination; give -D dir or -O file")
    flag, target = o["t1"]
    if flag == "-D":
        if not os.path.isdir(target):
            raise ReferenceExit(245, f"type-1 folder {target} does not exist; create it first")
        if not os.access(target, os.W_OK | os.X_OK):
            raise ReferenceExit(245, f"type-1 folder {target} is not writable")
        destination = {"t1_dir": target}
    else:
        destination = {"t1_file": target}
    try:
        chopper = qkd_core.Chopper2(**destination, max_gap_us=o["max_gap"],
                                    extended=o["extended"], four_detectors=o["four"],
                                    verbosity=o["verbosity"], reference_messages=True)
    except (OSError, qkd_core.FormatError) as exc:
        raise ReferenceExit(245, f"cannot open type-1 destination {target}: {exc}") from None

    def emit(summaries: list) -> None:
        for s in summaries:
            if log is not None and s["log_line"] is not None:
                log.write(s["log_line"])
                if o["flush_log"]:
                    log.flush()
            if debug is not None:
                debug.write(f"{s['name']}\n")
                debug.flush()

    def report() -> None:
        messages = chopper.take_messages()
        if messages:
            sys.stderr.write("".join(messages))
            sys.stderr.flush()

    all_zero = True
    try:
        for block in read_records(fd, read_error_status=244):
            all_zero = all_zero and block.count(0) == len(block)
            summaries = chopper.feed_bytes(block)
            report()
            emit(summaries)
        if o["flush_at_end"]:
            last = chopper.flush()
            emit([last] if last else [])
    except qkd_core.ChopError as exc:
        report()
        raise ReferenceExit(240, str(exc)) from None
    except (OSError, qkd_core.FormatError) as exc:
        raise ReferenceExit(245, f"writing an epoch file failed: {exc}") from None
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
