"""Record the release a host now runs, with what a rollback needs to bring it back.

Under gpufleet's state directory (``/var/lib/gpufleet``, root, 0700)::

    releases/<id>/manifest.json      the release (hashes and names, no secret value)
    releases/<id>/compose.yaml       the compose file it ran
    releases/<id>/env.public         the .env's plain lines and its secrets' names (never a
                                     secret value: a rollback takes today's), 0600
    releases/<id>/build/<svc>/Dockerfile
    releases/<id>/images             service, image ref and the image id it ran
    releases/<id>/models             the Hub cache snapshots it used (models--Org--Repo/<commit>:
                                     never pruned while the release is kept)
    current, history                 the current id; kept ids, oldest first

Each image is also tagged ``gpufleet/kept:<service>-<id>`` so that a rebuild of the same tag,
or a ``docker image prune``, cannot remove what a kept release runs. Only the newest
``releases_keep`` releases stay.
"""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra.api.deploy import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.operations import files, server

from gpufleet.core.known import STATE_DIR
from gpufleet.core.release import is_release_id
from gpufleet.core.render import plain_names, public_env, public_env_awk
from gpufleet.core.schema import HostConfig, LlamaServer
from gpufleet.core.wire import Op
from gpufleet.plan.restore import KEPT_REPO
from gpufleet.plan.types import HostPlan


def release_dir(plan: HostPlan) -> str:
    return f"{STATE_DIR}/releases/{plan.release.id if plan.release else 'none'}"


def history_lines(rid: str, history: tuple[str, ...]) -> list[str]:
    """Shell that makes ``rid`` current and writes the plan's history, each whole (temp file,
    then ``mv``). Every id is checked here again: a value that is not a release id never
    reaches the host's shell or a path."""
    q = shlex.quote
    for value in (rid, *history):
        if not is_release_id(value):
            raise ValueError(f"not a release id: {value[:40]!r}")
    return [
        f'printf "%s\\n" {q(rid)} > "$d/current.tmp"; mv -f "$d/current.tmp" "$d/current"',
        f"printf '%s\\n' {' '.join(q(h) for h in history or (rid,))} > \"$d/history.tmp\"; "
        'mv -f "$d/history.tmp" "$d/history"',
    ]


def prune_lines(pruned: tuple[str, ...]) -> list[str]:
    """Shell that removes the kept releases the plan prunes: their directories under the
    releases directory, and the tags that kept their images. Checked ids only, quoted."""
    q = shlex.quote
    lines = []
    for old in pruned:
        if not is_release_id(old):
            raise ValueError(f"not a release id: {old[:40]!r}")
        lines.append(
            f'rm -rf -- "$d/releases/"{q(old)}; '
            f"docker images --format '{{{{.Repository}}}}:{{{{.Tag}}}}' {KEPT_REPO} | "
            f"grep -x -- {q(f'{KEPT_REPO}:.*-{old}')} | xargs -r docker rmi >/dev/null"
        )
    return lines


def migrate_script(config: HostConfig, rids: tuple[str, ...]) -> str:
    """Rewrite kept releases' whole ``.env`` copies as their public part, then remove them."""
    q = shlex.quote
    lines = [f"set -e; umask 077; d={q(STATE_DIR)}"]
    for rid in rids:
        if not is_release_id(rid):
            raise ValueError(f"not a release id: {rid[:40]!r}")
        lines.append(
            f'r="$d/releases/"{q(rid)}; if [ -f "$r/env" ]; then '
            f'{public_env_awk(plain_names(config))} "$r/env" > "$r/env.public.tmp"; '
            'mv -f "$r/env.public.tmp" "$r/env.public"; rm -f "$r/env"; fi'
        )
    return "; ".join(lines)


def current_script(rid: str, history: tuple[str, ...]) -> str:
    """Make ``rid`` current and the newest in the history (a rollback reorders, not copies)."""
    return "; ".join(
        [f"set -e; umask 077; d={shlex.quote(STATE_DIR)}", *history_lines(rid, history)]
    )


