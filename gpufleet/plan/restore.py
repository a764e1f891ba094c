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
from gpufleet.core.hubcache import CachedFile
from gpufleet.core.release import Release, ServiceRelease
from gpufleet.core.render import restore_env
from gpufleet.core.schema import HostConfig
from gpufleet.core.snapshot import ModelsState, Snapshot
from gpufleet.core.wire import STEPS, Op
from gpufleet.plan.gate import check_host
from gpufleet.plan.models import links_of, unverified_reason
from gpufleet.plan.refusals import lease_refusal, refused
from gpufleet.plan.release import next_history, secret_copies
from gpufleet.plan.services import gate_seconds, orphans
from gpufleet.plan.types import Change, HostPlan, ModelFetch, PlanOptions, SnapshotLinks

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


def _env(config: HostConfig, snap: Snapshot, env: KeptEnv, rid: str) -> list[Change]:
    """The ``.env`` written again: the release's plain values with today's secrets."""
    path = config.layout.env_path
    found = snap.files.get(path)
    if found is not None and found.sha256 == env.sha256 and found.mode == "600":
        return []
    why = f".env differs from release {rid}'s plain values with today's secrets"
    return [Change("env", path, why, "restore", Op.RESTORE)]


def release_files(config: HostConfig, release: Release) -> dict[str, list[CachedFile]]:
    """Each snapshot a release uses (``models--Org--Repo/<commit>``) -> its files in the cache."""
    snapshots: dict[str, list[CachedFile]] = {}
    for svc in release.services.values():
        for f in svc.model_files:
            file = CachedFile(config.layout.hf_home, f.repo, f.commit, f.path, f.etag, f.size)
            if file not in snapshots.setdefault(f.snapshot_key(), []):
                snapshots[f.snapshot_key()].append(file)
    return snapshots


def _models(
    config: HostConfig, snap: Snapshot, release: Release, models: ModelsState
) -> tuple[list[Change], dict[str, ModelFetch], dict[str, SnapshotLinks]]:
    """The release's blobs that are not verified on the host, fetched again (the fetch script
    first, where it is absent), and its snapshots linked where they are not: a blob still in
    the cache is never downloaded again."""
    changes, fetches, snapshots = [], {}, {}
    urls = {
        (f.repo, f.commit, f.path): (f.url, svc.model or name)
        for name, svc in release.services.items()
        for f in svc.model_files
    }
    for files in release_files(config, release).values():
        for f in files:
            why = unverified_reason(models.files.get(f.blob), etag=f.etag, size=f.size)
            if why:
                url, model = urls[(f.repo, f.commit, f.path)]
                fetches[f.blob] = ModelFetch(model=model, file=f, url=url)
                reason = f"{f.repo}/{f.path}: {why}; release {release.id} uses it"
                changes.append(Change("model", f.blob, reason, "fetch and verify", Op.FETCH))
        # named by its commit: a rollback leaves a branch's ref as it is
        links = links_of(files[0].commit, files)
        wrong = [f for f in files if models.links.get(f.link) != f.target]
        if wrong or any(f.blob in fetches for f in files):
            directory = files[0].snapshot_dir
            snapshots[directory] = links
            why = f"{len(wrong)} of {len(files)} files not linked; release {release.id} uses it"
            changes.append(Change("model", directory, why, "link the snapshot", Op.LINK))
    if fetches and snap.files.get(known.FETCH_MODEL) is None:
        script = Change("model", known.FETCH_MODEL, "fetch script absent", "write", Op.WRITE)
        changes.insert(0, script)
    return changes, fetches, snapshots


def _images(
    config: HostConfig, snap: Snapshot, release: Release, images: dict[str, tuple[str, str]]
) -> list[Change]:
    """Each image the release ran, retagged from its kept tag, and the Dockerfile it was built
    from."""
    rid, changes = release.id, []
    for name, svc in release.services.items():
        ran = images[name][1]
        now = snap.compose.images.get(svc.image)
        if now is not None and now.id == ran:
            continue
        found = now.id if now else None
        why = f"{svc.image} is {(found or 'absent')[:19]}, release {rid} ran {ran[:19]}"
        changes.append(
            Change("image", svc.image, why, "retag", Op.RETAG, expected=ran, found=found)
        )
        if svc.build is not None:
            dockerfile = f"{config.layout.build_context(name)}/Dockerfile"
            why = f"the Dockerfile release {rid} was built from"
            changes.append(Change("build", dockerfile, why, "restore", Op.RESTORE))
    return changes


