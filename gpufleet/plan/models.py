"""The ``model`` step (applied by ``deploys/models.py``): each model file whole and verified
(by its stamp, or by a hash read in this run), fetched from its pinned URL when not; unused
model directories removed; and whether the files still to fetch fit on the disk.
"""

from __future__ import annotations

from pathlib import Path

from gpufleet.control.inputs import ControlInputs
from gpufleet.core import known
from gpufleet.core.render import FETCH_SCRIPT
from gpufleet.core.schema import HostConfig, LlamaServer
from gpufleet.core.snapshot import ModelFileState, Snapshot
from gpufleet.core.wire import Op
from gpufleet.plan.draft import PlanDraft, short
from gpufleet.plan.types import Change, ModelFetch


def unverified_reason(state: ModelFileState | None, *, sha256: str, size: int) -> str | None:
    """Why a model file cannot be trusted as it is, or None when it is whole and verified.

    A stamp (``<file>.verified``, written by fetch-model after hashing) newer than the file
    and naming this sha256 and size means verified, at the cost of a ``stat``; a deep check's
    hash overrides it.
    """
    if state is None:
        return "absent"
    if state.size != size:
        return f"size {state.size} found, {size} declared"
    if state.sha256 is not None and state.sha256 != sha256:
        return f"sha256 {state.sha256[:12]} found, {sha256[:12]} declared"
    if state.sha256 == sha256:
        return None  # hashed in this read: whatever its stamp says (see ``stale_stamp``)
    if state.stamp is None or state.stamp_mtime is None:
        return "never verified (no stamp)"
    if state.stamp != f"{sha256} {size}":
        return "verified as another file (stamp differs)"
    if state.stamp_mtime < state.mtime:
        return "changed since it was verified"
    return None


def plan_models(
    draft: PlanDraft,
    config: HostConfig,
    snap: Snapshot,
    control: ControlInputs,
    users: dict[str, list[str]],
) -> tuple[dict[str, ModelFetch], dict[str, str]]:
    fetches: dict[str, ModelFetch] = {}
    stamps: dict[str, str] = {}
    changes: list[Change] = []
    for name, resolved in control.models.items():
        for item in resolved.files:
            dest = f"{config.layout.models_dir}/{name}/{item.path}"
            state = snap.models.files.get(dest)
            why = unverified_reason(state, sha256=item.sha256, size=item.size)
            if why is None:
                if state is not None and stale_stamp(state, sha256=item.sha256, size=item.size):
                    # hashed in this read and whole: only its stamp is behind (a clock stepped
                    # back, a stamp lost); the next run sees it verified, nothing is recreated
                    stamps[dest] = f"{item.sha256} {item.size}"
                    changes.append(_stamp_change(dest))
                continue
            url = known.hub_file_url(config.hf_endpoint, resolved.repo, resolved.commit, item.path)
            known_bad = state is not None and state.sha256 is not None
            fetches[dest] = ModelFetch(
                model=name,
                dest=dest,
                url=url,
                sha256=item.sha256,
                size=item.size,
                known_bad=known_bad,
            )
            # a file a running service has mapped is replaced under it: recreate the service
            replaced = tuple(users.get(name, ())) if state is not None else ()
            changes.append(_fetch_change(fetches[dest], state, why, replaced))
    if fetches:
        script = snap.files.get(known.FETCH_MODEL)
        why = "fetch script absent" if script is None else "fetch script differs"
        draft.write("model", known.FETCH_MODEL, script, FETCH_SCRIPT.read_text(), why)
    draft.changes += changes
    if not config.models_keep_unused:
        _unused_models(draft, config, snap)
    return fetches, stamps


def _stamp_change(dest: str) -> Change:
    """A file hashed in this read that matches, its stamp behind: the stamp written again."""
    return Change(
        "model",
        f"{dest}.verified",
        f"{Path(dest).name} was hashed again and matches; its stamp is older than the file "
        "or absent",
        "refresh the stamp",
        Op.WRITE,
        expected="stamp not older than the file",
        found="older or absent",
    )


def _fetch_change(
    fetch: ModelFetch, state: ModelFileState | None, why: str, recreates: tuple[str, ...]
) -> Change:
    """A model file fetched and verified, and the services recreated because it is replaced."""
    return Change(
        "model",
        fetch.dest,
        why,
        "fetch and verify",
        Op.FETCH,
        recreates=recreates,
        expected=f"{short(fetch.sha256)}, {fetch.size} bytes",
        found="absent" if state is None else f"{state.size} bytes",
    )


def _unused_models(draft: PlanDraft, config: HostConfig, snap: Snapshot) -> None:
    """Model directories that no enabled service and no kept release uses: removed."""
    in_use = set(config.served_models()) | set(snap.state.kept_models)
    for name in sorted(set(snap.models.dirs) & set(config.models) - in_use):
        draft.add(
            "model",
            f"{config.layout.models_dir}/{name}",
            "no enabled service and no kept release uses it",
            "remove",
            found="present",
            expected="absent",
            op=Op.REMOVE,
        )


def stale_stamp(state: ModelFileState, *, sha256: str, size: int) -> bool:
    """A file hashed in this read that matches, whose stamp would not say so next time."""
    return state.sha256 == sha256 and (
        state.stamp != f"{sha256} {size}"
        or state.stamp_mtime is None
        or state.stamp_mtime < state.mtime
    )


def rehash_paths(config: HostConfig, snap: Snapshot) -> list[str]:
    """Model files to hash before planning, read again in the same run (a targeted deep read):

    - a file whose mtime is ahead of its stamp, its size and stamp right: hashed once, its
      stamp refreshed when the bytes match (a clock stepped back), else it is fetched;
    - every file of a llama-server whose container is not running, does not answer its
      health endpoint, or was restarted by Docker and does not answer yet (a crash loop caught
      between two restarts looks like a server loading): a crash loop's cause is often its
      model, changed in place with its mtime kept, which only a hash finds.

    Files hashed in this read already (``--deep``), absent, or of the wrong size are left out:
    the plan decides on them without a hash.
    """
    wanted: list[str] = []
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
        spec = config.models.get(svc.model)
        for path in spec.files if spec else ():
            dest = f"{config.layout.models_dir}/{svc.model}/{path}"
            state = snap.models.files.get(dest)
            if state is None or state.sha256 is not None or dest in wanted:
                continue
            ahead = state.stamp_mtime is not None and state.stamp_mtime < state.mtime
            if (failing and container is not None) or ahead:
                wanted.append(dest)
    return wanted


def model_users(config: HostConfig) -> dict[str, list[str]]:
    """Model -> the enabled llama-server services that serve it."""
    users: dict[str, list[str]] = {}
    for name, svc in config.enabled_services.items():
        if isinstance(svc, LlamaServer):
            users.setdefault(svc.model, []).append(name)
    return users


def space_refusal(fetches: list[ModelFetch], snap: Snapshot) -> str | None:
    """Why the files still to fetch cannot fit, checked before any byte is fetched."""
    missing = sum(f.size for f in fetches)
    host = snap.identity.host
    if missing and host.disk_free_bytes is not None and missing > host.disk_free_bytes:
        return (
            f"models need {missing / 2**30:.1f} GiB more in {host.disk_path}, "
            f"which has {host.disk_free_bytes / 2**30:.1f} GiB free"
        )
    return None
