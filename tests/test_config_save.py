"""PUT /api/config against a real node and its site file on disk."""

from __future__ import annotations

import pytest

pytest.importorskip("dash", reason="the web extra is not installed: pip install '.[web]'")
requests = pytest.importorskip("requests")
yaml = pytest.importorskip("yaml")

from S15qkd.channel.tls import create_node_certificate  # noqa: E402
from S15qkd.config import ConfigError, load_config  # noqa: E402
from S15qkd.node import Node  # noqa: E402
from S15qkd.simulate import free_port  # noqa: E402
from S15qkd.web import WebServer  # noqa: E402

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_site_file(tmp_path, with_kind: bool):
    """Write a site file that names only some keys, as an operator writes one."""
    certs = tmp_path / "certs"
    high_cert, high_key = create_node_certificate(certs, "alice")
    low_cert, _ = create_node_certificate(certs, "bob")
    values = {
        "identity": "alice", "role": "high", "listen_address": "127.0.0.1",
        "port_authd": free_port(), "local_cert": str(high_cert), "local_key": str(high_key),
        "remote_cert": str(low_cert), "data_root": str(tmp_path / "data"),
        "final_key_folder": str(tmp_path / "keys"), "QBER_limit": 0.1,
    }
    if with_kind:
        values["source"] = {"kind": "simulator", "seed": 5}
    site = tmp_path / "alice.yaml"
    site.write_text(yaml.safe_dump(values))
    return site


@pytest.fixture
def served(tmp_path):
    """Yield (site file, node, web server URL) for a node loaded from a partial site file."""
    site = write_site_file(tmp_path, with_kind=False)
    node = Node(load_config(site))
    try:
        with WebServer(node, TOKEN, host="127.0.0.1", port=0) as server:
            yield site, node, server.url
    finally:
        node.close()


def test_partial_body_rejected(served):
    site, node, url = served
    before = site.read_bytes()
    for query in ("?validate_only=1", ""):
        response = requests.put(f"{url}/api/config{query}", headers=AUTH, json={"QBER_limit": 0.08})
        assert response.status_code == 422, query
        body = response.json()
        assert body["valid"] is False
        message = body["problems"][0]["message"]
        assert "data_root" in message
        assert "local_cert" in message
        assert "source.kind" in message
        assert "QBER_limit" not in message.split(";")[0]
        assert "GET /api/config" in message
    assert site.read_bytes() == before
    assert node.config["QBER_limit"] == 0.1
    assert node.config["identity"] == "alice"


def test_missing_and_invalid_both_named(served):
    _, _, url = served
    response = requests.put(f"{url}/api/config?validate_only=1", headers=AUTH,
                            json={"QBER_limit": 0.9})
    assert response.status_code == 422
    problems = response.json()["problems"]
    assert len(problems) == 2
    assert problems[0]["key"] == ""
    assert problems[1]["key"] == "QBER_limit"


def test_whole_body_saves_named_keys(served):
    site, node, url = served
    config = requests.get(f"{url}/api/config", headers=AUTH).json()
    config["QBER_limit"] = 0.08
    config["tracking_window"] = 40
    check = requests.put(f"{url}/api/config?validate_only=1", headers=AUTH, json=config)
    assert check.status_code == 200
    assert check.json() == {"valid": True}
    response = requests.put(f"{url}/api/config", headers=AUTH, json=config)
    assert response.status_code == 200
    assert response.json()["changed_keys"] == ["QBER_limit", "tracking_window"]
    assert node.config["QBER_limit"] == 0.08

    saved = yaml.safe_load(site.read_text())
    assert saved["QBER_limit"] == 0.08
    assert saved["tracking_window"] == 40
    assert saved["local_cert"] == node.config["local_cert"]
    # Keys that were only at their default are not written out.
    assert "source" not in saved
    assert "FFT_buffer_order" not in saved
    assert "connections" not in saved
    with pytest.raises(ConfigError, match="missing value for 'source.kind'"):
        load_config(site).require_explicit_source_kind()


def test_second_save_keeps_named_kind(tmp_path):
    site = write_site_file(tmp_path, with_kind=True)
    node = Node(load_config(site))
    try:
        for limit in (0.08, 0.07):
            config = node.get_config()
            config["QBER_limit"] = limit
            node.save_config(config)
    finally:
        node.close()
    saved = yaml.safe_load(site.read_text())
    assert saved["source"] == {"kind": "simulator", "seed": 5}
    assert saved["QBER_limit"] == 0.07
    load_config(site).require_explicit_source_kind()
