"""The ``qkdserver`` command: run a node, or simulate a two-node link."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkdserver",
        description="Node software of a BBM92 quantum key distribution link.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="more log output (-v: info, -vv: debug). `qkdserver node` logs its own "
             "start-up, connection, engine state and block lines without -v",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import config_command, node_commands

    node_commands.add_commands(subparsers)
    config_command.add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose == 0 and getattr(args, "log_node_events", False):
        # A node is a long-running service: its operator needs the start-up, connection,
        # state and block lines by default. The Rust stages' per-epoch lines stay at -v.
        logging.getLogger("S15qkd").setLevel(logging.INFO)
    if args.command is None:
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
