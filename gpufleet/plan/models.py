"""The ``model`` step (applied by ``deploys/models.py``): each served model's snapshot whole in
the Hub cache, every blob verified (by its stamp, or by a hash read in this run), a blob found
where gpufleet kept models before moved in rather than downloaded, the rest fetched from its
pinned URL; snapshots gpufleet placed that nothing uses pruned; and whether the files still to
fetch fit on the disk.
"""

from __future__ import annotations

import re

from gpufleet.control.inputs import ControlInputs
from gpufleet.core import known
from gpufleet.core.hubcache import (
    CachedFile,
    hub_root,
    placed_path,
    ref_path,
    repo_folder,
    snapshot_dir,
)
from gpufleet.core.render import FETCH_SCRIPT
from gpufleet.core.schema import SHA1_RE, HostConfig, LlamaServer, Vllm
from gpufleet.core.snapshot import ModelFileState, Snapshot
from gpufleet.core.wire import Op
from gpufleet.plan.draft import PlanDraft, short
from gpufleet.plan.types import Change, ModelFetch, ModelMove, SnapshotLinks

# what a snapshot key ("models--Org--Repo/<commit>") read from a host must be to become a path
_SNAPSHOT_KEY = re.compile(r"models--[A-Za-z0-9._-]+--[A-Za-z0-9._-]+/[0-9a-f]{40}")


def unverified_reason(state: ModelFileState | None, *, etag: str, size: int) -> str | None:
    """Why a blob cannot be trusted as it is, or None when it is whole and verified.

    A stamp (written by gpufleet after hashing) not older than the blob and naming this etag
    and size means verified, at the cost of a ``stat``; a deep check's hash overrides it.
    """
    if state is None:
        return "absent"
    if state.size != size:
        return f"size {state.size} found, {size} declared"
    if state.digest is not None and state.digest != etag:
        return f"hash {state.digest[:12]} found, {etag[:12]} declared"
    if state.digest == etag:
        return None  # hashed in this read: whatever its stamp says (see ``stale_stamp``)
    if state.stamp is None or state.stamp_mtime is None:
        return "never verified (no stamp)"
    if state.stamp != f"{etag} {size}":
        return "verified as another file (stamp differs)"
    if state.stamp_mtime < state.mtime:
        return "changed since it was verified"
    return None


def stale_stamp(state: ModelFileState, *, etag: str, size: int) -> bool:
    """A blob hashed in this read that matches, whose stamp would not say so next time."""
    return state.digest == etag and (
        state.stamp != f"{etag} {size}"
        or state.stamp_mtime is None
        or state.stamp_mtime < state.mtime
    )


def cached_files(config: HostConfig, control: ControlInputs) -> dict[str, list[CachedFile]]:
    """Served model name -> where each of its files lives in the host's Hub cache."""
    hf_home = config.layout.hf_home
    return {
        name: [
            CachedFile(hf_home, resolved.repo, resolved.commit, f.path, f.etag, f.size)
            for f in resolved.files
        ]
        for name, resolved in control.models.items()
    }


def legacy_path(config: HostConfig, model: str, file: CachedFile) -> str:
    """Where gpufleet kept this file before the Hub cache ("" for a file it never kept there:
    only Git LFS files, by sha256, were)."""
    if file.kind != "sha256":
        return ""
    return f"{config.layout.models_dir}/{model}/{file.path}"


def store_reads(config: HostConfig, control: ControlInputs) -> dict:
    """What ``facts.modelfiles.ModelFiles`` reads for this host: each file's blob, stamp,
    link and old place, and the refs of branch or tag revisions."""
    entries, refs = [], []
    for name, files in cached_files(config, control).items():
        entries += [(f.blob, f.stamp, f.link, legacy_path(config, name, f)) for f in files]
        resolved = control.models[name]
        if not SHA1_RE.fullmatch(resolved.revision):
            refs.append(ref_path(config.layout.hf_home, resolved.repo, resolved.revision))
    return {"hub": config.layout.hub, "entries": entries, "refs": refs}


