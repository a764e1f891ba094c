"""`gpufleet sandbox up` on a machine that cannot host it: a clear message, nothing made."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

GPUFLEET = str(Path(sys.executable).with_name("gpufleet"))


def up(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GPUFLEET, "sandbox", "up"],
        env={**os.environ, "GPUFLEET_SANDBOX_DIR": str(tmp_path / "state"), **env},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def sandbox_objects() -> str:
    return subprocess.run(
        ["sh", "-c", "docker ps -aq --filter label=gpufleet.sandbox; "
         "docker network ls -q --filter label=gpufleet.sandbox; "
         "docker volume ls -q --filter label=gpufleet.sandbox"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def test_docker_unusable(tmp_path):
    proc = up(tmp_path, DOCKER_HOST="unix:///nonexistent/docker.sock")
    assert proc.returncode == 1
    assert "Docker is not usable here" in proc.stderr
    assert "systemctl start docker" in proc.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.sandbox
def test_port_in_use(tmp_path):
    before = sandbox_objects()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = up(tmp_path, GPUFLEET_SANDBOX_PORT_BASE=str(port))
    assert proc.returncode == 1
    assert f"port 127.0.0.1:{port} is already in use by another program" in proc.stderr
    assert "GPUFLEET_SANDBOX_PORT_BASE" in proc.stderr
    assert sandbox_objects() == before
    assert not (tmp_path / "state").exists()


@pytest.mark.sandbox
def test_too_little_disk(tmp_path):
    before = sandbox_objects()
    proc = up(tmp_path, GPUFLEET_SANDBOX_MIN_FREE_GIB="1000000")
    assert proc.returncode == 1
    assert "the sandbox needs 1000000 GiB" in proc.stderr
    assert "docker system prune" in proc.stderr
    assert sandbox_objects() == before
