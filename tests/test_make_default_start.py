"""`make default` with a configuration the node rejects: the reason reaches the terminal.

The container runs with --rm, so once the node exits its log is gone. These tests run
real containers of the image named by QKD_DOCKER_IMAGE (`make test-docker` sets it) and
are skipped without it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

IMAGE = os.environ.get("QKD_DOCKER_IMAGE", "")
if not IMAGE:
    pytest.skip("QKD_DOCKER_IMAGE is not set; 'make test-docker' builds the image and runs these tests",
                allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_default(tmp_path: Path, name: str, config_text: str) -> subprocess.CompletedProcess:
    if shutil.which("docker") is None:
        pytest.fail("QKD_DOCKER_IMAGE is set but the docker command is not installed")
    config = tmp_path / "config"
    config.mkdir()
    (config / "qkd_engine_config.yaml").write_text(config_text)
    variables = [f"IMAGE={IMAGE}", f"CONTAINER={name}", f"CONFIG_DIR={config}",
                 f"SECRETS_DIR={tmp_path / 'secrets'}", f"KEYS_VOLUME={tmp_path / 'keys'}",
                 f"DATA_VOLUME={tmp_path / 'data'}", f"WEB_PORT={free_port()}",
                 f"CHANNEL_PORT={free_port()}", "DEVICE=/dev/no-such-time-tagger"]
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO_ROOT), "default", *variables],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_rejected_config_shown_by_make_default(tmp_path):
    name = f"qkd-test-start-{uuid.uuid4().hex[:8]}"
    try:
        result = make_default(tmp_path, name, "role: medium\n")
    finally:
        subprocess.run(["docker", "rm", "--force", name], capture_output=True)
    assert result.returncode != 0, result.stdout
    assert "invalid value for 'role': expected 'high' or 'low', got 'medium'" in result.stdout
    assert f"container {name} stopped during start-up" in result.stdout
