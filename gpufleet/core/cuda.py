"""
CUDA toolkit, NVIDIA driver and compute capability tables, and what a CUDA binary holds (its
cuobjdump listing, the image labels made from it, and which GPUs its code runs on).

Driver minimums are NVIDIA's "CUDA Toolkit and Corresponding Driver Versions" table (Linux
x86_64 column) from the CUDA 13.1 release notes,
https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/index.html.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from packaging.version import Version


class DriverVersion(Version):
    """
    A ``Version`` that prints as written: NVIDIA zero-pads driver versions (``580.65.06``),
    which ``Version`` would print as ``580.65.6``.
    """

    def __init__(self, version: str) -> None:
        super().__init__(version)
        self._text = version.strip()

    def __str__(self) -> str:
        return self._text


# (toolkit, update, minimum Linux x86_64 driver); update 0 is the GA release
CUDA_DRIVERS: tuple[tuple[str, int, DriverVersion], ...] = tuple(
    (cuda, update, DriverVersion(driver))
    for cuda, update, driver in (
        ("13.1", 0, "590.44.01"),
        ("13.0", 2, "580.95.05"),
        ("13.0", 1, "580.82.07"),
        ("13.0", 0, "580.65.06"),
        ("12.9", 1, "575.57.08"),
        ("12.9", 0, "575.51.03"),
        ("12.8", 1, "570.124.06"),
        ("12.8", 0, "570.26"),
        ("12.6", 3, "560.35.05"),
        ("12.6", 2, "560.35.03"),
        ("12.6", 1, "560.35.03"),
        ("12.6", 0, "560.28.03"),
        ("12.5", 1, "555.42.06"),
        ("12.5", 0, "555.42.02"),
        ("12.4", 1, "550.54.15"),
        ("12.4", 0, "550.54.14"),
        ("12.3", 1, "545.23.08"),
        ("12.3", 0, "545.23.06"),
        ("12.2", 2, "535.104.05"),
        ("12.2", 1, "535.86.09"),
        ("12.2", 0, "535.54.03"),
        ("12.1", 1, "530.30.02"),
        ("12.1", 0, "530.30.02"),
        ("12.0", 1, "525.85.12"),
        ("12.0", 0, "525.60.13"),
        ("11.8", 0, "520.61.05"),
    )
)

# Minor version compatibility, same release notes and
# https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html: any
# toolkit of a major version runs, with a limited feature set, on a driver in [low, high)
# even below its own minimum above. None means no upper bound.
MINOR_VERSION_COMPAT: dict[int, tuple[Version, Version | None]] = {
    11: (Version("450"), Version("525")),
    12: (Version("525"), Version("580")),
    13: (Version("580"), None),
}

# compute capability -> first CUDA toolkit that compiles for it. 12.1/12.0/9.0/8.9 from
# ggml-org/llama.cpp @ 00a2d60 ggml/src/ggml-cuda/CMakeLists.txt ("120 == Blackwell, needs CUDA
# v12.8", 121a-real from 12.9, 89/90 from 11.8); the rest are the toolkits that introduced each
# architecture per NVIDIA's release notes, not re-read for this table (8.7 Jetson Orin: CUDA
# 11.4, JetPack 5).
FIRST_CUDA_BY_COMPUTE_CAP: dict[str, Version] = {
    cc: Version(cuda)
    for cc, cuda in (
        ("12.1", "12.9"),
        ("12.0", "12.8"),
        ("10.0", "12.8"),
        ("9.0", "11.8"),
        ("8.9", "11.8"),
        ("8.7", "11.4"),
        ("8.6", "11.1"),
        ("8.0", "11.0"),
        ("7.5", "10.0"),
        ("7.2", "10.0"),
        ("7.0", "9.0"),
        ("6.1", "8.0"),
        ("6.0", "8.0"),
    )
}

_COMPUTE_CAP = re.compile(r"(\d+)\.(\d)$")


def min_driver_for_cuda(cuda: str) -> Version:
    """
    The minimum Linux x86_64 NVIDIA driver for a CUDA toolkit: its GA row in ``CUDA_DRIVERS``.

    + cuda: toolkit version, ``X.Y`` or ``X.Y.Z`` (``13.0.1`` reads as ``13.0``)

    Raises ``ValueError`` for versions the table does not hold (newer than 13.1, older than 11.8).

    .. code:: python

        min_driver_for_cuda("13.0")  # DriverVersion("580.65.06")
    """

    version = Version(cuda)
    release = f"{version.major}.{version.minor}"
    for row_cuda, update, driver in CUDA_DRIVERS:
        if row_cuda == release and update == 0:
            return driver
    newest, oldest = CUDA_DRIVERS[0][0], CUDA_DRIVERS[-1][0]
    if version > Version(newest):
        raise ValueError(f"CUDA {cuda} is newer than the driver table's newest toolkit, {newest}")
    raise ValueError(f"CUDA {cuda} is not a toolkit in the driver table ({oldest} to {newest})")


def first_cuda_for_compute_cap(cc: str) -> Version | None:
    """
    The first CUDA toolkit that can build for compute capability ``cc`` (``"12.1"`` -> 12.9),
    None when ``FIRST_CUDA_BY_COMPUTE_CAP`` does not know it.
    """

    return FIRST_CUDA_BY_COMPUTE_CAP.get(cc)


def cuda_arch_for_compute_cap(cc: str) -> str:
    """
    The ``sm_`` number of a compute capability: ``"12.1"`` -> ``"121"``.
    """

    match = _COMPUTE_CAP.match(cc)
    if not match:
        raise ValueError(f"{cc} is not a compute capability (like 12.1)")
    return match.group(1) + match.group(2)


# --- what a CUDA binary holds -----------------------------------------------------------

# Where the llama.cpp Dockerfile's CUDA build stage writes `cuobjdump --list-elf --list-ptx` of
# the CUDA backend (templates/llama.cpp.Dockerfile.j2), and the image labels made from it.
OBJECTS_FILE = "/app/gpufleet-cuda-objects.txt"
SM_LABEL = "gpufleet.cuda.sm"
PTX_LABEL = "gpufleet.cuda.ptx"

_ELF = re.compile(r"^ELF file\s+\d+:\s+\S*?\.(sm_\d+[af]?)\.cubin\s*$", re.M)
_PTX = re.compile(r"^PTX file\s+\d+:\s+\S*?\.(sm_\d+[af]?)\.ptx\s*$", re.M)
_CODE = re.compile(r"(sm|compute)_(\d+)(\d)([af]?)$")


@dataclass(frozen=True)
class DeviceCode:
    """What a CUDA binary holds: real architectures (cubins) and virtual ones (PTX)."""

    elf: tuple[str, ...]
    ptx: tuple[str, ...]


def arch_sort_key(arch: str) -> tuple[int, str]:
    """Orders ``sm_86`` before ``sm_120a``: by architecture number, then by name."""
    digits = re.sub(r"\D", "", arch)
    return int(digits or 0), arch


def parse_cuobjdump(text: str) -> DeviceCode:
    """``cuobjdump --list-elf --list-ptx`` output as the architectures it lists.

    Each cubin is listed as ``ELF file    1: libggml-cuda.1.sm_121a.cubin`` and each PTX as
    ``PTX file    1: libggml-cuda.1.sm_90.ptx`` (cuobjdump names PTX by ``sm_``, for
    ``compute_90``); one entry per object and architecture, so the result is deduplicated and
    sorted by architecture number.

        >>> parse_cuobjdump("ELF file    1: x.1.sm_121a.cubin\\nPTX file    1: x.1.sm_90.ptx\\n")
        DeviceCode(elf=('sm_121a',), ptx=('sm_90',))

    Raises ``ValueError`` for a line that starts like an entry but does not parse: a format
    this parser does not know must not pass as "no device code".
    """
    for line in text.splitlines():
        if line.startswith(("ELF file", "PTX file")) and not (_ELF.match(line) or _PTX.match(line)):
            raise ValueError(f"unrecognised cuobjdump line: {line!r}")
    elf = sorted(set(_ELF.findall(text)), key=arch_sort_key)
    ptx = sorted(set(_PTX.findall(text)), key=arch_sort_key)
    return DeviceCode(elf=tuple(elf), ptx=tuple(ptx))


def sm_label(text: str) -> dict[str, str]:
    """The image labels for a cuobjdump listing: ``gpufleet.cuda.sm`` (comma-separated cubin
    architectures, e.g. ``sm_121a``) and ``gpufleet.cuda.ptx`` (``compute_90``, or empty).

    Raises ``ValueError`` when the listing holds no device code at all.
    """
    code = parse_cuobjdump(text)
    if not code.elf and not code.ptx:
        raise ValueError("cuobjdump lists no device code: not a CUDA build")
    ptx = [arch.replace("sm_", "compute_", 1) for arch in code.ptx]
    return {SM_LABEL: ",".join(code.elf), PTX_LABEL: ",".join(ptx)}


def image_device_code(labels: Mapping[str, str]) -> tuple[str, ...] | None:
    """The device code an image's labels say its binary holds (``("sm_121a", "compute_90")``),
    or None when the image carries no ``gpufleet.cuda.sm`` label (a CPU build, an image
    gpufleet did not build): then nothing is known, and nothing is checked."""
    if SM_LABEL not in labels:
        return None
    codes = [*labels[SM_LABEL].split(","), *labels.get(PTX_LABEL, "").split(",")]
    return tuple(code.strip() for code in codes if code.strip())


def runs_on(code: str, cc: str) -> bool:
    """Whether device code ``code`` runs on a GPU of compute capability ``cc``.

    + code: a cubin ``sm_XY`` or PTX ``compute_XY``, either with the ``a`` (architecture-
      specific) or ``f`` (family-specific) suffix; ``XY`` is major and one minor digit
    + cc: ``"12.1"``

    The rules are CUDA's, from the Programming Guide's "Binary Compatibility" and "PTX
    Compatibility" and NVIDIA's "Blackwell and CUDA 12.9 Introduce Family-Specific
    Architecture Features" (developer.nvidia.com/blog, 2025):

    - ``a`` code (cubin or PTX) runs on exactly X.Y: sm_121a on 12.1 only, sm_120a on 12.0 only;
    - a plain or ``f`` cubin runs on X.Y and every later minor of major X (sm_120 on 12.1,
      never on 13.0);
    - plain PTX is JIT-compiled by the driver for any X.Y or newer (compute_80 on 12.1);
      ``f`` PTX within its family only, like an ``f`` cubin.

    Raises ``ValueError`` for a code or compute capability that does not parse.

    .. code:: python

        runs_on("sm_121a", "12.1")  # True
        runs_on("sm_120a", "12.1")  # False
    """
    match = _CODE.match(code)
    if not match:
        raise ValueError(f"{code} is not CUDA device code (like sm_121a or compute_90)")
    kind, major, minor, suffix = (
        match.group(1),
        int(match.group(2)),
        int(match.group(3)),
        match.group(4),
    )
    have = _COMPUTE_CAP.match(cc)
    if not have:
        raise ValueError(f"{cc} is not a compute capability (like 12.1)")
    gpu = (int(have.group(1)), int(have.group(2)))
    if suffix == "a":
        return gpu == (major, minor)
    if kind == "sm" or suffix == "f":
        return gpu[0] == major and gpu[1] >= minor
    return gpu >= (major, minor)
