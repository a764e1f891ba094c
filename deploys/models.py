"""Models: resolved on the control machine, fetched by the host, verified before use."""

from __future__ import annotations

import shlex
from pathlib import Path

from pyinfra.api.deploy import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.operations import files, server

from gpufleet.core import known
from gpufleet.core.render import FETCH_SCRIPT
from gpufleet.core.schema import HostConfig
from gpufleet.core.wire import Op
from gpufleet.ops import operations as ops
from gpufleet.plan.types import HostPlan


@deploy("Models")
def models(config: HostConfig, plan: HostPlan):
    """Fetch what the plan lists (resumable, verified, moved into place whole) and prune.

    + config: validated host config (``models``, ``models_keep_unused``)
    + plan: the host's plan (its ``model`` changes)
    """
    if plan.touches("model", known.FETCH_MODEL):
        files.put(
            name="Model fetch script", src=str(FETCH_SCRIPT), dest=known.FETCH_MODEL, mode="755"
        )
    for change in plan.of("model"):
        fetch = plan.fetches.get(change.resource)
        if fetch is not None:
            ops.fetch_model(
                name=f"Fetch model {fetch.model}: {Path(fetch.dest).name} "
                f"({fetch.size / 2**20:.0f} MiB)",
                script=known.FETCH_MODEL,
                url=fetch.url,
                dest=fetch.dest,
                sha256=fetch.sha256,
                size=fetch.size,
                env_file=config.layout.env_path,
                attempts=config.models_download_attempts,
                stall_seconds=config.models_stall_seconds,
                distrust=fetch.known_bad,
            )
        elif change.op is Op.REMOVE:
            files.directory(
                name=f"Remove unused model {Path(change.resource).name}",
                path=change.resource,
                present=False,
            )
        elif change.op is Op.WRITE and change.resource.removesuffix(".verified") in plan.stamps:
            path = change.resource.removesuffix(".verified")
            server.shell(
                name=f"Stamp {Path(path).name} verified (hashed in this run)",
                commands=[stamp_script(path, plan.stamps[path])],
            )
        elif change.resource != known.FETCH_MODEL:
            raise DeployError(f"model: no way to apply {change.op.value} to {change.resource}")


def stamp_script(path: str, stamp: str) -> str:
    """Write ``<path>.verified`` (``"<sha256> <size>"``, as fetch-model does) dated as the file
    itself, written whole: a file dated ahead of the clock stays verified."""
    q = shlex.quote
    return (
        f"printf '%s\\n' {q(stamp)} > {q(path + '.verified.tmp')} && "
        f"touch -r {q(path)} -- {q(path + '.verified.tmp')} && "
        f"mv -f -- {q(path + '.verified.tmp')} {q(path + '.verified')}"
    )
