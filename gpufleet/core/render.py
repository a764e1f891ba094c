"""Every file gpufleet writes to a host, rendered: ``.env``, compose file, llama.cpp Dockerfile.

The one home of jinja and of the templates path. Rendering is pure: the same inputs give
byte-identical files, so their hashes decide what changes on a host.

Secrets never enter the compose file, a command line or ``docker compose config`` output: a
service gets them as files under ``/run/secrets`` from compose ``secrets`` whose source is a
variable of the project's ``.env`` (compose reads ``<project dir>/.env`` for that). Attaching the
``.env`` as ``env_file`` would print its values in ``docker compose config``, and compose 2.40's
``config --hash`` leaves ``env_file`` out while the container label includes it, so the two would
never match.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import jinja2

from gpufleet.core import hubcache, known
from gpufleet.core.schema import (
    HF_HOME_MOUNT,
    HUB_TOKEN,
    HostConfig,
    Layout,
    LlamaBuild,
    LlamaServer,
    Ollama,
    Service,
    Vllm,
)
from gpufleet.paths import TEMPLATES

FETCH_SCRIPT = TEMPLATES / "fetch-model.sh"


def _compose_quote(value: Any) -> str:
    # JSON strings are YAML strings; "$$" keeps compose from interpolating a literal "$".
    text = json.dumps(str(value).replace("$", "$$"), ensure_ascii=False)
    # JSON escapes a character past U+FFFF as a surrogate pair, which YAML reads as two invalid
    # characters: escape what is not ASCII the YAML way (the same bytes as JSON's up to U+FFFF)
    return "".join(
        c if c < "\x7f" else f"\\u{ord(c):04x}" if c <= "\uffff" else f"\\U{ord(c):08x}"
        for c in text
    )


_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _yaml_key(name: str) -> str:
    """A name as a YAML key: as it is, or quoted where YAML would read a number, a boolean or
    null (a service "0", a variable "ON", a secret "null")."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name) and name.lower() not in _YAML_WORDS:
        return name
    return _compose_quote(name)


_jinja = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
_jinja.filters["q"] = _compose_quote
_jinja.filters["json"] = json.dumps


def render_env(config: HostConfig, secrets: dict[str, str]) -> str:
    """The stack's ``.env``: plain values and secrets, single-quoted so compose reads them
    literally (no ``$`` expansion, no ``#`` comments).

    Raises ValueError naming group/host/env/NAME for a value compose cannot hold literally.
    """
    values = {**config.env, **secrets}
    for name, value in values.items():
        if re.search(r"[\x00-\x08\x0a-\x1f\x7f']", value):
            raise ValueError(
                f"{config.group}/{config.host}/env/{name}: a value may hold neither a line break "
                "(or another control character) nor a single quote"
            )
    return _jinja.get_template("env.j2").render(group=config.group, values=values)


_SECRET_LINE = "# secret "
_HEADER = re.compile(r"# Managed by gpufleet for the ([a-z0-9][a-z0-9_-]*) group: .*")
_PLAIN_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)='([^'\x00-\x08\x0a-\x1f\x7f]*)'")


def public_env(config: HostConfig) -> str:
    """The ``.env`` as a release keeps it: its header and plain lines as ``render_env`` writes
    them, each secret by name only (``# secret NAME``). Nothing in it is secret, and a rotated
    secret leaves it unchanged: its hash is the release's ``env_sha256``."""
    plain = {k: v for k, v in config.env.items() if k not in config.secrets}
    text = render_env(config.model_copy(update={"env": plain, "secrets": {}}), {})
    return text + "".join(f"{_SECRET_LINE}{name}\n" for name in sorted(config.secrets))


def plain_names(config: HostConfig) -> tuple[str, ...]:
    """The ``.env``'s names that are not secrets."""
    return tuple(sorted(set(config.env) - set(config.secrets)))


def public_env_awk(plain: tuple[str, ...]) -> str:
    """An awk program (and its arguments) that prints a whole ``.env`` as its public part,
    on the host, so no value leaves it: the header, the lines of the ``plain`` names, every
    other line by name only. Only a name declared plain now keeps its value: one that may
    have been a secret never does."""
    program = (
        "NR == 1 && /^# / { print; next } /^#/ { next } "
        '{ i = index($0, "="); if (i < 2) next; n = substr($0, 1, i - 1); '
        'if (index(" " plain " ", " " n " ")) print; else print "# secret " n }'
    )
    return f"awk -v plain={shlex.quote(' '.join(plain))} {shlex.quote(program)}"


