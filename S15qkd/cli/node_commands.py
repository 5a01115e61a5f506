"""Subcommands of ``qkdserver`` that run nodes: ``certs``, ``node`` and ``simulate``."""

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
    certs.add_argument("--host", action="append", metavar="HOST",
                       help="host name or IP address that HTTPS clients use to reach the "
                            "node's web page, written into the certificate's subjectAltName "
                            "with NAME; repeat for several (default: localhost and 127.0.0.1)")
    certs.set_defaults(handler=run_certs)

    node = subparsers.add_parser(
        "node", help="run one node of a link from a configuration file",
        description="Run one node: the classical channel to the peer, the stage workers "
                    "of its role, the keystore and the watchdog. Stops on SIGINT/SIGTERM.")
    node.add_argument("--config", required=True, help="site file (YAML or JSON)")
    node.add_argument("--start", action="store_true",
                      help="start key generation whenever the peer connects (the high-count "
                           "side sends the start request)")
    node.add_argument("--web-port", type=tcp_port, default=None, metavar="PORT",
                      help="also serve the web page and HTTP API on this port (8000 in the "
                           "reference deployment); the control token is <data_root>/web_token")
    node.add_argument("--web-host", default="0.0.0.0", help="address of the web page (default 0.0.0.0)")
    node.add_argument("--web-cert", metavar="FILE",
                      help="PEM certificate (chain) of the web page: serve HTTPS instead of HTTP; "
                           "needs --web-key")
    node.add_argument("--web-key", metavar="FILE", help="PEM private key of --web-cert")
    node.set_defaults(handler=run_node, log_node_events=True)

    simulate = subparsers.add_parser(
        "simulate", help="run both nodes of a link on this machine and compare their keys",
        description="Start a high-count and a low-count node in this process, connected "
                    "over mutual TLS on loopback, feed them simulated or recorded events, "
                    "print one line per epoch and per block, and exit with status 0 only "
                    "if both keystores hold the same non-empty set of keys.")
    from ..simulate import add_simulate_arguments

    add_simulate_arguments(simulate)
    simulate.set_defaults(handler=run_simulate)


def tcp_port(text: str) -> int:
    """Parse a TCP port number; the socket layer would take 70000 as port 4464."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected a TCP port number "
                                         "from 1 to 65535")
    return port


def run_certs(args: argparse.Namespace) -> int:
    from ..channel.tls import DEFAULT_CERTIFICATE_HOSTS, create_node_certificate

    try:
        hosts = args.host if args.host else DEFAULT_CERTIFICATE_HOSTS
        cert, key = create_node_certificate(Path(args.folder), args.name, days=args.days,
                                            hosts=hosts)
    except (ValueError, OSError) as error:
        # FileExistsError and a full or read-only folder are OSErrors; bad names and
        # validities are ValueErrors. Each message names the value.
        print(f"qkdserver certs: {error}", file=sys.stderr)
        return 1
    print(f"certificate: {cert}\nprivate key: {key}")
    return 0


def run_node(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config
    from ..keystore import KeyStoreError
    from ..node import check_start_up, run_node_until_signal

    if (args.web_cert is None) != (args.web_key is None):
        print("qkdserver node: HTTPS needs both --web-cert and --web-key; give both or neither",
              file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        # The checks of `qkdserver config --config`, so that it passes no file that stops here.
        check_start_up(config)
    except (ConfigError, KeyStoreError) as error:
        print(f"qkdserver node: {error}", file=sys.stderr)
        return 2
    return run_node_until_signal(config, start=args.start, web_port=args.web_port,
                                 web_host=args.web_host, web_certfile=args.web_cert,
                                 web_keyfile=args.web_key)


def run_simulate(args: argparse.Namespace) -> int:
    from ..simulate import run_simulation

    return run_simulation(args)
