"""Inference services: images built or delivered, one compose file, only changed services
brought up, each then gated on its health endpoint and a one-token chat completion."""

from __future__ import annotations

import functools
import hashlib
import json
import shlex
import time
from io import StringIO
from pathlib import Path
from typing import NamedTuple

from pyinfra import host
from pyinfra.api import FunctionCommand, OperationError, StringCommand, operation
from pyinfra.api.deploy import deploy
from pyinfra.operations import files, server

from deploys.gpu_probe import ensure_image, local_image_id
from deploys.models import PlannedFile, model_path
from facts.compose import ComposeState
from gpufleet import ops
from gpufleet.schema import HostConfig, Image
from gpufleet.services import (
    LlamaServer,
    Ollama,
    build_inputs,
    render_compose,
    render_dockerfile,
)

HEALTH = {"llama-server": "/health", "vllm": "/health", "ollama": "/api/tags"}


def compose_path(config: HostConfig) -> str:
    return f"{config.layout.stack_dir}/compose.yaml"


def project(config: HostConfig) -> str:
    return f"gpufleet-{config.group}"


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


class Build(NamedTuple):
    dockerfile: str
    inputs: str
    archive: str | None


@functools.cache
def _archive_sha(path: str, mtime_ns: int, size: int) -> str:
    """sha256 of a source archive, once per run whatever the number of hosts building it."""
    return _sha(Path(path).read_bytes())


@functools.cache
def _local_image_id(ref: str) -> str:
    return local_image_id(ref) or "absent"


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


class Plan:
    """What the services need, decided from facts read once: builds, images, compose text."""

    def __init__(self, config: HostConfig, secrets: dict[str, str], models: list[PlannedFile]):
        self.enabled = {n: s for n, s in config.services.items() if s.enabled}
        self.builds: dict[str, Build] = {}
        identity: dict[str, str] = {}
        for name, svc in self.enabled.items():
            if svc.image.source == "build":
                build = svc.build
                archive = build.source_archive
                if archive:
                    stat = Path(archive).stat()
                    source_id = _archive_sha(archive, stat.st_mtime_ns, stat.st_size)
                else:
                    source_id = f"{build.source_git}@{build.source_ref}"
                dockerfile = render_dockerfile(build, source_id)
                inputs = build_inputs(build, dockerfile, source_id)
                self.builds[name] = Build(dockerfile, inputs, archive)
                identity[name] = inputs
            elif svc.image.source == "transfer":
                identity[name] = _local_image_id(svc.image.ref)
            else:
                identity[name] = svc.image.ref
        shas = {f.dest: f.sha256 for f in models}
        env_digest = _sha(
            json.dumps(sorted(secrets.items())) + json.dumps(sorted(config.env.items()))
        )
        self.labels: dict[str, dict[str, str]] = {}
        self.model_paths: dict[str, str] = {}
        for name, svc in self.enabled.items():
            model_files = []
            if isinstance(svc, LlamaServer):
                self.model_paths[name] = model_path(config, svc.model)
                prefix = f"{config.layout.models_dir}/{svc.model}/"
                model_files = sorted((d, s) for d, s in shas.items() if d.startswith(prefix))
            # Everything that should recreate the service when it changes, as one label: compose
            # compares its config hash (which includes labels) with the running container's.
            self.labels[name] = {"gpufleet.inputs": _sha(json.dumps(
                [svc.model_dump(mode="json"), identity[name], model_files, env_digest]
            ))}  # fmt: skip
        self.compose = render_compose(
            project=project(config),
            services=self.enabled,
            model_paths=self.model_paths,
            models_dir=config.layout.models_dir,
            labels=self.labels,
            hf_endpoint=config.hf_endpoint,
        )

    def stale(self, state: dict) -> list[str]:
        """Services whose container is missing, stopped or made from other inputs."""
        out = []
        for name in self.enabled:
            container = state["containers"].get(name)
            if (
                not container
                or container["state"] != "running"
                or container["inputs"] != self.labels[name]["gpufleet.inputs"]
            ):
                out.append(name)
        return out


def _build(config: HostConfig, name: str, ref: str, dockerfile: str, inputs: str, archive):
    svc = config.services[name]
    context = f"{config.layout.stack_dir}/build/{name}"
    if svc.build.base_source == "transfer":
        for base in (svc.build.devel_image, svc.build.runtime_image):
            ensure_image(Image(ref=base, source="transfer"), name=f"Base image {base}")
    files.directory(name=f"Build context for {name}", path=context)
    if archive:
        files.put(name=f"llama.cpp source for {name}", src=archive, dest=f"{context}/source.tar.gz")
        subdir = svc.build.archive_subdir.strip("/")
        tree = shlex.quote(f"src.tmp/{subdir}" if subdir else "src.tmp")
        unpack = (
            f"cd {shlex.quote(context)} && rm -rf src src.tmp && mkdir src.tmp && "
            f"tar -xzf source.tar.gz -C src.tmp && mv {tree} src && rm -rf src.tmp"
        )
    else:
        unpack = (
            f"cd {shlex.quote(context)} && rm -rf src && git clone --depth 1 --branch "
            f"{shlex.quote(svc.build.source_ref)} {shlex.quote(svc.build.source_git)} src"
        )
    server.shell(name=f"Unpack llama.cpp source for {name}", commands=[unpack])
    files.put(name=f"Dockerfile for {name}", src=StringIO(dockerfile), dest=f"{context}/Dockerfile")
    server.shell(
        name=f"Build {ref} (llama.cpp from source)",
        commands=[
            # The classic builder: present on every engine from 20.10 on, with or without the
            # buildx plugin (Debian's docker.io has none).
            f"cd {shlex.quote(context)} && DOCKER_BUILDKIT=0 docker build -q -t {shlex.quote(ref)} "
            f"--label gpufleet.inputs={inputs} . && rm -rf src source.tar.gz"
        ],
    )