def plan_models(
    draft: PlanDraft,
    config: HostConfig,
    snap: Snapshot,
    control: ControlInputs,
    users: dict[str, list[str]],
) -> tuple[dict[str, ModelFetch], dict[str, CachedFile], dict[str, ModelMove], dict]:
    """Fetches, stamps to refresh, moves from the old place, and snapshots to link."""
    fetches: dict[str, ModelFetch] = {}
    stamps: dict[str, CachedFile] = {}
    moves: dict[str, ModelMove] = {}
    snapshots: dict[str, SnapshotLinks] = {}
    changes: list[Change] = []
    store = snap.models
    for name, files in cached_files(config, control).items():
        resolved = control.models[name]
        if not files:
            continue  # the control machine refuses a model that resolves to no file
        for f in files:
            state = store.files.get(f.blob)
            why = unverified_reason(state, etag=f.etag, size=f.size)
            if why is None:
                if state is not None and stale_stamp(state, etag=f.etag, size=f.size):
                    # hashed in this read and whole: only its stamp is behind (a clock stepped
                    # back, a stamp lost); the next run sees it verified, nothing is recreated
                    stamps[f.blob] = f
                    changes.append(_stamp_change(f))
                continue
            old = legacy_path(config, name, f)
            kept = store.legacy.get(old) if old else None
            if state is None and unverified_reason(kept, etag=f.etag, size=f.size) is None:
                moves[f.blob] = ModelMove(model=name, legacy=old, file=f)
                changes.append(_move_change(moves[f.blob]))
                continue
            url = known.hub_file_url(config.hf_endpoint, resolved.repo, resolved.commit, f.path)
            known_bad = state is not None and state.digest is not None
            fetches[f.blob] = ModelFetch(model=name, file=f, url=url, known_bad=known_bad)
            # a blob a running service has mapped is replaced under it: recreate the service
            replaced = tuple(users.get(name, ())) if state is not None else ()
            changes.append(_fetch_change(fetches[f.blob], state, why, replaced))
        # fetch-model and a move link their own file; the rest, the ref and the record, here
        links = _snapshot_links(snap, resolved.revision, files)
        if links is not None:
            directory = snapshot_dir(config.layout.hf_home, links.repo, links.commit)
            snapshots[directory] = links
            changes.append(_link_change(directory, links, snap))
    if fetches:
        script = snap.files.get(known.FETCH_MODEL)
        why = "fetch script absent" if script is None else "fetch script differs"
        draft.write("model", known.FETCH_MODEL, script, FETCH_SCRIPT.read_text(), why)
    draft.changes += changes
    if not config.models_keep_unused:
        _unused_snapshots(draft, config, snap, control)
    return fetches, stamps, moves, snapshots


def links_of(revision: str, files: list[CachedFile]) -> SnapshotLinks:
    """A snapshot's links, its ref (for a branch or tag, none for a commit) and its record."""
    first = files[0]
    ref = None if SHA1_RE.fullmatch(revision) else ref_path(first.hf_home, first.repo, revision)
    return SnapshotLinks(
        repo=first.repo,
        commit=first.commit,
        files=tuple(files),
        ref=ref,
        placed=placed_path(first.repo, first.commit),
    )


def _snapshot_links(snap: Snapshot, revision: str, files: list[CachedFile]) -> SnapshotLinks | None:
    """The snapshot's links, ref and record when any is not as declared, else None."""
    links = links_of(revision, files)
    store = snap.models
    key = f"{repo_folder(links.repo)}/{links.commit}"
    off = (
        any(store.links.get(f.link) != f.target for f in files)
        or (links.ref is not None and store.refs.get(links.ref) != links.commit)
        or key not in store.placed
    )
    return links if off else None


def _link_change(directory: str, links: SnapshotLinks, snap: Snapshot) -> Change:
    store = snap.models
    wrong = [f.path for f in links.files if store.links.get(f.link) != f.target]
    if wrong:
        why = f"{len(wrong)} of {len(links.files)} files not linked to their blobs ({wrong[0]})"
    elif links.ref is not None and store.refs.get(links.ref) != links.commit:
        why = f"refs/{links.ref.rsplit('/refs/', 1)[1]} is not {links.commit[:12]}"
    else:
        why = "not recorded as placed by gpufleet"
    return Change(
        "model",
        directory,
        why,
        "link the snapshot",
        Op.LINK,
        expected=f"{links.repo}@{links.commit[:12]} linked",
        found=why,
    )


def _stamp_change(f: CachedFile) -> Change:
    """A blob hashed in this read that matches, its stamp behind: the stamp written again."""
    return Change(
        "model",
        f.stamp,
        f"{f.path} was hashed again and matches; its stamp is older than the blob or absent",
        "refresh the stamp",
        Op.WRITE,
        expected="stamp not older than the blob",
        found="older or absent",
    )


