"""``qkd-costream``: coincidence matching and sifting on the high-count side, with the
options of the reference ``costream`` that QKDServer and the guardian scripts use.

Directory mode only: ``-D`` type-1 input, ``-d`` type-2 input, ``-f`` raw-key (type-3)
output, ``-F`` type-4 output, ``-B`` type-5 output (protocols 3 and 4). Inputs are read
as soon as they exist; a missing file is waited for (``--wait``, default 22 s, the
reference's limit), then the run fails with the reference's exit status. Like the
reference, every run writes the debug log ``costream_tlog`` into the working folder.
Unlike the reference, folder names are used whole: it cuts them at the first space and
at 188 characters. Window sizes outside 1 to 2^32 - 1 ticks end the run with status 255
and a message naming the value and the accepted range.

Example (the server's call)::

    qkd-costream -d receivefiles -D t1 -f rawkey -F sendfiles -e 0x4f87 "-k -K" -t 34592 \\
        -p 1 -T 2 -m rawpacketindex -M cmdpipe -n genlog -V 5 -G 2 -w 6 -u 30 \\
        -Q -200000 -R 5 "" -h 50 -q 0
"""

from __future__ import annotations

import logging
import os
import sys
import time

from .qcrypto_getopt import c_integer, scan
from .reference_options import ReferenceExit, c_int, plain_text, run

log = logging.getLogger(__name__)

OPTSTRING = "D:I:d:i:f:o:F:O:B:b:e:q:t:w:u:a:Q:p:r:R:T:G:V:n:l:L:m:M:H:h:S:kK"
DEBUG_LOG = "costream_tlog"
DEFAULT_WAIT_SECONDS = 22.0
POLL_SECONDS = 0.05

# Options that set one Costream argument from a decimal number, with the reference's
# error code for an unreadable value (exit status 256 - code).
DECIMAL_SETTINGS = {
    "q": ("epoch_count", 5),
    "w": ("coincidence_window", 7),
    "u": ("tracking_window", 8),
    "a": ("accidental_distance", 9),
    "Q": ("track_filter", 10),
    "p": ("protocol", 11),
    "R": ("width_filter", 57),
    "T": ("zero_policy", 58),
}

USAGE = """usage: qkd-costream -D t1dir -d t2dir -f rawkeydir -F t4dir [options]
  -e epoch     first epoch (decimal, 0x hex or 0 octal)     -q n   epochs, 0 = no end
  -t ticks     initial offset t_L - t_H in 1/8 ns (default 17)
  -w ticks     coincidence half-window (8)      -u ticks  tracking half-window (40)
  -a ticks     accidentals distance (160)       -Q q      servo: >0 pairs, <0 -us, 0 off
  -p proto     protocol 0..6 (1 = BBM92, 0 = service)     -R c   type-4 width servo (0 off)
  -T 0|1|2     files for epochs without kept events: none, type-4 only, both (1)
  -V 0..5      main log format (0)              -n file   main log (append; stdout)
  -l/-L/-m/-M file  epoch notifications for type-1/2/3/4 (append)
  -G 0..3      flush level (every line is flushed here)   -S a,b,c,d  detector skews
  -k / -K      delete type-2 / type-1 inputs after reading
  -B dir       type-5 output (protocols 3 and 4)
  --wait s     seconds to wait for a missing input (22)"""


def _parse(argv: list[str], debug) -> dict:
    wait = DEFAULT_WAIT_SECONDS
    if "--wait" in argv:
        at = argv.index("--wait")
        try:
            wait = float(argv[at + 1])
        except (IndexError, ValueError):
            raise ReferenceExit(255, "invalid --wait: expected seconds, e.g. --wait 22") from None
        argv = argv[:at] + argv[at + 2 :]
    options, skipped = scan(argv, OPTSTRING)
    for _ in skipped:
        # getopt returns '?' for every character it does not know.
        debug.write("got code I should not get: >>?<<\n")
    settings: dict = {
        "wait": wait,
        "verbosity": 0,
        "flush": 0,
        "kwargs": {},
        "notify": {},
        "delete_type1": False,
        "delete_type2": False,
    }
    kwargs = settings["kwargs"]
    folders = {"D": None, "d": None, "f": None, "F": None, "B": None}
    for char, value in options:
        if char in folders:
            folders[char] = value
        elif char in "IiOob":
            raise ReferenceExit(
                255, f"option -{char}: single-file mode is not supported; use the folder options -D -d -f -F -B"
            )
        elif char == "e":
            kwargs["start_epoch"] = c_integer(value, char, 256 - 4) & 0xFFFFFFFF
        elif char == "t":
            kwargs["time_offset"] = c_integer(value, char, 256 - 6)
        elif char in DECIMAL_SETTINGS:
            name, code = DECIMAL_SETTINGS[char]
            kwargs[name] = c_int(value, f"-{char}", 256 - code)
            if char == "q" and kwargs[name] < 0:
                # The reference stops only when n > 0, so a negative count runs forever.
                kwargs[name] = 0
        elif char == "r":
            raise ReferenceExit(
                197, "option -r is not supported: the type-4 width starts at 8; use -R to adapt it"
            )
        elif char == "G":
            settings["flush"] = c_int(value, f"-{char}", 256 - 60)
        elif char == "V":
            settings["verbosity"] = c_int(value, f"-{char}", 256 - 61)
        elif char in "nlLmM":
            settings["notify"][char] = value
        elif char == "H":
            # NOTE: the time-difference histogram of the reference is not implemented.
            raise ReferenceExit(255, "option -H (histogram files) is not supported; leave it out")
        elif char == "h":
            histogram_epochs = c_int(value, f"-{char}", 256 - 62)
            if histogram_epochs < 1:
                raise ReferenceExit(194, f"invalid -h {histogram_epochs}: epochs per histogram must be 1 or more")
            debug.write(f"entered histolen: {histogram_epochs}\n")
        elif char == "S":
            parts = value.split(",")
            if len(parts) != 4:
                raise ReferenceExit(176, f"invalid -S {value!r}: expected four skews a,b,c,d in 1/8 ns")
            kwargs["skews"] = tuple(c_int(p, "-S", 256 - 80) for p in parts)
        elif char == "k":
            settings["delete_type2"] = True
        elif char == "K":
            settings["delete_type1"] = True
    missing = [f"-{c}" for c in "DdfF" if not folders[c]]
    if missing:
        raise ReferenceExit(221, f"missing {' '.join(missing)}: give the input and output folders\n{USAGE}")
    settings["folders"] = folders
    return settings