def restore_env(public: str, secrets: dict[str, str], *, where: str) -> str:
    """The ``.env`` a release ran, rendered again from its public part (``public_env``, or an
    older release's copy with its values stripped on the host) and today's secret values.

    + public: the kept public part
    + secrets: resolved secret values (the current ones: a rotated key stays rotated)
    + where: the kept file, for messages

    Raises ValueError, one line naming ``where``: a line that is not gpufleet's, or a secret
    whose value gpufleet no longer has.
    """
    lines = public.splitlines()
    header = _HEADER.fullmatch(lines[0]) if lines else None
    if header is None:
        raise ValueError(f"{where} line 1 is not the header gpufleet writes")
    values: dict[str, str] = {}
    for number, line in enumerate(lines[1:], 2):
        if line.startswith(_SECRET_LINE):
            name = line.removeprefix(_SECRET_LINE)
            if name == HUB_TOKEN and name not in secrets:
                continue  # no token now: public models only (resolve_secrets said so)
            if name not in secrets:
                raise ValueError(
                    f"{where}: the release's .env has the secret {name}, which is not among "
                    "the secrets declared now: declare it in secrets to roll back to it"
                )
            values[name] = secrets[name]
        elif match := _PLAIN_LINE.fullmatch(line):
            values[match[1]] = match[2]
        elif line.strip():
            raise ValueError(f"{where} line {number} is not a line gpufleet writes")
    return _jinja.get_template("env.j2").render(group=header[1], values=values)


def _secret_name(var: str) -> str:
    return var.lower()


def _options(values: dict[str, str]) -> list[str]:
    """``{"--port": "8000"}`` -> ``["--port", "8000"]``, in the dict's order."""
    return [word for option in values.items() for word in option]


@dataclass(frozen=True)
class ServedModel:
    """The snapshot a service loads: its repository, the commit resolved, the file first read."""

    repo: str
    commit: str
    file: str

    def path_in_container(self) -> str:
        """llama-server's ``-m``: the snapshot's link, through the read-only Hub cache mount."""
        hub = hubcache.hub_root(HF_HOME_MOUNT)
        return f"{hub}/{hubcache.repo_folder(self.repo)}/snapshots/{self.commit}/{self.file}"


def llama_command(svc: LlamaServer, model_path_in_container: str) -> list[str]:
    """llama-server's arguments; ``--port`` is always explicit (the default moves 8080 -> 9931)."""
    argv = _options(
        {
            "--host": "0.0.0.0",
            "--port": str(svc.port),
            "-m": model_path_in_container,
            "-c": str(svc.ctx_size),
            "-ngl": str(svc.gpu_layers),
        }
    )
    if svc.jinja is not None:
        argv.append("--jinja" if svc.jinja else "--no-jinja")
    if svc.flash_attn:
        argv += ["-fa", svc.flash_attn]
    if svc.metrics:
        argv.append("--metrics")
    if not svc.cont_batching:
        argv.append("-nocb")
    if svc.threads:
        argv += ["-t", str(svc.threads)]
    if svc.parallel:
        argv += ["-np", str(svc.parallel)]
    if svc.alias:
        argv += ["--alias", svc.alias]
    if svc.api_key_secret:
        argv += ["--api-key-file", f"/run/secrets/{_secret_name(svc.api_key_secret)}"]
    return argv + svc.extra_args


def vllm_command(svc: Vllm, model: ServedModel) -> list[str]:
    """``vllm serve <repo> --revision <commit>`` and its flags: the snapshot gpufleet placed."""

    def flag(name: str, on: bool) -> str:
        return f"--{name}" if on else f"--no-{name}"

    options = _options(
        {
            "--host": "0.0.0.0",
            "--port": str(svc.port),
            "--gpu-memory-utilization": str(svc.gpu_memory_utilization),
            "--max-model-len": str(svc.max_model_len),
            "--max-num-batched-tokens": str(svc.max_num_batched_tokens),
            "--max-num-seqs": str(svc.max_num_seqs),
        }
    )
    switches = [
        flag("enable-chunked-prefill", svc.enable_chunked_prefill),
        flag("enable-prefix-caching", svc.enable_prefix_caching),
    ]
    pinned = [model.repo, "--revision", model.commit]
    return [*svc.command, *pinned, *options, *switches, *svc.extra_args]


