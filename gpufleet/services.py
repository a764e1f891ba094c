"""Inference services: their schema, and the compose file and llama.cpp Dockerfile they render to.

A group declares ``models`` (name -> Hugging Face files) and ``services`` (name -> service)::

    services = {
        "llama": {"kind": "llama-server", "port": 8000, "model": "gpt-oss-20b", ...},
        "vllm": {"kind": "vllm", "enabled": False, ...},
    }

``parse_services`` turns that data into models and lists every problem as ``(path, message)``,
e.g. ``("services/llama/port", "8000 is already used by vllm")``. Rendering is pure: the same
inputs give byte-identical files, so their hashes decide what changes on a host.

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
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import jinja2
from pydantic import (
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from gpufleet._model import StrictModel as _Model
from gpufleet._model import must_match

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
MODELS_MOUNT = "/models"
HF_CACHE_MOUNT = "/root/.cache/huggingface"
DEFAULT_LLAMA_TARGETS = [
    "llama-server", "llama-cli", "llama-bench", "llama-quantize", "llama-perplexity",
    "llama-embedding", "llama-tokenize", "llama-imatrix",
]  # fmt: skip

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


def _host_path(value: str) -> str:
    if not value.startswith("/") or ":" in value:
        raise ValueError(f"{value!r} is not an absolute host path without ':'")
    return value


def _env_names(value: dict[str, str]) -> dict[str, str]:
    for name, item in value.items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        if "\n" in item:
            raise ValueError(f"{name}: value spans lines")
    return value


class ImageSource(_Model):
    """A service's image and how it reaches the host."""

    ref: str = Field(description="Image reference, e.g. nvcr.io/nvidia/vllm:25.09-py3")
    source: Literal["pull", "build", "transfer"] = Field(
        "pull",
        description='"pull" from a registry; "build" on the host from the service\'s `build`; '
        '"transfer": `docker save` on the control machine streamed into `docker load`',
    )


