"""A sandbox left running by another checkout is replaced by `up`, never trusted.

Its hosts hold the other checkout's host keys and its mirror the other checkout's token, so
reusing them would fail every pinned SSH connection and every gated download.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from gpufleet.sandbox import docker, fleet

GPUFLEET = str(Path(sys.executable).with_name("gpufleet"))
pytestmark = pytest.mark.sandbox


def container_ids() -> dict[str, str]:
    names = [h.container for h in fleet.Sandbox().hosts] + [fleet.MIRROR]
    return {n: docker.inspect(n)["Id"] for n in names}


def test_up_replaces_a_sandbox_started_from_another_state_directory(tmp_path):
    ours = fleet.Sandbox()
    foreign = tmp_path / "other-checkout"
    foreign.mkdir()
    # The other checkout shares only the build cache (sdists, debs): keys and token are its own.
    (ours.state / "cache").mkdir(parents=True, exist_ok=True)
    (foreign / "cache").symlink_to(ours.state / "cache")
    proc = subprocess.run(
        [GPUFLEET, "sandbox", "up"], env={**os.environ, "GPUFLEET_SANDBOX_DIR": str(foreign)},
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = container_ids()

    state = fleet.up(ours)
    replaced = container_ids()
    assert all(replaced[n] != theirs[n] for n in theirs), "a foreign container was reused"

    # Our pinned keys are the ones the hosts present, and our token opens the gated repo.
    for host in state["hosts"]:
        ssh = subprocess.run(
            ["ssh", "-F", state["ssh"]["config"], "-o", "BatchMode=yes", host["name"],
             "cat /etc/hostname"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if host["bootstrap"]:  # password only: refused after its host key was accepted
            assert "Permission denied" in ssh.stderr, ssh.stderr
            continue
        assert ssh.returncode == 0, ssh.stderr
        assert ssh.stdout.strip() == host["name"]
    repo = next(r for r, info in state["hf"]["repos"].items() if info.get("gated"))
    token = Path(state["hf"]["token_file"]).read_text().strip()
    url = f"{state['mirror']['url']}/api/models/{repo}/tree/main"
    assert requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10).ok
    foreign_token = (foreign / "hf_token").read_text().strip()
    assert foreign_token != token
    bad = requests.get(url, headers={"Authorization": f"Bearer {foreign_token}"}, timeout=10)
    assert bad.status_code == 401

    # And a second `up` from the same state reuses every container.
    fleet.up(ours)
    assert container_ids() == replaced
