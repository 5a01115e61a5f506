"""The Docker image: what is installed, what the entrypoint does, and nodes in containers.

These tests run real containers of the image named by QKD_DOCKER_IMAGE; `make test-docker`
builds the image and sets it. Without QKD_DOCKER_IMAGE the module is skipped, so plain
`make test` needs no Docker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

IMAGE = os.environ.get("QKD_DOCKER_IMAGE", "")
if not IMAGE:
    pytest.skip("QKD_DOCKER_IMAGE is not set; 'make test-docker' builds the image and runs these tests",
                allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parents[1]


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
    assert {"/etc/qkdserver", "/root/keys/authd", "/epoch_files", "/var/log/qkdserver"} <= set(config["Volumes"])
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
