"""Inference services: images built or delivered, one compose file, only changed services
brought up, each then gated on its health endpoint and a one-token chat completion."""

from __future__ import annotations

import re
import shlex
from io import StringIO

from pyinfra.api.deploy import deploy
from pyinfra.api.exceptions import DeployError
from pyinfra.operations import files, server

from deploys.release import release_dir
from gpufleet.core.schema import HostConfig, Timeouts
from gpufleet.core.wire import Op
from gpufleet.ops import operations as ops
from gpufleet.plan.restore import kept_tag
from gpufleet.plan.types import BuildPlan, HostPlan


def _build(plan: BuildPlan, timeouts: Timeouts) -> None:
    build = plan.build
    context = plan.context
    files.directory(name=f"Build context for {plan.service}", path=context)
    if build.source_archive:
        files.put(
            name=f"llama.cpp source for {plan.service}",
            src=build.source_archive,
            dest=f"{context}/source.tar.gz",
        )
        subdir = build.archive_subdir.strip("/")
        tree = shlex.quote(f"src.tmp/{subdir}" if subdir else "src.tmp")
        unpack = (
            f"cd {shlex.quote(context)} && rm -rf src src.tmp && mkdir src.tmp && "
            f"tar -xzf source.tar.gz -C src.tmp && mv {tree} src && rm -rf src.tmp"
        )
    else:
        unpack = (
            f"cd {shlex.quote(context)} && rm -rf src && git clone --depth 1 --branch "
            f"{shlex.quote(build.source_ref or '')} {shlex.quote(build.source_git or '')} src"
        )
    server.shell(
        name=f"Unpack llama.cpp source for {plan.service}",
        commands=[unpack],
        _timeout=timeouts.transfer_seconds,  # a git clone, or an archive unpacked
    )
    files.put(
        name=f"Dockerfile for {plan.service}",
        src=StringIO(plan.dockerfile),
        dest=f"{context}/Dockerfile",
    )


GATE_SLACK_SECONDS = 120


def remove_command(ids) -> str:
    """``docker rm -f`` of exactly these containers, by id (checked: hex digits only)."""
    ids = list(ids)
    for cid in ids:
        if not re.fullmatch(r"[0-9a-f]{12,64}", cid):
            raise DeployError(f"not a container id: {cid[:70]!r}")
    return "docker rm -f -- " + " ".join(ids)


def _images(plan: HostPlan, timeouts: Timeouts) -> None:
    """Each image the services run: pulled, received or made, or a kept one retagged."""
    for change in plan.of("image"):
        if change.op is Op.RETAG:  # a rollback: the image the release ran, kept by a tag
            service = next(
                n for n, s in plan.release.services.items() if s.image == change.resource
            )
            tag = kept_tag(service, plan.release.id)
            retag = f"docker tag {shlex.quote(tag)} {shlex.quote(change.resource)}"
            server.shell(name=f"Image {change.resource} (kept for the release)", commands=[retag])
            continue
        # the services that run it: their images' binaries are checked on arrival
        checks = tuple(c for c in plan.image_checks.values() if c.ref == change.resource)
        ops.image(
            name=f"Image {change.resource}",
            ref=change.resource,
            source=change.op.value,
            checks=checks,
            _timeout=timeouts.transfer_seconds,
        )


def _restore_dockerfile(config: HostConfig, plan: HostPlan, resource: str) -> None:
    """A rollback: the Dockerfile the kept image came from, copied from the release."""
    service = next(
        n
        for n in plan.release.services
        if resource == f"{config.layout.build_context(n)}/Dockerfile"
    )
    source = shlex.quote(f"{release_dir(plan)}/build/{service}/Dockerfile")
    context = shlex.quote(resource.rsplit("/", 1)[0])
    server.shell(
        name=f"Dockerfile for {service} (from the release)",
        commands=[f"mkdir -p {context} && cp {source} {shlex.quote(resource)}"],
    )


def _build_contexts(config: HostConfig, plan: HostPlan) -> None:
    """Each build context: source tree and Dockerfile, or the Dockerfile alone."""
    by_context = {f"{b.context}/Dockerfile": b for b in plan.builds.values()}
    for change in plan.of("build"):
        build = plan.builds.get(change.resource)
        if change.op is Op.RESTORE:
            _restore_dockerfile(config, plan, change.resource)
        elif build and not build.receive_from:
            _build(build, config.timeouts)  # the context: source tree and Dockerfile
        elif build:  # received: the context keeps the Dockerfile the image was built from
            files.directory(name=f"Build context for {build.service}", path=build.context)
            files.put(
                name=f"Dockerfile for {build.service} (as built elsewhere)",
                src=StringIO(build.dockerfile),
                dest=f"{build.context}/Dockerfile",
            )
        elif change.resource in by_context:
            built = by_context[change.resource]
            files.put(
                name=f"Dockerfile for {built.service}",
                src=StringIO(built.dockerfile),
                dest=change.resource,
            )


