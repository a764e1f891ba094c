"""Each host's plan and snapshot, as the typed report the gpufleet command reads.

``gpufleet drift``, ``status`` and ``rollout`` start pyinfra through ``gpufleet.fleet.pyinfra_main``
with ``GPUFLEET_REPORT=<file>``; the converge records every host's plan here as it is made,
and the run writes the whole ``gpufleet.core.wire.RunReport`` when it ends, so the command reads the
same plans pyinfra applies. Nothing secret is in it: plans hold hashes.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.context import state

from gpufleet.core.schema import HostConfig
from gpufleet.core.snapshot import Snapshot
from gpufleet.core.wire import ChangeRecord, HostReport, ServiceRecord, SshRecord
from gpufleet.fleet.pyinfra_main import REPORTS
from gpufleet.ops.operations import run_state
from gpufleet.plan.types import HostPlan


def entry(config: HostConfig, plan: HostPlan, snap: Snapshot) -> HostReport:
    services = config.enabled_services
    return HostReport(
        host=config.host,
        group=config.group,
        refusal=plan.refusal,
        warnings=plan.warnings,
        changes=tuple(ChangeRecord(**vars(c)) for c in plan.changes),
        release=plan.release,
        release_id=plan.release.id if plan.release else None,
        snapshot=snap,
        services={name: _service(name, svc, config) for name, svc in services.items()},
        settings={name: svc.model_dump(mode="json") for name, svc in services.items()},
        secret_sources=dict(config.secrets),
        unified_memory=config.gpu.unified_memory,
        jetson=config.gpu.min_l4t is not None,
        ssh=SshRecord(
            hostname=host.data.get("ssh_hostname") or config.host,
            port=host.data.get("ssh_port") or 22,
            user=host.data.get("ssh_user"),
            key=host.data.get("ssh_key"),
            known_hosts=host.data.get("ssh_known_hosts_file"),
            sudo=bool(host.data.get("_sudo")),
        ),
    )


def _service(name: str, svc, config: HostConfig) -> ServiceRecord:
    model = config.chat_model(name) if svc.kind == "vllm" else None
    model = model or getattr(svc, "model", None) or svc.chat_model
    return ServiceRecord(
        kind=svc.kind, port=svc.port, model=model, image=svc.image.ref, address=svc.probe_address
    )


def add(config: HostConfig, plan: HostPlan, snap: Snapshot) -> None:
    """Record this host's plan for the run's report."""
    run_state(state, REPORTS)[config.host] = entry(config, plan, snap)
