"""``qkd-splicer``: final sifting on the low-count side, with the options of the
reference ``splicer`` that QKDServer and the guardian scripts use.

Directory mode only: ``-d`` chopper's type-3 input, ``-D`` type-4 input, ``-f`` raw-key
output, ``-B`` type-5 output (protocols 3 and 4). Epochs come from the command pipe
``-E`` (hex numbers separated by white space) or run from ``-e`` for ``-q`` epochs. A
missing input file ends the run at once with the reference's exit status. Unlike the
reference, folder names are used whole: it cuts them at the first space and at 200
characters.

Example (the server's call)::

    qkd-splicer -d t3 -D receivefiles -f rawkey -E splicepipe "-k -K" -p 1 -m genlog
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys

from .qcrypto_getopt import c_integer, scan
from .reference_options import ReferenceExit, c_int, run

log = logging.getLogger(__name__)

OPTSTRING = "d:i:D:I:f:o:B:b:e:q:E:p:kKl:L:m:V:"

USAGE = """usage: qkd-splicer -d t3dir -D t4dir -f rawkeydir [options]
  -e epoch   first epoch (decimal, 0x hex or 0 octal)   -q n  epochs, 0 = no end
  -E fifo    read the epochs to splice from this named pipe (hex, white space separated)
  -p proto   protocol 0..6 (1 = BBM92, 0 = service)
  -k / -K    delete type-3 / type-4 inputs after splicing
  -l/-L/-m file  log files (truncated at start), each gets the line of -V
  -V 0..2    log format: epoch; epoch and key entries; long form
  -B dir     type-5 output (protocols 3 and 4)"""




def _parse(argv: list[str]) -> dict:
    options, _skipped = scan(argv, OPTSTRING)
    settings: dict = {
        "start": 0,
        "count": 0,
        "protocol": 1,
        "verbosity": 0,
        "pipe": None,
        "logs": [],
        "delete_type3": False,
        "delete_type4": False,
        "folders": {"d": None, "D": None, "f": None, "B": None},
    }
    folders = settings["folders"]
    for char, value in options:
        if char in folders:
            folders[char] = value
        elif char in "iIob":
            raise ReferenceExit(
                255, f"option -{char}: single-file mode is not supported; use the folder options -d -D -f -B"
            )
        elif char == "e":
            settings["start"] = c_integer(value, char, 256 - 2) & 0xFFFFFFFF
        elif char == "q":
            settings["count"] = c_int(value, f"-{char}", 256 - 3)
        elif char == "E":
            settings["pipe"] = value
        elif char == "p":
            settings["protocol"] = c_int(value, f"-{char}", 256 - 4)
        elif char == "V":
            settings["verbosity"] = c_int(value, f"-{char}", 256 - 5)
        elif char in "lLm":
            settings["logs"].append(value)
        elif char == "k":
            settings["delete_type3"] = True
        elif char == "K":
            settings["delete_type4"] = True
    missing = [f"-{c}" for c in "dDf" if not folders[c]]
    if missing:
        raise ReferenceExit(242, f"missing {' '.join(missing)}: give the input and output folders\n{USAGE}")
    return settings


def _epochs_from_pipe(path: str):
    """Yield epochs read from a named pipe, blocking until the next one arrives."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ReferenceExit(216, f"cannot use command pipe {path}: {exc.strerror}") from None
    if not stat.S_ISFIFO(mode):
        raise ReferenceExit(215, f"command pipe {path} is not a named pipe; create it with mkfifo")
    # Opened for reading and writing, so the pipe never reports end of input when a
    # writer closes it: the splicer keeps waiting for the next epoch. Unbuffered reads
    # hand over each epoch as soon as its white space arrives.
    fd = os.open(path, os.O_RDWR)
    try:
        pending = b""
        while True:
            pending += os.read(fd, 4096)
            *tokens, pending = re.split(rb"\s+", pending)
            for token in filter(None, tokens):
                try:
                    yield int(token, 16)
                except ValueError:
                    text = token.decode(errors="replace")
                    raise ReferenceExit(214, f"invalid epoch {text!r} in command pipe {path}: expected hex") from None
    finally:
        os.close(fd)


def _epochs(settings: dict):
    if settings["pipe"] is not None:
        source = _epochs_from_pipe(settings["pipe"])
    else:
        source = (settings["start"] + k & 0xFFFFFFFF for k in range(1 << 32))
    # Like the reference, -q counts from -e even when epochs come from the pipe.
    end = settings["start"] + settings["count"]
    for epoch in source:
        if settings["count"] != 0 and epoch >= end:
            return
        yield epoch


def _run(argv: list[str]) -> int:
    import qkd_core

    settings = _parse(argv)
    folders = settings["folders"]
    try:
        splicer = qkd_core.Splicer(settings["protocol"], type5_output=folders["B"] is not None)
    except ValueError as exc:
        raise ReferenceExit(getattr(exc, "exit_status", 1), str(exc)) from None
    logs = []
    try:
        for path in settings["logs"]:
            try:
                logs.append(open(path, "w", encoding="ascii"))
            except OSError as exc:
                raise ReferenceExit(243, f"cannot open log file {path}: {exc.strerror}") from None
        for epoch in _epochs(settings):
            try:
                result = splicer.splice_folders(
                    epoch,
                    folders["d"],
                    folders["D"],
                    folders["f"],
                    folders["B"],
                    delete_type3=settings["delete_type3"],
                    delete_type4=settings["delete_type4"],
                )
            except (qkd_core.FormatError, OSError) as exc:
                raise ReferenceExit(getattr(exc, "exit_status", 224), str(exc)) from None
            line = result.log_line(settings["verbosity"])
            if line is not None:
                for stream in logs:
                    stream.write(line)
                    stream.flush()
            log.info("epoch %08x: %d raw-key entries", epoch, result.key_events)
    finally:
        for stream in logs:
            stream.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``qkd-splicer`` with ``argv`` (default: the process arguments)."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    return run("qkd-splicer", lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
