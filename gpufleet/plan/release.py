"""The ``release`` step (applied by ``deploys/release.py``): the release the host runs once its
plan is applied, recorded when it is not the current one, the history it keeps and prunes,
and kept releases whose ``.env`` copy still holds secret values.
"""

from __future__ import annotations

from gpufleet.control.inputs import ControlInputs
from gpufleet.core import known
from gpufleet.core.release import ModelFileRelease, Release, ServiceRelease
from gpufleet.core.schema import HostConfig, LlamaServer, Vllm
from gpufleet.core.snapshot import Snapshot
from gpufleet.core.wire import Op
from gpufleet.plan.draft import PlanDraft, sha
from gpufleet.plan.types import BuildPlan, Change


def _model_files(
    config: HostConfig, control: ControlInputs, model: str | None
) -> tuple[ModelFileRelease, ...]:
    """A served model's files as a release records them: where each came from, its hash."""
    if not model or model not in control.models:
        return ()
    resolved = control.models[model]
    hub = (config.hf_endpoint, resolved.repo, resolved.commit)
    return tuple(
        ModelFileRelease(
            repo=resolved.repo,
            commit=resolved.commit,
            path=f.path,
            etag=f.etag,
            size=f.size,
            url=known.hub_file_url(*hub, f.path),
        )
        for f in resolved.files
    )


def _build_record(plan: BuildPlan | None, source: str) -> dict | None:
    """What a built image was built from, as a release records it (None: not built)."""
    if plan is None:
        return None
    build = plan.build
    return {
        "inputs": plan.inputs,
        "source": source,
        "cuda": build.cuda,
        "cuda_version": build.cuda_version if build.cuda else None,
        "cuda_archs": list(build.cuda_archs),
    }


def release_of(
    config: HostConfig,
    snap: Snapshot,
    control: ControlInputs,
    compose: str,
    builds: dict[str, BuildPlan],
    labels: dict[str, dict[str, str]],
) -> Release:
    """What the host serves once its plan is applied (hashes, never secret values)."""
    services = {}
    for name, svc in config.enabled_services.items():
        model = svc.model if isinstance(svc, LlamaServer | Vllm) else None
        services[name] = ServiceRelease(
            kind=svc.kind,
            port=svc.port,
            image=svc.image.ref,
            image_source=svc.image.source,
            image_id=control.local_images.get(svc.image.ref),
            build=_build_record(builds.get(name), control.sources.get(name, "")),
            model=model,
            model_files=_model_files(config, control, model),
            inputs=labels[name]["gpufleet.inputs"],
        )
    identity = snap.identity
    return Release(
        gpufleet=control.version,
        driver=identity.nvidia.driver_version,
        cuda=identity.nvidia.cuda_version,
        l4t=identity.jetson.l4t if identity.jetson else None,
        toolkit=config.toolkit.version,
        services=services,
        compose_sha256=sha(compose) if compose else None,
        env_sha256=control.env_public_sha256,
    )


def next_history(
    kept: tuple[str, ...], rid: str, keep: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The history once ``rid`` is the current release (it moves to the end), and the releases
    beyond the newest ``keep`` that leave it. ``kept`` holds checked ids only
    (``facts.statedir.release_ids``)."""
    order = [h for h in kept if h != rid] + [rid]
    return tuple(order[-keep:]), tuple(order[:-keep])


def secret_copies(snap: Snapshot) -> list[Change]:
    """Kept releases that still hold a whole ``.env`` (gpufleet kept one before it kept only
    the public part): each is rewritten without its secret values on the next converge."""
    return [
        Change(
            "release",
            f"{known.STATE_DIR}/releases/{rid}/env",
            f"release {rid} keeps a copy of .env with secret values",
            "rewrite without secret values",
            Op.WRITE,
            expected="names only",
            found="values",
        )
        for rid in snap.state.secret_copies
    ]


def plan_release(
    draft: PlanDraft, config: HostConfig, snap: Snapshot, release: Release
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Record the release when it is not the current one: the history and pruned releases."""
    current = snap.state.current
    if release.id == current:
        return (), ()
    recorded = current or "none"
    why = f"release {recorded} recorded, {release.id} declared"
    draft.add(
        "release", release.id, why, "record", expected=release.id, found=recorded, op=Op.RECORD
    )
    return next_history(snap.state.releases, release.id, config.releases_keep)
