"""What an operator sees from `qkdserver node`: start-up lines, start-up errors, bad peers.

Every test runs the real command in a subprocess, on loopback, with real certificates.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from S15qkd.channel.tls import create_node_certificate

COMMAND = [sys.executable, "-m", "S15qkd.cli.main"]

#: Seconds a node gets to start or to fail; generous, because the tests share 2 cores.
START_LIMIT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    return {name: create_node_certificate(folder, name) for name in ("high", "low", "intruder")}


def write_config(path: Path, certs, role: str, port: int, local: str | None = None,
                 **values) -> Path:
    """Write a site file of one node; ``local`` names another certificate pair to present."""
    other = "low" if role == "high" else "high"
    cert, key = certs[local or role]
    config = {
        "role": role, "identity": f"test-{role}", "listen_address": "127.0.0.1",
        "target_hostname": "127.0.0.1", "port_authd": port,
        "local_cert": str(cert), "local_key": str(key), "remote_cert": str(certs[other][0]),
        "data_root": str(path.parent / f"{role}-data"),
        "final_key_folder": str(path.parent / f"{role}-keys"),
        "source": {"kind": "simulator"},
        **values,
    }
    path.write_text(json.dumps(config))
    return path


class NodeProcess:
    """A `qkdserver node` subprocess whose stderr lines a test can wait for."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(COMMAND + list(args), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = START_LIMIT_S) -> str:
        """Return the first stderr line matching the regular expression, or fail."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))
                self._changed.wait(min(remaining, 0.5))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=START_LIMIT_S)
        self._reader.join(timeout=5)
        return code


def run_node(config: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run a node that is expected to fail at start-up."""
    return subprocess.run(COMMAND + ["node", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=START_LIMIT_S)


INFO_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO ")


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    """Check the exit status 2 and a single error line without traceback; return the line.

    Only the node's start-up info lines may come before the error.
    """
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line and not INFO_LINE.match(line)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qkdserver node: ")
    return lines[0]


def test_start_up_lines_at_default_verbosity(tmp_path, certs):
    port = free_port()
    config = write_config(tmp_path / "high.json", certs, "high", port)
    node = NodeProcess("node", "--config", str(config))
    try:
        line = node.wait_for("node test-high:")
        assert "high-count side" in line
        assert "event source simulator with seed 1," in line
        assert f"data_root {tmp_path / 'high-data'}" in line
        assert f"final keys in {tmp_path / 'high-keys'}" in line
        assert f"listening on 127.0.0.1:{port}" in line
    finally:
        code = node.stop()
    assert code == 0
    assert any("node stopped" in line for line in node.lines)


def test_simulator_source_warned(tmp_path, certs):
    config = write_config(tmp_path / "high.json", certs, "high", free_port())
    node = NodeProcess("node", "--config", str(config))
    try:
        line = node.wait_for("source.kind is 'simulator'", timeout=10)
    finally:
        code = node.stop()
    assert code == 0
    assert " WARNING " in line
    assert "not secret" in line
    assert "source.seed 1 " in line


def test_node_without_source_kind_rejected(tmp_path, certs):
    config = write_config(tmp_path / "high.json", certs, "high", free_port())
    values = json.loads(config.read_text())
    del values["source"]
    config.write_text(json.dumps(values))
    result = subprocess.run([sys.executable, "-m", "S15qkd.cli.main", "node", "--config",
                             str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "missing value for 'source.kind'" in result.stderr
    assert "'tdc1'" in result.stderr
    assert "'simulator' for a test link" in result.stderr


def test_connection_and_state_changes_logged(tmp_path, certs):
    port = free_port()
    high = NodeProcess("node", "--config", str(write_config(tmp_path / "high.json", certs, "high", port)))
    try:
        high.wait_for("listening on")
        low = NodeProcess("node", "--config", str(write_config(tmp_path / "low.json", certs, "low", port)))
        try:
            line = low.wait_for("node test-low:")
            assert f"connecting to 127.0.0.1:{port}" in line
            assert "low-count side" in line
            for node in (high, low):
                node.wait_for("engine state OFF -> ONLY_COMMUNICATION: channel to the peer connected")
        finally:
            low.stop()
        high.wait_for("engine state ONLY_COMMUNICATION -> OFF: channel lost")
    finally:
        high.stop()


def test_channel_port_taken_exits(tmp_path, certs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "high.json", certs, "high", port)
        started = time.monotonic()
        result = run_node(config)
    line = assert_one_line_error(result)
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert "another process uses the port" in line
    assert "port_authd" in line
    assert time.monotonic() - started < START_LIMIT_S


def test_web_port_taken_exits_before_connecting(tmp_path, certs):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        web_port = taken.getsockname()[1]
        config = write_config(tmp_path / "high.json", certs, "high", port)
        result = run_node(config, "--web-port", str(web_port), "--web-host", "127.0.0.1")
    line = assert_one_line_error(result)
    assert f"cannot start the web page on 127.0.0.1:{web_port}" in line
    assert "--web-port" in line


def test_second_node_same_data_root_rejected(tmp_path, certs):
    first_config = write_config(tmp_path / "first.json", certs, "high", free_port())
    first = NodeProcess("node", "--config", str(first_config))
    try:
        first.wait_for("listening on")
        second_config = write_config(tmp_path / "second.json", certs, "high", free_port())
        result = run_node(second_config)
    finally:
        first.stop()
    line = assert_one_line_error(result)
    assert f"data_root {tmp_path / 'high-data'} is in use by process {first.process.pid}" in line
    assert "first.json" in line
    assert "give each node its own data_root" in line


def test_second_node_same_key_folder_rejected(tmp_path, certs):
    # A copy of a node with its own data_root but the same keys folder.
    first_config = write_config(tmp_path / "first.json", certs, "low", free_port())
    first = NodeProcess("node", "--config", str(first_config))
    try:
        first.wait_for("connecting to")
        second_config = write_config(tmp_path / "second.json", certs, "low", free_port(),
                                     data_root=str(tmp_path / "second-data"))
        result = run_node(second_config)
    finally:
        first.stop()
    line = assert_one_line_error(result)
    assert (f"final_key_folder {tmp_path / 'low-keys'} is in use by process "
            f"{first.process.pid}") in line
    assert "first.json" in line
    assert "give each node its own final_key_folder" in line


def test_restart_after_kill_takes_the_lock(tmp_path, certs):
    config = write_config(tmp_path / "high.json", certs, "high", free_port())
    killed = NodeProcess("node", "--config", str(config))
    try:
        killed.wait_for("listening on")
    finally:
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait(timeout=START_LIMIT_S)
    restarted = NodeProcess("node", "--config", str(config))
    try:
        restarted.wait_for("listening on")
    finally:
        assert restarted.stop() == 0


def test_missing_certificate_printed_once(tmp_path, certs):
    config = write_config(tmp_path / "high.json", certs, "high", free_port(),
                          remote_cert=str(tmp_path / "absent.crt"))
    line = assert_one_line_error(run_node(config))
    assert "'remote_cert'" in line
    assert "absent.crt" in line


def test_unusable_data_root_named(tmp_path, certs):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path / "high.json", certs, "high", free_port(),
                          data_root=str(blocker / "data"))
    line = assert_one_line_error(run_node(config))
    assert str(blocker / "data") in line
    assert "data_root" in line


@pytest.mark.parametrize("content, named", [
    ('{"next_unused_epoch": 1', "invalid JSON"),
    ("", "the file is empty"),
    ('{"next_unused_epoch": "abc", "releasing": 5}', "got 'abc'"),
])
def test_damaged_keystore_state_named(tmp_path, certs, content, named):
    config = write_config(tmp_path / "high.json", certs, "high", free_port())
    state = tmp_path / "high-data" / "keystore_state.json"
    state.parent.mkdir()
    state.write_text(content)
    line = assert_one_line_error(run_node(config))
    assert str(state) in line
    assert named in line
    assert "docs/node.md" in line


def test_notify_pipe_folder_named(tmp_path, certs):
    config = write_config(tmp_path / "high.json", certs, "high", free_port())
    pipe = tmp_path / "high-keys" / "notify.pipe"
    pipe.mkdir(parents=True)
    line = assert_one_line_error(run_node(config))
    assert f"{pipe} exists and is not a FIFO" in line


def test_rejected_certificate_named_with_backoff(tmp_path, certs):
    port = free_port()
    high_config = write_config(tmp_path / "high.json", certs, "high", port)
    low_config = write_config(tmp_path / "low.json", certs, "low", port, local="intruder",
                              reconnect_min_s=0.2, reconnect_max_s=3.2)
    high = NodeProcess("node", "--config", str(high_config))
    try:
        high.wait_for("listening on")
        low = NodeProcess("-v", "node", "--config", str(low_config))
        try:
            closed = low.wait_for("closed before the peer's HELLO")
            low.wait_for(r"reconnecting to .* in 1\.60 s")
        finally:
            low.stop()
        rejected = high.wait_for("TLS handshake with 127.0.0.1 failed")
    finally:
        high.stop()
    intruder_cert, high_remote_cert = certs["intruder"][0], certs["low"][0]
    assert f"may have rejected this node's certificate (local_cert {intruder_cert})" in closed
    assert "check that remote_cert on the peer is a copy of that file" in closed
    assert f"this node rejected the peer's certificate because it is not remote_cert " \
           f"({high_remote_cert})" in rejected
    delays = [float(match.group(1)) for line in low.lines
              if (match := re.search(r"reconnecting to \S+ in ([0-9.]+) s", line))]
    assert delays[:4] == [0.2, 0.4, 0.8, 1.6]
    # Every attempt is counted, but the same error is logged once per power of two.
    errors = [line for line in low.lines if "closed before the peer's HELLO" in line]
    assert len(errors) < len(delays)


def test_set_conn_to_taken_port_rejected(tmp_path, certs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        config = write_config(tmp_path / "high.json", certs, "high", free_port(),
                              connections={"QKDE0003": {"port_authd": taken_port}})
        web_port = free_port()
        node = NodeProcess("node", "--config", str(config), "--web-port", str(web_port),
                           "--web-host", "127.0.0.1")
        try:
            node.wait_for("web page on")
            # set_conn before the channel listens gets a different 409 ("try again").
            node.wait_for("classical channel listening on")
            token = (tmp_path / "high-data" / "web_token").read_text().strip()
            request = urllib.request.Request(f"http://127.0.0.1:{web_port}/set_conn/QKDE0003",
                                             headers={"Authorization": f"Bearer {token}"})
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=START_LIMIT_S)
            body = caught.value.read().decode()
        finally:
            node.stop()
    assert caught.value.code == 409
    assert f"cannot switch to connection QKDE0003: cannot listen on 127.0.0.1:{taken_port}" in body


def test_missing_events_file_named(tmp_path, certs):
    events = tmp_path / "absent.out"
    config = write_config(tmp_path / "high.json", certs, "high", free_port(),
                          source={"kind": "file", "events_file": str(events)})
    line = assert_one_line_error(run_node(config))
    assert f"invalid value for 'source.events_file': {str(events)!r} not found" in line


def test_events_file_gone_logged_without_traceback(tmp_path, certs):
    events = tmp_path / "events.out"
    events.write_bytes(bytes(8 * 16))
    port = free_port()
    high_config = write_config(tmp_path / "high.json", certs, "high", port,
                               source={"kind": "file", "events_file": str(events)})
    high = NodeProcess("node", "--start", "--config", str(high_config))
    try:
        high.wait_for("listening on")
        events.unlink()
        low = NodeProcess("node", "--config", str(write_config(tmp_path / "low.json", certs, "low", port)))
        try:
            line = high.wait_for("stage worker readevents failed")
        finally:
            low.stop()
    finally:
        high.stop()
    assert f"cannot open event file {str(events)!r}" in line
    assert not any("Traceback" in line for line in high.lines)


def test_web_host_not_local_named(tmp_path, certs):
    # Binding an address this machine lacks fails locally; no packet leaves the host.
    config = write_config(tmp_path / "high.json", certs, "high", free_port())
    line = assert_one_line_error(run_node(config, "--web-port", str(free_port()),
                                          "--web-host", "192.0.2.1"))
    assert "192.0.2.1 is not an address of this machine" in line
    assert "--web-host" in line


@pytest.mark.parametrize("key, content, named", [
    ("remote_cert", "garbage", "is not a PEM certificate"),
    ("local_cert", "", "is empty"),
    ("local_key", None, "is not a PEM private key"),
])
def test_bad_pem_files_named(tmp_path, certs, key, content, named):
    bad = tmp_path / "bad.pem"
    if content is None:
        bad.write_bytes(certs["high"][0].read_bytes())
    else:
        bad.write_text(content)
    config = write_config(tmp_path / "high.json", certs, "high", free_port(), **{key: str(bad)})
    line = assert_one_line_error(run_node(config))
    assert f"'{key}': '{bad}' {named}" in line
    assert "qkdserver certs" in line
    assert "PEM lib" not in line


def test_key_of_other_node_named(tmp_path, certs):
    config = write_config(tmp_path / "high.json", certs, "high", free_port(),
                          local_key=str(certs["low"][1]))
    line = assert_one_line_error(run_node(config))
    assert "is not the private key of local_cert" in line