def _gate(state, host, *, stack: str, compose_project: str, service: str, kind: str, port: int,
          timeout: int, secrets: tuple[ops.Secret, ...]) -> None:  # fmt: skip
    """Wait for the health endpoint (503 while loading), then ask for one token."""
    sudo = bool(host.data.get("_sudo") or state.config.SUDO)

    def run(command: str) -> tuple[bool, str]:
        ok, output = host.run_shell_command(StringCommand(command), _sudo=sudo)
        return ok, "\n".join(output.stdout_lines + output.stderr_lines)

    def fail(why: str) -> None:
        _, logs = run(f"cd {stack} && docker compose -p {compose_project} logs --no-color "
                      f"--tail 20 {service}")  # fmt: skip
        for secret in secrets:
            logs = logs.replace(secret.reveal(), "<secret>")
        raise OperationError(f"{service} {why}; its last log lines:\n{logs}")

    url = f"http://127.0.0.1:{port}"
    deadline, code = time.monotonic() + timeout, ""
    while True:
        _, code = run(f"curl -s -o /dev/null -w '%{{http_code}}' {url}{HEALTH[kind]}")
        if code.strip() == "200":
            break
        if time.monotonic() > deadline:
            fail(f"is not healthy after {timeout}s (last HTTP status {code.strip() or 'none'})")
        time.sleep(1)
    if kind == "ollama":
        return
    body = json.dumps({"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1})
    ok, answer = run(
        f"curl -s -f -H 'Content-Type: application/json' -d {shlex.quote(body)} "
        f"{url}/v1/chat/completions"
    )
    if not ok or '"choices"' not in answer:
        fail(f"is healthy but a one-token chat completion failed: {answer[-300:]}")


@operation(is_idempotent=False, idempotent_notice="Runs only when services were brought up")
def health_gate(
    *, stack: str, compose_project: str, service: str, kind: str, port: int, timeout: int,
    secrets: tuple[ops.Secret, ...] = (),
):  # fmt: skip
    """Gate a service on its health endpoint and a one-token chat completion.

    + service/kind/port: the compose service, its kind and published port
    + timeout: seconds to wait for health (llama-server answers 503 while loading)
    + secrets: values masked in the log tail a failure shows
    """
    yield FunctionCommand(
        _gate, (), dict(stack=stack, compose_project=compose_project, service=service, kind=kind,
                        port=port, timeout=timeout, secrets=secrets),
    )  # fmt: skip


@deploy("Inference services")
def services(config: HostConfig, secrets: dict[str, str], plan: Plan, current: dict):
    """Build or deliver images, write the compose file, bring up what changed, gate it.

    + config: validated host config (``services``)
    + secrets: resolved secret values (masked in failure output)
    + plan: ``Plan`` for this host
    + current: ``facts.managed.ManagedFiles`` of the managed paths
    """
    stack = config.layout.stack_dir
    if not plan.enabled and current.get(compose_path(config)) is None:
        return  # no services here, and none were ever brought up
    state = host.get_fact(
        ComposeState,
        project=project(config),
        images=[svc.image.ref for svc in plan.enabled.values()],
    )
    built = []
    for name, (dockerfile, inputs, archive) in plan.builds.items():
        ref = plan.enabled[name].image.ref
        if (state["images"].get(ref) or {}).get("inputs") != inputs:
            _build(config, name, ref, dockerfile, inputs, archive)
            built.append(name)
    for name, svc in plan.enabled.items():
        if svc.image.source != "build":
            ensure_image(
                Image(ref=svc.image.ref, source=svc.image.source),
                name=f"Image for {name}: {svc.image.ref}",
                present_id=(state["images"].get(svc.image.ref) or {}).get("id"),
            )
        if isinstance(svc, Ollama):
            files.directory(name=f"Ollama models for {name}", path=svc.models_dir)
    path = compose_path(config)
    compose_changed = (current.get(path) or {}).get("sha256") != _sha(plan.compose)
    if compose_changed:
        files.put(name="Compose file", src=StringIO(plan.compose), dest=path, mode="644")
    stale = plan.stale(state)
    if not (compose_changed or stale or built):
        return
    server.shell(
        name="Bring up changed services (docker compose up)",
        commands=[
            f"cd {shlex.quote(stack)} && docker compose -p {project(config)} config -q && "
            f"docker compose -p {project(config)} up -d --remove-orphans --no-build"
        ],
    )
    masked = tuple(ops.Secret(v) for v in secrets.values())
    for name in sorted(set(stale) | set(built)):
        svc = plan.enabled[name]
        health_gate(
            name=f"Health gate: {name} ({svc.kind} on :{svc.port})",
            stack=stack,
            compose_project=project(config),
            service=name,
            kind=svc.kind,
            port=svc.port,
            timeout=min(_seconds(svc.start_period), 1800),
            secrets=masked,
        )
