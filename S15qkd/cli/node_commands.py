"""Subcommands of ``qkdserver`` for nodes: ``certs``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(subparsers) -> None:
    certs = subparsers.add_parser(
        "certs", help="create a private key and a self-signed certificate for a node",
        description="Write NAME.key (EC P-256, mode 0600) and a self-signed NAME.crt into "
                    "FOLDER. Give each node its own pair and copy each node's .crt to the "
                    "other node, where it becomes remote_cert.")
    certs.add_argument("name", help="node name, used as file name and certificate common name")
    certs.add_argument("--folder", default=".", help="output folder (default: current folder)")
    certs.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    certs.set_defaults(handler=run_certs)


def run_certs(args: argparse.Namespace) -> int:
    from ..channel.tls import create_node_certificate

    try:
        cert, key = create_node_certificate(Path(args.folder), args.name, days=args.days)
    except FileExistsError as error:
        print(f"qkdserver certs: {error}", file=sys.stderr)
        return 1
    print(f"certificate: {cert}\nprivate key: {key}")
    return 0
