"""What gpufleet knows about the outside world, each fact written once and imported everywhere.

Facts read hosts with these, the plan compares against them, deploys write them, and the
sandbox's stand-ins are built to match them: one copy, so the copies cannot drift apart.
"""

from __future__ import annotations

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
CHAT_KINDS = ("llama-server", "vllm")

# Where gpufleet keeps its own files on a host.
FETCH_MODEL = "/usr/local/libexec/gpufleet/fetch-model"
STATE_DIR = "/var/lib/gpufleet"


def hub_file_url(endpoint: str, repo: str, commit: str, path: str) -> str:
    """A file of a Hub repository pinned to a commit (huggingface_hub's resolve template)."""
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{commit}/{quote(path)}"


def deb_arch(machine: str) -> str:
    """apt's name for a CPU architecture as ``uname -m`` prints it."""
    return DEB_ARCH.get(machine, machine)
