"""The inference stack's layout: base and model directories, and the ``.env`` file."""

from __future__ import annotations

from pyinfra.api.deploy import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.operations import files

from deploys.release import release_dir
from gpufleet.core.render import render_env, restore_env
from gpufleet.core.schema import HostConfig
from gpufleet.core.wire import Op
from gpufleet.ops import operations as ops
from gpufleet.plan.types import HostPlan


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
        lay.hf_home: (lay.models_mode, lay.models_owner, lay.models_group),
    }
    for change in plan.of("layout"):
        mode, user, group = owners.get(change.resource, ("755", "root", "root"))
        files.directory(
            name=f"Directory {change.resource}",
            path=change.resource,
            mode=mode,
            user=user,
            group=group,
        )
    for change in plan.of("env"):
        if change.op is Op.RESTORE:  # a rollback: the release's plain values, today's secrets
            text = restore_env(plan.restore_env, secrets, where=f"{release_dir(plan)}/env.public")
            name = f"Environment file {change.resource} (the release's, with today's secrets)"
        elif change.op is Op.WRITE:
            text, name = render_env(config, secrets), f"Environment file {change.resource}"
        else:
            raise DeployError(f"env: no way to apply {change.op.value}")
        ops.secret_file(name=name, path=change.resource, content=ops.Secret(text))
