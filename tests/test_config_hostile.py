"""Hostile site files: every configuration key, and files that are not configurations.

Each bad value must give one ConfigError that names the key, the value and the expected
form. The file-level cases run `qkdserver node` itself and check for one error line and
the exit status 2, never a traceback.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from S15qkd.config import SCHEMA, ConfigError, load_config

NAN, INF = float("nan"), float("inf")
LONG = "x" * 5000

# Wrong types that no key accepts. None is what an empty YAML value gives.
NOT_SCALAR = [None, [1], {"a": 1}]
NOT_INT = NOT_SCALAR + ["12", 1.5, True, NAN]
NOT_NUMBER = NOT_SCALAR + ["0.1", True, NAN, INF, -INF]
NOT_LINE = NOT_SCALAR + [5, True, "a\x00b", "two\nlines", "tab\there", LONG]
NOT_BOOL = NOT_SCALAR + ["yes", "true", 1, 0.0]


def int_range(low: int, high: int) -> list:
    return NOT_INT + [low - 1, high + 1, 2**70]


def number_range(low: float, high: float) -> list:
    return NOT_NUMBER + [low - (high - low) / 100 - 1e-3, high * 1.01 + 1]


SKEW = int_range(-100000, 100000)

#: Every key with values it must reject. The completeness test below keeps it in step
#: with SCHEMA.
HOSTILE: dict[str, list] = {
    "identity": NOT_LINE,
    "role": NOT_SCALAR + ["", "HIGH", "middle", 1],
    "local_connection_id": NOT_LINE + ["two words"],
    "remote_connection_id": NOT_LINE + ["two words"],
    "target_hostname": NOT_LINE + ["host name", "a;rm -rf", "peer/path"],
    "port_authd": int_range(1, 65535),
    "listen_address": NOT_LINE + ["", "localhost", "999.1.1.1", "0.0.0.0:4853"],
    "local_cert": NOT_LINE,
    "local_key": NOT_LINE,
    "remote_cert": NOT_LINE,
    "max_frame_bytes": int_range(1 << 16, 1 << 30),
    "reconnect_min_s": number_range(0.01, 60.0),
    "reconnect_max_s": number_range(0.1, 600.0),
    "reply_timeout_s": number_range(0.5, 600.0),
    "block_timeout_s": number_range(1.0, 3600.0),
    "type2_timeout_s": number_range(1.0, 3600.0),
    "data_root": NOT_LINE + [""],
    "final_key_folder": NOT_LINE + [""],
    "source.kind": NOT_SCALAR + ["", "tdc2", "File"],
    "source.events_file": NOT_LINE,
    "source.device": NOT_LINE + [""],
    "source.real_time": NOT_BOOL,
    "source.seed": int_range(0, 2**63 - 1),
    "source.pair_rate": number_range(1.0, 1e8),
    "source.qber": number_range(0.0, 0.5),
    "source.loss_low": number_range(0.0, 0.999),
    "source.offset_ticks": int_range(-(2**40), 2**40),
    "source.drift": number_range(-1e-4, 1e-4),
    "source.jitter_ps": number_range(0.0, 10000.0),
    "source.background_rate": number_range(0.0, 1e7),
    "source.start_time": number_range(0.0, 1e11),
    "source.epochs": int_range(0, 2**31),
    "local_detector_skew_correction.det1corr": SKEW,
    "local_detector_skew_correction.det2corr": SKEW,
    "local_detector_skew_correction.det3corr": SKEW,
    "local_detector_skew_correction.det4corr": SKEW,
    "max_event_diff": int_range(1, 2**31),
    "pfind_epochs": int_range(1, 64),
    "qcrypto.pfind.coarse_resolution": NOT_INT + [0, 3, 48, 1 << 21, -32],
    "qcrypto.pfind.fine_resolution": NOT_INT + [0, 3, 6, 1 << 21, -4],
    "qcrypto.pfind.frequency_search": NOT_BOOL,
    "FFT_buffer_order": int_range(12, 26),
    "remote_coincidence_window": int_range(1, 4096),
    "tracking_window": int_range(1, 65536),
    "track_filter_time_constant": int_range(1, 2**31),
    "error_correction": NOT_BOOL,
    "minimal_block_size": int_range(256, 10_000_000),
    "max_blocks_in_flight": int_range(1, 64),
    "maximal_block_size": int_range(256, 1 << 25),
    "QBER_limit": number_range(0.0, 0.5),
    "QBER_threshold": number_range(0.0, 0.5),
    "default_QBER": number_range(0.005, 0.5),
    "servo_blocks": int_range(1, 1000),
    "service_epochs": int_range(1, 1000),
    "connections": [None, [1], "QKDE0001", 5],
}

CASES = [(key, value) for key, values in HOSTILE.items() for value in values]


def nested(key: str, value) -> dict:
    """Return the site-file mapping that sets the dotted key to value."""
    *parents, leaf = key.split(".")
    mapping = {leaf: value}
    for part in reversed(parents):
        mapping = {part: mapping}
    return mapping


def value_text(value) -> str:
    """Return how an error message shows the value (repr, cut like the config module does)."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return repr(value)[:60]


def test_table_covers_every_key():
    assert set(HOSTILE) == set(SCHEMA)


