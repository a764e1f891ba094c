"""Models: resolved on the control machine, fetched by the host into its Hub cache, verified
before use, linked into their snapshots, and pruned like ``hf cache prune``."""

from __future__ import annotations

import shlex

from pyinfra.api.deploy import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.operations import files, server

from gpufleet.core import known
from gpufleet.core.hubcache import PLACED_DIR, VERIFIED_DIR, CachedFile
from gpufleet.core.render import FETCH_SCRIPT
from gpufleet.core.schema import HostConfig
from gpufleet.core.wire import Op
from gpufleet.ops import operations as ops
from gpufleet.plan.types import HostPlan, ModelMove, SnapshotLinks

q = shlex.quote


@deploy("Models")
def models(config: HostConfig, plan: HostPlan):
    """Fetch or move in what the plan lists (resumable, verified, in place whole), link the
    snapshots, and prune.

    + config: validated host config (``models``, ``models_keep_unused``)
    + plan: the host's plan (its ``model`` changes)
    """
    if plan.touches("model", known.FETCH_MODEL):
        files.put(
            name="Model fetch script", src=str(FETCH_SCRIPT), dest=known.FETCH_MODEL, mode="755"
        )
    for change in plan.of("model"):
        fetch = plan.fetches.get(change.resource)
        if fetch is not None:
            ops.fetch_model(
                name=f"Fetch model {fetch.model}: {fetch.file.path} ({fetch.size / 2**20:.0f} MiB)",
                script=known.FETCH_MODEL,
                url=fetch.url,
                file=fetch.file,
                env_file=config.layout.env_path,
                attempts=config.models_download_attempts,
                stall_seconds=config.models_stall_seconds,
                distrust=fetch.known_bad,
            )
        elif change.op is Op.MOVE:
            move = plan.moves[change.resource]
            server.shell(
                name=f"Move model {move.model}: {move.file.path} into the Hub cache",
                commands=[move_script(move)],
            )
        elif change.op is Op.LINK:
            links = plan.snapshots[change.resource]
            server.shell(
                name=f"Link snapshot {links.repo}@{links.commit[:12]}",
                commands=[link_script(links)],
            )
        elif change.op is Op.REMOVE:
            server.shell(
                name=f"Remove unused snapshot {change.resource.split('/hub/', 1)[-1]}",
                commands=[prune_script(change.resource)],
            )
        elif change.op is Op.WRITE and change.resource in {f.stamp for f in plan.stamps.values()}:
            blob = next(f for f in plan.stamps.values() if f.stamp == change.resource)
            server.shell(
                name=f"Stamp {blob.path} verified (hashed in this run)",
                commands=[stamp_script(blob)],
            )
        elif change.resource != known.FETCH_MODEL:
            raise DeployError(f"model: no way to apply {change.op.value} to {change.resource}")


def stamp_script(file: CachedFile) -> str:
    """Write the blob's stamp (``"<etag> <size>"``, as fetch-model does) dated as the blob
    itself, written whole: a blob dated ahead of the clock stays verified."""
    tmp = file.stamp + ".tmp"
    return (
        f"mkdir -p {q(file.stamp.rsplit('/', 1)[0])} && "
        f"printf '%s\\n' {q(file.stamp_text)} > {q(tmp)} && "
        f"touch -r {q(file.blob)} -- {q(tmp)} && mv -f -- {q(tmp)} {q(file.stamp)}"
    )


def move_script(move: ModelMove) -> str:
    """The file gpufleet kept at its old place becomes the blob without a byte downloaded: a
    hard link (the old place keeps working for a release kept from before, at no cost in
    space), else a move (another filesystem); its stamp follows it, then its snapshot link."""
    f, old = move.file, move.legacy
    tmp = f"{f.blob}.gpufleet-move"
    return "; ".join(
        [
            "set -e",
            f"mkdir -p {q(f.blob.rsplit('/', 1)[0])}",
            f"ln -f -- {q(old)} {q(tmp)} 2>/dev/null || cp -p -- {q(old)} {q(tmp)}",
            f"mv -f -- {q(tmp)} {q(f.blob)}",
            stamp_script(f),
            *_link_lines(f),
        ]
    )


def _link_lines(f: CachedFile) -> list[str]:
    """The snapshot's relative symlink to the blob, swapped in whole (a link made beside it,
    then renamed over: a reader sees the old link or the new one)."""
    tmp = f"{f.link}.gpufleet-link"
    return [
        f"mkdir -p {q(f.link.rsplit('/', 1)[0])}",
        f"ln -sfn {q(f.target)} {q(tmp)}",
        f"mv -fT -- {q(tmp)} {q(f.link)}",
    ]


def link_script(links: SnapshotLinks) -> str:
    """Every file of the snapshot linked to its blob, the ref of a branch or tag pointing at
    the commit (huggingface_hub writes it without a newline), and gpufleet's record."""
    lines = ["set -e"]
    for f in links.files:
        lines += _link_lines(f)
    if links.ref:
        lines += [
            f"mkdir -p {q(links.ref.rsplit('/', 1)[0])}",
            f"printf '%s' {q(links.commit)} > {q(links.ref + '.tmp')}",
            f"mv -f -- {q(links.ref + '.tmp')} {q(links.ref)}",
        ]
    lines += [f"mkdir -p {q(links.placed.rsplit('/', 1)[0])}", f"touch {q(links.placed)}"]
    return "; ".join(lines)


def prune_script(snapshot: str) -> str:
    """``hf cache prune`` for one snapshot gpufleet placed: the snapshot and its record go,
    then each blob of the repository that no snapshot links any more, with its stamp."""
    repo_dir, _, commit = snapshot.rpartition("/snapshots/")
    folder = repo_dir.rsplit("/", 1)[1]
    stamps = f"{VERIFIED_DIR}/{folder}"
    return "; ".join(
        [
            "set -e",
            f"rm -rf -- {q(snapshot)}",
            f"rm -f -- {q(f'{PLACED_DIR}/{folder}/{commit}')}",
            f"linked=$(find {q(repo_dir + '/snapshots')} -type l -exec readlink {{}} + 2>/dev/null"
            " | sed 's#.*/##' | sort -u)",
            f'for b in {q(repo_dir)}/blobs/*; do [ -f "$b" ] || continue; n=${{b##*/}};'
            " case $n in *.incomplete) continue ;; esac;"
            ' if ! printf \'%s\\n\' "$linked" | grep -qx "$n"; then rm -f -- "$b" '
            f'{q(stamps)}/"$n"; fi; done',
        ]
    )
