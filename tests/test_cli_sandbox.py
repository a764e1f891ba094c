"""The sandbox command's failures: one line that says what to do, never a traceback."""

from __future__ import annotations

import os
import subprocess

import pytest
from click.testing import CliRunner

from gpufleet import cli
from gpufleet.sandbox import fleet
from gpufleet.sandbox.docker import SandboxError


def test_an_unforeseen_failure_in_up_is_one_line_with_the_details_in_a_log(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFLEET_SANDBOX_DIR", str(tmp_path))

    def up(**kwargs):
        raise subprocess.CalledProcessError(2, ["tar", "-xzf", "x.tar.gz"])

    monkeypatch.setattr(fleet, "up", up)
    result = CliRunner().invoke(cli.main, ["sandbox", "up"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("gpufleet sandbox: up failed: CalledProcessError: Command ")
    assert str(tmp_path / "sandbox-error.log") in lines[0]
    assert "Traceback" in (tmp_path / "sandbox-error.log").read_text()


def test_a_foreseen_failure_in_up_is_its_own_message(monkeypatch):
    def up(**kwargs):
        raise SandboxError("port 127.0.0.1:2221 is already in use by another program")

    monkeypatch.setattr(fleet, "up", up)
    result = CliRunner().invoke(cli.main, ["sandbox", "up"])
    assert result.exit_code == 1
    assert result.output == (
        "gpufleet sandbox: port 127.0.0.1:2221 is already in use by another program\n"
    )


def test_system_deps_names_the_one_apt_line_when_it_cannot_install(tmp_path):
    import shutil
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "gpufleet" / "sandbox" / "system-deps.sh"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    for tool in ("sh", "head", "grep", "test"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")  # not root
    (bin_dir / "id").chmod(0o755)
    proc = subprocess.run(
        ["/bin/sh", str(script)], env={"PATH": str(bin_dir)}, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    # tools this machine has as files (the CA bundle, the keyring, busybox) are not listed
    assert proc.stderr == (
        "system-deps: missing: docker.io debootstrap gnupg openssh-client prometheus. Install "
        "them, as root: apt-get install -y --no-install-recommends docker.io debootstrap gnupg "
        "openssh-client prometheus\n"
    )


def test_a_docker_info_without_a_server_is_not_an_engine(tmp_path, monkeypatch):
    # some docker CLIs exit 0 with the client's half and ServerErrors when no engine answers
    from gpufleet.sandbox import docker

    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho '{\"ServerVersion\": \"\", \"ServerErrors\": "
                    "[\"Cannot connect to the Docker daemon at unix:///x\"]}'\n")  # fmt: skip
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(docker.SandboxError, match=r"not usable here \(Cannot connect"):
        docker.engine_info()
    fake.write_text('#!/bin/sh\necho \'{"ServerVersion": "20.10.24"}\'\n')
    assert docker.engine_info()["ServerVersion"] == "20.10.24"
