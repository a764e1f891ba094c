"""The schema of host data: one pydantic model, nested by subsystem, parsed before any change.

pyinfra merges data shallowly (host data replaces a group's value for the same key), so group
data uses flat, prefixed keys that can each be overridden alone, from an inventory or with
``--data toolkit_version=1.17.8-1``:

    gpu_min_cuda = "13.0"          -> config.gpu.min_cuda
    toolkit_version = "1.18.0-1"   -> config.toolkit.version
    docker_engine_packages = [...] -> config.docker.engine_packages

A key with a known prefix that the schema does not have is an error (a misspelt key would
otherwise be ignored silently). Errors name the group, the host and the field::

    spark/sandbox-spark/toolkit/version: '1.18' is not a full package version like 1.18.0-1
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import string
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from packaging.version import InvalidVersion, Version
from pydantic import (
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from gpufleet.core.cuda import cuda_arch_for_compute_cap, min_driver_for_cuda
from gpufleet.core.hubcache import hub_root
from gpufleet.core.model import StrictModel as _Model
from gpufleet.core.model import must_match
from gpufleet.core.slo import BenchExpectations

GROUPS = ("spark", "rtx5090", "jetson")


class ConfigError(ValueError):
    """Host data that cannot be deployed; each line names group/host/field."""


# what a host path may hold: it reaches root shells, so nothing a shell reads as syntax (quotes,
# $, `, ;, &, |, <, >, (, ), *, ?, [, ~, #, !, \, spaces) even where it is quoted
_PATH_CHARS = re.compile(r"[A-Za-z0-9/._+,@%=-]*")


def _host_path(value: str) -> str:
    if not value.startswith("/") or ".." in PurePosixPath(value).parts:
        raise ValueError(f"{value!r} is not an absolute host path (no '..')")
    if not _PATH_CHARS.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a host path gpufleet can hand to a shell: use letters, digits "
            "and / . _ + , @ % = - only"
        )
    return value


def _host_dir(value: str) -> str:
    """A directory gpufleet owns (and may prune): absolute, not the root, written one way."""
    _host_path(value)
    if value == "/" or value.endswith("/") or "//" in value:
        raise ValueError(f"{value!r} is not a directory like /opt/gpufleet (not /, no '//')")
    return value


def _url(value: str, *, file: bool = False) -> str:
    """``value`` if it is an http(s) URL (or, with ``file``, a ``file:`` one apt can read)
    that carries no credentials."""
    if m := re.fullmatch(r"(https?://)([^\s/?#]*)@(\S*)", value):
        # shown without them: a user:password reaches a host's process list (curl's argv),
        # a world-readable apt list or a compose file, and this very error message
        raise ValueError(
            f"{m[1]}<credentials>@{m[3]} holds credentials: give the URL without them (a "
            "mirror's token goes in secrets as HF_TOKEN; apt's in /etc/apt/auth.conf.d)"
        )
    pattern = r"https?://[^\s/?#]+\S*" + (r"|file:/\S*" if file else "")
    if not re.fullmatch(pattern, value):
        expected = "an http(s) or file: URL" if file else "an http(s) URL"
        raise ValueError(f"{value!r} is not {expected}")
    return value


# a Docker image reference, as `docker pull` reads it (distribution/reference's grammar)
_IMAGE_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_IMAGE_HOST = rf"(?:{_IMAGE_LABEL}(?:\.{_IMAGE_LABEL})*|\[[0-9A-Fa-f:]+\])(?::\d+)?"
IMAGE_RE = re.compile(
    rf"(?:{_IMAGE_HOST}/)?{_IMAGE_PART}(?:/{_IMAGE_PART})*(?::\w[\w.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)


def _image_ref(value: str) -> str:
    if not IMAGE_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not an image reference like nvcr.io/nvidia/vllm:25.09-py3")
    return value


def _printable(value: str) -> str:
    return value if value.isprintable() else repr(value)


def _shown(key: Any) -> str:
    """A name from host data as one part of an error's path: as it is, or quoted if it is
    empty, holds a '/' or a character that does not print."""
    if isinstance(key, str) and key.isprintable() and key and "/" not in key:
        return key
    return repr(key)


class Toolkit(_Model):
    """NVIDIA Container Toolkit: where it comes from and how Docker is wired to it."""

    version: str = Field(
        "1.18.0-1", description="Package version for all four toolkit packages, e.g. 1.18.0-1"
    )
    repo_url: str = Field(
        "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH)",
        description="apt repository (flat, as NVIDIA publishes it); $(ARCH) is apt's own",
    )
    key_url: str = Field(
        "https://nvidia.github.io/libnvidia-container/gpgkey",
        description="ASCII-armored signing key; stored dearmored as the keyring",
    )
    keyring: str = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
    list_path: str = "/etc/apt/sources.list.d/nvidia-container-toolkit.list"
    set_default_runtime: bool = Field(False, description='Make "nvidia" Docker\'s default runtime')
    cdi: bool = Field(False, description="Enable CDI in Docker and keep /etc/cdi/nvidia.yaml fresh")

    @field_validator("version")
    @classmethod
    def _full_version(cls, value: str) -> str:
        return must_match(
            value, r"\d+\.\d+\.\d+(~rc\.\d+)?-\d+", "a full package version like 1.18.0-1"
        )

    @field_validator("repo_url", "key_url")
    @classmethod
    def _urls(cls, value: str) -> str:
        return _url(value, file=True)

    @field_validator("keyring", "list_path")
    @classmethod
    def _paths(cls, value: str) -> str:
        return _host_path(value)


class Docker(_Model):
    """The Docker engine and its Compose v2 plugin, for hosts that have none."""

    engine_packages: list[str] = Field(
        ["docker-ce", "docker-ce-cli", "containerd.io"],
        description="Packages that provide the engine (Docker's repo) or ['docker.io'] (distro)",
    )
    compose_packages: list[str] = ["docker-compose-plugin"]
    repo_url: str | None = Field(
        "https://download.docker.com/linux/{os_id}",
        description="Docker's apt repository; None uses only the distribution's packages",
    )
    repo_dist: str = Field(
        "{codename} stable", description='Suite and components; "/" for a flat repository'
    )
    key_url: str = "https://download.docker.com/linux/{os_id}/gpg"
    keyring: str = "/etc/apt/keyrings/docker.gpg"
    version: str | None = Field(
        None, description="Engine package version; None keeps whatever engine a host has"
    )

    @field_validator("engine_packages", "compose_packages")
    @classmethod
    def _packages(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value and info.field_name == "engine_packages":
            raise ValueError("lists no package: the engine's package comes first")
        for name in value:
            must_match(name, r"[a-z0-9][a-z0-9+.-]*", "a Debian package name like docker-ce")
        return value

    @field_validator("repo_url", "key_url", "repo_dist")
    @classmethod
    def _placeholders(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError:
            names = {"{"}
        if names - {"os_id", "codename"}:
            raise ValueError(f"{value!r} may hold only the placeholders {{os_id}} and {{codename}}")
        return value if info.field_name == "repo_dist" else _url(value, file=True)

    @field_validator("keyring")
    @classmethod
    def _keyring(cls, value: str) -> str:
        return _host_path(value)


class Layout(_Model):
    """Where the inference stack lives on a host."""

    stack_dir: str = "/opt/gpufleet"
    hf_home: str = Field(
        "/opt/gpufleet/huggingface",
        description="HF_HOME: every model lives in its Hub cache (<it>/hub), in huggingface_hub's "
        "layout, mounted read-only into llama-server and vLLM",
    )
    models_dir: str = Field(
        "/opt/gpufleet/models",
        description="Where gpufleet kept models before the Hub cache: a verified file found "
        "here is moved into the cache (no download)",
    )
    models_owner: str = "root"
    models_group: str = "root"
    models_mode: str = "0755"

    @field_validator("models_mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        return must_match(value, r"0?[0-7]{3}", "an octal mode like 0755")

    @field_validator("models_owner", "models_group")
    @classmethod
    def _owner(cls, value: str) -> str:
        return must_match(value, r"[a-z_][a-z0-9_-]*\$?|[0-9]+", "a user or group name like root")

    @field_validator("stack_dir", "models_dir", "hf_home")
    @classmethod
    def _dirs(cls, value: str) -> str:
        return _host_dir(value)

    @property
    def hub(self) -> str:
        """``HF_HUB_CACHE``: the Hub cache under ``hf_home``."""
        return hub_root(self.hf_home)

    @property
    def env_path(self) -> str:
        return f"{self.stack_dir}/.env"

    @property
    def compose_path(self) -> str:
        return f"{self.stack_dir}/compose.yaml"

    def build_context(self, service: str) -> str:
        return f"{self.stack_dir}/build/{service}"

    def cache_dir(self, service: str) -> str:
        """A service's own writable cache (vLLM's compile cache), kept across recreates."""
        return f"{self.stack_dir}/cache/{service}"


class Image(_Model):
    """A container image and how it reaches a host: pulled, or sent from the control machine."""

    ref: str
    source: Literal["pull", "transfer"] = "pull"

    @field_validator("ref")
    @classmethod
    def _ref(cls, value: str) -> str:
        return _image_ref(value)


class Probe(_Model):
    """The GPU probe run after setup: a container with the group's GPU request must exit 0."""

    image: Image = Image(ref="nvidia/cuda:12.8.1-base-ubuntu24.04")
    command: list[str] = ["nvidia-smi", "-L"]
    gpu_request: Literal["gpus", "runtime"] = Field(
        "gpus", description='"gpus" runs with --gpus all; "runtime" with --runtime nvidia'
    )


