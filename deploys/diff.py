"""`gpufleet drift --diff`: every host's plan, as `deploys/fleet.py --dry` makes it, plus the
text of the compose file, of each build context's Dockerfile and the `.env`'s key names of a
host whose plan rewrites them (or rebuilds from that Dockerfile), read only then (one more
read; a value never leaves the host). The diffs are written for the command to read
(``gpufleet.fleet.diffs``); the run changes nothing (the command runs it with ``--dry``).
"""

from __future__ import annotations

import os
import shlex

from pyinfra import host
from pyinfra.facts.server import Command

from deploys._config import host_config
from deploys._converge import plan_this_host
from gpufleet.fleet import diffs
from gpufleet.ops.operations import keep_alive


def _read(command: str) -> str:
    sudo = bool(host.data.get("_sudo"))
    lines = host.get_fact(Command, command, _sudo=sudo) or []
    return "\n".join(lines) + ("\n" if lines else "")


def _diff() -> None:
    config, secrets = host_config()
    keep_alive(host, answer_within=config.ssh_liveness_seconds)
    result = plan_this_host(config, secrets)
    out = diffs.image_diffs(result.changes)
    layout = config.layout
    if result.touches("compose", layout.compose_path):
        path = shlex.quote(layout.compose_path)
        found = _read(f"cat -- {path} 2>/dev/null || true")
        if d := diffs.compose_diff(found, result.compose, layout.compose_path, secrets):
            out.insert(0, d)
    for name, build in result.builds.items():
        path = f"{build.context}/Dockerfile"
        if result.touches("build", path) or result.touches("build", name):
            found = _read(f"cat -- {shlex.quote(path)} 2>/dev/null || true")
            if d := diffs.dockerfile_diff(found, build.dockerfile, path, secrets):
                out.append(d)
    if result.touches("env", layout.env_path):
        found = _read(diffs.ENV_NAMES_COMMAND + shlex.quote(layout.env_path) + " 2>/dev/null")
        declared = sorted({*config.env, *secrets})  # a secret that may be unset is not written
        if d := diffs.env_diff(found, declared, layout.env_path):
            out.append(d)
    if where := os.environ.get(diffs.DIFF_DIR_ENV):
        diffs.write(where, config.host, out)


_diff()