def _port_address(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _curl(port: int, path: str) -> list[str]:
    return ["CMD", "curl", "-fsS", f"http://127.0.0.1:{port}{path}"]


@dataclass
class _Runtime:
    """What a service's kind puts into its compose service."""

    env: dict[str, str]
    health: list[str]
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    volumes: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)  # the .env variables it is given
    ipc: str | None = None


def _hub_mount(hf_home: str) -> str:
    """The Hub cache, read-only: a server reads verified blobs and never writes the cache."""
    return f"{hf_home}:{HF_HOME_MOUNT}:ro"


def _llama_runtime(svc: LlamaServer, model: ServedModel, hf_home: str) -> _Runtime:
    env = dict(svc.env)
    if svc.unified_memory:
        env["GGML_CUDA_ENABLE_UNIFIED_MEMORY"] = "1"
    return _Runtime(
        env=env,
        health=_curl(svc.port, known.HEALTH_PATHS[svc.kind]),
        command=llama_command(svc, model.path_in_container()),
        entrypoint=svc.entrypoint,
        volumes=[_hub_mount(hf_home)],
        secrets=[svc.api_key_secret] if svc.api_key_secret else [],
    )


# vLLM's own caches (torch.compile, kernels) go here, writable, beside the read-only Hub cache
VLLM_CACHE_MOUNT = "/root/.cache/vllm"


def _vllm_runtime(svc: Vllm, model: ServedModel, hf_home: str, cache_dir: str) -> _Runtime:
    env = {**svc.env, **svc.environment}
    # offline: the model is in the cache already, pinned by --revision; it never asks the Hub
    env |= {"HF_HOME": HF_HOME_MOUNT, "HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": VLLM_CACHE_MOUNT}
    run = _Runtime(
        env=env,
        health=_curl(svc.port, known.HEALTH_PATHS[svc.kind]),
        command=vllm_command(svc, model),
        volumes=[_hub_mount(hf_home), f"{cache_dir}:{VLLM_CACHE_MOUNT}"],
        ipc="host",  # PyTorch workers share tensors through /dev/shm
    )
    if svc.api_key_secret:
        # vLLM reads its key from VLLM_API_KEY: set from the compose secret by a shell, so
        # the key is in no command line, no compose file and no `docker inspect`
        run.secrets.append(svc.api_key_secret)
        key = f"/run/secrets/{_secret_name(svc.api_key_secret)}"
        run.entrypoint = ["/bin/sh", "-c", f'VLLM_API_KEY="$(cat {key})" exec "$@"', "vllm"]
    return run


def _ollama_runtime(svc: Ollama) -> _Runtime:
    env = dict(svc.env)
    env |= {"OLLAMA_HOST": f"0.0.0.0:{svc.port}", "OLLAMA_KEEP_ALIVE": svc.keep_alive}
    if svc.num_parallel:
        env["OLLAMA_NUM_PARALLEL"] = str(svc.num_parallel)
    return _Runtime(
        env=env,
        # the ollama image has no curl; `ollama list` is GET /api/tags on OLLAMA_HOST
        health=["CMD", "ollama", "list"],
        volumes=[f"{svc.models_dir}:/root/.ollama"],
    )


def _spec(
    name: str,
    svc: Service,
    models: dict[str, ServedModel],
    layout: Layout,
    image_ref: str,
    labels: dict[str, str],
) -> dict:
    if isinstance(svc, LlamaServer | Vllm) and name not in models:
        raise ValueError(f"services/{name}: model {svc.model!r} is not resolved")
    if isinstance(svc, LlamaServer):
        run = _llama_runtime(svc, models[name], layout.hf_home)
    elif isinstance(svc, Vllm):
        run = _vllm_runtime(svc, models[name], layout.hf_home, layout.cache_dir(name))
    else:
        run = _ollama_runtime(svc)
    published = f"{svc.port}:{svc.port}"
    if svc.bind != "0.0.0.0":
        published = f"{_port_address(svc.bind)}:{published}"
    return {
        "name": _yaml_key(name),
        "image": image_ref,
        "pull_policy": None if svc.image.source == "pull" else "never",
        "entrypoint": run.entrypoint,
        "command": run.command,
        "environment": [(_yaml_key(k), v) for k, v in sorted(run.env.items())],
        "ports": [published],
        "volumes": run.volumes,
        "secrets": [_yaml_key(_secret_name(var)) for var in run.secrets],
        "secret_vars": run.secrets,
        "health": run.health,
        "start_period": svc.start_period,
        "gpu": svc.gpu,
        "ipc": run.ipc,
        "labels": sorted(labels.items()),
    }


