"""
Sandbox host profiles: the GPU identity each sandbox host is given.

Each profile says what the host ships with (Docker, a Container Toolkit version, a
``daemon.json``), what the stand-in ``nvidia-smi`` answers (``gpu``, written to
``/etc/gpufleet-sandbox/gpu.json``) and which identity files it carries (Jetson's
``/etc/nv_tegra_release`` and ``/usr/local/cuda/version.json``). Values follow
``shared/reference/gpu-facts.md`` and the captured samples beside it.
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.core.known import NVIDIA_RUNTIME

GPU_PROFILE_PATH = "/etc/gpufleet-sandbox/gpu.json"
# The processes whose CPU load the stand-in nvidia-smi and tegrastats report as GPU load.
SERVING = ("llama-server", "vllm", "ollama")
TEGRASTATS = Path(__file__).parent / "assets" / "tegrastats"
DAEMON_JSON_PATH = "/etc/docker/daemon.json"
_UUID_NAMESPACE = uuid.UUID("5d1c4f2e-8f7a-4c36-9a53-3f0e6b1d2a90")


def nvidia_runtime() -> dict[str, Any]:
    """
    The ``runtimes.nvidia`` entry ``nvidia-ctk runtime configure --runtime=docker`` writes.
    """
    return copy.deepcopy(NVIDIA_RUNTIME)


NV_TEGRA_RELEASE_R36_4_7 = (
    "# R36 (release), REVISION: 4.7, GCID: 42132812, BOARD: generic, EABI: aarch64, "
    "DATE: Thu Sep 18 22:54:44 UTC 2025\n"
    "# KERNEL_VARIANT: oot\n"
    "TARGET_USERSPACE_LIB_DIR=nvidia\n"
    "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n"
)

# JetPack 6.2.1 (Orin Nano) values from the captured sample; the sample is cut inside
# cuda_sanitizer_api, whose version here follows its neighbours.
_CUDA_12_6_COMPONENTS = {
    "cuda": ("CUDA SDK", "12.6.11"),
    "cuda_cccl": ("CUDA C++ Core Compute Libraries", "12.6.37"),
    "cuda_compat": ("CUDA Specific Libraries", "12.6.36890662"),
    "cuda_cudart": ("CUDA Runtime (cudart)", "12.6.68"),
    "cuda_cuobjdump": ("cuobjdump", "12.6.68"),
    "cuda_cupti": ("CUPTI", "12.6.68"),
    "cuda_cuxxfilt": ("CUDA cu++ filt", "12.6.68"),
    "cuda_gdb": ("CUDA GDB", "12.6.68"),
    "cuda_nvcc": ("CUDA NVCC", "12.6.68"),
    "cuda_nvdisasm": ("CUDA nvdisasm", "12.6.68"),
    "cuda_nvml_dev": ("CUDA NVML Headers", "12.6.68"),
    "cuda_nvprune": ("CUDA nvprune", "12.6.68"),
    "cuda_nvrtc": ("CUDA NVRTC", "12.6.68"),
    "cuda_nvtx": ("CUDA NVTX", "12.6.68"),
    "cuda_sanitizer_api": ("CUDA Compute Sanitizer API", "12.6.68"),
}


def cuda_version_json(components: dict[str, tuple[str, str]] = _CUDA_12_6_COMPONENTS) -> str:
    """
    Render ``/usr/local/cuda/version.json`` as NVIDIA writes it (3-space indent, ``" : "``).
    """
    data = {key: {"name": name, "version": ver} for key, (name, ver) in components.items()}
    return json.dumps(data, indent=3, separators=(",", " : "), sort_keys=True) + "\n"


def gpu_uuid(hostname: str, index: int = 0) -> str:
    """
    A stable ``GPU-xxxxxxxx-...`` UUID derived from the host name and GPU index.
    """
    return f"GPU-{uuid.uuid5(_UUID_NAMESPACE, f'{hostname}/{index}')}"


def gpu(hostname: str, name: str, *, index: int = 0, **values: Any) -> dict[str, Any]:
    """
    One GPU entry of an ``nvidia-smi`` profile; ``None`` prints as ``N/A`` / ``[N/A]``.

    + hostname: seeds the UUID
    + name: product name as ``nvidia-smi`` prints it
    + values: any of the keys below (default: an idle discrete board)
    """
    entry: dict[str, Any] = {
        "index": index,
        "name": name,
        "uuid": gpu_uuid(hostname, index),
        "bus_id": f"00000000:{index + 1:02X}:00.0",
        "compute_cap": None,
        "memory_total_mib": None,
        "memory_used_mib": 2,
        "power_limit_w": None,
        "power_draw_w": 1,
        "persistence_mode": "Off",
        "display_active": "Off",
        "ecc": None,
        "fan_pct": 0,
        "temperature_c": 29,
        "pstate": "P8",
        "utilization_gpu_pct": 0,
        "utilization_memory_pct": 0,
        "compute_mode": "Default",
        "mig_mode": None,
    }
    unknown = set(values) - set(entry)
    if unknown:
        raise ValueError(f"unknown GPU profile keys: {sorted(unknown)}")
    entry.update(values)
    return entry


def gb10(hostname: str) -> dict[str, Any]:
    """
    DGX Spark GB10 as captured: unified memory (``Not Supported``), no power cap.
    """
    return gpu(
        hostname,
        "NVIDIA GB10",
        bus_id="0000000F:01:00.0",
        compute_cap="12.1",
        memory_used_mib=None,
        persistence_mode="On",
        fan_pct=None,
        temperature_c=36,
        power_draw_w=3,
    )


def orin(hostname: str) -> dict[str, Any]:
    """
    Jetson Orin under JetPack 6: ``Orin (nvgpu)`` with nearly every field ``N/A``.
    """
    return gpu(
        hostname,
        "Orin (nvgpu)",
        bus_id=None,
        compute_cap="8.7",
        memory_used_mib=None,
        power_draw_w=None,
        persistence_mode=None,
        display_active=None,
        fan_pct=None,
        temperature_c=None,
        pstate=None,
        utilization_gpu_pct=None,
        utilization_memory_pct=None,
        compute_mode=None,
    )


def smi_profile(
    driver: str | None,
    cuda: str | None,
    gpus: list[dict[str, Any]],
    failure: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """
    The whole ``gpu.json`` document the stand-in ``nvidia-smi`` reads.

    + failure: ``None``, ``"no-driver"`` (exit 9) or ``"mismatch"`` (exit 18, with
      ``nvml_version`` in ``extra``)
    """
    return {
        "driver": driver,
        "cuda": cuda,
        "failure": failure,
        "gpus": gpus,
        "processes": [],
        **extra,
    }


@dataclass(frozen=True)
class HostProfile:
    """
    What one sandbox host is: its name, what it ships with, and its GPU identity.
    """

    key: str
    hostname: str
    docker_preinstalled: bool
    toolkit_preinstalled: str | None
    daemon_json: dict[str, Any] | None
    gpu: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    executables: dict[str, Path] = field(default_factory=dict)  # host path -> asset


Profile = HostProfile


RTX_5090 = {"compute_cap": "12.0", "memory_total_mib": 32607, "power_limit_w": 575}
RTX_4090 = {
    "compute_cap": "8.9",
    "memory_total_mib": 24564,
    "memory_used_mib": 1,
    "power_limit_w": 450,
    "power_draw_w": 6,
    "ecc": "Off",
    "temperature_c": 31,
}


def _rtx5090_gpu(hostname: str) -> dict[str, Any]:
    board = gpu(hostname, "NVIDIA GeForce RTX 5090", **RTX_5090)
    return smi_profile("570.133.07", "12.8", [board], load_from=list(SERVING))


def _rtx4090_gpu(hostname: str) -> dict[str, Any]:
    """Driver 550 (CUDA 12.4): older than any group accepts."""
    board = gpu(hostname, "NVIDIA GeForce RTX 4090", **RTX_4090)
    return smi_profile("550.54.14", "12.4", [board], load_from=list(SERVING))


def _workstation(key: str, hostname: str, smi: dict[str, Any], *, docker: bool) -> HostProfile:
    """A workstation without the toolkit or a daemon.json; with Docker if ``docker``."""
    return HostProfile(
        key,
        hostname,
        docker_preinstalled=docker,
        toolkit_preinstalled=None,
        daemon_json=None,
        gpu=smi,
    )


def _make(key: str, hostname: str) -> HostProfile:
    """The profile ``key`` for a host called ``hostname`` (its GPU UUID derives from it)."""
    if key == "spark":
        return HostProfile(
            key,
            hostname,
            docker_preinstalled=True,
            toolkit_preinstalled="1.17.8-1",
            daemon_json={"runtimes": {"nvidia": nvidia_runtime()}},
            gpu=smi_profile("580.95.05", "13.0", [gb10(hostname)], load_from=list(SERVING)),
        )
    if key in ("rtx5090", "fresh"):
        # fresh: a workstation straight from its installer, for `gpufleet bootstrap`
        return _workstation(key, hostname, _rtx5090_gpu(hostname), docker=False)
    if key == "rtx5090-light":
        # an extra workstation that ships Docker (cheap to start: no engine to install)
        return _workstation(key, hostname, _rtx5090_gpu(hostname), docker=True)
    if key == "jetson":
        return HostProfile(
            key,
            hostname,
            docker_preinstalled=True,
            toolkit_preinstalled="1.17.8-1",
            daemon_json={"default-runtime": "nvidia", "runtimes": {"nvidia": nvidia_runtime()}},
            gpu=smi_profile("540.4.0", "12.6", [orin(hostname)], load_from=list(SERVING)),
            files={
                "/etc/nv_tegra_release": NV_TEGRA_RELEASE_R36_4_7,
                "/usr/local/cuda/version.json": cuda_version_json(),
            },
            executables={"/usr/bin/tegrastats": TEGRASTATS},
        )
    if key == "old-driver":
        return _workstation(key, hostname, _rtx4090_gpu(hostname), docker=False)
    if key == "no-driver":
        no_driver = smi_profile(None, None, [], failure="no-driver")
        return _workstation(key, hostname, no_driver, docker=False)
    raise KeyError(f"no sandbox profile {key!r}")


KEYS = ("spark", "rtx5090", "jetson", "old-driver", "no-driver")
# The base sandbox's hosts, one per profile, each called sandbox-<profile>.
PROFILES: dict[str, HostProfile] = {key: _make(key, f"sandbox-{key}") for key in KEYS}


def for_host(key: str, hostname: str) -> HostProfile:
    """Profile ``key`` for any host of the sandbox (extra hosts carry their own GPU UUIDs)."""
    return _make(key, hostname)


def daemon_json_text(config: dict[str, Any]) -> str:
    """
    Serialise a ``daemon.json`` the way ``nvidia-ctk runtime configure`` writes it.
    """
    return json.dumps(config, indent=4, sort_keys=True) + "\n"


def render_profile_files(profile: HostProfile) -> dict[str, bytes]:
    """
    Every file the orchestration places into the host: absolute path -> content.

    Always the ``nvidia-smi`` profile; ``/etc/docker/daemon.json`` when the host ships
    one; the host's identity files (Jetson's L4T release and CUDA version files).
    """
    files = {GPU_PROFILE_PATH: (json.dumps(profile.gpu, indent=2, sort_keys=True) + "\n").encode()}
    if profile.daemon_json is not None:
        files[DAEMON_JSON_PATH] = daemon_json_text(profile.daemon_json).encode()
    files.update({path: text.encode() for path, text in profile.files.items()})
    return files
