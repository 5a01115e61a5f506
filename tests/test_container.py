"""The Docker image: what is installed, what the entrypoint does, and nodes in containers.

These tests run real containers of the image named by QKD_DOCKER_IMAGE; `make test-docker`
builds the image and sets it. Without QKD_DOCKER_IMAGE the module is skipped, so plain
`make test` needs no Docker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tarfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("QKD_DOCKER_IMAGE", "")
if not IMAGE:
    pytest.skip("QKD_DOCKER_IMAGE is not set; 'make test-docker' builds the image and runs these tests",
                allow_module_level=True)

def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one docker command and return its result, with stdout and stderr as text."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed with exit code {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def run_in_image(*command: str, options: tuple[str, ...] = (), check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in a new container of the image, through the entrypoint."""
    return docker("run", "--rm", *options, IMAGE, *command, check=check)


@pytest.fixture(scope="module", autouse=True)
def image_present():
    """Fail at once, with the fix, when the image to test does not exist."""
    if shutil.which("docker") is None:
        pytest.fail("QKD_DOCKER_IMAGE is set but the docker command is not installed")
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"image {IMAGE} not found; build it with 'make build IMAGE={IMAGE}'")


@pytest.fixture
def container_names():
    """Unique container names for one test; every container named here is removed after it."""
    names: list[str] = []

    def new_name(role: str) -> str:
        name = f"qkd-test-{role}-{uuid.uuid4().hex[:8]}"
        names.append(name)
        return name

    yield new_name
    for name in names:
        docker("rm", "--force", "--volumes", name, check=False)


# --- What the image contains ---------------------------------------------------------

def test_image_imports_qkd_core():
    result = run_in_image("python", "-c",
                          "import numpy, qkd_core, S15qkd; "
                          "print(qkd_core.__name__, issubclass(qkd_core.QkdError, Exception), numpy.__version__)")
    words = result.stdout.split()
    assert words[0] == "qkd_core"
    assert words[1] == "True"


def test_image_qkdserver_command_runs():
    result = run_in_image("qkdserver", "--help")
    assert "usage: qkdserver" in result.stdout


def test_image_has_no_compiler():
    result = run_in_image("bash", "-c", "command -v cc gcc clang rustc cargo || true")
    assert result.stdout.strip() == ""


def test_image_extension_is_installed_from_wheel():
    # The extension sits in the virtual environment's site-packages, not in a source tree.
    result = run_in_image("python", "-c", "import qkd_core; print(qkd_core.__file__)")
    assert result.stdout.strip().startswith("/opt/qkdserver/lib/")


