"""What gpufleet knows about the outside world, each fact written once and imported everywhere.

Facts read hosts with these, the plan compares against them, deploys write them, and the
sandbox's stand-ins are built to match them: one copy, so the copies cannot drift apart.
"""

from __future__ import annotations

import json
from urllib.parse import quote

# NVIDIA Container Toolkit: the four packages the install guide pins to one version
# (NVIDIA/cloud-native-docs, container-toolkit/install-guide.md).
TOOLKIT_PACKAGES = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)
# What `nvidia-ctk runtime configure --runtime=docker` writes under "runtimes" (configure.go).
NVIDIA_RUNTIME = {"args": [], "path": "nvidia-container-runtime"}
DAEMON_JSON = "/etc/docker/daemon.json"
CDI_SPEC = "/etc/cdi/nvidia.yaml"
DOCKER_LIST = "/etc/apt/sources.list.d/docker.list"
# apt's architecture names for `uname -m` (the toolkit repository URL carries `$(ARCH)`)
DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}

# Each service kind's health endpoint: llama-server and vLLM answer 503 while loading and 200
# when ready; Ollama has no /health, and /api/tags lists its models.
HEALTH_PATHS = {"llama-server": "/health", "vllm": "/health", "ollama": "/api/tags"}


# Kinds gated by a one-token chat completion (Ollama answers only for a model it has pulled).
def chat_body(model: str | None = None) -> str:
    """The one-token chat completion a gate and a drift check ask a service for."""
    body: dict = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    if model:
        body["model"] = model
    return json.dumps(body)


# Where gpufleet keeps its own files on a host.
FETCH_MODEL = "/usr/local/libexec/gpufleet/fetch-model"
STATE_DIR = "/var/lib/gpufleet"
# Where an image comes from when no host of the run sends it (host names have no spaces)
CONTROL_MACHINE = "the control machine"


def hub_file_url(endpoint: str, repo: str, commit: str, path: str) -> str:
    """A file of a Hub repository pinned to a commit (huggingface_hub's resolve template)."""
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{commit}/{quote(path)}"


def deb_arch(machine: str) -> str:
    """apt's name for a CPU architecture as ``uname -m`` prints it."""
    return DEB_ARCH.get(machine, machine)


OLLAMA_REGISTRY = "registry.ollama.ai"


def ollama_manifest(models_dir: str, name: str) -> str:
    """Where Ollama keeps a pulled model's manifest under its host directory (mounted at
    /root/.ollama): ``models/manifests/<registry>/<namespace>/<model>/<tag>``.

    ``llama3.2`` is ``registry.ollama.ai/library/llama3.2/latest``; ``team/m:q4`` is
    ``registry.ollama.ai/team/m/q4``; ``reg.example/team/m:q4`` keeps its registry.
    """
    base, _, tag = name.partition(":")
    parts = base.split("/")
    if len(parts) == 1:
        parts = [OLLAMA_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [OLLAMA_REGISTRY, *parts]
    return "/".join([models_dir.rstrip("/"), "models", "manifests", *parts, tag or "latest"])
