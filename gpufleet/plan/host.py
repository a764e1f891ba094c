"""A host's plan: the declared state compared with one snapshot, as data.

``plan_host(config, snapshot, control)`` is pure: the validated host config, the typed host
snapshot (``gpufleet.core.snapshot``, one remote command) and the control machine's inputs
(``gpufleet.control.inputs``) in, a ``HostPlan`` (``gpufleet.plan.types``) out. Every decision
gpufleet makes about a host is made once per host per run, by the module of its step, named as
the deploy that applies it (``docker_engine``, ``container_toolkit``, ``gpu_probe``,
``layout``, ``models``, ``services``, ``release``; ``refusals`` before any of them), and put
together here in step order; ``deploys/`` only apply what a plan lists, and ``gpufleet
drift``, ``status`` and ``rollout`` print or sequence the same plans. ``choose_builders``
decides, across the fleet, which host builds each image and which receive it.

A plan is an ordered list of changes, each with its step, the resource it touches, a reason
that says what was found and what is declared, and what it restarts or recreates::

    Change(step="toolkit", resource="nvidia-container-toolkit", action="install",
           reason="toolkit 1.17.8-1 installed, 1.18.0-1 declared", ...)

and the ``Release`` the host runs once the plan is applied. A host that must not be changed
(the GPU gate, an unreadable daemon.json, a lease held by another run, a model that does not
fit, an image whose binary holds no code for the host's GPU) gets a plan that is only its
refusal. Secret values never enter a plan: the ``.env`` is compared by the hash of what would
be written.
"""

from __future__ import annotations

from gpufleet.control.inputs import ControlInputs
from gpufleet.core import known
from gpufleet.core.schema import HostConfig
from gpufleet.core.snapshot import Snapshot
from gpufleet.plan.container_toolkit import plan_toolkit
from gpufleet.plan.docker_engine import engine_stopped, plan_engine
from gpufleet.plan.draft import PlanDraft
from gpufleet.plan.gpu_probe import plan_probe
from gpufleet.plan.layout import plan_layout
from gpufleet.plan.models import model_users, plan_models, space_refusal
from gpufleet.plan.refusals import first_refusal, gpu_gate, refused
from gpufleet.plan.release import plan_release, release_of, secret_copies
from gpufleet.plan.services import check_images, orphans, plan_gates, plan_services, replaced_under
from gpufleet.plan.types import BuildPlan, HostPlan, PlanOptions


def plan_host(
    config: HostConfig,
    snap: Snapshot,
    control: ControlInputs,
    options: PlanOptions | None = None,
) -> HostPlan:
    """The changes that bring this host to its declared state, and the release it then runs.

    + config: the host's validated config
    + snap: the host as one ``facts.snapshot.HostSnapshot`` read it
    + control: the control machine's inputs (``gpufleet.control.inputs.gather``)
    + options: the run's lease, clock and fleet-wide build assignments

    .. code:: python

        plan = plan_host(config, snapshot, control)
        plan.refusal      # None, or one line: what was found and what is required
        plan.changes      # (Change(step="env", resource="/opt/gpufleet/.env", ...), ...)
        plan.release.id   # "3f9c2a1b7d0e"
    """
    options = options or PlanOptions()
    gate = gpu_gate(config, snap)
    warnings = tuple(gate.warnings) + snap.state.problems
    if why := first_refusal(gate.failures, config, snap, control, options):
        return refused(config, why, warnings)
    draft = PlanDraft()
    plan_engine(draft, config, snap)
    if engine_stopped(snap):  # only the start: an image it cannot see is not one it lacks
        return draft.plan(config, warnings)
    if plan_toolkit(draft, config, snap):
        plan_probe(draft, config, snap, control)
    plan_layout(draft, config, snap, control)
    fetches, stamps, moves, snapshots = plan_models(
        draft, config, snap, control, model_users(config)
    )
    if why := space_refusal(list(fetches.values()), snap):
        return refused(config, why, warnings)
    replaced = replaced_under(draft.changes)
    builds, compose, labels = plan_services(draft, config, snap, control, options, replaced)
    refusal, checks = check_images(config, snap, draft.changes)
    if refusal:
        return refused(config, refusal, warnings)
    gates, pulls = plan_gates(draft, config, snap, control)
    release = release_of(config, snap, control, compose, builds, labels)
    history, pruned = plan_release(draft, config, snap, release)
    draft.changes += secret_copies(snap)
    return draft.plan(
        config,
        warnings,
        release=release,
        fetches=fetches,
        builds=builds,
        compose=compose,
        gate_seconds=gates,
        pulls=pulls,
        image_checks=checks,
        history=history,
        pruned=pruned,
        migrate=snap.state.secret_copies,
        stamps=stamps,
        moves=moves,
        snapshots=snapshots,
        orphans=orphans(snap, set(config.enabled_services)),
    )


def choose_builders(
    order: list[str],
    needs: dict[str, list[tuple[str, str]]],
    haves: dict[str, list[tuple[str, str]]],
    control: dict[str, str] | None = None,
) -> dict[str, tuple[str, str, bool]]:
    """Build inputs -> the (host, image ref, builds it now) every host needing them gets them from.

    A host that already has the image sends it; else the control machine sends one it holds
    (``known.CONTROL_MACHINE``); else the first host in inventory ``order`` that needs it builds
    it, and the others receive it: at most one build per set of inputs per run.

    + order: host names in inventory order
    + needs/haves: host -> the ``(inputs, ref)`` it would build / already has
    + control: inputs -> the tag of an image built from them in the control machine's Docker
    """
    chosen: dict[str, tuple[str, str, bool]] = {}
    for name in sorted(haves, key=order.index):
        for inputs, ref in haves[name]:
            chosen.setdefault(inputs, (name, ref, False))
    for inputs, ref in (control or {}).items():
        chosen.setdefault(inputs, (known.CONTROL_MACHINE, ref, False))
    for name in sorted(needs, key=order.index):
        for inputs, ref in needs[name]:
            chosen.setdefault(inputs, (name, ref, True))
    return chosen


def current_images(plan: HostPlan) -> list[BuildPlan]:
    """Builds whose image this host already has: it can send them to hosts that need them."""
    if plan.refusal:
        return []
    return [p for name, p in plan.builds.items() if not plan.touches("build", name)]


def built_here(plan: HostPlan) -> list[BuildPlan]:
    """Builds this host makes itself in this run (hosts planned later may receive them)."""
    own = {name: p for name, p in plan.builds.items() if p.receive_from is None}
    return [p for name, p in own.items() if plan.touches("build", name)]