def _move_change(move: ModelMove) -> Change:
    return Change(
        "model",
        move.file.blob,
        f"{move.file.path} is verified at {move.legacy}, where gpufleet kept models before "
        "the Hub cache",
        "move into the Hub cache",
        Op.MOVE,
        expected=f"{move.file.repo}/{move.file.path} in the Hub cache",
        found=move.legacy,
    )


def _fetch_change(
    fetch: ModelFetch, state: ModelFileState | None, why: str, recreates: tuple[str, ...]
) -> Change:
    """A blob fetched and verified, and the services recreated because it is replaced."""
    f = fetch.file
    return Change(
        "model",
        f.blob,
        f"{f.repo}/{f.path}: {why}",
        "fetch and verify",
        Op.FETCH,
        recreates=recreates,
        expected=f"{short(f.etag)}, {f.size} bytes",
        found="absent" if state is None else f"{state.size} bytes",
    )


def _unused_snapshots(
    draft: PlanDraft, config: HostConfig, snap: Snapshot, control: ControlInputs
) -> None:
    """Snapshots gpufleet placed that no enabled service and no kept release uses: removed,
    then the blobs no snapshot links any more (``hf cache prune``'s rule). Snapshots other
    tools placed are left alone."""
    in_use = {f"{repo_folder(r.repo)}/{r.commit}" for r in control.models.values()}
    in_use |= set(snap.state.kept_models)
    hub = hub_root(config.layout.hf_home)
    for key in sorted(set(snap.models.placed) - in_use):
        if not _SNAPSHOT_KEY.fullmatch(key):
            continue  # a name on the host that cannot be one gpufleet wrote: never a path
        folder, commit = key.split("/")
        draft.add(
            "model",
            f"{hub}/{folder}/snapshots/{commit}",
            "placed by gpufleet; no enabled service and no kept release uses it",
            "remove, with the blobs only it linked",
            found="present",
            expected="absent",
            op=Op.REMOVE,
        )


def rehash_paths(config: HostConfig, snap: Snapshot, control: ControlInputs) -> list[str]:
    """Blobs to hash before planning, read again in the same run (a targeted deep read):

    - a blob whose mtime is ahead of its stamp, its size and stamp right: hashed once, its
      stamp refreshed when the bytes match (a clock stepped back), else it is fetched;
    - every blob of a llama-server whose container is not running, does not answer its
      health endpoint, or was restarted by Docker and does not answer yet (a crash loop caught
      between two restarts looks like a server loading): a crash loop's cause is often its
      model, changed in place with its mtime kept, which only a hash finds.

    Blobs hashed in this read already (``--deep``), absent, or of the wrong size are left out:
    the plan decides on them without a hash.
    """
    wanted: list[str] = []
    files = cached_files(config, control)
    for name, svc in config.enabled_services.items():
        if not isinstance(svc, LlamaServer):
            continue
        container = snap.compose.containers.get(name)
        health = snap.health.get(name)
        failing = (
            container is None
            or container.state != "running"
            or container.health == "unhealthy"
            or (
                health is not None
                and (health.hung or (not health.ok and container.health != "starting"))
            )
            # restarted by Docker and not answering yet: a crash loop between two restarts
            or (container.restarts > 0 and not (health is not None and health.ok))
        )
        for f in files.get(svc.model, ()):
            state = snap.models.files.get(f.blob)
            if state is None or state.digest is not None or f.blob in wanted:
                continue
            ahead = state.stamp_mtime is not None and state.stamp_mtime < state.mtime
            if (failing and container is not None) or ahead:
                wanted.append(f.blob)
    return wanted


def model_users(config: HostConfig) -> dict[str, list[str]]:
    """Model -> the enabled llama-server and vLLM services that serve it."""
    users: dict[str, list[str]] = {}
    for name, svc in config.enabled_services.items():
        if isinstance(svc, LlamaServer | Vllm):
            users.setdefault(svc.model, []).append(name)
    return users


def space_refusal(fetches: list[ModelFetch], snap: Snapshot) -> str | None:
    """Why the files still to fetch cannot fit, checked before any byte is fetched."""
    missing = sum(f.size - snap.models.incomplete.get(f.file.blob, 0) for f in fetches)
    host = snap.identity.host
    if missing and host.disk_free_bytes is not None and missing > host.disk_free_bytes:
        return (
            f"models need {missing / 2**30:.1f} GiB more in {host.disk_path}, "
            f"which has {host.disk_free_bytes / 2**30:.1f} GiB free"
        )
    return None