def _open_append(path: str):
    try:
        return open(path, "a", encoding="ascii")
    except OSError as exc:
        raise ReferenceExit(230, f"cannot open log file {path}: {exc.strerror}") from None


def _run(argv: list[str]) -> int:
    import qkd_core

    # The reference truncates its debug log before it looks at the options.
    with open(DEBUG_LOG, "w", encoding="ascii") as debug:
        debug.write("this run filtercionst4: 0, width: 8\n")
        settings = _parse(argv, debug)
        kwargs = settings["kwargs"]
        debug.write(f"after parsing filterconst4: {kwargs.get('width_filter', 0)}, width: 8\n")
        debug.flush()
        folders = settings["folders"]
        try:
            costream = qkd_core.Costream(
                kwargs.pop("start_epoch", 0),
                kwargs.pop("time_offset", 17),
                type5_output=folders["B"] is not None,
                **kwargs,
            )
        except ValueError as exc:
            raise ReferenceExit(getattr(exc, "exit_status", 1), str(exc)) from None
        notify = {c: _open_append(p) for c, p in settings["notify"].items()}
        main_log = notify.get("n", sys.stdout)
        try:
            return _loop(costream, settings, folders, notify, main_log, debug)
        finally:
            for stream in notify.values():
                stream.close()


def _loop(costream, settings, folders, notify, main_log, debug) -> int:
    import qkd_core

    verbosity = settings["verbosity"]
    width_filter = settings["kwargs"].get("width_filter", 0)
    waiting_for = None
    deadline = 0.0
    while True:
        try:
            closed, need, epoch = costream.step_folders(
                folders["D"],
                folders["d"],
                folders["f"],
                folders["F"],
                folders["B"],
                delete_type1=settings["delete_type1"],
                delete_type2=settings["delete_type2"],
            )
        except (qkd_core.FormatError, OSError) as exc:
            raise ReferenceExit(getattr(exc, "exit_status", 222), str(exc)) from None
        for result in closed:
            _report(result, notify, main_log, verbosity, width_filter, debug)
        if need == "done":
            debug.write("benign end.\n")
            sys.stderr.write("This is a benign end.\n")
            return 0
        if (need, epoch) != waiting_for or closed:
            waiting_for = (need, epoch)
            deadline = time.monotonic() + settings["wait"]
        elif time.monotonic() > deadline:
            folder = folders["D"] if need == "type1" else folders["d"]
            path = os.path.join(folder, f"{epoch:08x}")
            status = 225 if need == "type1" else 224
            raise ReferenceExit(status, f"waited too long for {path}: no {need} file for epoch {epoch:08x}")
        else:
            time.sleep(POLL_SECONDS)


def _report(result, notify, main_log, verbosity, width_filter, debug) -> None:
    """Write an epoch's notifications and log lines in the reference's order."""
    debug.write(f"costream: type4bitwidth: {result.type4_width} for epoch {result.epoch:08x}\n")
    if result.width_servo is not None:
        long_width, optimal, distance = result.width_servo
        # The reference prints a default-width variable here that nothing sets, so 0.
        debug.write(
            f"loop: t4long: {long_width}, optimal_width: {optimal}, avg_dist: {distance} "
            f"filterconst: {width_filter}, def: 0\n"
        )
    name = f"{result.epoch:08x}\n"
    if result.type4 is not None and "M" in notify:
        _write_line(notify["M"], name)
    if result.type3 is not None and "m" in notify:
        _write_line(notify["m"], name)
    line = result.log_line(verbosity)
    if line is not None:
        _write_line(main_log, line)
    for char in "lL":
        if char in notify:
            _write_line(notify[char], name)
    log.info("epoch %08x: %d coincidences, %d accidentals, %d kept", result.epoch,
             result.coincidences, result.accidentals, result.kept)


def _write_line(stream, line: str) -> None:
    # Readers of these files and pipes act on each line, so none is held back.
    stream.write(line)
    stream.flush()


def main(argv: list[str] | None = None) -> int:
    """Run ``qkd-costream`` with ``argv`` (default: the process arguments)."""
    if argv is None:
        argv = sys.argv[1:]
    # Only --help, because -h sets the epochs per histogram, as in the reference.
    if argv[:1] == ["--help"]:
        print(plain_text(__doc__))
        return 0
    return run("qkd-costream", lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