def _build_images(plan: HostPlan, timeouts: Timeouts) -> None:
    """Each image built here or received from the host that builds it."""
    for change in plan.of("build"):
        build = plan.builds.get(change.resource)
        if build:
            # One call site for building and receiving: pyinfra runs it as one operation on
            # every host at once, and the hosts receiving the image wait for the one building.
            how = f"receive from {build.receive_from}" if build.receive_from else "from source"
            # A CUDA image is labelled with what its binary holds, then checked against this
            # host's GPUs: a mismatch fails the host here, before compose starts it.
            ops.build_image(
                name=f"Build {build.ref} (llama.cpp {how})",
                context=build.context,
                ref=build.ref,
                inputs=build.inputs,
                receive_from=build.receive_from,
                builder_ref=build.receive_ref,
                wait=build.source_builds,
                cuda=build.build.cuda,
                check=plan.image_checks.get(build.service),
                # a receiver waits for its builder, then loads: the build's bound, and a send's
                _timeout=timeouts.build_seconds + timeouts.transfer_seconds,
            )


def _compose_file(config: HostConfig, plan: HostPlan) -> None:
    """The compose file: rendered, or the release's copy on a rollback."""
    for change in plan.of("compose"):
        if change.op is Op.RESTORE:
            kept = shlex.quote(f"{release_dir(plan)}/compose.yaml")
            install = f"install -m 644 {kept} {shlex.quote(change.resource)}"
            server.shell(name="Compose file (from the release)", commands=[install])
        else:
            files.put(
                name="Compose file",
                src=StringIO(plan.compose),
                dest=config.layout.compose_path,
                mode="644",
            )


def _bring_up(config: HostConfig, plan: HostPlan) -> None:
    """Containers no service declares removed; changed services recreated."""
    removed = [c for c in plan.of("recreate") if c.op is Op.REMOVE]
    if removed:
        server.shell(
            name=f"Remove containers no service declares: {', '.join(plan.orphans)}",
            commands=[remove_command(plan.orphans[c.resource] for c in removed)],
        )
    if plan.of("recreate") or plan.of("compose"):
        up = ops.compose_up_command(config.layout.stack_dir, config.project, plan.recreated)
        server.shell(
            name="Bring up changed services (docker compose up)",
            commands=[up],
            _timeout=config.timeouts.transfer_seconds,  # compose pulls what is not there
        )


def _gates(config: HostConfig, secrets: dict[str, str], plan: HostPlan) -> None:
    """Each recreated service gated on its health endpoint and a one-token chat."""
    masked = tuple(ops.Secret(v) for v in secrets.values())
    for change in plan.of("gate"):
        name, svc = change.resource, config.services[change.resource]
        spec = ops.GateSpec(
            stack=config.layout.stack_dir,
            compose_project=config.project,
            service=name,
            kind=svc.kind,
            port=svc.port,
            timeout=plan.gate_seconds[name],
            secrets=masked,
            address=svc.probe_address,
            key_var=getattr(svc, "api_key_secret", None),
            chat=svc.chats,
            model=config.chat_model(name),
            pulls=plan.pulls.get(name, ()),
        )
        ops.health_gate(
            name=f"Health gate: {name} ({svc.kind} on :{svc.port})",
            spec=spec,
            _timeout=spec.timeout + GATE_SLACK_SECONDS,  # its own wait, then its log tail
        )


@deploy("Inference services")
def services(config: HostConfig, secrets: dict[str, str], plan: HostPlan):
    """Build or deliver images, write the compose file, recreate what changed, gate it.

    + config: validated host config (``services``)
    + secrets: resolved secret values (masked in failure output)
    + plan: the host's plan (its ``image``, ``build``, ``compose``, ``recreate`` and ``gate``
      changes)
    """
    _images(plan, config.timeouts)
    _build_contexts(config, plan)
    _build_images(plan, config.timeouts)
    _compose_file(config, plan)
    _bring_up(config, plan)
    _gates(config, secrets, plan)
