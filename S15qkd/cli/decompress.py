"""``qkd-decompress``: list the events of a type-2 file, as qcrypto ``decompress`` does.

Usage: ``qkd-decompress FILE``. Prints::

    retval from getstream: 0, realsize:<file bytes>
    entries: <header length>, bitwidth: <time order T>
    original buffer: (nil),pointer2: (nil)
    k=<i>: diff=<hex difference>, result: <offset in the epoch, 8 hex digits>, pattern :<hex value>

Differences from the reference: the pointer line carries no addresses. Every event is
listed, whereas the reference can miss the last one when several entries share the last
data word. An invalid file gives a message on stderr and exit status 1, not a partial list.
"""

from __future__ import annotations

import os
import stat
import sys

from .reference_options import plain_text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(plain_text(__doc__), file=sys.stderr if len(argv) != 1 else sys.stdout)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    import qkd_core

    try:
        # A device or pipe (/dev/zero, a FIFO) would be read without end.
        if not stat.S_ISREG(os.stat(argv[0]).st_mode):
            print(f"qkd-decompress: {argv[0]} is not a regular file; give the path of a "
                  "type-2 epoch file", file=sys.stderr)
            return 1
        listing = qkd_core.type2_listing(argv[0])
    except (OSError, qkd_core.FormatError) as exc:
        print(f"qkd-decompress: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(listing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