class LlamaBuild(_Model):
    """How the llama.cpp image is built on a host (multi-stage, as upstream's cuda.Dockerfile).

    The deploy puts the source tree in the build context's ``src/`` (cloned on the host, or
    extracted from an archive sent from the control machine); the Dockerfile builds from there.
    """

    source_git: str | None = Field(
        "https://github.com/ggml-org/llama.cpp", description="Git repository cloned on the host"
    )
    source_ref: str | None = Field(None, description='Pinned tag or commit, e.g. "b7000"')
    source_archive: str | None = Field(
        None, description="A .tar.gz on the control machine, for hosts without internet"
    )
    archive_subdir: str = Field(
        "",
        description='Directory in the archive holding llama.cpp, e.g. "pkg-1.0/vendor/llama.cpp"',
    )
    cuda: bool = Field(True, description="Build the CUDA backend (GGML_CUDA)")
    cuda_version: str = Field("12.8.1", description="CUDA of the nvidia/cuda base images")
    cuda_archs: list[str] = Field(
        [],
        description='CMAKE_CUDA_ARCHITECTURES, e.g. ["121"]; [] builds llama.cpp\'s default list',
    )
    ubuntu_version: str = Field("24.04", description="Ubuntu of the nvidia/cuda base images")
    base_devel: str | None = Field(
        None, description="Build stage image; default nvidia/cuda:<cuda>-devel-ubuntu<ubuntu>"
    )
    base_runtime: str | None = Field(
        None, description="Runtime stage image; default nvidia/cuda:<cuda>-runtime-ubuntu<ubuntu>"
    )
    base_source: Literal["pull", "transfer"] = Field(
        "pull", description='"transfer": send base_devel/base_runtime from the control machine'
    )
    backend_dl: bool = Field(True, description="Backends as .so files loaded at run time")
    cpu_all_variants: bool = Field(
        True, description="Every CPU backend variant (needs backend_dl); off for quick CPU builds"
    )
    targets: list[str] = Field(
        DEFAULT_LLAMA_TARGETS, description="cmake targets built and kept in /app", min_length=1
    )
    cmake_args: list[str] = Field([], description="Extra cmake arguments, after gpufleet's own")

    @model_validator(mode="before")
    @classmethod
    def _archive_replaces_git(cls, data: Any) -> Any:
        # An archive given alone replaces the default git source rather than conflicting with it.
        if isinstance(data, dict) and data.get("source_archive") and "source_git" not in data:
            return {**data, "source_git": None}
        return data

    @field_validator("cuda_version")
    @classmethod
    def _cuda_version(cls, value: str) -> str:
        return must_match(value, r"\d+\.\d+\.\d+", "a full CUDA version like 13.0.1")

    @field_validator("cuda_archs")
    @classmethod
    def _archs(cls, value: list[str]) -> list[str]:
        for arch in value:
            if not re.fullmatch(r"\d{2,3}[af]?(-real|-virtual)?", arch):
                raise ValueError(f"{arch!r} is not a CUDA architecture like 121 or 120a-real")
        return value

    @property
    def devel_image(self) -> str:
        if self.base_devel:
            return self.base_devel
        if self.cuda:
            return f"nvidia/cuda:{self.cuda_version}-devel-ubuntu{self.ubuntu_version}"
        return f"ubuntu:{self.ubuntu_version}"

    @property
    def runtime_image(self) -> str:
        if self.base_runtime:
            return self.base_runtime
        if self.cuda:
            return f"nvidia/cuda:{self.cuda_version}-runtime-ubuntu{self.ubuntu_version}"
        return f"ubuntu:{self.ubuntu_version}"

    def problems(self) -> list[tuple[str, str]]:
        """Rules across fields, as ``(field, message)``."""
        errors = []
        if self.source_git and self.source_archive:
            errors.append(("source_archive", "set either source_git or source_archive, not both"))
        elif not self.source_git and not self.source_archive:
            errors.append(("source_git", "set source_git (with source_ref) or source_archive"))
        elif self.source_git and not self.source_ref:
            errors.append(("source_ref", "required with source_git: a pinned tag like b7000"))
        if self.source_archive and not self.source_archive.endswith((".tar.gz", ".tgz")):
            errors.append(("source_archive", f"{self.source_archive!r} is not a .tar.gz"))
        if "llama-server" not in self.targets:
            errors.append(("targets", "must include llama-server, the image's entrypoint"))
        sub = PurePosixPath(self.archive_subdir)
        if sub.is_absolute() or ".." in sub.parts:
            errors.append(("archive_subdir", f"{self.archive_subdir!r} must be relative, no .."))
        return errors


class _Service(_Model):
    enabled: bool = Field(True, description="Rendered into the compose file and started")
    gpu: Literal["all", "runtime", "none"] = Field(
        "all",
        description='"all": compose GPU reservation (driver nvidia, count all); '
        '"runtime": `runtime: nvidia` (Jetson); "none"',
    )
    env: dict[str, str] = Field({}, description="Plain (non-secret) environment variables")
    start_period: str = Field(
        "10m",
        description="Healthcheck grace while the model loads, e.g. 10m",
        pattern=r"^\d+[smh]$",
    )

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return _env_names(value)


class LlamaServer(_Service):
    """llama.cpp's ``llama-server``, from an image gpufleet builds or a prebuilt one."""

    kind: Literal["llama-server"] = "llama-server"
    port: int = Field(ge=1, le=65535, description="Host and container port")
    model: str = Field(description="A key of the group's `models`; its first file is loaded")
    image: ImageSource = Field(description="The image; source build needs `build`")
    build: LlamaBuild | None = Field(None, description="Required when image.source is build")
    entrypoint: list[str] | None = Field(
        None, description='None keeps the image\'s own (/app/llama-server); ["llama-server"] ...'
    )
    ctx_size: int = Field(ge=0, description="-c; 0 takes the model's own")
    gpu_layers: int | Literal["all", "auto"] = Field(99, description="-ngl")
    jinja: bool | None = Field(
        True, description="--jinja / --no-jinja; None passes neither (builds older than the flag)"
    )
    flash_attn: Literal["on", "off", "auto"] | None = Field(None, description="-fa; None: default")
    metrics: bool = Field(False, description="--metrics (Prometheus /metrics)")
    cont_batching: bool = Field(True, description="False passes -nocb; on by default in llama.cpp")
    threads: int | None = Field(None, ge=1, description="-t")
    parallel: int | None = Field(None, ge=1, description="-np")
    alias: str | None = Field(None, description="--alias, the model id in /v1/models")
    api_key_secret: str | None = Field(
        None, description="Name of a secret in .env; given to llama-server as --api-key-file"
    )
    unified_memory: bool = Field(False, description="GGML_CUDA_ENABLE_UNIFIED_MEMORY=1 (Spark)")
    extra_args: list[str] = Field([], description="Appended to llama-server's arguments")


