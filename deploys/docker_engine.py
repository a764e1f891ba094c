"""Docker engine and Compose v2 plugin for hosts that have none (a fresh Ubuntu workstation)."""

from __future__ import annotations

from pyinfra.api.deploy import deploy
from pyinfra.operations import systemd

from deploys._apt import apt_source
from gpufleet.core.schema import HostConfig
from gpufleet.core.wire import Op
from gpufleet.ops import operations as ops
from gpufleet.plan.types import HostPlan


@deploy("Docker engine")
def docker_engine(config: HostConfig, plan: HostPlan):
    """Install the engine and the Compose plugin where missing, start a stopped engine.

    + config: validated host config (``docker_*`` settings)
    + plan: the host's plan (its ``engine`` changes)
    """
    changes = plan.of("engine")
    if not changes:
        return
    apt_source(plan, "engine")
    for change in changes:
        if change.op is Op.INSTALL:
            ops.apt_install(
                name="Install Docker engine packages",
                packages=change.resource.split(),
                lock_seconds=config.apt_lock_seconds,
            )
    systemd.service(name="Start Docker", service="docker", running=True, enabled=True)
