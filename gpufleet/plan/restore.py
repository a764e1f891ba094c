"""A rollback's plan: the changes that bring a host back to a release it kept.

``plan_restore(config, snapshot, record, model_files, control)`` is pure, like
``gpufleet.plan.host.plan_host``, and returns the same ``HostPlan`` shape, so the same thin deploys
apply it and ``gpufleet drift`` can print it. What comes back is what the release recorded:
its compose file, its ``.env``'s plain lines (the release keeps them and its secrets' names,
never their values: the secrets come from their current sources, so a rotated key stays
rotated), its build contexts' Dockerfiles, its images (kept by a
``gpufleet/kept:<service>-<id>`` tag) and its model files (kept on the host; fetched again from
the pinned URL the release names if one went missing). The driver and the toolkit are
not rolled back: the release records them, the host keeps what it has.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gpufleet.control.inputs import ControlInputs
from gpufleet.core import known
from gpufleet.core.release import Release
from gpufleet.core.render import restore_env
from gpufleet.core.schema import HostConfig
from gpufleet.core.snapshot import ModelsState, Snapshot
from gpufleet.core.wire import Op
from gpufleet.plan.gate import check_host
from gpufleet.plan.host import (
    STEPS,
    Change,
    HostPlan,
    ModelFetch,
    PlanOptions,
    gate_seconds,
    lease_refusal,
    next_history,
    orphans,
    refused,
    secret_copies,
    unverified_reason,
)

KEPT_REPO = "gpufleet/kept"


@dataclass(frozen=True)
class KeptEnv:
    """A kept release's ``.env``, as a rollback writes it again.

    + public: its public part (plain lines, secrets by name; ``gpufleet.core.render.public_env``)
    + sha256: of the ``.env`` rendered from it with today's secret values (the host's file is
      compared with it); None when it cannot be rendered
    + error: why it cannot be rendered (a secret no longer declared, a line not gpufleet's)
    """

    public: str | None
    sha256: str | None = None
    error: str | None = None


def kept_env(public: str | None, secrets: dict[str, str], *, where: str) -> KeptEnv:
    """``KeptEnv`` of a release's kept public part; ``secrets``: today's values (the hash of
    the rendered file leaves this function, never a value)."""
    if public is None:
        return KeptEnv(None, error=f"{where} is absent: the release kept no .env")
    try:
        text = restore_env(public, secrets, where=where)
    except ValueError as exc:
        return KeptEnv(public, error=str(exc))
    return KeptEnv(public, sha256=hashlib.sha256(text.encode()).hexdigest())


def kept_tag(service: str, release_id: str) -> str:
    return f"{KEPT_REPO}:{service}-{release_id}"


def resolve_target(wanted: str, snap: Snapshot) -> str | None:
    """The release id ``wanted`` names on this host: an id, or ``previous`` (the one before
    the current in the host's history); None when the host keeps no such release."""
    kept = list(snap.state.releases)
    if wanted == "previous":
        if snap.state.current in kept:
            kept = kept[: kept.index(snap.state.current)]
        return kept[-1] if kept else None
    return wanted if wanted in kept else None


def plan_restore(
    config: HostConfig,
    snap: Snapshot,
    release: Release,
    images: dict[str, tuple[str, str]],
    models: ModelsState,
    control: ControlInputs,
    options: PlanOptions | None = None,
    *,
    env: KeptEnv,
) -> HostPlan:
    """The changes that make ``release`` (kept on the host) the one it runs again.

    + release/images: the kept release's manifest and the image ids it ran
      (``facts.statedir.ReleaseRecord``)
    + env: its ``.env`` as it is written again (``kept_env``)
    + models: the state of the release's model files (``facts.modelfiles.ModelFiles``)
    + control: the control machine's inputs (only the gpufleet version is used)
    """
    options = options or PlanOptions()
    gate = check_host(config.gpu, snap.identity, group=config.group)
    warnings = tuple(gate.warnings) + snap.state.problems
    if gate.failures:
        return refused(config, "; ".join(gate.failures), warnings)
    if why := lease_refusal(snap, options):
        return refused(config, why, warnings)
    rid = release.id
    lay = config.layout
    changes: list[Change] = []

    def add(step: str, resource: str, reason: str, action: str, *, op: Op, **kw) -> None:
        changes.append(Change(step, resource, reason, action, op, **kw))

    if env.error:
        return refused(config, env.error, warnings)
    found = snap.files.get(lay.env_path)
    if found is None or found.sha256 != env.sha256 or found.mode != "600":
        add(
            "env",
            lay.env_path,
            f".env differs from release {rid}'s plain values with today's secrets",
            "restore",
            op=Op.RESTORE,
        )
    fetches: dict[str, ModelFetch] = {}
    for name, svc in release.services.items():
        for f in svc.model_files:
            dest = f"{lay.models_dir}/{f.path}"
            why = unverified_reason(models.files.get(dest), sha256=f.sha256, size=f.size)
            if why:
                fetches[dest] = ModelFetch(
                    model=svc.model or name, dest=dest, url=f.url, sha256=f.sha256, size=f.size
                )
                add("model", dest, f"{why}; release {rid} uses it", "fetch and verify", op=Op.FETCH)
    if fetches and snap.files.get(known.FETCH_MODEL) is None:
        changes.insert(
            0, Change("model", known.FETCH_MODEL, "fetch script absent", "write", Op.WRITE)
        )
    for name, svc in release.services.items():
        ran = images.get(name, (svc.image, ""))[1]
        now = snap.compose.images.get(svc.image)
        if not ran:
            return refused(config, f"release {rid} recorded no image id for {name}")
        if now is None or now.id != ran:
            found = now.id if now else None
            add(
                "image",
                svc.image,
                f"{svc.image} is {(found or 'absent')[:19]}, release {rid} ran {ran[:19]}",
                "retag",
                expected=ran,
                found=found,
                op=Op.RETAG,
            )
            if svc.build is not None:
                add(
                    "build",
                    f"{lay.build_context(name)}/Dockerfile",
                    f"the Dockerfile release {rid} was built from",
                    "restore",
                    op=Op.RESTORE,
                )
    compose = snap.files.get(lay.compose_path)
    if release.compose_sha256 and (compose is None or compose.sha256 != release.compose_sha256):
        add(
            "compose",
            lay.compose_path,
            f"compose file differs from release {rid}'s",
            "restore",
            op=Op.RESTORE,
        )
    gates = {}
    for name, svc in release.services.items():
        container = snap.compose.containers.get(name)
        health = snap.health.get(name)
        why = None
        if container is None or container.state != "running":
            why = "no container" if container is None else f"container {container.state}"
        elif container.inputs != svc.inputs:
            why = f"it runs other inputs than release {rid}"
        elif health is not None and not health.ok:
            why = f"its health endpoint gave {health.describe()}"
        elif any(c.step in ("image", "model", "env") for c in changes):
            why = "what it runs is restored"
        if why:
            add("recreate", name, why, "recreate", op=Op.RECREATE)
            size = sum(f.size for f in svc.model_files)
            cfg = config.services.get(name)
            gates[name] = gate_seconds(cfg, size) if cfg is not None else 600
            add(
                "gate",
                name,
                f"{name} is recreated",
                f"health and a one-token chat within {gates[name]}s",
                expected="answers",
                op=Op.GATE,
            )
    removed = orphans(snap, set(release.services))
    for name in removed:
        add("recreate", name, f"not in release {rid}", "remove", op=Op.REMOVE)
    history: tuple[str, ...] = ()
    if snap.state.current != rid:
        # a rollback reorders the history: nothing is pruned (the target is kept already)
        history = next_history(snap.state.releases, rid, len(snap.state.releases) + 1)[0]
        add(
            "release",
            rid,
            f"release {snap.state.current or 'none'} recorded, {rid} restored",
            "make current",
            expected=rid,
            found=snap.state.current or "none",
            op=Op.MAKE_CURRENT,
        )
    changes += secret_copies(snap)
    return HostPlan(
        host=config.host,
        group=config.group,
        warnings=warnings,
        changes=tuple(sorted(changes, key=lambda c: STEPS.index(c.step))),
        release=release,
        fetches=fetches,
        gate_seconds=gates,
        history=history,
        restore_env=env.public or "",
        migrate=snap.state.secret_copies,
        orphans=removed,
    )


def restored_llama_paths(release: Release, config: HostConfig) -> list[str]:
    """Model files a release uses, as paths on the host (what the snapshot must stat)."""
    return [
        f"{config.layout.models_dir}/{f.path}"
        for svc in release.services.values()
        for f in svc.model_files
    ]
