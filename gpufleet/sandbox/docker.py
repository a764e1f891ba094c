"""Thin, typed wrappers over the ``docker`` CLI used by the sandbox.

The sandbox talks to the control machine's Docker engine through its CLI rather than an SDK:
the CLI is what a newcomer already has, and its errors are the ones they know how to read.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence

LABEL = "gpufleet.sandbox"


class SandboxError(RuntimeError):
    """A sandbox step failed; the message says what is wrong and how to fix it."""


def run(
    args: Sequence[str],
    *,
    input: bytes | None = None,
    check: bool = True,
    timeout: float | None = 600,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``docker <args>``, raising SandboxError with docker's stderr on failure."""
    try:
        proc = subprocess.run(
            ["docker", *args], input=input, capture_output=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise SandboxError(
            "the docker CLI is not installed: install it with `apt-get install docker.io`"
        ) from exc
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace")
        raise SandboxError(f"docker {' '.join(args[:3])} failed: {err.strip()[-2000:]}")
    return proc


def out(args: Sequence[str], **kwargs) -> str:
    return run(args, **kwargs).stdout.decode().strip()


def engine_info() -> dict:
    """Return ``docker info`` as a dict, or raise a SandboxError that says how to get an engine."""
    proc = run(["info", "--format", "{{json .}}"], check=False, timeout=30)
    try:
        info = json.loads(proc.stdout) if proc.returncode == 0 else {}
    except ValueError:
        info = {}
    # some CLI versions exit 0 with the client's half and ServerErrors when no engine answers
    why = (info.get("ServerErrors") or [None])[0] if isinstance(info, dict) else None
    if proc.returncode != 0 or not isinstance(info, dict) or why or not info.get("ServerVersion"):
        stderr = proc.stderr.decode(errors="replace").strip().splitlines()
        last = why or (stderr or ["no output"])[-1]
        raise SandboxError(
            f"Docker is not usable here ({last}). Start an engine (`systemctl start docker`, or "
            "`python -m gpufleet.sandbox.engine start`, which make test and make demo run) and "
            "try again."
        )
    return info


def image_exists(ref: str) -> bool:
    return run(["image", "inspect", ref], check=False).returncode == 0


def names(kind: str) -> list[str]:
    """Names of every container, network or volume that carries the sandbox label."""
    fmt = "{{.Names}}" if kind == "container" else "{{.Name}}"
    cmd = {
        "container": ["ps", "-a", "--filter", f"label={LABEL}", "--format", fmt],
        "network": ["network", "ls", "--filter", f"label={LABEL}", "--format", fmt],
        "volume": ["volume", "ls", "--filter", f"label={LABEL}", "--format", fmt],
    }[kind]
    return [line for line in out(cmd).splitlines() if line]


def inspect(name: str) -> dict | None:
    proc = run(["inspect", name], check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout)[0]