def test_image_declares_ports_and_volumes():
    config = json.loads(docker("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert set(config["ExposedPorts"]) == {"8000/tcp", "4853/tcp"}
    assert {"/etc/qkdserver", "/root/keys/authd", "/epoch_files", "/tmp/cryptostuff"} <= set(config["Volumes"])
    assert config["Entrypoint"] == ["/root/entrypoint.sh"]


# --- The entrypoint ------------------------------------------------------------------

def test_entrypoint_missing_config_exits_with_hint():
    result = run_in_image(check=False)
    assert result.returncode == 2
    assert "/etc/qkdserver/qkd_engine_config.yaml not found" in result.stderr
    assert "mount" in result.stderr


def test_entrypoint_sets_time_zone_from_tz():
    result = run_in_image("bash", "-c", "date +%z; readlink /etc/localtime; cat /etc/timezone",
                          options=("--env", "TZ=Asia/Singapore"))
    offset, localtime, timezone = result.stdout.split()
    assert offset == "+0800"
    assert localtime == "/usr/share/zoneinfo/Asia/Singapore"
    assert timezone == "Asia/Singapore"


def test_entrypoint_unknown_time_zone_keeps_utc():
    result = run_in_image("date", "+%z", options=("--env", "TZ=Nowhere/Atlantis"))
    assert result.stdout.strip() == "+0000"
    assert "TZ=Nowhere/Atlantis not found" in result.stderr


def test_entrypoint_time_zone_default_is_utc():
    result = run_in_image("date", "+%Z")
    assert result.stdout.strip() == "UTC"


def test_entrypoint_uses_mounted_source(tmp_path):
    # A mounted S15qkd folder replaces the installed package (make default DEV=1).
    package = tmp_path / "S15qkd"
    package.mkdir()
    (package / "__init__.py").write_text("MOUNTED = True\n")
    result = run_in_image("python", "-c", "import S15qkd; print(S15qkd.__file__, S15qkd.MOUNTED)",
                          options=("--volume", f"{package}:/root/code/QKDServer/S15qkd:ro"))
    assert result.stdout.split() == ["/root/code/QKDServer/S15qkd/__init__.py", "True"]
    assert "using the S15qkd source mounted" in result.stderr


# --- Nodes in containers -------------------------------------------------------------

KEY_NAME = re.compile(r"[0-9a-f]{8}")

# Lists the qkd_core classes and functions that S15qkd.stages requires but the installed
# qkd_core lacks; the key tests need every stage of the pipeline.
MISSING_STAGES_SCRIPT = """
import inspect, re, qkd_core, S15qkd.stages as stages
names = sorted(set(re.findall(r'_require\\("(\\w+)"\\)', inspect.getsource(stages))))
print(' '.join(name for name in names if not hasattr(qkd_core, name)))
"""


def missing_stages() -> list[str]:
    return run_in_image("python", "-c", MISSING_STAGES_SCRIPT).stdout.split()


class NodeFolders:
    """Host folders of one containerized node: configuration, secrets, keys, working folder."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.config = root / name / "config"
        self.secrets = root / name / "secrets"
        self.keys = root / name / "keys"
        self.data = root / name / "data"
        for folder in (self.config, self.secrets, self.keys, self.data):
            folder.mkdir(parents=True)

    def volumes(self) -> list[str]:
        return ["--volume", f"{self.config}:/etc/qkdserver",
                "--volume", f"{self.secrets}:/root/keys/authd",
                "--volume", f"{self.keys}:/epoch_files",
                "--volume", f"{self.data}:/tmp/cryptostuff"]

    def write_config(self, values: dict) -> None:
        (self.config / "qkd_engine_config.json").write_text(json.dumps(values, indent=2))

    def final_keys(self) -> dict[str, bytes]:
        return {path.name: path.read_bytes() for path in self.keys.iterdir()
                if KEY_NAME.fullmatch(path.name)}

    def temporary_files(self) -> list[str]:
        return sorted(path.name for path in self.keys.iterdir() if path.name.endswith(".tmp"))


def make_certificates(first: NodeFolders, second: NodeFolders) -> None:
    """Give each node its own key pair (made by the image) and the peer's certificate."""
    for node in (first, second):
        run_in_image("qkdserver", "certs", node.name, "--folder", "/root/keys/authd",
                     options=("--volume", f"{node.secrets}:/root/keys/authd"))
    shutil.copy(first.secrets / f"{first.name}.crt", second.secrets)
    shutil.copy(second.secrets / f"{second.name}.crt", first.secrets)


def node_values(node: NodeFolders, peer: NodeFolders, role: str, peer_host: str) -> dict:
    return {
        "identity": node.name, "role": role,
        "local_connection_id": node.name.upper(), "remote_connection_id": peer.name.upper(),
        "listen_address": "0.0.0.0", "target_hostname": peer_host, "port_authd": 4853,
        "local_cert": f"/root/keys/authd/{node.name}.crt",
        "local_key": f"/root/keys/authd/{node.name}.key",
        "remote_cert": f"/root/keys/authd/{peer.name}.crt",
        "data_root": "/tmp/cryptostuff", "final_key_folder": "/epoch_files",
        "source": {"kind": "simulator", "seed": 11, "epochs": 40, "pair_rate": 2e5,
                   "qber": 0.03, "real_time": False},
    }


def start_node(name: str, node: NodeFolders, options: tuple[str, ...] = ()) -> None:
    docker("run", "--detach", "--name", name, *options, *node.volumes(),
           "--env", "QKD_CONFIG=/etc/qkdserver/qkd_engine_config.json", IMAGE)


def wait_for_log(name: str, text: str, timeout: float = 60) -> str:
    """Wait until the container's log contains text; return the log."""
    deadline = time.monotonic() + timeout
    while True:
        result = docker("logs", name, check=False)
        output = result.stdout + result.stderr
        if text in output:
            return output
        running = docker("container", "inspect", "-f", "{{.State.Running}}", name, check=False)
        if running.stdout.strip() != "true":
            raise AssertionError(f"container {name} exited before logging {text!r}:\n{output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"container {name} did not log {text!r} within {timeout} s:\n{output}")
        time.sleep(0.5)


def stop_container(name: str, timeout_s: int = 30) -> int:
    """Stop a container as `docker stop` does (SIGTERM, then SIGKILL); return its exit code."""
    docker("stop", "--time", str(timeout_s), name, timeout=timeout_s + 30)
    return int(docker("container", "inspect", "-f", "{{.State.ExitCode}}", name).stdout)


@pytest.fixture
def private_network():
    """A Docker network with no route outside, removed after the test."""
    name = f"qkd-test-net-{uuid.uuid4().hex[:8]}"
    docker("network", "create", "--internal", name)
    yield name
    docker("network", "rm", name, check=False)


def test_node_stops_cleanly_on_sigterm(tmp_path, container_names):
    high = NodeFolders(tmp_path, "alice")
    low = NodeFolders(tmp_path, "bob")
    make_certificates(high, low)
    high.write_config(node_values(high, low, "high", "127.0.0.1"))
    name = container_names("high")
    start_node(name, high)
    wait_for_log(name, "classical channel listening on 0.0.0.0:4853")

    # Exit code 0, not 137: the node handled SIGTERM and exited before docker stop's SIGKILL.
    exit_code = stop_container(name)
    assert exit_code == 0, docker("logs", name).stderr
    assert high.temporary_files() == []


def published_port(name: str, container_port: int) -> int:
    """Return the loopback port that Docker published for the container's port."""
    mapping = docker("port", name, str(container_port)).stdout.split()[0]
    return int(mapping.rsplit(":", 1)[1])


def fetch(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30, context=context) as response:
        return response.status, response.read().decode()


def start_single_node(tmp_path, container_names) -> tuple[NodeFolders, str]:
    """Start a high-count node with no peer, its web page published on a loopback port."""
    high = NodeFolders(tmp_path, "alice")
    low = NodeFolders(tmp_path, "bob")
    make_certificates(high, low)
    high.write_config(node_values(high, low, "high", "127.0.0.1"))
    return high, container_names("high")


def test_node_web_page_answers(tmp_path, container_names):
    high, name = start_single_node(tmp_path, container_names)
    start_node(name, high, ("--publish", "127.0.0.1::8000"))
    wait_for_log(name, "S15qkd.node: web page on http://")
    base = f"http://127.0.0.1:{published_port(name, 8000)}"

    status, page = fetch(base + "/")
    assert status == 200
    assert "_dash-config" in page
    status, body = fetch(base + "/status_data")
    assert status == 200
    # With no peer connected the engine is OFF (no channel) or ONLY_COMMUNICATION.
    assert json.loads(body)["status_info"]["state"] in ("OFF", "ONLY_COMMUNICATION")
    assert stop_container(name) == 0


def test_node_web_page_https_with_mounted_certificate(tmp_path, container_names):
    high, name = start_single_node(tmp_path, container_names)
    certs = high.secrets / "certs"
    run_in_image("qkdserver", "certs", "web", "--folder", "/root/keys/authd/certs",
                 options=("--volume", f"{high.secrets}:/root/keys/authd"))
    (certs / "web.crt").rename(certs / "cert.crt")
    (certs / "web.key").rename(certs / "cert.key")
    start_node(name, high, ("--publish", "127.0.0.1::8000"))
    wait_for_log(name, "S15qkd.node: web page on https://")

    # Trust exactly the mounted certificate; its name is the node's, not 127.0.0.1.
    context = ssl.create_default_context(cafile=str(certs / "cert.crt"))
    context.check_hostname = False
    status, body = fetch(f"https://127.0.0.1:{published_port(name, 8000)}/status_data", context)
    assert status == 200
    assert "status_info" in json.loads(body)
    assert stop_container(name) == 0


def test_entrypoint_rejects_certificate_without_key(tmp_path, container_names):
    high, name = start_single_node(tmp_path, container_names)
    (high.secrets / "certs").mkdir()
    shutil.copy(high.secrets / "alice.crt", high.secrets / "certs" / "cert.crt")
    start_node(name, high)
    docker("wait", name)
    assert int(docker("container", "inspect", "-f", "{{.State.ExitCode}}", name).stdout) == 2
    assert "mount both for HTTPS" in docker("logs", name).stderr


def test_node_invalid_config_exits_with_message(tmp_path, container_names):
    node = NodeFolders(tmp_path, "alice")
    node.write_config({"role": "middle"})
    name = container_names("bad")
    start_node(name, node)
    docker("wait", name)
    result = docker("logs", name)
    assert "role" in result.stdout + result.stderr
    assert int(docker("container", "inspect", "-f", "{{.State.ExitCode}}", name).stdout) == 2


def start_link(tmp_path, container_names, network: str, start: bool) -> tuple[NodeFolders, NodeFolders, str, str]:
    """Start a high-count and a low-count node, one container each, on the network."""
    high = NodeFolders(tmp_path, "alice")
    low = NodeFolders(tmp_path, "bob")
    make_certificates(high, low)
    high_name = container_names("high")
    low_name = container_names("low")
    # The low-count side connects to the high-count side by its container name, which
    # Docker's DNS resolves on the private network.
    high.write_config(node_values(high, low, "high", "127.0.0.1"))
    low.write_config(node_values(low, high, "low", high_name))
    options = ("--network", network)
    start_node(high_name, high, options + (("--env", "QKD_NODE_ARGS=--start") if start else ()))
    wait_for_log(high_name, "classical channel listening")
    start_node(low_name, low, options)
    return high, low, high_name, low_name


def test_two_containers_connect_over_private_network(tmp_path, container_names, private_network):
    high, low, high_name, low_name = start_link(tmp_path, container_names, private_network, start=False)
    wait_for_log(low_name, f"classical channel connected to {high_name}")
    assert stop_container(low_name) == 0
    assert stop_container(high_name) == 0


def test_two_containers_produce_identical_keys(tmp_path, container_names, private_network):
    missing = missing_stages()
    if missing:
        pytest.skip(f"qkd_core in {IMAGE} lacks the stages {', '.join(missing)}; the link cannot make keys yet")
    high, low, high_name, low_name = start_link(tmp_path, container_names, private_network, start=True)

    # Both sources stop after 40 epochs; wait until both keystores hold the same
    # non-empty set of keys and it has not grown for 10 s.
    deadline = time.monotonic() + 300
    last_change = time.monotonic()
    previous: set[str] = set()
    while time.monotonic() < deadline:
        names = set(high.final_keys()) | set(low.final_keys())
        if names != previous:
            previous, last_change = names, time.monotonic()
        elif names and time.monotonic() - last_change > 10:
            break
        time.sleep(1)

    high_keys = high.final_keys()
    low_keys = low.final_keys()
    logs = docker("logs", high_name).stderr[-3000:] + docker("logs", low_name).stderr[-3000:]
    assert high_keys, f"no final keys after 300 s:\n{logs}"
    assert sorted(high_keys) == sorted(low_keys)
    assert high_keys == low_keys

    assert stop_container(low_name) == 0
    assert stop_container(high_name) == 0
    assert high.temporary_files() == []
    assert low.temporary_files() == []


# --- The Makefile targets ------------------------------------------------------------

def make(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO_ROOT), *arguments],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def container_running(name: str) -> bool:
    result = docker("container", "inspect", "-f", "{{.State.Running}}", name, check=False)
    return result.stdout.strip() == "true"


def test_make_default_restart_watchdog_stop(tmp_path, container_names):
    high = NodeFolders(tmp_path, "alice")
    low = NodeFolders(tmp_path, "bob")
    make_certificates(high, low)
    name = container_names("make")
    web_port = free_port()
    variables = [f"IMAGE={IMAGE}", f"CONTAINER={name}", f"CONFIG_DIR={high.config}",
                 "CONFIG_FILE=qkd_engine_config.json", f"SECRETS_DIR={high.secrets}",
                 f"KEYS_VOLUME={high.keys}", f"DATA_VOLUME={high.data}",
                 f"WEB_PORT={web_port}", f"CHANNEL_PORT={free_port()}",
                 "DEVICE=/dev/no-such-time-tagger", "NODE_ARGS=", "TZ=Asia/Singapore"]

    result = make("default", *variables)
    assert result.returncode != 0
    assert "qkd_engine_config.json not found" in result.stdout

    high.write_config(node_values(high, low, "high", "127.0.0.1"))
    result = make("default", *variables)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no timestamp device at /dev/no-such-time-tagger" in result.stdout
    wait_for_log(name, "S15qkd.node: web page on http://")
    status, _ = fetch(f"http://127.0.0.1:{web_port}/status_data")
    assert status == 200
    assert docker("exec", name, "date", "+%z").stdout.strip() == "+0800"

    result = make("default", *variables)
    assert result.returncode != 0
    assert "already exists" in result.stdout

    # make watchdog follows the log until stopped; read what it printed in a few seconds.
    # Its own process group, so that killing it also ends the docker client it started.
    watchdog = subprocess.Popen(["make", "--no-print-directory", "-C", str(REPO_ROOT), "watchdog", *variables],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    time.sleep(5)
    os.killpg(watchdog.pid, signal.SIGKILL)
    output = watchdog.communicate(timeout=30)[0]
    assert "tail -n 100 -F /tmp/cryptostuff/watchdog.log" in output

    # Without WEB_TOKEN_FILE the control verbs read the token inside the container.
    result = make("keygen-stop", *variables)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stop_keygen: done" in result.stdout
    result = make("qkd-status", *variables)
    assert result.stdout.strip() == "status_qkd: 404"

    log_dir = tmp_path / "logs"
    result = make("savelog", *variables, f"LOG_DIR={log_dir}")
    assert result.returncode == 0, result.stdout + result.stderr
    archives = list(log_dir.glob("*_qkdlog_*.tar.gz"))
    assert len(archives) == 1, result.stdout
    with tarfile.open(archives[0]) as archive:
        saved = sorted(Path(member.name).name for member in archive.getmembers() if member.isfile())
    assert saved == ["console.log", "watchdog.log"]

    first_id = docker("container", "inspect", "-f", "{{.Id}}", name).stdout
    result = make("restart", *variables)
    assert result.returncode == 0, result.stdout + result.stderr
    assert container_running(name)
    assert docker("container", "inspect", "-f", "{{.Id}}", name).stdout != first_id

    result = make("stop", *variables)
    assert result.returncode == 0
    assert f"stopped {name}" in result.stdout
    assert not container_running(name)
    result = make("stop", *variables)
    assert f"container {name} is not running" in result.stdout