def render_compose(
    *,
    project: str,
    services: dict[str, Service],
    models: dict[str, ServedModel],
    layout: Layout,
    image_refs: dict[str, str] | None = None,
    labels: dict[str, dict[str, str]] | None = None,
) -> str:
    """The stack's compose file: enabled services only, byte-identical for identical inputs.

    + project: compose project name
    + services: validated services (``parse_services``)
    + models: llama-server and vLLM service name -> the snapshot it loads
    + layout: the host's layout (the Hub cache mounted read-only, vLLM's own cache dir)
    + image_refs: service name -> image to run (e.g. the tag a build produced); default image.ref
    + labels: service name -> extra labels (e.g. a hash of the service's inputs)
    """
    image_refs, labels = image_refs or {}, labels or {}
    specs = []
    for name, svc in services.items():
        if not svc.enabled:
            continue
        image_ref, own_labels = image_refs.get(name, svc.image.ref), labels.get(name, {})
        spec = _spec(name, svc, models, layout, image_ref, own_labels)
        specs.append(spec)
    top_secrets = sorted({(_yaml_key(_secret_name(v)), v) for s in specs for v in s["secret_vars"]})
    return _jinja.get_template("compose.yaml.j2").render(
        project=project, services=specs, secrets=top_secrets
    )


# No network during the build and no libcurl/libssl in the image: models are local files,
# and the web UI is not fetched from the Hugging Face "latest" bucket (unreproducible).
OFFLINE_FLAGS = (
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
)


def cmake_flags(build: LlamaBuild) -> list[str]:
    """The cmake configure arguments; ``cmake_args`` come last so they can override."""
    flags = ["-DGGML_NATIVE=OFF", f"-DGGML_BACKEND_DL={'ON' if build.backend_dl else 'OFF'}"]
    if build.backend_dl and build.cpu_all_variants:
        flags.append("-DGGML_CPU_ALL_VARIANTS=ON")
    flags += OFFLINE_FLAGS
    if build.cuda:
        flags.append("-DGGML_CUDA=ON")
        if build.cuda_archs:
            flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(build.cuda_archs)}")
        # as upstream: executables link against libcuda's stub, the driver comes at run time
        flags.append("-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined")
    return flags + build.cmake_args


def source_label(build: LlamaBuild, source_id: str | None = None) -> str:
    """What the image was built from: ``<git url>@<ref>``, or ``sha256:<archive digest>``."""
    if build.source_git:
        return f"{build.source_git}@{build.source_ref}"
    return f"sha256:{source_id}" if source_id else "archive"


def render_dockerfile(build: LlamaBuild, source_id: str | None = None) -> str:
    """The multi-stage llama.cpp Dockerfile; the build context holds the source tree in ``src/``.

    + build: the build settings
    + source_id: the archive's sha256, recorded as the image's source label
    """
    archs = (";".join(build.cuda_archs) or "default") if build.cuda else "none"
    return _jinja.get_template("llama.cpp.Dockerfile.j2").render(
        build=build,
        cmake_flags=shlex.join(cmake_flags(build)),
        targets=shlex.join(build.targets),
        binaries=" ".join(shlex.quote(f"build/bin/{t}") for t in build.targets),
        source=source_label(build, source_id),
        cuda_archs=archs,
    )


def build_inputs(build: LlamaBuild, dockerfile_text: str, source_id: str, *, arch: str) -> str:
    """sha256 over everything that decides the image: settings, Dockerfile, source tree, CPU.

    A build's identity: hosts whose builds have the same inputs can share one image. Where the
    source is fetched from on the control machine (``source_archive``'s path) is left out:
    moving the archive rebuilds nothing. Base images count by reference; pin them by digest
    (``image@sha256:...``) to rebuild when a tag moves.

    + source_id: the source tree's identity (``git@ref``, or the archive's sha256)
    + arch: the CPU architecture it is built on and for, as ``uname -m`` prints it
    """
    payload = {
        "build": build.model_dump(mode="json", exclude={"source_archive"}),
        "dockerfile": dockerfile_text,
        "source": source_id,
        "arch": arch,
    }
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()
