"""``qkdserver config``: print or write a node's configuration with every key.

Without ``--config`` the output contains the defaults. With it, the output contains the
defaults merged with the site file, after the start-up checks of ``qkdserver node`` that
need no network (:func:`S15qkd.node.check_start_up`). ``--output`` writes a new
file (YAML for .yaml and .yml, JSON otherwise) that a node loads unchanged, and never
replaces an existing one. The YAML form carries each key's meaning and expected form as
a comment, so it serves as a starting site file.

``source.kind`` appears only where the site file sets it. Otherwise the YAML form lists
the choices as comments and the JSON form leaves the key out, so that ``qkdserver node``
rejects a generated file until the user chooses a source. The default, the built-in
simulator, releases keys that anyone with ``source.seed`` can compute. For the same
reason, printing the configuration of a site file without ``source.kind`` fails with the
error a node gives.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from ..config import SCHEMA, SOURCE_KIND_CHOICES, Config, ConfigError, load_config

#: Start-up conditions that `qkdserver config --config` leaves unchecked, because they
#: need the network or a running node.
NOT_CHECKED = ("Not checked: that port_authd and the web port are free, that listen_address "
               "is an address of this machine, that the peer is reachable and accepts "
               "local_cert, that source.device exists, and that no other node uses data_root.")

#: Width of the comment lines in the YAML form.
COMMENT_WIDTH = 88


def add_command(subparsers) -> None:
    config = subparsers.add_parser(
        "config", help="print or write a node's configuration with every key",
        description="Print the configuration a node would run with: the defaults, merged "
                    "with --config FILE if given. With --config, the command also runs the "
                    "start-up checks of qkdserver node that need no network (certificate "
                    "and key files, source.kind named, event file, folders, keystore "
                    "state) and stops with the same error a node gives. --output writes "
                    "a new site file instead.")
    config.add_argument("--config", metavar="FILE", help="site file (YAML or JSON) to merge")
    config.add_argument("--output", metavar="FILE",
                        help="write a new file instead of printing (YAML for .yaml/.yml, "
                             "JSON otherwise); an existing file is never replaced")
    config.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    config.set_defaults(handler=run_config)


def run_config(args: argparse.Namespace) -> int:
    # Imported here, so that `qkdserver --help` does not load the node and its Rust module.
    from ..keystore import KeyStoreError
    from ..node import check_start_up

    try:
        config = load_config(args.config)
        if args.config is not None and args.output is None:
            check_start_up(config)
    except (ConfigError, KeyStoreError) as error:
        print(f"qkdserver config: {error}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(config_json(config) if args.json else commented_yaml(config))
        if args.config is not None:
            print(f"qkdserver config: {args.config} passes the start-up checks of qkdserver "
                  f"node that need no network. {NOT_CHECKED}", file=sys.stderr)
        return 0
    path = Path(args.output)
    text = commented_yaml(config) if path.suffix.lower() in (".yaml", ".yml") else config_json(config)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        print(f"qkdserver config: {path} already exists; edit it, or remove it to write a "
              "new one", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"qkdserver config: cannot write {path}: {error.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(f"wrote {path}")
    return 0


def config_json(config: Config) -> str:
    values = config.as_dict()
    if "source.kind" not in config.explicit_keys:
        del values["source"]["kind"]
    return json.dumps(values, indent=2) + "\n"


def commented_yaml(config: Config) -> str:
    """Return the configuration as YAML, each key preceded by its meaning and expected form."""
    import yaml

    lines: list[str] = []
    sections: list[str] = []  # the nested mappings open at the current line
    for key, option in SCHEMA.items():
        *parents, leaf = key.split(".")
        shared = 0
        while shared < min(len(sections), len(parents)) and sections[shared] == parents[shared]:
            shared += 1
        sections = sections[:shared]
        for depth in range(shared, len(parents)):
            lines.append("  " * depth + f"{parents[depth]}:")
            sections.append(parents[depth])
        indent = "  " * len(parents)
        comment = f"{option.help[0].upper()}{option.help[1:]}. Expected: {option.expected}."
        lines.extend(textwrap.wrap(comment, COMMENT_WIDTH, initial_indent=indent + "# ",
                                   subsequent_indent=indent + "# ", break_on_hyphens=False))
        if key == "source.kind" and key not in config.explicit_keys:
            lines.extend(source_kind_choices(indent, leaf))
            continue
        rendered = yaml.safe_dump({leaf: config[key]}, default_flow_style=False, width=1000,
                                  sort_keys=False).rstrip("\n")
        lines.extend(indent + line for line in rendered.split("\n"))
    return "\n".join(lines) + "\n"


def source_kind_choices(indent: str, leaf: str) -> list[str]:
    """Return commented-out lines, one per source.kind, for the user to choose one."""
    note = "Not set, so qkdserver node rejects this file: remove the '# ' in front of one of these lines."
    lines = textwrap.wrap(note, COMMENT_WIDTH, initial_indent=indent + "# ",
                          subsequent_indent=indent + "# ", break_on_hyphens=False)
    width = max(len(kind) for kind in SOURCE_KIND_CHOICES)
    for kind, use in SOURCE_KIND_CHOICES.items():
        lines.append(f"{indent}# {leaf}: {kind:<{width}}  # {use}")
    return lines
