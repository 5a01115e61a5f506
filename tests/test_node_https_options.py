"""`qkdserver node --web-cert/--web-key`: both or neither, and a clear error for bad files."""

from __future__ import annotations

import json
import socket

from S15qkd.channel.tls import create_node_certificate
from S15qkd.cli.main import main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(tmp_path) -> str:
    high_cert, high_key = create_node_certificate(tmp_path / "certs", "high")
    low_cert, _ = create_node_certificate(tmp_path / "certs", "low")
    config = {
        "role": "high", "listen_address": "127.0.0.1", "port_authd": free_port(),
        "local_cert": str(high_cert), "local_key": str(high_key), "remote_cert": str(low_cert),
        "data_root": str(tmp_path / "data"), "final_key_folder": str(tmp_path / "keys"),
        "source": {"kind": "simulator"},
    }
    path = tmp_path / "node.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_node_certificate_without_key_rejected(tmp_path, capsys):
    status = main(["node", "--config", write_config(tmp_path), "--web-port", str(free_port()),
                   "--web-cert", str(tmp_path / "certs" / "high.crt")])
    assert status == 2
    assert "both --web-cert and --web-key" in capsys.readouterr().err


def test_node_invalid_web_certificate_exits(tmp_path, capsys):
    not_pem = tmp_path / "cert.crt"
    not_pem.write_text("not a certificate\n")
    status = main(["node", "--config", write_config(tmp_path), "--web-port", str(free_port()),
                   "--web-cert", str(not_pem), "--web-key", str(not_pem)])
    assert status == 2
    assert "cannot start the web page" in capsys.readouterr().err