def record_script(config: HostConfig, plan: HostPlan) -> str:
    """The shell that copies the release's files in place, makes it current, and prunes."""
    release = plan.release
    assert release is not None
    rid = release.id
    q = shlex.quote
    root, rel = STATE_DIR, f"{STATE_DIR}/releases/{rid}"
    lines = [
        "set -e; umask 077",
        f"r={q(rel)}; d={q(root)}",
        'mkdir -p "$r/build"',
        f"if [ -f {q(config.layout.compose_path)} ]; then cp {q(config.layout.compose_path)} "
        '"$r/compose.yaml"; fi',
        ': > "$r/images.tmp"',
    ]
    for name, svc in release.services.items():
        lines.append(
            f'id=$(docker image inspect --format "{{{{.Id}}}}" {q(svc.image)}); '
            f"docker tag {q(svc.image)} {q(f'{KEPT_REPO}:{name}-{rid}')}; "
            f'printf \'%s\\t%s\\t%s\\n\' {q(name)} {q(svc.image)} "$id" >> "$r/images.tmp"'
        )
        cfg = config.services.get(name)
        if isinstance(cfg, LlamaServer) and cfg.image.source == "build":
            context = config.layout.build_context(name)
            lines.append(
                f'mkdir -p "$r/build/"{q(name)}; cp {q(context + "/Dockerfile")} '
                f'"$r/build/"{q(name + "/Dockerfile")}'
            )
    models = sorted({f.snapshot_key() for s in release.services.values() for f in s.model_files})
    lines += [
        'mv -f "$r/images.tmp" "$r/images"',
        f"printf '%s\\n' {' '.join(q(m) for m in models) or ''} > \"$r/models.tmp\"",
        'mv -f "$r/models.tmp" "$r/models"',
        *history_lines(rid, plan.history),
        # the plan keeps the newest releases_keep: older ones lose their files and image tags
        *prune_lines(plan.pruned),
    ]
    return "; ".join(lines)


@deploy("Release")
def record_release(config: HostConfig, plan: HostPlan):
    """Make the plan's release the host's current one, after every change and gate passed.

    + config: validated host config (``releases_keep``)
    + plan: the host's plan (its ``release`` change)
    """
    if not plan.of("release") or plan.release is None:
        return
    rid = plan.release.id
    if plan.migrate:  # before a prune: a release pruned now is migrated, then removed
        server.shell(
            name="Kept releases: .env copies rewritten without secret values",
            commands=[migrate_script(config, plan.migrate)],
        )
    for change in plan.of("release"):
        if change.op is Op.MAKE_CURRENT:  # a rollback: the files are kept
            server.shell(
                name=f"Make release {rid} current again",
                commands=[current_script(rid, plan.history)],
            )
        elif change.op is Op.RECORD:
            _record(config, plan)
        elif change.op is not Op.WRITE:  # WRITE: the migration above
            raise DeployError(f"release: no way to apply {change.op.value}")


def _record(config: HostConfig, plan: HostPlan) -> None:
    rid = plan.release.id
    rel = f"{STATE_DIR}/releases/{rid}"
    files.directory(
        name="gpufleet state directory", path=STATE_DIR, mode="700", user="root", group="root"
    )
    files.directory(name=f"Release {rid}", path=rel, mode="700")
    files.put(
        name=f"Release {rid} manifest",
        src=StringIO(plan.release.manifest()),
        dest=f"{rel}/manifest.json",
        mode="600",
    )
    files.put(
        name=f"Release {rid} .env (plain values, secrets by name)",
        src=StringIO(public_env(config)),
        dest=f"{rel}/env.public",
        mode="600",
    )
    server.shell(name=f"Record release {rid} as current", commands=[record_script(config, plan)])