# --- the GPU gate's requirements ---------------------------------------------------


class GpuRequirements(_Model):
    """
    What a host group needs from the NVIDIA stack; the ``gpu`` part of group data.

    .. code:: python

        GpuRequirements(min_cuda="13.0", compute_caps=["12.1"], arch="aarch64", unified_memory=True)
    """

    min_driver: str | None = Field(
        None, description="Minimum NVIDIA driver for the group, e.g. 580.95.05."
    )
    driver_floor: str | None = Field(
        "570",
        description="Fleet-wide minimum NVIDIA driver; None where no discrete driver applies "
        "(Jetson).",
    )
    min_cuda: str | None = Field(
        None,
        description="Minimum CUDA the driver (on Jetson: the installed toolkit) must support; "
        "also implies a driver minimum from the CUDA 13.1 release notes table.",
    )
    min_l4t: str | None = Field(
        None,
        description="Minimum Jetson L4T release, e.g. 36.4; set for Jetson groups, where it "
        "replaces the driver check.",
    )
    compute_caps: list[str] = Field(
        default_factory=list,
        description="Accepted GPU compute capabilities, e.g. ['12.1']; empty accepts any.",
    )
    arch: Literal["x86_64", "aarch64"] | None = Field(
        None, description="Required CPU architecture, as `uname -m` prints it."
    )
    unified_memory: bool = Field(
        False,
        description="GPU and CPU share host memory (DGX Spark, Jetson): models are sized "
        "against MemTotal rather than GPU memory.",
    )
    kv_allowance_gib: float = Field(
        2.0, ge=0, description="Memory to keep free beside the model files (KV cache, runtime)."
    )

    @field_validator("min_driver", "driver_floor", "min_cuda", "min_l4t")
    @classmethod
    def _is_version(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                Version(value)
            except InvalidVersion:
                raise ValueError(f"{_printable(value)} is not a version") from None
            if value != value.strip():
                raise ValueError(f"{value!r} is not a version (spaces around it)")
        return value

    @field_validator("min_cuda")
    @classmethod
    def _cuda_in_table(cls, value: str | None) -> str | None:
        if value is not None:
            min_driver_for_cuda(value)
        return value

    @field_validator("compute_caps")
    @classmethod
    def _are_compute_caps(cls, value: list[str]) -> list[str]:
        for cc in value:
            if not re.fullmatch(r"\d+\.\d", cc):
                raise ValueError(f"{_printable(cc)} is not a compute capability (like 12.1)")
            cuda_arch_for_compute_cap(cc)
        return value

    @model_validator(mode="after")
    def _driver_covers_cuda(self) -> GpuRequirements:
        if self.min_driver is not None and self.min_cuda is not None:
            needed = min_driver_for_cuda(self.min_cuda)
            if Version(self.min_driver) < needed:
                raise ValueError(
                    f"min_driver: {self.min_driver} is below {needed}, "
                    f"the minimum NVIDIA driver for CUDA {self.min_cuda}"
                )
        return self


# --- models ---------------------------------------------------------------------------


REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
SHA1_RE = re.compile(r"[0-9a-f]{40}")


class ModelSpec(_Model):
    """One model as group data declares it."""

    repo: str = Field(description='Hub repository, "org/name"')
    revision: str = Field(
        "main",
        description="Branch, tag or 40-hex commit sha; a sha pins the model (and is cached)",
    )
    patterns: list[str] = Field(
        [],
        description="Also every file matching one of these, as `hf download --include` does"
        ' (fnmatch: ["*.json", "*.safetensors", "tokenizer*"]); each must match a file',
    )
    files: list[str] = Field(
        [],
        validate_default=True,  # absent, with no patterns: nothing to fetch, said at its path
        description="Paths inside the repo; split GGUF parts in order, the first is what a"
        " server loads",
    )
    size_bytes: int | None = Field(
        None,
        gt=0,
        description="Declared total size, so the memory/disk fit check runs before any lookup;"
        " None: known only once resolved",
    )
    gated: bool = Field(False, description="Informational: the repo needs HF_TOKEN")

    @field_validator("repo")
    @classmethod
    def _repo(cls, value: str) -> str:
        if not REPO_RE.fullmatch(value) or ".." in value or "--" in value:
            raise ValueError(f"{value!r} is not a Hub repository like org/name")
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str) -> str:
        if not value or re.search(r"[\s\\~^:?*\[]|\.\.|^/|/$", value):
            raise ValueError(f"{value!r} is not a branch, tag or commit sha")
        return value

    @field_validator("files")
    @classmethod
    def _files(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value and "patterns" in info.data and not info.data["patterns"]:
            # named here (patterns are read first): the path points at what is missing
            raise ValueError("give files, patterns or both: nothing would be fetched")
        for path in value:
            parts = PurePosixPath(path).parts
            if (
                not parts
                or path.startswith("/")
                or path.endswith("/")
                or path == "."
                or "\\" in path
                or ".." in parts
                or re.search(r"[\x00-\x1f\x7f]", path)
            ):
                raise ValueError(f"{path!r} is not a path inside the repository")
        if len(set(value)) != len(value):
            raise ValueError("files are listed more than once")
        return value

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern.strip() or re.search(r"[\x00-\x1f\x7f]", pattern):
                raise ValueError(f"{pattern!r} is not a file pattern like *.json")
        if len(set(value)) != len(value):
            raise ValueError("patterns are listed more than once")
        return value

    @property
    def pinned(self) -> bool:
        """True when ``revision`` is a commit sha: the files cannot change."""
        return bool(SHA1_RE.fullmatch(self.revision))


# --- services -------------------------------------------------------------------------


HF_HOME_MOUNT = "/root/.cache/huggingface"  # HF_HOME in a container: the Hub cache, read-only
DEFAULT_LLAMA_TARGETS = [
    "llama-server",
    "llama-cli",
    "llama-bench",
    "llama-quantize",
    "llama-perplexity",
    "llama-embedding",
    "llama-tokenize",
    "llama-imatrix",
]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OLLAMA_MODEL = re.compile(  # [registry/][namespace/]model[:tag]
    r"[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*){0,2}(:[A-Za-z0-9._-]{1,128})?"
)
_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SECRET_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_NOT_A_SERVICE_NAME = "not a service name (lower-case letters, digits, '.', '_', '-')"


def _secret_name(value: str | None) -> str | None:
    # it names a compose secret and a .env variable: a name, not text to quote
    if value is not None and not _SECRET_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a secret's name like HF_TOKEN")
    return value


def _env_names(value: dict[str, str]) -> dict[str, str]:
    for name, item in value.items():
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", item):
            raise ValueError(f"{name}: the value holds a line break or another control character")
    return value


class ImageSource(_Model):
    """A service's image and how it reaches the host."""

    ref: str = Field(description="Image reference, e.g. nvcr.io/nvidia/vllm:25.09-py3")
    source: Literal["pull", "build", "transfer"] = Field(
        "pull",
        description='"pull" from a registry; "build" on the host from the service\'s `build`; '
        '"transfer": `docker save` on the control machine streamed into `docker load`',
    )

    @field_validator("ref")
    @classmethod
    def _ref(cls, value: str) -> str:
        return _image_ref(value)


class LlamaBuild(_Model):
    """How the llama.cpp image is built on a host (multi-stage, as upstream's cuda.Dockerfile).

    The deploy puts the source tree in the build context's ``src/`` (cloned on the host, or
    extracted from an archive sent from the control machine); the Dockerfile builds from there.
    """

    source_git: str | None = Field(
        "https://github.com/ggml-org/llama.cpp", description="Git repository cloned on the host"
    )
    source_ref: str | None = Field(None, description='Pinned tag or commit, e.g. "v0.6.0"')
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

    @field_validator("ubuntu_version")
    @classmethod
    def _ubuntu_version(cls, value: str) -> str:
        return must_match(value, r"\d+\.\d+", "an Ubuntu release like 24.04")

    @field_validator("base_devel", "base_runtime")
    @classmethod
    def _base(cls, value: str | None) -> str | None:
        return value if value is None else _image_ref(value)

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
            errors.append(("source_ref", "required with source_git: a pinned tag like v0.6.0"))
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
    bind: str = Field(
        "0.0.0.0",
        description="Host address the port is published on: 0.0.0.0 (every interface), "
        "127.0.0.1 (this host only: reach it through SSH, as gpufleet bench does), or one "
        "of the host's own addresses",
    )
    bench: BenchExpectations | None = Field(
        None,
        description="Expected figures and SLOs for `gpufleet bench`, e.g. "
        "{'baseline': {'decode_tps': 84.1}, 'slo': ['ttft_p95 <= 1s']}",
    )

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return _env_names(value)

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address like 0.0.0.0 or 127.0.0.1") from None
        return value

    @property
    def probe_address(self) -> str:
        """Where the host itself reaches the service."""
        if self.bind in ("0.0.0.0", "::"):
            return "127.0.0.1"
        return self.bind

    @property
    def chats(self) -> bool:
        """Whether the service can answer a chat completion (a gate asks it for one token)."""
        return True

    @property
    def chat_model(self) -> str | None:
        """The ``model`` a chat completion names; None: the server's only model."""
        return None


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
    metrics: bool = Field(
        True,
        description="--metrics: Prometheus /metrics on the API's port, behind the same bind "
        "address and API key (gpufleet targets scrapes it); False turns it off",
    )
    cont_batching: bool = Field(True, description="False passes -nocb; on by default in llama.cpp")
    threads: int | None = Field(None, ge=1, description="-t")
    parallel: int | None = Field(None, ge=1, description="-np")
    alias: str | None = Field(None, description="--alias, the model id in /v1/models")
    api_key_secret: str | None = Field(
        None,
        description="A secret's name (in `secrets`): llama-server requires it as its API key "
        "(--api-key-file); the health gate and gpufleet bench send it",
    )
    unified_memory: bool = Field(False, description="GGML_CUDA_ENABLE_UNIFIED_MEMORY=1 (Spark)")
    extra_args: list[str] = Field([], description="Appended to llama-server's arguments")

    @field_validator("api_key_secret")
    @classmethod
    def _secret_names(cls, value: str | None) -> str | None:
        return _secret_name(value)

    @field_validator("gpu_layers", mode="wrap")
    @classmethod
    def _layers(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> int | str:
        try:
            return handler(value)
        except ValidationError:  # one line, not one per member of the union
            raise ValueError(f"{value!r} is not a number of layers, 'all' or 'auto'") from None


class Vllm(_Service):
    """vLLM's OpenAI server, loading a declared model from the Hub cache, offline."""

    kind: Literal["vllm"] = "vllm"
    enabled: bool = False
    port: int = Field(8001, ge=1, le=65535, description="Host and container port")
    model: str | None = Field(
        None,
        description="A key of the group's `models` (repo, revision, files or patterns): "
        "gpufleet fetches and verifies it into the Hub cache before vLLM starts (required "
        "when enabled)",
    )
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
    api_key_secret: str | None = Field(
        None,
        description="A secret's name (in `secrets`): vLLM requires it as its API key "
        "(VLLM_API_KEY, read from a compose secret); the gate and gpufleet bench send it",
    )
    start_period: str = Field(
        "10m", pattern=r"^\d+[smh]$", description="Healthcheck grace while the model loads"
    )
    environment: dict[str, str] = Field(
        {},
        description="Extra container environment (e.g. VLLM_CPU_KVCACHE_SPACE for a CPU build)",
    )
    extra_args: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "model_id" in data:
                raise ValueError(
                    "model_id is gone: declare the repository in the group's `models` (repo, "
                    "revision, patterns) and name it in `model`; gpufleet prefetches it"
                )
            if "hf_cache" in data:
                raise ValueError(
                    "hf_cache is gone: the Hub cache is layout_hf_home, shared by every service"
                )
        return data

    @field_validator("api_key_secret")
    @classmethod
    def _secret_names(cls, value: str | None) -> str | None:
        return _secret_name(value)

    @property
    def chat_model(self) -> str | None:
        return None  # the server's only model (its repository's name)


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
    models: list[str] = Field(
        [],
        description="Models pulled once the server answers (`ollama pull`), like llama3.2:3b "
        "or registry.example/team/model:tag; the first is the one the gate and gpufleet bench "
        "chat with",
    )

    @field_validator("models_dir")
    @classmethod
    def _models_dir(cls, value: str) -> str:
        return _host_dir(value)

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _OLLAMA_MODEL.fullmatch(name):
                raise ValueError(f"{name!r} is not an Ollama model name like llama3.2:3b")
        if len(set(value)) != len(value):
            raise ValueError("a model is listed twice")
        return value

    @property
    def chats(self) -> bool:
        return bool(self.models)

    @property
    def chat_model(self) -> str | None:
        return self.models[0] if self.models else None


Service = Annotated[LlamaServer | Vllm | Ollama, Field(discriminator="kind")]
_KINDS = [kind.model_fields["kind"].default for kind in (LlamaServer, Vllm, Ollama)]
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
        if not isinstance(name, str) or not _SERVICE_NAME.fullmatch(name):
            # checked first: the name is part of every other path, and of the compose file
            errors.append((f"services/{_shown(name)}", _NOT_A_SERVICE_NAME))
            continue
        try:
            services[name] = _SERVICE.validate_python(raw)
        except ValidationError as exc:
            for err in exc.errors():
                # drop the union tag pydantic puts first ("llama-server", ...)
                loc = list(err["loc"])[1:] if err["type"] != "union_tag_invalid" else []
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    msg = "unknown setting"
                elif err["type"] == "union_tag_invalid":  # pydantic's own quotes it raw
                    tag, expected = err["ctx"]["tag"], err["ctx"]["expected_tags"]
                    msg = f"kind {tag!r} is not one of {expected}"
                elif err["type"] == "union_tag_not_found":
                    loc, msg = ["kind"], f"required: one of {', '.join(map(repr, _KINDS))}"
                errors.append(("/".join(["services", name, *map(_shown, loc)]), msg))
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
            errors.append((base, _NOT_A_SERVICE_NAME))
        if svc.enabled:
            if svc.port in owners:
                errors.append((f"{base}/port", f"{svc.port} is already used by {owners[svc.port]}"))
            else:
                owners[svc.port] = name
        if not isinstance(svc, LlamaServer | Vllm) or (svc.model is None and not svc.enabled):
            continue
        if svc.model not in models:
            declared = ", ".join(sorted(map(_shown, models))) or "(none)"
            errors.append(
                (f"{base}/model", f"{svc.model!r} is not one of the declared models: {declared}")
            )
        if isinstance(svc, Vllm):
            continue
        if svc.image.source == "build" and svc.build is None:
            errors.append((f"{base}/build", "required when image source is build"))
        if svc.build is not None:
            errors += [(f"{base}/build/{field}", msg) for field, msg in svc.build.problems()]
    return errors


# --- monitoring -------------------------------------------------------------------------

DCGM_EXPORTER_IMAGE = "nvcr.io/nvidia/k8s/dcgm-exporter:4.2.3-4.1.3-ubuntu22.04"


class Monitor(_Model):
    """Fleet monitoring on the host: gpufleet's textfile for node_exporter, and the exporters.

    .. code:: python

        monitor_textfile_path = "/var/lib/prometheus/node-exporter/gpufleet.prom"
        monitor_node_exporter = True     # prometheus-node-exporter from the distribution
        monitor_dcgm_exporter = True     # discrete GPUs only (rtx5090)
    """

    textfile: bool = Field(True, description="Write gpufleet's metrics textfile on each converge")
    textfile_path: str = Field(
        "/var/lib/prometheus/node-exporter/gpufleet.prom",
        description="Where node_exporter's textfile collector reads it (Debian's "
        "prometheus-node-exporter reads /var/lib/prometheus/node-exporter/*.prom)",
    )
    node_exporter: bool = Field(
        False, description="Install and run prometheus-node-exporter from the distribution"
    )
    node_exporter_port: int = Field(9100, ge=1, le=65535, description="Its port, for scraping")
    dcgm_exporter: bool = Field(
        False,
        description="Run NVIDIA's dcgm-exporter as a compose service (discrete GPUs only; "
        "unified-memory hosts read GPU memory from /proc/meminfo instead)",
    )
    dcgm_image: Image = Field(Image(ref=DCGM_EXPORTER_IMAGE), description="dcgm-exporter's image")
    dcgm_port: int = Field(9400, ge=1, le=65535, description="dcgm-exporter's port")
    address: str | None = Field(
        None,
        description="Where Prometheus reaches this host; None: its ssh_hostname, else its name",
    )

    @field_validator("textfile_path")
    @classmethod
    def _textfile(cls, value: str) -> str:
        _host_path(value)
        if not value.endswith(".prom") or value.endswith("/.prom"):
            raise ValueError(f"{value!r} must be a file named *.prom, which node_exporter reads")
        return value

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.:_-]*", value):
            raise ValueError(f"{value!r} is not a host name or an IP address")
        return value


def monitor_problems(config: HostConfig) -> list[tuple[str, str]]:
    """Monitoring settings that cannot work on this host, as ``(data key, message)``."""
    errors = []
    mon = config.monitor
    if mon.dcgm_exporter and (config.gpu.unified_memory or config.gpu.min_l4t is not None):
        errors.append(
            (
                "monitor_dcgm_exporter",
                "dcgm-exporter reads discrete GPUs; this group has unified memory (Jetson, "
                "GB10): its GPU figures come from gpufleet's textfile and node_exporter's meminfo",
            )
        )
    ports = {svc.port: name for name, svc in config.enabled_services.items()}
    exporters = [
        ("monitor_node_exporter_port", mon.node_exporter, mon.node_exporter_port),
        ("monitor_dcgm_port", mon.dcgm_exporter, mon.dcgm_port),
    ]
    for key, on, port in exporters:
        if on and port in ports:
            errors.append((key, f"{port} is already used by {ports[port]}"))
    return errors


class Timeouts(_Model):
    """How long one remote command may run, by what it does (``timeout_<kind>_seconds``): a
    command past its bound fails its host with one line, and the other hosts go on. Reading a
    host has its own bound (``read_timeout_seconds``), a health gate its service's
    ``start_period``, and a host that stops answering is caught by ``ssh_liveness_seconds``."""

    command_seconds: int = Field(
        300, ge=10, description="A file written, a container removed or retagged, a release kept"
    )
    apt_seconds: int = Field(
        1800, ge=60, description="An apt repository key, apt-get update and install"
    )
    transfer_seconds: int = Field(
        3600,
        ge=60,
        description="An image pulled, sent or loaded; source fetched; compose bringing "
        "services up (it may pull)",
    )
    download_seconds: int = Field(
        21600, ge=60, description="One model file fetched and verified (it resumes on retry)"
    )
    build_seconds: int = Field(
        14400, ge=60, description="llama.cpp built on a host, or waited for from its builder"
    )


# --- the host --------------------------------------------------------------------------


GROUP_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_NOT_A_GROUP = (
    "is not a group name (lower-case letters, digits, '_', '-'): it names the compose project "
    "and goes into the .env"
)


class HostConfig(_Model):
    group: str
    host: str
    gpu: GpuRequirements
    toolkit: Toolkit = Toolkit()
    docker: Docker = Docker()
    layout: Layout = Layout()
    probe: Probe = Probe()
    monitor: Monitor = Monitor()
    timeouts: Timeouts = Timeouts()
    secrets: dict[str, str] = Field(
        {}, description='Name -> source on the control machine: "env:VAR" or "file:/path"'
    )
    env: dict[str, str] = Field({}, description="Plain (non-secret) values for the .env file")
    hf_endpoint: str = Field(
        "https://huggingface.co", description="Hub (or mirror) URL the hosts download from"
    )
    hf_control_endpoint: str | None = Field(
        None,
        description="Where the control machine reads Hub metadata, when it reaches the mirror "
        "by another name than the hosts do; None: hf_endpoint",
    )
    models: dict[str, ModelSpec] = Field({}, description="Models by name, for services to use")
    models_keep_unused: bool = Field(
        True, description="Keep model files that no enabled service uses any more"
    )
    models_download_attempts: int = Field(
        4,
        ge=1,
        le=20,
        description="Tries per model file before a run gives up on it (each "
        "resumes; 429/5xx, resets and stalls are retried with backoff)",
    )
    models_stall_seconds: int = Field(
        120,
        ge=5,
        le=3600,
        description="A model download under 1 KiB/s for this long is a stall "
        "(tried again, resuming)",
    )
    services: dict[str, Service] = Field({}, description="Inference services by name")
    builds_from_control: bool = Field(
        True,
        description="Before building llama.cpp on a host, look in the control machine's Docker "
        "for an image built from the same inputs (its gpufleet.inputs label) and send it instead",
    )
    releases_keep: int = Field(
        5, ge=1, le=100, description="Releases kept on each host for rollback, newest first"
    )
    apt_lock_seconds: int = Field(
        120,
        ge=0,
        le=3600,
        description="How long another apt/dpkg may hold apt's lock before "
        "a run fails and names the process holding it",
    )
    ssh_liveness_seconds: int = Field(
        30,
        ge=5,
        le=3600,
        description="A host that answers no SSH keepalive for this long (asked every 15 s of "
        "quiet) has its connection closed and fails as unreachable; the other hosts go on",
    )
    read_timeout_seconds: int = Field(
        120,
        ge=10,
        le=3600,
        description="The longest a host may take to answer the one command that reads it",
    )

    @property
    def project(self) -> str:
        """The compose project's name."""
        return f"gpufleet-{self.group}"

    @property
    def enabled_services(self) -> dict[str, Service]:
        return {name: svc for name, svc in self.services.items() if svc.enabled}

    def chat_model(self, service: str) -> str | None:
        """The ``model`` a chat completion to ``service`` names: vLLM names the model it loaded
        by its repository; llama-server by its alias, or none (it serves one)."""
        svc = self.services[service]
        if isinstance(svc, Vllm) and svc.model in self.models:
            return self.models[svc.model].repo
        return svc.chat_model

    def served_models(self) -> dict[str, ModelSpec]:
        """The models enabled services use, by name."""
        used = {
            s.model
            for s in self.services.values()
            if isinstance(s, LlamaServer | Vllm) and s.enabled
        }
        return {name: spec for name, spec in self.models.items() if name in used}

    def cuda_archs(self) -> tuple[str, ...]:
        """CUDA architectures the host's llama.cpp builds target (empty: none built with CUDA)."""
        return tuple(
            arch
            for s in self.services.values()
            if isinstance(s, LlamaServer) and s.enabled and s.build and s.build.cuda
            for arch in s.build.cuda_archs
        )

    @field_validator("secrets")
    @classmethod
    def _sources(cls, value: dict[str, str]) -> dict[str, str]:
        for name, source in value.items():
            if not _SECRET_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            kind, _, ref = source.partition(":")
            if not (kind == "env" and _ENV_NAME.fullmatch(ref)) and not (kind == "file" and ref):
                raise ValueError(f'{name}: source {source!r} must be "env:VAR" or "file:/path"')
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return _env_names(value)

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        if not GROUP_RE.fullmatch(value):
            raise ValueError(f"{value!r} {_NOT_A_GROUP}")
        return value

    @field_validator("hf_endpoint", "hf_control_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return value if value is None else _url(value)

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        for name in value:
            if not _MODEL_NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not a model name (letters, digits, '.', '_', '-'; "
                    "it names the model's directory)"
                )
        return value


# prefix of a flat data key -> field of HostConfig holding that subsystem
_PREFIXES = {
    "gpu_": "gpu",
    "toolkit_": "toolkit",
    "docker_": "docker",
    "layout_": "layout",
    "monitor_": "monitor",
    "timeout_": "timeouts",
}
_PROBE_KEYS = {
    "probe_image": "image",
    "probe_command": "command",
    "probe_gpu_request": "gpu_request",
}
_TOP = {
    "secrets",
    "env",
    "hf_endpoint",
    "hf_control_endpoint",
    "models",
    "models_keep_unused",
    "models_download_attempts",
    "models_stall_seconds",
    "releases_keep",
    "apt_lock_seconds",
    "builds_from_control",
    "ssh_liveness_seconds",
    "read_timeout_seconds",
}


def host_group(host_name: str, groups: list[str] | tuple[str, ...], data: dict[str, Any]) -> str:
    """The group a host is deployed as: its ``gpufleet_group`` data, else its inventory group."""
    if data.get("gpufleet_group"):
        return str(data["gpufleet_group"])
    for group in groups:
        if group in GROUPS:
            return group
    raise ConfigError(f"{host_name}: in none of the groups {', '.join(GROUPS)}; add it to one")


def parse(host_name: str, group: str, data: dict[str, Any]) -> HostConfig:
    """Build a HostConfig from a host's merged data, or raise ConfigError naming each field."""
    if not isinstance(group, str) or not GROUP_RE.fullmatch(group):
        # every other error line starts with the group: it must be one word first
        raise ConfigError(f"{_shown(host_name)}/gpufleet_group: {group!r} {_NOT_A_GROUP}")
    if not host_name.isprintable():
        raise ConfigError(f"{group}/{host_name!r}: a host name holds a control character")
    nested: dict[str, Any] = {"group": group, "host": host_name}
    unknown = []
    for key, value in data.items():
        if key in _TOP:
            nested[key] = value
        elif key in _PROBE_KEYS:
            nested.setdefault("probe", {})[_PROBE_KEYS[key]] = value
        elif key.startswith("probe_"):
            unknown.append(key)
        else:
            for prefix, section in _PREFIXES.items():
                if key.startswith(prefix):
                    nested.setdefault(section, {})[key[len(prefix) :]] = value
                    break
    nested.setdefault("gpu", {})
    errors = [f"{group}/{host_name}/{key}: unknown setting{_suggest(key)}" for key in unknown]
    if isinstance(data.get("services"), dict):
        models = data.get("models")
        models = {m for m in models if isinstance(m, str)} if isinstance(models, dict) else set()
        nested["services"], problems = parse_services(data["services"], models)
        errors += [f"{group}/{host_name}/{path}: {message}" for path, message in problems]
    elif data.get("services") is not None:  # not a table of services: HostConfig says what
        nested["services"] = data["services"]
    try:
        config = HostConfig.model_validate(nested)
    except ValidationError as exc:
        for err in exc.errors():
            loc = list(err["loc"])
            flat = len(loc) == 2 and loc[0] in _PREFIXES.values()  # a flat key: gpu_x, ...
            if err["type"] == "extra_forbidden" and flat:
                key = next(p for p, s in _PREFIXES.items() if s == loc[0]) + str(loc[1])
                errors.append(f"{group}/{host_name}/{key}: unknown setting{_suggest(key)}")
                continue
            path = "/".join(_shown(part) for part in loc)
            message = err["msg"].removeprefix("Value error, ")
            errors.append(f"{group}/{host_name}/{path}: {message}")
    else:
        errors += [
            f"{group}/{host_name}/{path}: {message}"
            for path, message in secret_refs(config) + monitor_problems(config)
        ]
    if errors:
        raise ConfigError("\n".join(errors))
    return config


def secret_refs(config: HostConfig) -> list[tuple[str, str]]:
    """Services that name a secret the host data does not declare."""
    errors = []
    for name, svc in config.services.items():
        for field in ("api_key_secret", "hf_token_secret"):
            ref = getattr(svc, field, None)
            if ref and svc.enabled and ref not in config.secrets:
                declared = ", ".join(sorted(config.secrets)) or "(none)"
                message = f"{ref!r} is not one of the secrets: {declared}"
                errors.append((f"services/{name}/{field}", message))
    return errors


def _known_keys() -> list[str]:
    keys = []
    for prefix, section in _PREFIXES.items():
        settings = HostConfig.model_fields[section].annotation
        keys += [f"{prefix}{name}" for name in settings.model_fields]
    return keys + list(_PROBE_KEYS) + list(_TOP)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _known_keys(), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# what a secret's value may hold: every token and key format in use (hex, base64 and base64url,
# hf_..., sk-..., JWTs) and nothing that ends a quote in .env, a curl config line or a shell
SECRET_CHARS = "letters, digits and . _ ~ + / = : @ % , -"
SECRET_VALUE_RE = re.compile(r"[A-Za-z0-9._~+/=:@%,-]+")


HUB_TOKEN = "HF_TOKEN"  # the Hub's token: the name fetch-model reads from .env, and HF_TOKEN_PATH


def hub_token_needs(config: HostConfig) -> list[str]:
    """Why this host needs ``HF_TOKEN``: each gated model an enabled service loads, and each
    enabled service that names it as a secret. Empty: public models only, no token needed."""
    needs = []
    for name, svc in config.enabled_services.items():
        model = config.models.get(getattr(svc, "model", None) or "")
        if model is not None and model.gated:
            needs.append(f"services/{name} loads {model.repo}, which is gated")
        for field in ("api_key_secret", "hf_token_secret"):
            if getattr(svc, field, None) == HUB_TOKEN:
                needs.append(f"services/{name}/{field} names it")
    return needs


def resolve_secrets(config: HostConfig) -> dict[str, str]:
    """Read each declared secret from its source on the control machine.

    A missing secret is an error here, before anything connects; the message names where it
    was looked for, never a value. ``HF_TOKEN`` alone may be missing where nothing needs it
    (``hub_token_needs``): public repositories resolve and download without a token, and a
    gated one the group data does not mark ``gated`` is named by the Hub's refusal instead.
    """
    values, errors = {}, []
    for name, source in config.secrets.items():
        kind, _, ref = source.partition(":")
        setting = f"{config.group}/{config.host}/secrets/{name}"
        value = None
        if kind == "env":
            value = os.environ.get(ref)
        else:
            try:
                path = Path(ref).expanduser()
                if path.is_file():
                    value = path.read_text().strip()
            except (OSError, RuntimeError, UnicodeDecodeError) as exc:
                # unreadable, a name too long, ~user without a home, bytes that are not text
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                errors.append(f"{setting}: cannot read file {_printable(ref)}: {reason}")
                continue
        where = f"environment variable {ref}" if kind == "env" else f"file {_printable(ref)}"
        needs = hub_token_needs(config) if not value and name == HUB_TOKEN else []
        if not value and name == HUB_TOKEN and not needs:
            continue  # public models only: no token, and none in .env
        if not value:
            why = f"; needed because {needs[0]}" if needs else ""
            errors.append(f"{setting}: not set ({where} is empty or missing){why}")
        elif not SECRET_VALUE_RE.fullmatch(value):
            # never the value, nor the character: a part of a key is a part of a key
            errors.append(
                f"{setting}: the value in {where} holds a character other than {SECRET_CHARS}"
                " (a quote, a space or a line break would end the quoting in .env, a"
                " curl header or a shell): issue a key of those characters"
            )
        else:
            values[name] = value
    if errors:
        raise ConfigError("\n".join(errors))
    return values
