"""HTTP routes of the web server, over real sockets on loopback (HTTP and HTTPS)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import ssl
import stat
import subprocess

import pytest

pytest.importorskip("dash", reason="the web extra is not installed: pip install '.[web]'")
requests = pytest.importorskip("requests")

from S15qkd.channel.tls import create_node_certificate  # noqa: E402
from S15qkd.status import BlockRecord, ControlError, EngineState, InMemoryNode  # noqa: E402
from S15qkd.web import WebServer  # noqa: E402
from S15qkd.web.auth import SESSION_COOKIE, load_token, session_value  # noqa: E402

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WRONG_AUTH = {"Authorization": "Bearer wrong-token-0123456789"}

CONTROL_ROUTES = ["start_keygen", "stop_keygen", "restart_transferd", "restart_connection"]
STATUS_ROUTES = ["status_keygen", "status_qkd", "status_data", "api/status"]


class RefusingNode(InMemoryNode):
    """A node whose start request fails, as when the peer is not connected."""

    def start_keygen(self) -> None:
        raise ControlError("the channel to the peer is down; restart the connection first")


def make_node(cls=InMemoryNode) -> InMemoryNode:
    return cls(config={
        "identity": "alice",
        "QBER_limit": 0.1,
        "tracking_window": 30,
        "connections": {"QKDE0001": {"target_hostname": "bob.local"}},
    })


@pytest.fixture
def node():
    return make_node()


@pytest.fixture
def server(node):
    with WebServer(node, TOKEN, host="127.0.0.1", port=0) as running:
        yield running


def block(final_bits: int = 2000) -> BlockRecord:
    return BlockRecord(first_epoch=0x1234, num_epochs=5, raw_bits=8000, qber=0.031, leaked_bits=1700,
                       efficiency=1.1, final_bits=final_bits, key_rate_bps=1234.56)


@pytest.mark.parametrize("route", CONTROL_ROUTES)
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_control_without_token_is_401(server, node, route, method):
    response = requests.request(method, f"{server.url}/{route}")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert node.calls == []


@pytest.mark.parametrize("route", CONTROL_ROUTES)
def test_control_with_wrong_token_is_403(server, node, route):
    response = requests.get(f"{server.url}/{route}", headers=WRONG_AUTH)
    assert response.status_code == 403
    assert node.calls == []


@pytest.mark.parametrize("route", CONTROL_ROUTES)
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_control_with_token_is_204(server, node, route, method):
    response = requests.request(method, f"{server.url}/{route}", headers=AUTH)
    assert response.status_code == 204
    assert response.content == b""
    assert node.calls == [(route,)]


@pytest.mark.parametrize("route", CONTROL_ROUTES + ["set_conn/QKDE0001"])
@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_control_wrong_method_is_405(server, node, route, method):
    response = requests.request(method, f"{server.url}/{route}", headers=AUTH)
    assert response.status_code == 405
    assert node.calls == []


@pytest.mark.parametrize("route", STATUS_ROUTES)
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_status_wrong_method_is_405(server, route, method):
    assert requests.request(method, f"{server.url}/{route}").status_code == 405


def test_control_refused_by_node_is_409():
    refusing = make_node(RefusingNode)
    with WebServer(refusing, TOKEN, host="127.0.0.1", port=0) as running:
        response = requests.get(f"{running.url}/start_keygen", headers=AUTH)
    assert response.status_code == 409
    assert "restart the connection" in response.text


def test_set_conn_known_id(server, node):
    response = requests.get(f"{server.url}/set_conn/QKDE0001", headers=AUTH)
    assert response.status_code == 204
    assert node.calls == [("set_conn", "QKDE0001")]
    assert node.status().active_connection == "QKDE0001"


def test_set_conn_unknown_id_is_404(server, node):
    response = requests.get(f"{server.url}/set_conn/QKDE9999", headers=AUTH)
    assert response.status_code == 404
    assert "QKDE9999" in response.text
    assert "QKDE0001" in response.text
    assert node.calls == []


def test_set_conn_without_token_is_401(server, node):
    assert requests.get(f"{server.url}/set_conn/QKDE0001").status_code == 401
    assert requests.get(f"{server.url}/set_conn/QKDE9999").status_code == 401
    assert node.calls == []


def test_status_qkd_follows_engine(server, node):
    response = requests.get(f"{server.url}/status_qkd")
    assert response.status_code == 404
    assert response.content == b""
    node.start_keygen()
    response = requests.get(f"{server.url}/status_qkd")
    assert response.status_code == 200
    assert response.content == b""
    assert requests.head(f"{server.url}/status_qkd").status_code == 200


def test_status_keygen_reports_key_rate(server, node):
    assert requests.get(f"{server.url}/status_keygen").status_code == 404
    node.start_keygen()
    response = requests.get(f"{server.url}/status_keygen")
    assert response.status_code == 200
    assert response.text == ""
    node.add_block(block())
    response = requests.get(f"{server.url}/status_keygen")
    assert response.status_code == 200
    assert response.text == "1234.6"
    head = requests.head(f"{server.url}/status_keygen")
    assert head.status_code == 200
    assert head.content == b""


def test_status_data_has_reference_fields(server, node):
    node.start_keygen()
    node.add_block(block())
    response = requests.get(f"{server.url}/status_data")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    data = response.json()
    assert set(data) == {"time", "process_state", "status_info", "errc_info"}
    assert set(data["process_state"]) == {
        "transferd", "readevents", "chopper", "chopper2", "costream", "splicer", "error_correction"}
    assert data["process_state"]["costream"] is True
    assert data["process_state"]["splicer"] is False
    assert data["status_info"]["state"] == "KEY_GENERATION"
    assert data["status_info"]["connection_status"] == 1
    assert data["status_info"]["symmetry"] is False
    assert set(data["status_info"]["local_counts"]) == {"total", "v", "-", "h", "+"}
    assert data["errc_info"]["first_epoch"] == "00001234"
    assert data["errc_info"]["key_file_name"] == "00001234"
    assert data["errc_info"]["ec_final_bits"] == 2000
    assert data["errc_info"]["ec_key_gen_rate"] == 1234.6
    assert data["errc_info"]["total_ec_key_bits"] == 2000


def test_api_status_is_full_snapshot(server, node):
    node.add_block(block())
    data = requests.get(f"{server.url}/api/status").json()
    assert data["engine_state"] == EngineState.ONLY_COMMUNICATION.value
    assert data["error_correction"]["recent_blocks"][0]["leaked_bits"] == 1700


def test_config_requires_token(server):
    assert requests.get(f"{server.url}/api/config").status_code == 401
    assert requests.put(f"{server.url}/api/config", json={}).status_code == 401
    assert requests.get(f"{server.url}/api/config", headers=WRONG_AUTH).status_code == 403


def test_config_get_and_save(server, node):
    config = requests.get(f"{server.url}/api/config", headers=AUTH).json()
    assert config["tracking_window"] == 30
    config["QBER_limit"] = 0.09
    config["tracking_window"] = 40
    response = requests.put(f"{server.url}/api/config", headers=AUTH, json=config)
    assert response.status_code == 200
    result = response.json()
    assert result["applied_keys"] == ["QBER_limit"]
    assert result["restart_needed_keys"] == ["tracking_window"]
    assert node.status().error_correction.qber_limit == 0.09


def test_config_invalid_is_422(server, node):
    config = node.get_config()
    config["tracking_window"] = "wide"
    response = requests.put(f"{server.url}/api/config", headers=AUTH, json=config)
    assert response.status_code == 422
    assert response.json()["problems"][0]["key"] == "tracking_window"
    assert node.get_config()["tracking_window"] == 30


def test_config_validate_only_saves_nothing(server, node):
    config = node.get_config()
    config["tracking_window"] = 50
    response = requests.put(f"{server.url}/api/config?validate_only=1", headers=AUTH, json=config)
    assert response.status_code == 200
    assert response.json() == {"valid": True}
    assert node.get_config()["tracking_window"] == 30


def test_config_not_json_is_400(server):
    response = requests.put(f"{server.url}/api/config", headers=AUTH, data="tracking_window=3")
    assert response.status_code == 400
    assert "expected a JSON object with the whole configuration" in response.text


@pytest.mark.parametrize("body", ["[" * 100_000 + "]" * 100_000,
                                  '{"connections": ' + '{"a": ' * 5000 + "1" + "}" * 5001,
                                  b"\xff\xfe{"])
def test_config_body_too_deep_or_not_utf8_is_400(server, body):
    response = requests.put(f"{server.url}/api/config?validate_only=1", headers=AUTH, data=body)
    assert response.status_code == 400
    assert "expected a JSON object with the whole configuration" in response.text


def test_config_json_without_content_type(server, node):
    # curl --data @config.json labels the body application/x-www-form-urlencoded.
    config = requests.get(f"{server.url}/api/config", headers=AUTH).json()
    config["tracking_window"] = 31
    headers = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}
    response = requests.put(f"{server.url}/api/config?validate_only=1", headers=headers,
                            data=json.dumps(config))
    assert response.status_code == 200
    assert response.json() == {"valid": True}


def test_config_wrong_method_is_405(server):
    assert requests.delete(f"{server.url}/api/config", headers=AUTH).status_code == 405


def test_login_sets_session_cookie(server, node):
    session = requests.Session()
    refused = session.post(f"{server.url}/login", data={"token": "not-the-token"}, allow_redirects=False)
    assert refused.status_code == 403
    assert SESSION_COOKIE not in session.cookies

    accepted = session.post(f"{server.url}/login", data={"token": TOKEN}, allow_redirects=False)
    assert accepted.status_code == 303
    set_cookie = accepted.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie
    assert "SameSite=Strict" in set_cookie
    assert TOKEN not in set_cookie
    assert session.get(f"{server.url}/stop_keygen").status_code == 204
    assert node.calls == [("stop_keygen",)]

    session.get(f"{server.url}/logout")
    assert session.get(f"{server.url}/stop_keygen").status_code == 401


def test_forged_session_cookie_is_403(server, node):
    cookies = {SESSION_COOKIE: session_value("some-other-token-value")}
    assert requests.get(f"{server.url}/start_keygen", cookies=cookies).status_code == 403
    assert node.calls == []


def test_protected_status_requires_token(node):
    with WebServer(node, TOKEN, host="127.0.0.1", port=0, protect_status=True) as running:
        assert requests.get(f"{running.url}/status_data").status_code == 401
        assert requests.get(f"{running.url}/status_qkd").status_code == 401
        assert requests.get(f"{running.url}/status_data", headers=AUTH).status_code == 200


def test_pages_are_served(server):
    for path in ["/", "/apps/QKD_status", "/apps/QKD_settings", "/apps/detector_settings", "/login"]:
        response = requests.get(f"{server.url}{path}")
        assert response.status_code == 200, path
        assert "S15 QKD" in response.text, path


@pytest.fixture
def certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not found; it creates the test certificate")
    cert, key = tmp_path / "cert.crt", tmp_path / "cert.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def test_https_serves_routes(node, certificate):
    cert, key = certificate
    with WebServer(node, TOKEN, host="127.0.0.1", port=0, certfile=cert, keyfile=key) as running:
        assert running.url.startswith("https://")
        response = requests.get(f"{running.url}/status_data", verify=str(cert))
        assert response.status_code == 200
        assert response.json()["status_info"]["state"] == "ONLY_COMMUNICATION"
        assert requests.get(f"{running.url}/start_keygen", verify=str(cert)).status_code == 401
        assert requests.get(f"{running.url}/start_keygen", headers=AUTH, verify=str(cert)).status_code == 204
        page = requests.get(f"{running.url}/apps/QKD_status", verify=str(cert))
        assert page.status_code == 200
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{running.port}/status_data", timeout=5)
    assert node.calls == [("start_keygen",)]


def test_start_log_names_bind_address(node, caplog):
    caplog.set_level(logging.INFO, logger="S15qkd.web.server")
    with WebServer(node, TOKEN, host="127.0.0.1", port=0) as running:
        pass
    lines = [r.getMessage() for r in caplog.records if "web page serving" in r.getMessage()]
    assert lines == [f"web page serving on http://127.0.0.1:{running.port} (listening on 127.0.0.1 only)"]


def test_wildcard_host_named_every_interface(node):
    # Not started: binding 0.0.0.0 here would open a port beyond loopback. The URL to
    # open stays on 127.0.0.1, but the log must not suggest the page is local only.
    server = WebServer(node, TOKEN, host="0.0.0.0", port=8123)
    server.port = 8123
    assert server.url == "http://127.0.0.1:8123"
    assert server.bind_description == ("listening on every network interface, port 8123; "
                                "--web-host 127.0.0.1 keeps it on this machine")


def test_node_certificate_passes_host_check(node, tmp_path):
    # `qkdserver certs` writes subjectAltName entries, so a client that checks the host
    # name accepts the page by IP address and by name, and rejects other names.
    cert, key = create_node_certificate(tmp_path, "alice", hosts=("127.0.0.1", "qkd-a.local"))
    with WebServer(node, TOKEN, host="127.0.0.1", port=0, certfile=cert, keyfile=key) as running:
        response = requests.get(f"{running.url}/status_data", verify=str(cert))
        assert response.status_code == 200
        for name, accepted in (("qkd-a.local", True), ("alice", True), ("localhost", False)):
            context = ssl.create_default_context(cafile=str(cert))
            with socket.create_connection(("127.0.0.1", running.port), timeout=5) as raw:
                if accepted:
                    with context.wrap_socket(raw, server_hostname=name):
                        pass
                else:
                    with pytest.raises(ssl.SSLCertVerificationError, match="localhost"):
                        context.wrap_socket(raw, server_hostname=name)


def test_https_needs_both_files(node, certificate):
    cert, _ = certificate
    with pytest.raises(ValueError, match="both a certificate file and a key file"):
        WebServer(node, TOKEN, certfile=cert)


def test_load_token_creates_private_file(tmp_path):
    path = tmp_path / "secrets" / "web_token"
    token = load_token(path)
    assert len(token) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_token(path) == token


def test_load_token_rejects_short_token(tmp_path):
    path = tmp_path / "web_token"
    path.write_text("short\n")
    with pytest.raises(ValueError, match="5 characters long"):
        load_token(path)


def test_load_token_without_create(tmp_path):
    with pytest.raises(FileNotFoundError, match="web token file"):
        load_token(tmp_path / "missing", create=False)


def test_failed_login_logged_after_token_rejection(server, caplog):
    caplog.set_level(logging.WARNING, logger="S15qkd.web.routes")
    assert requests.get(f"{server.url}/start_keygen", headers=WRONG_AUTH).status_code == 403
    assert requests.post(f"{server.url}/login", data={"token": "wrong"}).status_code == 403
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("rejected GET /start_keygen") for message in messages)
    assert any(message.startswith("failed login from 127.0.0.1") for message in messages)