@pytest.mark.parametrize("key, value", CASES, ids=[f"{k}={value_text(v)[:20]}" for k, v in CASES])
def test_hostile_value_named(tmp_path, key, value):
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump(nested(key, value)))
    with pytest.raises(ConfigError) as caught:
        load_config(site)
    message = str(caught.value)
    assert "\n" not in message
    assert f"'{key}'" in message
    assert SCHEMA[key].expected in message or key == "connections"
    assert value_text(value) in message


def test_long_value_cut_in_message(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"identity": LONG}))
    with pytest.raises(ConfigError, match=r"\(5002 characters\)") as caught:
        load_config(site)
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize("values, message", [
    ({"qcrypto": {"pfind": {"coarse_resolution": 4, "fine_resolution": 8}}},
     "invalid value for 'qcrypto.pfind.fine_resolution': expected at most "
     "qcrypto.pfind.coarse_resolution (4), got 8"),
    ({"minimal_block_size": 50000, "maximal_block_size": 40000},
     "invalid value for 'minimal_block_size': expected at most maximal_block_size (40000), "
     "got 50000"),
    ({"connections": {"QKDE0003": {"port_authd": "abc"}}},
     "in connections.QKDE0003: invalid value for 'port_authd': expected a TCP port number"),
    ({"connections": {"QKDE0003": {"QBER_limt": 0.1}}},
     "in connections.QKDE0003: unknown configuration key 'QBER_limt'; did you mean 'QBER_limit'?"),
    ({"connections": {"two words": {}}}, "invalid key 'connections.two words'"),
    ({"connections": {"A": {"connections": {}}}}, "a connection cannot contain connections"),
    ({"source": "simulator"}, "invalid value for 'source': expected a mapping with the keys kind, "),
    ({"local_detector_skew_correction": 5},
     "invalid value for 'local_detector_skew_correction': expected a mapping with the keys det1corr"),
    ({"QBER_limt": 0.1}, "unknown configuration key 'QBER_limt'; did you mean 'QBER_limit'?"),
    ({"source": {"kindd": "file"}}, "unknown configuration key 'source.kindd'; did you mean 'source.kind'?"),
])
def test_structure_errors_named(values, message):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=values)
    assert message in str(caught.value)


# ---- whole files, through the real command -------------------------------------------

FILES = [
    ("latin1.yaml", "identity: caf\xe9\n".encode("latin-1"),
     "is not UTF-8 text: byte 0xe9 at line 1"),
    ("utf16.json", '{"identity": "a"}'.encode("utf-16"), "is not UTF-8 text: byte 0xff at line 1"),
    ("binary.yaml", bytes(range(128, 256)) * 4, "is not UTF-8 text"),
    ("broken.yaml", b"role: high\n  bad: [\n", "invalid YAML in"),
    ("tab.yaml", b"\trole: high\n", "invalid YAML in"),
    ("python.yaml", b"a: !!python/object/apply:os.system [ls]\n", "could not determine a constructor"),
    ("broken.json", b'{"role": "high",}', "invalid JSON in"),
    ("list.yaml", b"- role\n- high\n", "expected a mapping of keys to values, got list"),
    ("scalar.json", b"42", "expected a mapping of keys to values, got int"),
    ("section.yaml", b"source: simulator\n", "invalid value for 'source': expected a mapping"),
    ("typo.yaml", b"QBER_limt: 0.1\n", "did you mean 'QBER_limit'?"),
    ("type.yaml", b"port_authd: '4853'\n", "invalid value for 'port_authd': expected a TCP port number "
                                           "from 1 to 65535, got '4853'"),
    ("range.json", b'{"QBER_limit": 0.7}', "invalid value for 'QBER_limit': expected a fraction "
                                           "from 0 to 0.5, got 0.7"),
    ("date.yaml", b"data_root: 2024-01-01\n", "invalid value for 'data_root'"),
    ("blocks.yaml", b"max_blocks_in_flight: 0\n", "invalid value for 'max_blocks_in_flight': "
                                                  "expected an integer from 1 to 64, got 0"),
    ("block_size.yaml", b"minimal_block_size: 50000\nmaximal_block_size: 40000\n",
     "invalid value for 'minimal_block_size': expected at most maximal_block_size (40000), "
     "got 50000"),
    ("intkey.yaml", b"1: high\n", "invalid key 1: expected a string"),
]


@pytest.mark.parametrize("name, content, message", FILES, ids=[case[0] for case in FILES])
def test_bad_file_one_line_error(tmp_path, name, content, message):
    site = tmp_path / name
    site.write_bytes(content)
    result = subprocess.run([sys.executable, "-m", "S15qkd.cli.main", "node", "--config", str(site)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qkdserver node: ")
    assert message in lines[0]


def test_endless_or_huge_file_rejected(tmp_path):
    huge = tmp_path / "huge.yaml"
    huge.write_text("# padding\n" * 200_000)
    for path in (Path("/dev/zero"), huge):
        result = subprocess.run([sys.executable, "-m", "S15qkd.cli.main", "node", "--config", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert f"configuration file {str(path)!r} is larger than 1048576 bytes" in result.stderr


def test_config_folder_or_missing_file(tmp_path):
    for path, message in ((tmp_path, "Is a directory"), (tmp_path / "absent.yaml", "No such file")):
        result = subprocess.run([sys.executable, "-m", "S15qkd.cli.main", "node", "--config", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert f"cannot read configuration file {str(path)!r}: {message}" in result.stderr
