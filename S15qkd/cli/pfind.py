"""``qkd-pfind``: the time offset finder with the options of the reference ``pfind``.

Usage: qkd-pfind -D type1_dir -d type2_dir [-e first_epoch] [-n epochs] [-r fine_ns]
       [-R coarse_ns] [-q buffer_order] [-V verbosity] [-l logfile] [-k] [-K]

Options are parsed as the reference's C getopt does: flags may be grouped, unknown
option characters and stray arguments are ignored (so "-k -K" given as one argument
sets both flags), ``-e`` accepts decimal, 0x-hex and 0-octal numbers, and every number
stops at its first non-digit. The result line goes to stdout or is appended to the
``-l`` file; the diagnostic line ``pfind: pos_f:...`` goes to stderr first. A failure
prints one line to stderr and exits with the reference's status, 256 minus its error
code (236 for a missing type-1 file, for example), or 1 where the reference has no code.

Differences from the reference: single-file input (``-I``, ``-i``) is not supported;
type-1 files with header length 0 are read as empty epochs; type-2 files whose last
entry starts in their last word decode instead of failing with status 237; folder
names are used whole, where the reference cuts them at the first space and at 200
characters.
"""

from __future__ import annotations

import getopt
import logging
import re
import sys

import qkd_core

from .reference_options import plain_text

log = logging.getLogger(__name__)

USAGE = __doc__.split("\n\n")[1]

# Option letters of the reference pfind; a colon marks a letter that takes a value.
OPTION_SPEC = "d:D:i:I:e:n:r:R:q:V:l:kK"

# Error codes of the reference for argument errors and missing sources.
CODE_BAD_ARGUMENT = 1
CODE_NO_TYPE1 = 20
CODE_NO_TYPE2 = 23
CODE_LOG_FILE = 26


class UsageError(Exception):
    """An option value the reference would reject; carries its error code."""

    def __init__(self, message: str, code: int = CODE_BAD_ARGUMENT):
        super().__init__(message)
        self.code = code


def exit_status(code: int) -> int:
    """Return the process exit status of a reference error code: (256 - code) & 0xFF."""
    return (256 - code) & 0xFF


def parse_c_integer(text: str, *, auto_base: bool) -> int:
    """Parse a number as C's sscanf does: optional sign, digits up to the first other
    character. With auto_base (``%i``), 0x means hex and a leading 0 octal."""
    match = re.match(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)" if auto_base
                     else r"\s*([+-]?)([0-9]+)", text)
    if match is None:
        raise ValueError(f"{text!r} is not a number")
    sign, digits = match.groups()
    if auto_base and digits[:2].lower() == "0x":
        value = int(digits[2:], 16)
    elif auto_base and digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits, 10)
    return -value if sign == "-" else value


def clean_arguments(argv: list[str]) -> list[str]:
    """Reduce argv to what the reference's getopt acts on: known option letters with
    their values; unknown letters and non-option arguments dropped."""
    takes_value = {c for i, c in enumerate(OPTION_SPEC) if OPTION_SPEC[i + 1:i + 2] == ":"}
    flags = set(OPTION_SPEC.replace(":", ""))
    cleaned: list[str] = []
    i = 0
    while i < len(argv):
        element = argv[i]
        i += 1
        if not element.startswith("-") or element in ("-", "--"):
            continue
        kept = ""
        for position, letter in enumerate(element[1:], start=1):
            if letter in takes_value:
                rest = element[position + 1:]
                if rest:
                    value = rest
                elif i < len(argv):
                    value = argv[i]
                    i += 1
                else:
                    break  # The reference ignores an option missing its value.
                if kept:
                    cleaned.append("-" + kept)
                    kept = ""
                cleaned.extend(["-" + letter, value])
                break
            if letter in flags:
                kept += letter
        if kept:
            cleaned.append("-" + kept)
    return cleaned


