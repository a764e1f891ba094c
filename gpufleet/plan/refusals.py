"""Refusals found before the first change: the GPU gate, an unreadable daemon.json, the
control machine's Hub error, another run's lease. A refused host's plan is only its refusal.

Refusals that need a step's own reading live with that step: no room for the models
(``models.space_refusal``), an image with no code for the GPU (``services.check_images``),
a toolkit pin the repository lacks (``container_toolkit.toolkit_unavailable``).
"""

from __future__ import annotations

from gpufleet.control.inputs import ControlInputs
from gpufleet.core.schema import HostConfig
from gpufleet.core.snapshot import Snapshot
from gpufleet.plan.gate import GateResult, check_host
from gpufleet.plan.types import HostPlan, PlanOptions


def lease_refusal(snap: Snapshot, options: PlanOptions) -> str | None:
    """Why another run's lease keeps this host from being changed, or None."""
    state = snap.state
    if options.lease_id == "*":  # a look that changes nothing: any lease may stand
        return None
    if state.lease_error:
        return f"{state.lease_error}; break it with `gpufleet lock break` if no rollout runs"
    lease = state.lease
    if lease is None or lease.id == options.lease_id or lease.expires <= options.now:
        return None
    left = int(lease.expires - options.now)
    if lease.message:
        return (
            f"held by {lease.holder} for maintenance: {lease.message!r} ({left}s left); "
            "`gpufleet lock release` ends it"
        )
    return (
        f"leased by {lease.holder} on {lease.control} for a rollout"
        f"{f' of release {lease.release}' if lease.release else ''} ({left}s left); wait for it, "
        "or `gpufleet lock break` if that run is gone"
    )


def refused(config: HostConfig, why: str, warnings: tuple[str, ...] = ()) -> HostPlan:
    return HostPlan(host=config.host, group=config.group, refusal=why, warnings=warnings)


def gpu_gate(config: HostConfig, snap: Snapshot) -> GateResult:
    """The GPU gate: driver, CUDA, architectures and memory for what the host serves."""
    served = config.served_models()
    return check_host(
        config.gpu,
        snap.identity,
        group=config.group,
        model_bytes=sum(spec.size_bytes or 0 for spec in served.values()),
        cuda_archs=config.cuda_archs(),
    )


def first_refusal(
    gate_failures: list[str],
    config: HostConfig,
    snap: Snapshot,
    control: ControlInputs,
    options: PlanOptions,
) -> str | None:
    """Why the host must not be changed at all, found before the first change, or None."""
    if gate_failures:
        return "; ".join(gate_failures)
    daemon_error = snap.identity.docker.daemon_json_error
    if daemon_error:
        daemon_error += "; gpufleet merges its keys into that file: fix or remove it"
    reasons = (lease_refusal(snap, options), daemon_error, control.hub_error)
    return next((why for why in reasons if why), None)
