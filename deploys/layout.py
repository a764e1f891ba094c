"""The inference stack's layout: base and model directories, and the ``.env`` file."""

from __future__ import annotations

import shlex

from pyinfra.api.deploy import deploy
from pyinfra.operations import files, server

from deploys.release import release_dir
from gpufleet.core.render import render_env
from gpufleet.core.schema import HostConfig
from gpufleet.core.wire import Op
from gpufleet.ops import operations as ops
from gpufleet.plan.host import HostPlan


@deploy("Stack layout")
def layout(config: HostConfig, secrets: dict[str, str], plan: HostPlan):
    """Directories and the ``.env`` file (0600, written atomically, content never shown).

    + config: validated host config (``layout_*``, ``env``, ``secrets``)
    + secrets: resolved secret values, from the control machine
    + plan: the host's plan (its ``layout`` and ``env`` changes)
    """
    lay = config.layout
    owners = {
        lay.stack_dir: ("755", "root", "root"),
        lay.models_dir: (lay.models_mode, lay.models_owner, lay.models_group),
    }
    for change in plan.of("layout"):
        mode, user, group = owners.get(change.resource, ("755", "root", "root"))
        files.directory(name=f"Directory {change.resource}", path=change.resource, mode=mode,
                        user=user, group=group)  # fmt: skip
    for change in plan.of("env"):
        if change.op is Op.RESTORE:  # a rollback: the release's own 0600 copy, on the host
            kept = shlex.quote(f"{release_dir(plan)}/env")
            path = shlex.quote(change.resource)
            server.shell(
                name=f"Environment file {change.resource} (from the release)",
                commands=[f"install -m 600 -o root -g root {kept} {path}.gpufleet && "
                          f"mv -f {path}.gpufleet {path}"],
            )  # fmt: skip
            continue
        ops.secret_file(
            name=f"Environment file {change.resource}",
            path=change.resource,
            content=ops.Secret(render_env(config, secrets)),
        )
