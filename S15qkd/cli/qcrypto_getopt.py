"""Command-line parsing as the qcrypto C programs do it (glibc ``getopt``, ``sscanf``).

The reference programs set ``opterr = 0``, so characters that are not options are
skipped instead of rejected, grouped flags are read one character at a time, and
arguments that are not options (the empty string included) are ignored wherever they
stand. QKDServer relies on this: it passes ``"-k -K"`` as one argument (the space and
the second dash are skipped) and an empty argument for an unset option.
Python's ``getopt`` rejects both, hence this scanner.
"""

from __future__ import annotations

import re

from .reference_options import ReferenceExit

_C_INTEGER = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def scan(argv: list[str], optstring: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Split ``argv`` into options like glibc ``getopt`` with ``opterr = 0``.

    ``optstring`` lists the option characters; a character followed by ``:`` takes a
    value, either the rest of its argument or the next argument. Returns the options
    in order as ``(char, value)`` pairs (value ``""`` for flags) and the skipped
    characters, in order. A missing value is skipped like an unknown character.
    """
    takes_value = {c: optstring[i + 1 : i + 2] == ":" for i, c in enumerate(optstring) if c != ":"}
    options: list[tuple[str, str]] = []
    skipped: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if len(arg) < 2 or not arg.startswith("-"):
            continue
        k = 1
        while k < len(arg):
            char = arg[k]
            k += 1
            if char not in takes_value:
                skipped.append(char)
                continue
            if not takes_value[char]:
                options.append((char, ""))
                continue
            if k < len(arg):
                options.append((char, arg[k:]))
            elif i < len(argv):
                options.append((char, argv[i]))
                i += 1
            else:
                skipped.append(char)
            break
    return options, skipped


def c_integer(text: str, option: str, status: int) -> int:
    """Parse ``text`` like ``sscanf("%lli")``: decimal, ``0x`` hex or leading-0 octal.

    Trailing characters are ignored, so ``-123456.0`` reads as -123456. Raises
    ReferenceExit(status) when no number starts the text, or when the number does not
    fit the ``long long`` that ``%lli`` fills.
    """
    match = _C_INTEGER.match(text)
    if match is None:
        raise ReferenceExit(status, f"invalid value {text!r} for option -{option}: expected an integer")
    sign, digits = match.groups()
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    value = -value if sign == "-" else value
    if not -(2**63) <= value < 2**63:
        raise ReferenceExit(status, f"invalid value {text!r} for option -{option}: expected an "
                                    f"integer from {-(2**63)} to {2**63 - 1}")
    return value