def parse_arguments(argv: list[str]) -> dict:
    """Return the settings of a pfind command line, with the reference's defaults."""
    settings = {
        "type1_dir": None, "type2_dir": None, "start_epoch": 0, "epoch_count": 1,
        "fine_ns": 2, "coarse_ns": 2048, "order": 17, "verbosity": 0, "log_file": None,
        "delete_type1": False, "delete_type2": False,
    }
    options, _ = getopt.getopt(clean_arguments(argv), OPTION_SPEC)
    for option, value in options:
        letter = option[1]
        try:
            if letter == "D":
                settings["type1_dir"] = value
            elif letter == "d":
                settings["type2_dir"] = value
            elif letter in "Ii":
                code = CODE_NO_TYPE1 if letter == "I" else CODE_NO_TYPE2
                raise UsageError(
                    f"single-file input -{letter} {value} is not supported; "
                    f"give the epoch folder with -{'D' if letter == 'I' else 'd'}", code)
            elif letter == "e":
                settings["start_epoch"] = parse_c_integer(value, auto_base=True) & 0xFFFFFFFF
            elif letter == "n":
                settings["epoch_count"] = parse_c_integer(value, auto_base=False)
            elif letter == "r":
                settings["fine_ns"] = parse_c_integer(value, auto_base=False)
            elif letter == "R":
                settings["coarse_ns"] = parse_c_integer(value, auto_base=False)
            elif letter == "q":
                settings["order"] = parse_c_integer(value, auto_base=False)
            elif letter == "V":
                settings["verbosity"] = parse_c_integer(value, auto_base=False)
            elif letter == "l":
                settings["log_file"] = value
            elif letter == "k":
                settings["delete_type2"] = True
            elif letter == "K":
                settings["delete_type1"] = True
        except ValueError as err:
            raise UsageError(f"invalid value for -{letter}: {err}") from err
    return settings


def check_settings(settings: dict) -> None:
    """Reject settings the search cannot use, with the reference's error codes."""
    if settings["type1_dir"] is None:
        raise UsageError("no type-1 source: give the type-1 epoch folder with -D", CODE_NO_TYPE1)
    if settings["type2_dir"] is None:
        raise UsageError("no type-2 source: give the type-2 epoch folder with -d", CODE_NO_TYPE2)
    if not 1 <= settings["epoch_count"] <= 0xFFFFFFFF:
        raise UsageError(f"invalid epoch count -n {settings['epoch_count']}: expected at least 1")
    for letter, key in (("r", "fine_ns"), ("R", "coarse_ns")):
        value = settings[key]
        if value < 1 or value > 0xFFFFFFFF or value & (value - 1):
            raise UsageError(
                f"invalid resolution -{letter} {value}: expected a power of two of at least 1 ns",
                9)
    if not 12 <= settings["order"] <= 27:
        raise UsageError(
            f"invalid buffer order -q {settings['order']}: expected 12 to 27 (2^q FFT bins)", 30)


def run(settings: dict) -> str:
    """Run the search and return the result text; print the diagnostic line to stderr."""
    finder = qkd_core.OffsetFinder(
        buffer_order=settings["order"],
        fine_resolution_ns=settings["fine_ns"],
        coarse_resolution_ns=settings["coarse_ns"],
    )
    result = finder.find_in_folders(
        settings["type1_dir"], settings["type2_dir"], settings["start_epoch"],
        settings["epoch_count"], delete_type1=settings["delete_type1"],
        delete_type2=settings["delete_type2"],
    )
    sys.stderr.write(result.diagnostic_line(settings["start_epoch"]))
    sys.stderr.flush()
    return result.report(settings["verbosity"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(plain_text(__doc__))
        return 0
    try:
        settings = parse_arguments(argv)
        check_settings(settings)
        report = run(settings)
    except UsageError as err:
        sys.stderr.write(f"qkd-pfind: {err}\n{USAGE}\n")
        return exit_status(err.code)
    except (qkd_core.QkdError, OSError, ValueError) as err:
        code = getattr(err, "pfind_code", None)
        sys.stderr.write(f"qkd-pfind: {err}\n")
        return exit_status(code) if code is not None else 1

    if settings["log_file"] is None:
        sys.stdout.write(report)
        sys.stdout.flush()
        return 0
    try:
        with open(settings["log_file"], "a", encoding="ascii") as log_file:
            log_file.write(report)
    except OSError as err:
        sys.stderr.write(f"qkd-pfind: cannot append to log file {settings['log_file']}: {err}\n")
        return exit_status(CODE_LOG_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
