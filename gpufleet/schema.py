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
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from gpufleet._model import StrictModel as _Model
from gpufleet._model import must_match
from gpufleet.gate import GpuRequirements
from gpufleet.hf import ModelSpec
from gpufleet.services import LlamaServer, Service, parse_services

GROUPS = ("spark", "rtx5090", "jetson")


class ConfigError(ValueError):
    """Host data that cannot be deployed; each line names group/host/field."""


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


class Layout(_Model):
    """Where the inference stack lives on a host."""

    stack_dir: str = "/opt/gpufleet"
    models_dir: str = "/opt/gpufleet/models"
    models_owner: str = "root"
    models_group: str = "root"
    models_mode: str = "0755"

    @field_validator("models_mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        return must_match(value, r"0?[0-7]{3}", "an octal mode like 0755")


class Image(_Model):
    """A container image and how it reaches a host: pulled, or sent from the control machine."""

    ref: str
    source: Literal["pull", "transfer"] = "pull"


class Probe(_Model):
    """The GPU probe run after setup: a container with the group's GPU request must exit 0."""

    image: Image = Image(ref="nvidia/cuda:12.8.1-base-ubuntu24.04")
    command: list[str] = ["nvidia-smi", "-L"]
    gpu_request: Literal["gpus", "runtime"] = Field(
        "gpus", description='"gpus" runs with --gpus all; "runtime" with --runtime nvidia'
    )


class HostConfig(_Model):
    group: str
    host: str
    gpu: GpuRequirements
    toolkit: Toolkit = Toolkit()
    docker: Docker = Docker()
    layout: Layout = Layout()
    probe: Probe = Probe()
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
    services: dict[str, Service] = Field({}, description="Inference services by name")

    def served_models(self) -> dict[str, ModelSpec]:
        """The models enabled services use, by name."""
        used = {s.model for s in self.services.values() if isinstance(s, LlamaServer) and s.enabled}
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
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if not source.startswith(("env:", "file:")):
                raise ValueError(f'{name}: source {source!r} must be "env:VAR" or "file:/path"')
        return value


# prefix of a flat data key -> field of HostConfig holding that subsystem
_PREFIXES = {"gpu_": "gpu", "toolkit_": "toolkit", "docker_": "docker", "layout_": "layout"}
_PROBE_KEYS = {
    "probe_image": "image",
    "probe_command": "command",
    "probe_gpu_request": "gpu_request",
}
_TOP = {"secrets", "env", "hf_endpoint", "hf_control_endpoint", "models", "models_keep_unused"}


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
    if "services" in data:
        models = data.get("models") or {}
        nested["services"], problems = parse_services(data["services"] or {}, set(models))
        errors += [f"{group}/{host_name}/{path}: {message}" for path, message in problems]
    try:
        config = HostConfig.model_validate(nested)
    except ValidationError as exc:
        for err in exc.errors():
            loc = list(err["loc"])
            if err["type"] == "extra_forbidden" and loc and loc[0] in _PREFIXES.values():
                key = next(p for p, s in _PREFIXES.items() if s == loc[0]) + str(loc[1])
                errors.append(f"{group}/{host_name}/{key}: unknown setting{_suggest(key)}")
                continue
            path = "/".join(str(part) for part in loc)
            message = err["msg"].removeprefix("Value error, ")
            errors.append(f"{group}/{host_name}/{path}: {message}")
    if errors:
        raise ConfigError("\n".join(errors))
    return config


def _known_keys() -> list[str]:
    keys = [f"{prefix}{name}" for prefix, section in _PREFIXES.items()
            for name in HostConfig.model_fields[section].annotation.model_fields]  # fmt: skip
    return keys + list(_PROBE_KEYS) + list(_TOP)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _known_keys(), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def resolve_secrets(config: HostConfig) -> dict[str, str]:
    """Read each declared secret from its source on the control machine.

    A missing secret is an error here, before anything connects; the message names where it
    was looked for, never a value.
    """
    values, errors = {}, []
    for name, source in config.secrets.items():
        kind, _, ref = source.partition(":")
        value = None
        if kind == "env":
            value = os.environ.get(ref)
        else:
            path = Path(ref).expanduser()
            if path.is_file():
                value = path.read_text().strip()
        if not value:
            where = f"environment variable {ref}" if kind == "env" else f"file {ref}"
            path = f"{config.group}/{config.host}/secrets/{name}"
            errors.append(f"{path}: not set ({where} is empty or missing)")
        else:
            values[name] = value
    if errors:
        raise ConfigError("\n".join(errors))
    return values