class Vllm(_Service):
    """vLLM's OpenAI server; downloads ``model_id`` into the mounted Hugging Face cache."""

    kind: Literal["vllm"] = "vllm"
    enabled: bool = False
    port: int = Field(8001, ge=1, le=65535, description="Host and container port")
    model_id: str = Field("Qwen/Qwen3-32B-FP8", description="Hugging Face repository")
    image: ImageSource = ImageSource(ref="nvcr.io/nvidia/vllm:25.09-py3")
    command: list[str] = Field(
        ["vllm", "serve"],
        description="argv before the model id; [] for images whose entrypoint is `vllm serve`",
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int = Field(32000, ge=1)
    max_num_batched_tokens: int = Field(8192, ge=1)
    max_num_seqs: int = Field(32, ge=1)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    hf_cache: str = Field(
        "/opt/gpufleet/huggingface", description=f"Host directory mounted at {HF_CACHE_MOUNT}"
    )
    hf_token_secret: str | None = Field(
        "HF_TOKEN", description="Secret in .env for gated models (HF_TOKEN_PATH); None: public"
    )
    start_period: str = Field("30m", pattern=r"^\d+[smh]$")
    extra_args: list[str] = []

    @field_validator("hf_cache")
    @classmethod
    def _hf_cache(cls, value: str) -> str:
        return _host_path(value)


class Ollama(_Service):
    """Ollama's server with its own model store."""

    kind: Literal["ollama"] = "ollama"
    enabled: bool = False
    port: int = Field(11434, ge=1, le=65535, description="Host and container port")
    image: ImageSource = ImageSource(ref="ollama/ollama:0.12.6")
    keep_alive: str = Field("30m", description="OLLAMA_KEEP_ALIVE")
    models_dir: str = Field("/opt/gpufleet/ollama", description="Host dir mounted at /root/.ollama")
    num_parallel: int | None = Field(None, ge=1, description="OLLAMA_NUM_PARALLEL")
    start_period: str = Field("1m", pattern=r"^\d+[smh]$")

    @field_validator("models_dir")
    @classmethod
    def _models_dir(cls, value: str) -> str:
        return _host_path(value)


Service = Annotated[LlamaServer | Vllm | Ollama, Field(discriminator="kind")]
_SERVICE = TypeAdapter(Service)


# --- validation ----------------------------------------------------------------------------


def parse_services(
    data: dict[str, Any], models: set[str]
) -> tuple[dict[str, Service], list[tuple[str, str]]]:
    """Build services from group data; every problem comes back as ``(path, message)``.

    + data: service name -> its settings (``kind`` chooses the type)
    + models: names declared in the group's ``models``
    """
    services: dict[str, Service] = {}
    errors: list[tuple[str, str]] = []
    for name, raw in data.items():
        try:
            services[name] = _SERVICE.validate_python(raw)
        except ValidationError as exc:
            for err in exc.errors():
                # drop the union tag pydantic puts first ("llama-server", ...)
                loc = [str(p) for p in err["loc"]][1:] if err["type"] != "union_tag_invalid" else []
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    msg = "unknown setting"
                errors.append(("/".join(["services", name, *loc]), msg))
    return services, errors + validate_services(services, models)


def validate_services(services: dict[str, Service], models: set[str]) -> list[tuple[str, str]]:
    """Rules across services: ports, declared models, build sources.

    Two enabled services on one port name the later one (dict order) and the earlier owner:
    ``("services/llama/port", "8000 is already used by vllm")``.
    """
    errors: list[tuple[str, str]] = []
    owners: dict[int, str] = {}
    for name, svc in services.items():
        base = f"services/{name}"
        if not _SERVICE_NAME.fullmatch(name):
            errors.append((base, "not a service name (lower-case letters, digits, '.', '_', '-')"))
        if svc.enabled:
            if svc.port in owners:
                errors.append((f"{base}/port", f"{svc.port} is already used by {owners[svc.port]}"))
            else:
                owners[svc.port] = name
        if not isinstance(svc, LlamaServer):
            continue
        if svc.model not in models:
            declared = ", ".join(sorted(models)) or "(none)"
            errors.append(
                (f"{base}/model", f"{svc.model!r} is not one of the declared models: {declared}")
            )
        if svc.image.source == "build" and svc.build is None:
            errors.append((f"{base}/build", "required when image source is build"))
        if svc.build is not None:
            errors += [(f"{base}/build/{field}", msg) for field, msg in svc.build.problems()]
    return errors


# --- rendering -----------------------------------------------------------------------------


def _compose_quote(value: Any) -> str:
    # JSON strings are YAML strings; "$$" keeps compose from interpolating a literal "$".
    return json.dumps(str(value).replace("$", "$$"))


_jinja = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
_jinja.filters["q"] = _compose_quote
_jinja.filters["json"] = json.dumps


def _secret_name(var: str) -> str:
    return var.lower()


def llama_command(svc: LlamaServer, model_path_in_container: str) -> list[str]:
    """llama-server's arguments; ``--port`` is always explicit (the default moves 8080 -> 9931)."""
    argv = ["--host", "0.0.0.0", "--port", str(svc.port), "-m", model_path_in_container,
            "-c", str(svc.ctx_size), "-ngl", str(svc.gpu_layers)]  # fmt: skip
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


def vllm_command(svc: Vllm) -> list[str]:
    """``vllm serve`` and its flags."""

    def flag(name: str, on: bool) -> str:
        return f"--{name}" if on else f"--no-{name}"

    return [*svc.command, svc.model_id, "--host", "0.0.0.0", "--port", str(svc.port),
            "--gpu-memory-utilization", str(svc.gpu_memory_utilization),
            "--max-model-len", str(svc.max_model_len),
            "--max-num-batched-tokens", str(svc.max_num_batched_tokens),
            "--max-num-seqs", str(svc.max_num_seqs),
            flag("enable-chunked-prefill", svc.enable_chunked_prefill),
            flag("enable-prefix-caching", svc.enable_prefix_caching),
            *svc.extra_args]  # fmt: skip


def _in_container(host_path: str, models_dir: str) -> str:
    try:
        relative = PurePosixPath(host_path).relative_to(models_dir)
    except ValueError:
        raise ValueError(f"model file {host_path} is not under {models_dir}") from None
    return f"{MODELS_MOUNT}/{relative}"


def _curl(port: int, path: str) -> list[str]:
    return ["CMD", "curl", "-fsS", f"http://127.0.0.1:{port}{path}"]


def _spec(name: str, svc: Service, model_paths: dict[str, str], models_dir: str,
          image_ref: str, labels: dict[str, str], hf_endpoint: str | None) -> dict:  # fmt: skip
    env = dict(svc.env)
    volumes: list[str] = []
    secrets: list[str] = []
    entrypoint = command = None
    ipc = None
    if isinstance(svc, LlamaServer):
        if name not in model_paths:
            raise ValueError(f"services/{name}: no model path given for model {svc.model!r}")
        command = llama_command(svc, _in_container(model_paths[name], models_dir))
        entrypoint = svc.entrypoint
        volumes.append(f"{models_dir}:{MODELS_MOUNT}:ro")
        if svc.unified_memory:
            env["GGML_CUDA_ENABLE_UNIFIED_MEMORY"] = "1"
        if svc.api_key_secret:
            secrets.append(svc.api_key_secret)
        health = _curl(svc.port, "/health")
    elif isinstance(svc, Vllm):
        command = vllm_command(svc)
        volumes.append(f"{svc.hf_cache}:{HF_CACHE_MOUNT}")
        if svc.hf_token_secret:
            secrets.append(svc.hf_token_secret)
            env["HF_TOKEN_PATH"] = f"/run/secrets/{_secret_name(svc.hf_token_secret)}"
        if hf_endpoint:
            env.setdefault("HF_ENDPOINT", hf_endpoint)
        ipc = "host"  # PyTorch workers share tensors through /dev/shm
        health = _curl(svc.port, "/health")
    else:
        env |= {"OLLAMA_HOST": f"0.0.0.0:{svc.port}", "OLLAMA_KEEP_ALIVE": svc.keep_alive}
        if svc.num_parallel:
            env["OLLAMA_NUM_PARALLEL"] = str(svc.num_parallel)
        volumes.append(f"{svc.models_dir}:/root/.ollama")
        # the ollama image has no curl; `ollama list` is GET /api/tags on OLLAMA_HOST
        health = ["CMD", "ollama", "list"]
    return {
        "name": name,
        "image": image_ref,
        "pull_policy": None if svc.image.source == "pull" else "never",
        "entrypoint": entrypoint,
        "command": command,
        "environment": sorted(env.items()),
        "ports": [f"{svc.port}:{svc.port}"],
        "volumes": volumes,
        "secrets": [_secret_name(var) for var in secrets],
        "secret_vars": secrets,
        "health": health,
        "start_period": svc.start_period,
        "gpu": svc.gpu,
        "ipc": ipc,
        "labels": sorted(labels.items()),
    }


def render_compose(
    *,
    project: str,
    services: dict[str, Service],
    model_paths: dict[str, str],
    models_dir: str,
    image_refs: dict[str, str] | None = None,
    labels: dict[str, dict[str, str]] | None = None,
    hf_endpoint: str | None = None,
) -> str:
    """The stack's compose file: enabled services only, byte-identical for identical inputs.

    + project: compose project name
    + services: validated services (``parse_services``)
    + model_paths: llama service name -> host path of its model's first file, under models_dir
    + models_dir: host directory mounted read-only at /models
    + image_refs: service name -> image to run (e.g. the tag a build produced); default image.ref
    + labels: service name -> extra labels (e.g. a hash of the service's inputs)
    + hf_endpoint: HF_ENDPOINT for vLLM, for mirrors
    """
    image_refs, labels = image_refs or {}, labels or {}
    specs = [
        _spec(
            name,
            svc,
            model_paths,
            models_dir,
            image_refs.get(name, svc.image.ref),
            labels.get(name, {}),
            hf_endpoint,
        )  # fmt: skip
        for name, svc in services.items()
        if svc.enabled
    ]
    top_secrets = sorted({(_secret_name(v), v) for s in specs for v in s["secret_vars"]})
    return _jinja.get_template("compose.yaml.j2").render(
        project=project, services=specs, secrets=top_secrets
    )


def cmake_flags(build: LlamaBuild) -> list[str]:
    """The cmake configure arguments; ``cmake_args`` come last so they can override."""
    flags = ["-DGGML_NATIVE=OFF", f"-DGGML_BACKEND_DL={'ON' if build.backend_dl else 'OFF'}"]
    if build.backend_dl and build.cpu_all_variants:
        flags.append("-DGGML_CPU_ALL_VARIANTS=ON")
    # No network during the build and no libcurl/libssl in the image: models are local files,
    # and the web UI is not fetched from the Hugging Face "latest" bucket (unreproducible).
    flags += ["-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
              "-DLLAMA_BUILD_TESTS=OFF"]  # fmt: skip
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


def build_inputs(build: LlamaBuild, dockerfile_text: str, source_id: str) -> str:
    """sha256 over everything that decides the image: settings, Dockerfile and source tree.

    Where the source is fetched from on the control machine (``source_archive``'s path) is left
    out: moving the archive rebuilds nothing. Base images count by reference; pin them by
    digest (``image@sha256:...``) to rebuild when a tag moves.

    + source_id: the source tree's identity (git commit, or the archive's sha256)
    """
    payload = {
        "build": build.model_dump(mode="json", exclude={"source_archive"}),
        "dockerfile": dockerfile_text,
        "source": source_id,
    }
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()
