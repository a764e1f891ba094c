"""A host rebooted while it builds llama.cpp: the run names the lost connection, and the next run
completes the build. (One whole llama-server build on this machine's 2 cores: the price of
proving it for real. ``builds_from_control=false``: the control machine holds an image of the
same inputs, which the host would otherwise receive instead of building.)"""

from __future__ import annotations

import subprocess
import time

import pytest

from gpufleet.sandbox import docker
from tests.sandbox.conftest import PYINFRA, ROOT, pyinfra

pytestmark = pytest.mark.sandbox

RTX = "sandbox-rtx5090"
IMAGE = "gpufleet/llama.cpp:rtx5090"
BUILD_LOG = "/opt/gpufleet/build/llama.build.log"
OWN_BUILD = ("--data", "builds_from_control=false")


def wait_booted(host, timeout: float = 120) -> None:
    """Until the host answers SSH again with its boot finished."""
    deadline = time.monotonic() + timeout
    while True:
        try:  # (testinfra raises while sshd is not up yet)
            if host.run("systemctl is-system-running --wait").rc in (0, 1):
                return
        except RuntimeError:
            pass
        assert time.monotonic() < deadline, "the host did not come back"
        time.sleep(1)


def test_a_host_rebooted_mid_build_builds_on_the_next_run(sandbox, hosts):
    host = hosts[RTX]
    assert pyinfra("--limit", RTX).rc == 0
    # the image (under every tag: the release keeps one too), its container and so its build
    # cache gone: the next build compiles
    image_id = host.check_output(f"docker image inspect -f '{{{{.Id}}}}' {IMAGE}")
    host.check_output("cd /opt/gpufleet && docker compose -p gpufleet-rtx5090 rm -sf llama && "
                      f"docker rmi -f {image_id} && docker image prune -f")  # fmt: skip
    converge = subprocess.Popen(
        [PYINFRA, "-y", "inventory/sandbox.py", "deploys/fleet.py", "--limit", RTX, *OWN_BUILD],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while host.run(f"grep -q '^\\[ *[0-9]*%\\]' {BUILD_LOG}").rc != 0:  # the compile has begun
        assert time.monotonic() < deadline and converge.poll() is None, "no build began"
        time.sleep(1)
    container = next(h["container"] for h in sandbox["hosts"] if h["name"] == RTX)
    docker.run(["restart", "-t", "10", container])  # a reboot: systemd stops everything
    said, _ = converge.communicate(timeout=300)
    assert converge.returncode != 0
    assert f"docker build of {IMAGE}: the SSH connection was lost during the build" in said, \
        said[-3000:]  # fmt: skip
    assert "Traceback" not in said
    wait_booted(host)
    assert host.run(f"docker image inspect {IMAGE}").rc != 0  # nothing half-built was kept

    again = pyinfra("--limit", RTX, "--json", *OWN_BUILD)
    assert again.rc == 0, again.stderr[-3000:]
    assert "--> gpufleet: 1 image build(s): sandbox-rtx5090" in again.stderr
    assert host.run(f"docker image inspect {IMAGE}").rc == 0
    assert '"choices"' in host.check_output(
        "curl -fsS -H 'Content-Type: application/json' -d "
        """'{"messages":[{"role":"user","content":"hi"}],"max_tokens":1}' """
        "http://127.0.0.1:8000/v1/chat/completions"
    )
    quiet = pyinfra("--limit", RTX, "--json")
    assert quiet.rc == 0 and quiet.changed() == {}
