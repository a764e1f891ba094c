"""The ``image``, ``build``, ``compose``, ``recreate`` and ``gate`` steps (applied by
``deploys/services.py``): each service's image pulled, sent, built or received; the compose
file; the containers recreated when their inputs changed or they are unwell, the orphans
removed; a health gate for each service recreated; and whether each image can run on the
host's GPUs.
"""

from __future__ import annotations

import json
from pathlib import Path

from gpufleet.control.inputs import ControlInputs
from gpufleet.core import known
from gpufleet.core.duration import parse_duration
from gpufleet.core.render import ServedModel, build_inputs, render_compose, render_dockerfile
from gpufleet.core.schema import HostConfig, LlamaServer, Ollama, Service, Vllm
from gpufleet.core.snapshot import Container, FileState, Snapshot
from gpufleet.core.wire import Op
from gpufleet.plan.draft import PlanDraft, image_missing, sha
from gpufleet.plan.gate import ImageCheck, image_check
from gpufleet.plan.types import BuildPlan, Change, PlanOptions

MIB = 1024**2


def _seconds(duration: str) -> int:
    return int(parse_duration(duration))


def gate_seconds(svc: Service, model_bytes: int) -> int:
    """How long a service may take to answer after it is (re)created.

    A minute plus the time to read its model at 100 MiB/s (a slow disk), capped by the
    service's ``start_period``: a 0.5 MB test model gets 60 s, a 63 GB one about 11 minutes.
    """
    base = 180 if isinstance(svc, Vllm) else 60  # vLLM starts its engine before the model
    return min(_seconds(svc.start_period), base + model_bytes // (100 * MIB))


def service_labels(
    config: HostConfig, control: ControlInputs, identity: dict[str, str]
) -> dict[str, dict[str, str]]:
    """Per service, everything that should recreate it when it changes, as one label: compose
    compares its config hash (which includes labels) with the running container's."""
    env_digest = control.env_public_sha256  # no secret value: a rotation recreates by its change
    labels = {}
    for name, svc in config.enabled_services.items():
        files = []
        if isinstance(svc, LlamaServer | Vllm) and svc.model in control.models:
            resolved = control.models[svc.model]
            files = sorted((f.path, f.etag) for f in resolved.files)
            files.insert(0, (resolved.repo, resolved.commit))
        payload = [svc.model_dump(mode="json"), identity.get(name, ""), files, env_digest]
        labels[name] = {"gpufleet.inputs": sha(json.dumps(payload))}
    return labels


def served_models(config: HostConfig, control: ControlInputs) -> dict[str, ServedModel]:
    """Each enabled llama-server and vLLM service's snapshot, as the control machine resolved
    its model (the file llama-server loads is the first declared: a split's first part)."""
    served = {}
    for name, svc in config.enabled_services.items():
        resolved = control.models.get(svc.model) if isinstance(svc, LlamaServer | Vllm) else None
        if resolved is not None and resolved.files:
            first = resolved.files[0].path
            served[name] = ServedModel(repo=resolved.repo, commit=resolved.commit, file=first)
    return served


def _build_plans(
    config: HostConfig, snap: Snapshot, control: ControlInputs, options: PlanOptions
) -> dict[str, BuildPlan]:
    plans = {}
    arch = snap.identity.host.arch
    for name, svc in config.enabled_services.items():
        if not (isinstance(svc, LlamaServer) and svc.image.source == "build" and svc.build):
            continue
        source_id = control.sources[name]
        dockerfile = render_dockerfile(svc.build, source_id if svc.build.source_archive else None)
        inputs = build_inputs(svc.build, dockerfile, source_id, arch=arch)
        builder, builder_ref, building = options.builders.get(inputs, (None, None, False))
        other = builder is not None and builder != config.host
        plans[name] = BuildPlan(
            service=name,
            ref=svc.image.ref,
            context=config.layout.build_context(name),
            dockerfile=dockerfile,
            inputs=inputs,
            build=svc.build,
            receive_from=builder if other else None,
            receive_ref=builder_ref if other else None,
            source_builds=other and building,
        )
    return plans


def check_images(
    config: HostConfig, snap: Snapshot, changes: list[Change]
) -> tuple[str | None, dict[str, ImageCheck]]:
    """Can each enabled service's image run on this host's GPUs? By the image's labels
    (``gpufleet.cuda.sm``, what cuobjdump found in its binary), never by the build flags.

    An image the host has, and keeps in this run, is checked now: a mismatch is the host's
    refusal, before any change. An image built, received, pulled or sent in this run has no
    labels to read yet: its check is returned, for the operation that makes the image present
    to run before compose starts anything from it.

    Returns ``(refusal or None, service -> deferred check)``.
    """
    delivered = {c.resource for c in changes if c.step == "image"}
    rebuilt = {c.resource for c in changes if c.step == "build"}
    deferred: dict[str, ImageCheck] = {}
    for name, svc in config.enabled_services.items():
        ref = svc.image.ref
        built = svc.image.source == "build"
        check = image_check(name, ref, snap.identity.nvidia.gpus, built=built)
        if check is None:
            continue
        if name in rebuilt or ref in delivered:
            deferred[name] = check
            continue
        image = snap.compose.images.get(ref)
        if image is not None and (why := check.refusal(image.labels)):
            return why, {}
    return None, deferred


def _container_reason(container: Container | None, wanted: str, health) -> str | None:
    if container is None:
        return "no container"
    if container.state != "running":
        return f"container {container.state}"
    if container.inputs != wanted:
        return "its inputs changed (config, image, model files or .env)"
    # a loading server answers 503 (llama-server) or not yet at all (vLLM): left to load, unless
    # it holds the port without ever answering (frozen), or Docker's own check gave up on it
    if health is not None and (health.hung or (not health.ok and container.health != "starting")):
        return f"running but its health endpoint gave {health.describe()}"
    if health is not None and health.chat is False:
        return "healthy, but a one-token chat completion failed"
    return None


def plan_services(
    draft: PlanDraft,
    config: HostConfig,
    snap: Snapshot,
    control: ControlInputs,
    options: PlanOptions,
    replaced: dict[str, list[str]],
) -> tuple[dict[str, BuildPlan], str, dict[str, dict[str, str]]]:
    """Images, the compose file and the containers: ``(builds, compose text, labels)``."""
    compose_state = snap.files.get(config.layout.compose_path)
    if not config.enabled_services and compose_state is None:
        return {}, "", {}
    builds = _build_plans(config, snap, control, options)
    identity: dict[str, str] = {}
    rebuilt: set[str] = set()
    for name, svc in config.enabled_services.items():
        if name in builds:
            identity[name] = builds[name].inputs
            if _build(draft, snap, control, builds[name]):
                rebuilt.add(name)
        else:
            identity[name] = _image(draft, snap, control, name, svc)
        if isinstance(svc, Ollama):
            draft.directory(snap, "layout", svc.models_dir, "755", "root", "root")
    labels = service_labels(config, control, identity)
    text = _compose(draft, config, control, labels, compose_state)
    _recreate(draft, config, snap, labels, rebuilt, replaced)
    return builds, text, labels


def _build(draft: PlanDraft, snap: Snapshot, control: ControlInputs, plan: BuildPlan) -> bool:
    """Build or receive the service's image when the host has none from these inputs, and
    send the build's base images; else keep its build context's Dockerfile. True: rebuilt."""
    name = plan.service
    image = snap.compose.images.get(plan.ref)
    if image is not None and image.inputs == plan.inputs:
        path = f"{plan.context}/Dockerfile"
        kept = snap.files.get(path)
        state = "is absent" if kept is None else "was edited"
        why = f"the build context's Dockerfile {state}; the image is current"
        draft.write("build", path, kept, plan.dockerfile, why)
        return False
    found = "no image" if image is None else f"built from {str(image.inputs)[:12]}"
    how = f"receive from {plan.receive_from}" if plan.receive_from else "build from source"
    draft.add(
        "build",
        name,
        f"{found}, inputs {plan.inputs[:12]} declared",
        how,
        expected=plan.inputs[:12],
        found=found,
        recreates=(name,),
        op=Op.RECEIVE if plan.receive_from else Op.BUILD,
    )
    if plan.build.base_source == "transfer" and not plan.receive_from:
        for base in (plan.build.devel_image, plan.build.runtime_image):
            why = image_missing(snap, base, "transfer", control.local_images.get(base))
            if why and not draft.has("image", base):
                draft.add(
                    "image",
                    base,
                    f"build base {why}",
                    "transfer",
                    expected="present",
                    found=why,
                    op=Op.TRANSFER,
                )
    return True


def _image(
    draft: PlanDraft, snap: Snapshot, control: ControlInputs, name: str, svc: Service
) -> str:
    """Pull or send the service's image when the host lacks it; returns what identifies the
    image in the service's inputs (the control machine's id for a sent one, else its ref)."""
    ref, source = svc.image.ref, svc.image.source
    local = control.local_images.get(ref)
    why = image_missing(snap, ref, source, local)
    if why:
        draft.add(
            "image",
            ref,
            f"image {why}",
            source,
            expected="present",
            found=why,
            recreates=(name,),
            op=Op(source),
        )
    return (local or "absent") if source == "transfer" else ref


def _compose(
    draft: PlanDraft,
    config: HostConfig,
    control: ControlInputs,
    labels: dict[str, dict[str, str]],
    state: FileState | None,
) -> str:
    """The compose file of the enabled services, written when it differs; returns its text."""
    text = render_compose(
        project=config.project,
        services=config.enabled_services,
        models=served_models(config, control),
        layout=config.layout,
        labels=labels,
    )
    why = "compose file absent" if state is None else "compose file differs"
    draft.write("compose", config.layout.compose_path, state, text, why)
    return text


def _recreate(
    draft: PlanDraft,
    config: HostConfig,
    snap: Snapshot,
    labels: dict[str, dict[str, str]],
    rebuilt: set[str],
    replaced: dict[str, list[str]],
) -> None:
    """Recreate each service whose container is not what it declares; remove the orphans."""
    for name in config.enabled_services:
        container = snap.compose.containers.get(name)
        wanted = labels[name]["gpufleet.inputs"]
        why = _container_reason(container, wanted, snap.health.get(name))
        if why is None and name in rebuilt:
            why = "its image is rebuilt"
        if replaced.get(name):
            also = replaced_reason(replaced[name], config.layout.env_path)
            why = also if why is None else f"{why}; {also}"
        if why:
            found = container.state if container else "absent"
            draft.add(
                "recreate",
                name,
                why,
                "recreate",
                expected="running, healthy",
                found=found,
                op=Op.RECREATE,
            )
    for name in orphans(snap, set(config.enabled_services)):
        found = snap.compose.containers[name].state
        draft.add(
            "recreate",
            name,
            "no longer declared",
            "remove",
            expected="absent",
            found=found,
            op=Op.REMOVE,
        )


def orphans(snap: Snapshot, declared: set[str]) -> dict[str, str]:
    """Containers in the compose project that no declared service owns (left by a service
    since disabled, or started by hand with the project's labels): service -> container id.
    Removed by id (``docker rm -f``): compose's ``--remove-orphans`` misses a container it did
    not create itself."""
    return {
        name: snap.compose.containers[name].id
        for name in sorted(set(snap.compose.containers) - declared)
    }


def _short_name(name: str) -> str:
    return f"blob {name[:12]}" if len(name) in (40, 64) and name.isalnum() else name


def replaced_reason(resources: list[str], env_path: str) -> str:
    """Why a service is recreated for what changed under it: its model files or its secrets."""
    # a blob of the Hub cache is named by its hash: shown short, as the fetch change shows it
    files = [_short_name(Path(r).name) for r in resources if r != env_path]
    if files:
        return f"its model file is replaced ({', '.join(files)})"
    return "the secrets it is given from .env changed"


def replaced_under(changes: list[Change]) -> dict[str, list[str]]:
    """Service -> the resources changed under it that recreate it (model files, the .env)."""
    found: dict[str, list[str]] = {}
    for change in changes:
        for name in change.recreates:
            found.setdefault(name, []).append(change.resource)
    return found


def _missing_pulls(svc: Service, snap: Snapshot) -> tuple[str, ...]:
    """An Ollama service's models with no manifest on the host (nothing for other kinds)."""
    if not isinstance(svc, Ollama):
        return ()
    return tuple(
        m for m in svc.models if snap.files.get(known.ollama_manifest(svc.models_dir, m)) is None
    )


def plan_gates(
    draft: PlanDraft, config: HostConfig, snap: Snapshot, control: ControlInputs
) -> tuple[dict[str, int], dict[str, tuple[str, ...]]]:
    """A gate for each service recreated or with models to pull: it must answer in time.

    Returns ``(service -> seconds it is given, service -> models to pull first)``.
    """
    gates, pulls = {}, {}
    recreated = {c.resource for c in draft.changes if c.step == "recreate" and c.op is Op.RECREATE}
    for name, svc in config.enabled_services.items():
        missing = _missing_pulls(svc, snap)
        if name not in recreated and not missing:
            continue
        model_bytes = 0
        if isinstance(svc, LlamaServer | Vllm) and svc.model in control.models:
            model_bytes = control.models[svc.model].total_size
        gates[name] = seconds = gate_seconds(svc, model_bytes)
        what = f"health within {seconds}s"
        if svc.chats:
            what = f"health and a one-token chat within {seconds}s"
        if missing:
            pulls[name] = missing
            what = f"pull {', '.join(missing)}, then {what}"
        why = f"{name} is recreated"
        if name not in recreated:
            why = f"{', '.join(missing)} not pulled into {svc.models_dir}"
        draft.add("gate", name, why, what, expected="answers", op=Op.GATE)
    return gates, pulls
