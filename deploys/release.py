"""Record the release a host now runs, with what a rollback needs to bring it back.

Under gpufleet's state directory (``/var/lib/gpufleet``, root, 0700)::

    releases/<id>/manifest.json      the release (hashes and names, no secret value)
    releases/<id>/compose.yaml       the compose file it ran
    releases/<id>/env                the .env, 0600
    releases/<id>/build/<svc>/Dockerfile
    releases/<id>/images             service, image ref and the image id it ran
    releases/<id>/models             model names it used (never pruned while kept)
    current, history                 the current id; kept ids, oldest first

Each image is also tagged ``gpufleet/kept:<service>-<id>`` so that a rebuild of the same tag,
or a ``docker image prune``, cannot remove what a kept release runs. Only the newest
``releases_keep`` releases stay.
"""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra.api.deploy import deploy
from pyinfra.operations import files, server

from gpufleet.core.known import STATE_DIR
from gpufleet.core.schema import HostConfig, LlamaServer
from gpufleet.core.wire import Op
from gpufleet.plan.host import HostPlan
from gpufleet.plan.restore import KEPT_REPO


def release_dir(plan: HostPlan) -> str:
    return f"{STATE_DIR}/releases/{plan.release.id if plan.release else 'none'}"


def current_script(rid: str) -> str:
    """Make ``rid`` current and the newest in the history (a rollback reorders, not copies)."""
    q = shlex.quote
    return "; ".join((
        f"set -e; umask 077; d={q(STATE_DIR)}",
        f'printf "%s\\n" {q(rid)} > "$d/current.tmp"; mv -f "$d/current.tmp" "$d/current"',
        f'{{ grep -vx {q(rid)} "$d/history" 2>/dev/null || true; echo {q(rid)}; }} '
        '> "$d/history.tmp"; mv -f "$d/history.tmp" "$d/history"',
    ))  # fmt: skip


def record_script(config: HostConfig, plan: HostPlan) -> str:
    """The shell that copies the release's files in place and makes it current."""
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
        f'cp {q(config.layout.env_path)} "$r/env"; chmod 600 "$r/env"',
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
                f'mkdir -p "$r/build/{name}"; cp {q(context + "/Dockerfile")} '
                f'"$r/build/{name}/Dockerfile"'
            )
    models = sorted({s.model for s in release.services.values() if s.model})
    lines += [
        'mv -f "$r/images.tmp" "$r/images"',
        f"printf '%s\\n' {' '.join(q(m) for m in models) or ''} > \"$r/models.tmp\"",
        'mv -f "$r/models.tmp" "$r/models"',
        f'printf "%s\\n" {q(rid)} > "$d/current.tmp"; mv -f "$d/current.tmp" "$d/current"',
        f'{{ grep -vx {q(rid)} "$d/history" 2>/dev/null || true; echo {q(rid)}; }} '
        '> "$d/history.tmp"; mv -f "$d/history.tmp" "$d/history"',
        # keep the newest releases_keep: older ones lose their files and their image tags
        f'n=$(wc -l < "$d/history"); k={config.releases_keep}',
        'if [ "$n" -gt "$k" ]; then for old in $(head -n $((n - k)) "$d/history"); do '
        'rm -rf "$d/releases/$old"; '
        f"docker images --format '{{{{.Repository}}}}:{{{{.Tag}}}}' {KEPT_REPO} | "
        'grep -- "-$old$" | xargs -r docker rmi >/dev/null; done; '
        'tail -n "$k" "$d/history" > "$d/history.tmp"; mv -f "$d/history.tmp" "$d/history"; fi',
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
    if plan.of("release")[0].op is Op.MAKE_CURRENT:  # a rollback: the files are kept
        server.shell(name=f"Make release {rid} current again", commands=[current_script(rid)])
        return
    files.directory(name="gpufleet state directory", path=STATE_DIR, mode="700",
                    user="root", group="root")  # fmt: skip
    files.directory(name=f"Release {rid}", path=f"{STATE_DIR}/releases/{rid}", mode="700")
    files.put(name=f"Release {rid} manifest", src=StringIO(plan.release.manifest()),
              dest=f"{STATE_DIR}/releases/{rid}/manifest.json", mode="600")  # fmt: skip
    server.shell(name=f"Record release {rid} as current", commands=[record_script(config, plan)])
