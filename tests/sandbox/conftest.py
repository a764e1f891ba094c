"""Helpers for the sandbox tests: run pyinfra as a user would, and look at hosts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import testinfra

ROOT = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
# Gate and host-setup tests leave services out: the service tests pay for the builds once.
NO_SERVICES = ("--data", "services={}", "--data", "models={}")


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict:
        return json.loads(self.stdout)

    def changed(self) -> dict[str, list[str]]:
        """Operation name -> hosts it changed (from --json results)."""
        ops = self.report["results"]["operations"]
        return {op["name"]: op["success"] for op in ops if op["success"]}

    def errors(self) -> dict[str, list[str]]:
        ops = self.report["results"]["operations"]
        return {op["name"]: op["error"] for op in ops if op["error"]}


def pyinfra(*args: str, deploy: str = "deploys/fleet.py", env: dict | None = None,
            inventory: str = "inventory/sandbox.py") -> Run:  # fmt: skip
    """``pyinfra -y <inventory> <deploy> <args>`` from the project root."""
    proc = subprocess.run(
        [PYINFRA, "-y", inventory, deploy, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    return Run(proc.returncode, proc.stdout, proc.stderr)


def remote_commands(*args: str) -> tuple[dict[str, int], str]:
    """``pyinfra inventory/sandbox.py <args> --debug`` (must succeed).

    Returns host -> remote commands it ran, and pyinfra's stderr.
    """
    proc = subprocess.run(
        [PYINFRA, "-y", "inventory/sandbox.py", *args, "--debug"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.findall(r"Running command on ([\w.-]+):", proc.stderr)
    return {name: found.count(name) for name in set(found)}, proc.stderr


@pytest.fixture(scope="session")
def hosts(sandbox):
    """name -> testinfra host over the sandbox's pinned SSH config."""
    config = sandbox["ssh"]["config"]
    return {h["name"]: testinfra.get_host(f"ssh://{h['name']}", ssh_config=config)
            for h in sandbox["hosts"]}  # fmt: skip


@pytest.fixture(scope="session")
def token(sandbox) -> str:
    return Path(sandbox["hf"]["token_file"]).read_text().strip()


def assert_token_only_in_env_files(host, token: str) -> None:
    """The token is in the stack's .env and the releases' copies of it, all 0600 under
    0700 directories, and in no other file a converge could have written."""
    found = host.run(
        f"grep -rlsF '{token}' /tmp /var/tmp /root /home /opt /etc /run /var/lib/gpufleet"
    ).stdout.split()
    assert "/opt/gpufleet/.env" in found
    for path in found:
        assert path == "/opt/gpufleet/.env" or (
            path.startswith("/var/lib/gpufleet/releases/") and path.endswith("/env")
        ), path
        assert host.file(path).mode == 0o600, path
    if any(p.startswith("/var/lib/gpufleet") for p in found):
        assert host.file("/var/lib/gpufleet").mode == 0o700


def inventory_data(name: str) -> dict:
    """A host's data as inventory/sandbox.py gives it."""
    import os
    import runpy

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        inventory = runpy.run_path(str(ROOT / "inventory" / "sandbox.py"))
    finally:
        os.chdir(cwd)
    for group in ("spark", "rtx5090", "jetson"):
        for host, data in inventory[group]:
            if host == name:
                return data
    raise KeyError(name)


def stored(name: str, model: str, index: int | str = 0):
    """Where file ``index`` of ``model`` lives in host ``name``'s Hub cache (its blob, stamp,
    snapshot link), from the inventory's pinned revision and the mirror's sha256."""
    import fnmatch

    from gpufleet.core.hubcache import CachedFile
    from gpufleet.core.schema import Layout
    from gpufleet.sandbox.state import load

    spec = inventory_data(name)["models"][model]
    repo = load().hf.repos[spec["repo"]]["files"]
    # a model declared by patterns: its files as the control machine resolves them, sorted
    files = spec.get("files") or sorted(p for p in repo if any(
        fnmatch.fnmatch(p, pattern) for pattern in spec.get("patterns", ())))  # fmt: skip
    path = index if isinstance(index, str) else files[index]
    meta = repo[path]
    return CachedFile(
        Layout().hf_home, spec["repo"], spec["revision"], path, meta["sha256"], meta["size"]
    )
