"""The reference deployment's Makefile verbs, run through `make` against real nodes and files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from S15qkd.channel.tls import create_node_certificate
from S15qkd.config import load_config
from test_node_cli import NodeProcess, free_port, write_config

REPO_ROOT = Path(__file__).resolve().parents[1]
QKDSERVER = f"{sys.executable} -m S15qkd.cli.main"

pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("curl") is None,
                                reason="needs make and curl")


def make(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(REPO_ROOT), f"QKDSERVER={QKDSERVER}", *arguments],
                          capture_output=True, text=True, timeout=120)


def test_help_lists_reference_verbs():
    result = make("help")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    for verb in ("generate-config", "check-config", "certs", "qkd-status", "keygen-status",
                 "keygen-start", "keygen-stop", "savelog", "build-fresh"):
        assert verb in listed


def test_generate_config_loads_as_defaults(tmp_path):
    result = make("generate-config", f"CONFIG_DIR={tmp_path}", "CONFIG_FILE=site.yaml")
    assert result.returncode == 0, result.stderr
    site = tmp_path / "site.yaml"
    assert load_config(site).as_dict() == load_config().as_dict()
    assert "# TLS port of the classical channel" in site.read_text()


def test_generated_config_leaves_source_kind(tmp_path):
    result = make("generate-config", f"CONFIG_DIR={tmp_path}", "CONFIG_FILE=site.yaml")
    assert result.returncode == 0, result.stderr
    site = tmp_path / "site.yaml"
    text = site.read_text()
    assert "\n  kind:" not in text
    for kind in ("tdc1", "pipe", "file", "simulator"):
        assert f"\n  # kind: {kind} " in text

    node = subprocess.run([sys.executable, "-m", "S15qkd.cli.main", "node", "--config", str(site)],
                          capture_output=True, text=True, timeout=60)
    assert node.returncode == 2
    assert "Traceback" not in node.stderr
    assert "missing value for 'source.kind'" in node.stderr
    assert "'tdc1'" in node.stderr
    assert "'simulator' for a test link" in node.stderr

    check = make("check-config", f"CONFIG_DIR={tmp_path}", "CONFIG_FILE=site.yaml")
    assert check.returncode != 0
    assert "missing value for 'source.kind'" in check.stderr
    assert "'tdc1'" in check.stderr


def test_generated_config_kind_uncommented(tmp_path):
    result = make("generate-config", f"CONFIG_DIR={tmp_path}", "CONFIG_FILE=site.yaml")
    assert result.returncode == 0, result.stderr
    site = tmp_path / "site.yaml"
    # check-config also runs the node's file checks, so the generated file gets the
    # certificates, folders and named pipe of a real node.
    (cert, key), (peer, _) = (create_node_certificate(tmp_path / "certs", name)
                              for name in ("high", "low"))
    events = tmp_path / "events.pipe"
    os.mkfifo(events)
    replacements = {"  # kind: pipe ": "  kind: pipe ", "local_cert: ''": f"local_cert: {cert}",
                    "local_key: ''": f"local_key: {key}", "remote_cert: ''": f"remote_cert: {peer}",
                    "events_file: ''": f"events_file: {events}",
                    "data_root: /tmp/cryptostuff": f"data_root: {tmp_path / 'data'}",
                    "final_key_folder: /epoch_files": f"final_key_folder: {tmp_path / 'keys'}"}
    text = site.read_text()
    for generated, chosen in replacements.items():
        assert generated in text
        text = text.replace(generated, chosen)
    site.write_text(text)
    assert load_config(site)["source.kind"] == "pipe"
    check = make("check-config", f"CONFIG_DIR={tmp_path}", "CONFIG_FILE=site.yaml")
    assert check.returncode == 0, check.stderr
    assert "  kind: pipe\n" in check.stdout


def test_generated_json_config_leaves_source_kind(tmp_path):
    result = make("generate-config", f"CONFIG_DIR={tmp_path}", "CONFIG_FILE=site.json")
    assert result.returncode == 0, result.stderr
    site = tmp_path / "site.json"
    assert "kind" not in json.loads(site.read_text())["source"]
    check = make("check-config", f"CONFIG_DIR={tmp_path}", "CONFIG_FILE=site.json")
    assert check.returncode != 0
    assert "missing value for 'source.kind'" in check.stderr


def test_generate_config_keeps_existing_file(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("role: low\n")
    result = make("generate-config", f"CONFIG_DIR={tmp_path}", "CONFIG_FILE=site.yaml")
    assert result.returncode != 0
    assert f"{site} already exists" in result.stderr
    assert site.read_text() == "role: low\n"


def test_check_config_names_bad_value(tmp_path):
    (tmp_path / "site.yaml").write_text("QBER_limit: 0.7\n")
    result = make("check-config", f"CONFIG_DIR={tmp_path}", "CONFIG_FILE=site.yaml")
    assert result.returncode != 0
    assert "invalid value for 'QBER_limit'" in result.stderr
    assert "got 0.7" in result.stderr


def test_check_config_passes_node_file(tmp_path):
    certs = {name: create_node_certificate(tmp_path / "certs", name) for name in ("high", "low")}
    write_config(tmp_path / "site.json", certs, "high", free_port(), QBER_limit=0.07)
    result = make("check-config", f"CONFIG_DIR={tmp_path}", "CONFIG_FILE=site.json")
    assert result.returncode == 0, result.stderr
    assert "QBER_limit: 0.07" in result.stdout
    assert "passes the start-up checks" in result.stderr
    assert "Not checked: that port_authd and the web port are free" in result.stderr


@pytest.mark.parametrize("change, named", [
    ({"local_cert": ""}, "missing value for 'local_cert'"),
    ({"remote_cert": "absent.crt"}, "file 'absent.crt' not found"),
    ({"source": {}}, "missing value for 'source.kind'"),
    ({"source": {"kind": "file"}}, "missing value for 'source.events_file'"),
    ({"local_key": "EMPTY"}, "local_key"),
    ({"data_root": "FILE"}, "is a file, not a folder"),
    ({"data_root": "STATE"}, "invalid keystore state"),
])
def test_check_config_rejects_what_node_rejects(tmp_path, change, named):
    certs = {name: create_node_certificate(tmp_path / "certs", name) for name in ("high", "low")}
    empty, a_file, state_root = tmp_path / "empty.key", tmp_path / "a-file", tmp_path / "state"
    empty.write_text("")
    a_file.write_text("not a folder")
    state_root.mkdir()
    (state_root / "keystore_state.json").write_text('{"next_unused_epoch": "abc"}')
    places = {"EMPTY": str(empty), "FILE": str(a_file), "STATE": str(state_root)}
    values = {key: places.get(value, value) if isinstance(value, str) else value
              for key, value in change.items()}
    site = write_config(tmp_path / "site.json", certs, "high", free_port(), **values)

    before = sorted(tmp_path.rglob("*"))
    checked = make("check-config", f"CONFIG_DIR={tmp_path}", "CONFIG_FILE=site.json")
    assert checked.returncode == 2
    assert named in checked.stderr
    assert checked.stdout == ""
    assert sorted(tmp_path.rglob("*")) == before

    node = subprocess.run([sys.executable, "-m", "S15qkd.cli.main", "node", "--config", str(site)],
                          capture_output=True, text=True, timeout=60)
    assert node.returncode == 2
    assert named in node.stderr


def test_certs_writes_pair(tmp_path):
    result = make("certs", "NAME=alpha", f"SECRETS_DIR={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "alpha.crt").is_file()
    assert (tmp_path / "alpha.key").stat().st_mode & 0o777 == 0o600


@pytest.fixture
def web_node(tmp_path):
    """A high-count node without peer, serving its web page on loopback."""
    folder = tmp_path / "certs"
    certs = {name: create_node_certificate(folder, name) for name in ("high", "low")}
    config = write_config(tmp_path / "high.json", certs, "high", free_port())
    web_port = free_port()
    node = NodeProcess("node", "--config", str(config), "--web-port", str(web_port),
                       "--web-host", "127.0.0.1")
    try:
        node.wait_for("web page on")
        yield f"http://127.0.0.1:{web_port}", tmp_path / "high-data" / "web_token"
    finally:
        node.stop()


def test_status_verbs_report_codes(web_node):
    url, _ = web_node
    result = make("qkd-status", f"WEB_URL={url}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "status_qkd: 404"
    result = make("keygen-status", f"WEB_URL={url}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(status_keygen: 404)"


def test_keygen_verbs_use_token(web_node, tmp_path):
    url, token = web_node
    result = make("keygen-stop", f"WEB_URL={url}", f"WEB_TOKEN_FILE={token}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stop_keygen: done"
    # Without a peer the node rejects the start, and make shows why.
    result = make("keygen-start", f"WEB_URL={url}", f"WEB_TOKEN_FILE={token}")
    assert result.returncode != 0
    assert "the channel to the peer is not connected" in result.stdout
    wrong = tmp_path / "wrong_token"
    wrong.write_text("not-the-token-of-this-node\n")
    result = make("keygen-stop", f"WEB_URL={url}", f"WEB_TOKEN_FILE={wrong}")
    assert result.returncode != 0
    assert "invalid web token" in result.stdout


def test_run_passes_simulate_args():
    # -n prints the commands of run and install without running them.
    result = make("-n", "run", "SIMULATE_ARGS=--workdir /tmp/kept-keys")
    assert result.returncode == 0, result.stderr
    assert "qkdserver simulate --workdir /tmp/kept-keys" in result.stdout
