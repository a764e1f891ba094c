"""The GPU probe: a container started with the group's GPU request must start and exit 0."""

from __future__ import annotations

import shlex

from pyinfra.api.deploy import deploy
from pyinfra.operations import server

from gpufleet.core.schema import HostConfig
from gpufleet.core.wire import Op
from gpufleet.ops import operations as ops
from gpufleet.plan.types import HostPlan


@deploy("GPU probe")
def gpu_probe(config: HostConfig, plan: HostPlan):
    """Start a container with ``--gpus all`` (or ``--runtime nvidia``) and require exit 0.

    + config: validated host config (``probe_*`` settings)
    + plan: the host's plan (its ``probe`` change, planned when the GPU plumbing changes)
    """
    probe = config.probe
    changes = plan.of("probe")
    if not changes:
        return
    for change in changes:
        if change.op is not Op.PROBE:
            ops.image(
                name=f"Probe image {probe.image.ref}", ref=probe.image.ref, source=change.op.value
            )
    request = "--gpus all" if probe.gpu_request == "gpus" else "--runtime nvidia"
    command = " ".join(shlex.quote(part) for part in probe.command)
    server.shell(
        name="GPU probe: a container with the group's GPU request exits 0",
        commands=[f"docker run --rm {request} {shlex.quote(probe.image.ref)} {command}"],
    )
