"""Option parsing shared by the tools that accept the qcrypto programs' options.

The qcrypto programs parse numbers with C ``sscanf("%d")``: leading white space and a
sign are allowed, the leading digits are the value and trailing characters are ignored.
They report a fatal error as one line on stderr and exit with status ``256 - code``.
"""

from __future__ import annotations

import re
import signal
import sys

_LEADING_INT = re.compile(r"\s*([+-]?\d+)")

#: Range of a C int, the type that ``sscanf("%d")`` fills. The reference's result for a
#: number outside it is undefined, so such a number is rejected.
C_INT_MIN, C_INT_MAX = -(2**31), 2**31 - 1


class ReferenceExit(Exception):
    """A fatal error with the exit status of the reference program."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def c_int(text: str, option: str, status: int) -> int:
    """Parse ``text`` like ``sscanf("%d")``; raise ReferenceExit(status) if no number."""
    match = _LEADING_INT.match(text)
    if match is None:
        raise ReferenceExit(status, f"option {option}: {text!r} is not a number")
    value = int(match.group(1))
    if not C_INT_MIN <= value <= C_INT_MAX:
        raise ReferenceExit(status, f"option {option}: {text!r} is out of range; expected an "
                                    f"integer from {C_INT_MIN} to {C_INT_MAX}")
    return value


def _stop(signum, frame):
    raise KeyboardInterrupt


def plain_text(doc: str) -> str:
    """Return a module docstring without its reStructuredText markup, for --help output."""
    text = doc.strip("\n").replace("``", "")
    return re.sub(r"::$", ":", text, flags=re.MULTILINE)


def run(program: str, body) -> int:
    """Call ``body()`` and turn ReferenceExit into its message on stderr and its status.

    SIGTERM and SIGINT end the program with status 0, as they stop the reference. Python
    handles them between calls into qkd_core, so an epoch file being written is finished
    and renamed first and no temporary file is left behind.
    """
    signal.signal(signal.SIGTERM, _stop)
    try:
        return body()
    except ReferenceExit as exc:
        sys.stdout.flush()
        print(f"{program}: {exc.message}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 0


def read_records(fd: int, skip_reads: int = 0, read_error_status: int = 241,
                 chunk_bytes: int = 1 << 22):
    """Yield whole 8-byte records from a file descriptor until end of input.

    The first ``skip_reads`` reads are of at most 8192 bytes and their whole records are
    discarded, as the reference's ``-y`` does (on a regular file: the first 1024 records
    per read). Trailing bytes that do not form a record at end of input are dropped.
    A failed read raises ReferenceExit(read_error_status).
    """
    import os

    carry = b""
    while True:
        limit = 8192 - len(carry) if skip_reads > 0 else chunk_bytes
        try:
            data = os.read(fd, limit)
        except OSError as exc:
            raise ReferenceExit(read_error_status, f"reading the input failed: {exc}") from None
        if not data:
            return
        data = carry + data
        whole = len(data) - len(data) % 8
        carry = data[whole:]
        if skip_reads > 0:
            skip_reads -= 1
            continue
        if whole:
            yield data[:whole]


def dropped_everything_message(stats: dict, all_zero: bool) -> str | None:
    """Explain an input that is all zero words or of which no event was accepted."""
    total = stats["events_in"]
    if total > 0 and all_zero:
        return (f"all {total} input events are zero words, which carry no time; the input "
                "must be raw events in the legacy serialisation (readevents -a 1 -X)")
    if total == 0 or stats["accepted"] > 0:
        return None
    reasons = ", ".join(f"{count} {name.removeprefix('dropped_').replace('_', ' ')}"
                        for name, count in stats.items()
                        if name.startswith("dropped_") and count)
    return (f"all {total} input events were dropped ({reasons}); the input must be "
            "time-ordered raw events in the legacy serialisation (readevents -a 1 -X)")
