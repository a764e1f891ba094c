"""NVIDIA Container Toolkit: pinned packages from NVIDIA's (or a mirror's) signed repository,
wired into Docker through ``nvidia-ctk`` without touching keys gpufleet does not own."""

from __future__ import annotations

from pyinfra.api.deploy import deploy
from pyinfra.operations import server, systemd

from deploys._apt import apt_source
from gpufleet.core import known
from gpufleet.core.schema import HostConfig
from gpufleet.ops import operations as ops
from gpufleet.plan.types import HostPlan


@deploy("NVIDIA Container Toolkit")
def container_toolkit(config: HostConfig, plan: HostPlan):
    """Install the pinned toolkit and configure Docker's ``nvidia`` runtime.

    + config: validated host config (``toolkit_*`` settings)
    + plan: the host's plan (its ``toolkit``, ``daemon`` and ``cdi`` changes)

    Docker restarts only when ``nvidia-ctk`` changed its config.
    """
    tk = config.toolkit
    apt_source(plan, "toolkit")
    if plan.touches("toolkit", "nvidia-container-toolkit"):
        ops.apt_install(
            name=f"Install NVIDIA Container Toolkit {tk.version}",
            packages=[f"{p}={tk.version}" for p in known.TOOLKIT_PACKAGES],
            lock_seconds=config.apt_lock_seconds,
            allow_downgrades=True,
        )
    if plan.of("daemon"):
        runtime = ops.nvidia_runtime(
            name="Configure Docker's nvidia runtime",
            set_default=tk.set_default_runtime,
            cdi=tk.cdi,
        )
        systemd.service(
            name="Restart Docker (its config changed)",
            service="docker",
            restarted=True,
            _if=runtime.did_change,
        )
    if plan.of("cdi"):
        server.shell(
            name="Generate the CDI spec",
            commands=[f"nvidia-ctk cdi generate --output={known.CDI_SPEC}"],
        )
