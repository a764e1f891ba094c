"""
The preflight gate: does a host meet its group's driver, CUDA, L4T, GPU and memory needs, and
can the images its services run execute on its GPUs?

Pure functions over the ``facts.identity.HostIdentity`` fact and image labels; no I/O. A host
that fails the gate gets no changes, and each failure says what was found and what is required.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from packaging.version import Version

from gpufleet.core.cuda import (
    DriverVersion,
    cuda_arch_for_compute_cap,
    first_cuda_for_compute_cap,
    image_device_code,
    min_driver_for_cuda,
    runs_on,
)
from gpufleet.core.schema import GpuRequirements
from gpufleet.core.snapshot import Gpu, Identity, L4tInfo, NvidiaInfo

GIB = 1024**3
MIB = 1024**2


@dataclass
class GateResult:
    """
    What ``check_host`` found: failures keep the host from any change, warnings are reported.
    """

    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def effective_min_driver(req: GpuRequirements) -> tuple[Version, str] | None:
    """
    The driver a host needs, and which rule set it, or None when no rule applies.

    The largest of ``min_cuda``'s table minimum ("the minimum for CUDA 13.0"), ``min_driver``
    ("the group minimum") and ``driver_floor`` ("the fleet-wide floor"); ties name the CUDA rule.
    """

    candidates = []
    if req.min_cuda is not None:
        candidates.append(
            (min_driver_for_cuda(req.min_cuda), f"the minimum for CUDA {req.min_cuda}")
        )
    if req.min_driver is not None:
        candidates.append((DriverVersion(req.min_driver), "the group minimum"))
    if req.driver_floor is not None:
        candidates.append((DriverVersion(req.driver_floor), "the fleet-wide floor"))
    return max(candidates, key=lambda candidate: candidate[0], default=None)


def detect_group(identity: Identity) -> str | None:
    """
    The host group a host looks like: ``jetson`` (L4T release file), ``spark`` (a GB10 GPU),
    ``rtx5090`` (compute capability 12.0 on x86_64), else None.
    """

    if identity.jetson is not None:
        return "jetson"
    gpus = identity.nvidia.gpus
    if any("GB10" in gpu.name for gpu in gpus):
        return "spark"
    if identity.host.arch == "x86_64" and any(gpu.compute_cap == "12.0" for gpu in gpus):
        return "rtx5090"
    return None


def _jetson_failures(req: GpuRequirements, l4t: L4tInfo | None, group: str) -> list[str]:
    if l4t is None:
        return [f"No L4T release: no /etc/nv_tegra_release ({group} needs L4T >= {req.min_l4t})"]
    failures = []
    if req.min_l4t is not None and Version(l4t.l4t) < Version(req.min_l4t):
        failures.append(f"L4T {l4t.l4t} is older than {req.min_l4t} ({group})")
    if req.min_cuda is not None:
        if l4t.cuda is None:
            failures.append(
                f"CUDA version unknown: no /usr/local/cuda/version.json and no default for "
                f"L4T {l4t.l4t} ({group} needs CUDA >= {req.min_cuda})"
            )
        elif Version(l4t.cuda) < Version(req.min_cuda):
            failures.append(f"CUDA {l4t.cuda} is older than {req.min_cuda} ({group})")
    return failures


def _driver_failures(req: GpuRequirements, nvidia: NvidiaInfo, group: str) -> list[str]:
    minimum = effective_min_driver(req)
    needs = f"{group} needs driver >= {minimum[0]}, {minimum[1]}" if minimum else group
    if nvidia.status != "ok":
        return [f"NVIDIA driver not usable: {nvidia.message or 'nvidia-smi not found'} ({needs})"]
    driver, cuda = nvidia.driver_version, nvidia.cuda_version
    if driver is None:
        return [f"NVIDIA driver version unknown: nvidia-smi reports N/A ({needs})"]
    if minimum and Version(driver) < minimum[0]:
        return [f"NVIDIA driver {driver} is older than {minimum[0]}, {minimum[1]} ({group})"]
    if not nvidia.gpus:
        return [f"No NVIDIA GPU: nvidia-smi lists none ({group})"]
    if req.min_cuda is not None:
        if cuda is None:
            return [
                f"CUDA version unknown: driver {driver} reports CUDA Version N/A "
                f"({group} needs CUDA >= {req.min_cuda})"
            ]
        if Version(cuda) < Version(req.min_cuda):
            return [
                f"NVIDIA driver {driver} supports CUDA up to {cuda}, older than {req.min_cuda} "
                f"({group})"
            ]
    return []


def _gpu_results(
    req: GpuRequirements, gpus: Sequence[Gpu], group: str, cuda_archs: Sequence[str]
) -> GateResult:
    result = GateResult()
    built = [re.sub(r"^sm_|[a-z]?(-real|-virtual)?$", "", arch) for arch in cuda_archs]
    caps = {gpu.compute_cap: gpu.name for gpu in gpus}
    for cc, name in caps.items():
        if cc is None:
            if req.compute_caps or built:
                result.warnings.append(
                    f"Compute capability of {name} unknown (nvidia-smi reports N/A); not checked"
                )
            continue
        if req.compute_caps and cc not in req.compute_caps:
            result.failures.append(
                f"{name} has compute capability {cc}, not {' or '.join(req.compute_caps)} ({group})"
            )
        if not built:
            continue
        arch, first = cuda_arch_for_compute_cap(cc), first_cuda_for_compute_cap(cc)
        if arch not in built:
            result.failures.append(
                f"{name} is sm_{arch}, the build targets {', '.join('sm_' + a for a in built)} "
                f"({group})"
            )
        elif first is not None and req.min_cuda is not None and Version(req.min_cuda) < first:
            result.failures.append(
                f"sm_{arch} ({name}) needs CUDA >= {first}, the build uses CUDA {req.min_cuda} "
                f"({group})"
            )
    return result


def _fit_failure(
    req: GpuRequirements, identity: Identity, group: str, model_bytes: int
) -> str | None:
    memory = [gpu.memory_total_mib for gpu in identity.nvidia.gpus]
    if req.unified_memory or not memory or None in memory:
        have, where = identity.host.mem_total_bytes, "host memory"
    else:
        have, where = sum(memory) * MIB, "GPU memory"
    need = model_bytes + req.kv_allowance_gib * GIB
    if need <= have:
        return None
    return (
        f"Model needs {need / GIB:.1f} GiB ({model_bytes / GIB:.1f} GiB + "
        f"{req.kv_allowance_gib:g} GiB KV allowance), more than the {have / GIB:.1f} GiB "
        f"of {where} ({group})"
    )


def check_host(
    req: GpuRequirements,
    identity: Identity,
    *,
    group: str,
    model_bytes: int = 0,
    cuda_archs: Sequence[str] = (),
) -> GateResult:
    """
    Check a host against its group's requirements.

    + req: the group's requirements
    + identity: the host's ``facts.identity.HostIdentity`` fact
    + group: the group name, ending every failure message
    + model_bytes: size of the model files to serve; with ``kv_allowance_gib`` it must fit the
      GPUs' memory, or host memory when ``unified_memory`` or GPU memory is unknown (0: no check)
    + cuda_archs: ``CMAKE_CUDA_ARCHITECTURES`` of the build to run (``["121"]``): the GPU's
      arch must be among them and its first CUDA no newer than ``min_cuda``

    On Jetson (``min_l4t`` set) the L4T release and its CUDA replace the driver check.

    .. code:: python

        result = check_host(req, host.get_fact(HostIdentity), group="spark", model_bytes=size)
        if not result.ok:
            ...  # result.failures: ["NVIDIA driver 550.54.14 is older than 580.65.06, ..."]
    """

    result = GateResult()
    arch = identity.host.arch
    if req.arch is not None and arch != req.arch:
        result.failures.append(f"CPU architecture is {arch}, not {req.arch} ({group})")
    if req.min_l4t is not None:
        result.failures += _jetson_failures(req, identity.jetson, group)
    else:
        result.failures += _driver_failures(req, identity.nvidia, group)

    gpus = _gpu_results(req, identity.nvidia.gpus, group, cuda_archs)
    result.failures += gpus.failures
    result.warnings += gpus.warnings
    if model_bytes > 0 and (fit := _fit_failure(req, identity, group, model_bytes)):
        result.failures.append(fit)

    detected = detect_group(identity)
    if detected is not None and detected != group:
        result.warnings.append(f"This host looks like a {detected} host, not {group}")
    return result


# --- the image's binary against the GPUs ------------------------------------------------


@dataclass(frozen=True)
class ImageCheck:
    """
    What a service's image must hold to run on this host's GPUs, checked against the image's
    labels (``gpufleet.cuda.sm``/``.ptx``, made from the binary by cuobjdump after the build).

    + service/ref: the service and the image it runs
    + gpus: the host's GPUs whose compute capability is known
    + advice: what to do about a mismatch; it ends the refusal
    """

    service: str
    ref: str
    gpus: tuple[Gpu, ...]
    advice: str

    def refusal(self, labels: Mapping[str, str]) -> str | None:
        """
        Why the image with ``labels`` cannot run on one of the GPUs, in one line, or None (it
        can; or it carries no ``gpufleet.cuda.sm`` label, so nothing is known about its code)::

            services.llama: image gpufleet/llama.cpp:spark has sm_120a; this GPU is 12.1
            (NVIDIA GB10): rebuild with cuda_archs ["121"]
        """

        codes = image_device_code(labels)
        if codes is None:
            return None
        for gpu in self.gpus:
            cc = gpu.compute_cap or ""  # image_check keeps only GPUs that report one
            if any(_runs(code, cc) for code in codes):
                continue
            which = "this GPU" if len(self.gpus) == 1 else f"GPU {gpu.index}"
            return (
                f"services.{self.service}: image {self.ref} has "
                f"{', '.join(codes) or 'no device code'}; {which} is {cc} ({gpu.name}): "
                f"{self.advice}"
            )
        return None


def _runs(code: str, cc: str) -> bool:
    try:
        return runs_on(code, cc)
    except ValueError:  # a label gpufleet did not write: code it cannot read runs nowhere
        return False


def image_check(service: str, ref: str, gpus: Sequence[Gpu], *, built: bool) -> ImageCheck | None:
    """
    The check of a service's image on these GPUs, or None when no GPU reports its compute
    capability (nothing to compare with; the GPU gate warns about that).

    + built: the service's image is built from source (the advice is then a rebuild with the
      GPUs' ``cuda_archs``), else pulled or sent (the advice names the code it needs)

    .. code:: python

        check = image_check("llama", "gpufleet/llama.cpp:spark", identity.nvidia.gpus, built=True)
        check.refusal({"gpufleet.cuda.sm": "sm_121a"})  # None
    """

    known: list[Gpu] = []
    archs: list[str] = []
    for gpu in gpus:
        try:
            arch = cuda_arch_for_compute_cap(gpu.compute_cap or "")
        except ValueError:  # [N/A]: nothing to compare with
            continue
        known.append(gpu)
        if arch not in archs:
            archs.append(arch)
    if not known:
        return None
    if built:
        advice = f"rebuild with cuda_archs {json.dumps(archs)}"
    else:
        advice = "use an image built for " + " and ".join(f"sm_{arch}" for arch in archs)
    return ImageCheck(service=service, ref=ref, gpus=tuple(known), advice=advice)