def _compose(config: HostConfig, snap: Snapshot, release: Release) -> list[Change]:
    path = config.layout.compose_path
    compose = snap.files.get(path)
    if not release.compose_sha256 or (
        compose is not None and compose.sha256 == release.compose_sha256
    ):
        return []
    why = f"compose file differs from release {release.id}'s"
    return [Change("compose", path, why, "restore", Op.RESTORE)]


def _recreate_reason(
    snap: Snapshot, name: str, svc: ServiceRelease, rid: str, restored: bool
) -> str | None:
    """Why service ``name`` is recreated, or None where it runs the release as it is."""
    container = snap.compose.containers.get(name)
    health = snap.health.get(name)
    if container is None or container.state != "running":
        return "no container" if container is None else f"container {container.state}"
    if container.inputs != svc.inputs:
        return f"it runs other inputs than release {rid}"
    if health is not None and not health.ok:
        return f"its health endpoint gave {health.describe()}"
    if restored:
        return "what it runs is restored"
    return None


def _recreates(
    config: HostConfig, snap: Snapshot, release: Release, restored: bool
) -> tuple[list[Change], dict[str, int]]:
    """The services recreated, each then gated; ``restored``: an image, model or ``.env`` of the
    release is written again."""
    changes, gates = [], {}
    for name, svc in release.services.items():
        why = _recreate_reason(snap, name, svc, release.id, restored)
        if not why:
            continue
        changes.append(Change("recreate", name, why, "recreate", Op.RECREATE))
        size = sum(f.size for f in svc.model_files)
        cfg = config.services.get(name)
        gates[name] = gate_seconds(cfg, size) if cfg is not None else 600
        within = f"health and a one-token chat within {gates[name]}s"
        recreated = f"{name} is recreated"
        changes.append(Change("gate", name, recreated, within, Op.GATE, expected="answers"))
    return changes, gates


def _make_current(snap: Snapshot, rid: str) -> tuple[list[Change], tuple[str, ...]]:
    """The release made current; a rollback reorders the history: nothing is pruned (the
    target is kept already)."""
    current = snap.state.current
    if current == rid:
        return [], ()
    releases = snap.state.releases
    history = next_history(releases, rid, len(releases) + 1)[0]
    why = f"release {current or 'none'} recorded, {rid} restored"
    found = current or "none"
    made = Change("release", rid, why, "make current", Op.MAKE_CURRENT, expected=rid, found=found)
    return [made], history


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
    if env.error:
        return refused(config, env.error, warnings)
    rid = release.id
    images = {name: images.get(name, (svc.image, "")) for name, svc in release.services.items()}
    if unrecorded := [name for name, (_, ran) in images.items() if not ran]:
        return refused(config, f"release {rid} recorded no image id for {unrecorded[0]}")
    model_changes, fetches, snapshots = _models(config, snap, release, models)
    changes = [
        *_env(config, snap, env, rid),
        *model_changes,
        *_images(config, snap, release, images),
    ]
    changes += _compose(config, snap, release)
    restored = any(c.step in ("image", "model", "env") for c in changes)
    recreated, gates = _recreates(config, snap, release, restored)
    changes += recreated
    removed = orphans(snap, set(release.services))
    changes += [
        Change("recreate", n, f"not in release {rid}", "remove", Op.REMOVE) for n in removed
    ]
    made_current, history = _make_current(snap, rid)
    changes += made_current
    changes += secret_copies(snap)
    return HostPlan(
        host=config.host,
        group=config.group,
        warnings=warnings,
        changes=tuple(sorted(changes, key=lambda c: STEPS.index(c.step))),
        release=release,
        fetches=fetches,
        snapshots=snapshots,
        gate_seconds=gates,
        history=history,
        restore_env=env.public or "",
        migrate=snap.state.secret_copies,
        orphans=removed,
    )


def store_reads(release: Release, config: HostConfig) -> dict:
    """What ``facts.modelfiles.ModelFiles`` reads for a rollback: the release's blobs and links."""
    entries = [
        (f.blob, f.stamp, f.link, "")
        for files in release_files(config, release).values()
        for f in files
    ]
    return {"hub": config.layout.hub, "entries": entries, "refs": []}
