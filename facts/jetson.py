"""
Facts about NVIDIA Jetson boards: the L4T release, its JetPack and its CUDA.
"""

from __future__ import annotations

import re

from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

from facts._sections import Section, excerpt, get_section, mark, split_sections
from gpufleet.core.snapshot import L4tInfo

SCRIPT = "; ".join(
    (
        "if [ -f /etc/nv_tegra_release ]; then " + mark("l4t.release"),
        "cat /etc/nv_tegra_release",
        mark("l4t.cuda-version-json"),
        "cat /usr/local/cuda/version.json 2>/dev/null || true",
        f"else {mark('l4t.absent')}; fi",
    )
)

# L4T -> JetPack, from dusty-nv/jetson-containers @ dd206bf, jetson_containers/l4t_version.py
# (get_jetpack_version); keys are a full L4T version or its major.minor. R32 (JetPack 4) and
# R34 (JetPack 5.0 previews) from the same function @ 019980c, which still lists them.
JETPACK_BY_L4T = {
    "32.3.1": "4.3",
    "32.4.2": "4.4 DP",
    "32.4.3": "4.4",
    "32.4.4": "4.4.1",
    "32.5.0": "4.5",
    "32.5.1": "4.5.1",
    "32.5.2": "4.5.1",
    "32.6.1": "4.6",
    "32.7.1": "4.6.1",
    "32.7.2": "4.6.2",
    "32.7.3": "4.6.3",
    "32.7.4": "4.6.4",
    "32.7.5": "4.6.5",
    "34.1.0": "5.0 DP",
    "34.1.1": "5.0.1 DP",
    "35.1.0": "5.0.2",
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "35.6.1": "5.1.5",
    "35.6.2": "5.1.5",
    "35.6.4": "5.1.6",
    "36.2.0": "6.0 DP",
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.2": "6.1.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
    "36.4.7": "6.2.1",
    "36.5.0": "6.2.1",
    "38.2": "7.0",
    "38.4.0": "7.1",
    "39.1.0": "7.2",
}

# The CUDA a JetPack installs, for hosts without /usr/local/cuda/version.json; same file
# (get_cuda_version); keys are an L4T major.minor or major. R35 (CUDA 11.4) has no entry there.
DEFAULT_CUDA_BY_L4T = {
    "36.2": "12.2",
    "36.3": "12.4",
    "36.4": "12.6",
    "36.5": "12.6",
    "38": "13.0",
    "39": "13.2",
}

_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)", re.ASCII)


def _lookup(table: dict[str, str], version: str, depths: tuple[int, ...]) -> str | None:
    parts = version.split(".")
    return next((table[key] for n in depths if (key := ".".join(parts[:n])) in table), None)


def parse_tegra_release(lines: list[str]) -> tuple[int, str, str | None]:
    """
    Major, revision and board from ``/etc/nv_tegra_release`` (R35: one line, R36: four lines;
    only the first carries the version).
    """

    match = _RELEASE.match(lines[0].strip()) if lines else None
    if not match:
        first = excerpt(lines[0]) if lines else "nothing"
        raise FactProcessError(f"not an nv_tegra_release first line: {first}")
    board = re.search(r"BOARD:\s*([^,]+)", lines[0])
    return int(match.group(1)), match.group(2), board.group(1).strip() if board else None


def parse_cuda_version_json(lines: list[str]) -> str | None:
    """
    The CUDA toolkit version from ``/usr/local/cuda/version.json``.

    Reads ``cuda_nvcc.version``, else ``cuda_cudart.version``: the top-level ``cuda.version`` is
    a build stamp (``12.6.11``). Matched per block rather than with ``json.loads`` so that a
    truncated file still yields the components it holds.
    """

    text = "\n".join(lines)
    for component in ("cuda_nvcc", "cuda_cudart"):
        block = re.search(rf'"{component}"\s*:\s*{{[^{{}}]*?"version"\s*:\s*"([^"]+)"', text)
        if block:
            version = block.group(1)
            if not re.fullmatch(r"\d+(\.\d+)+", version, re.ASCII):
                raise FactProcessError(f"{component} {excerpt(version)} is not a CUDA version")
            return version
    return None


def from_sections(sections: dict[str, Section]) -> L4tInfo | None:
    """
    Parse the ``l4t.*`` sections printed by ``SCRIPT``; None when the host is no Jetson.
    """

    if "l4t.absent" in sections:
        return None
    major, revision, board = parse_tegra_release(get_section(sections, "l4t.release").lines)
    l4t = f"{major}.{revision}"
    cuda = parse_cuda_version_json(get_section(sections, "l4t.cuda-version-json").lines)
    return L4tInfo(
        l4t=l4t,
        major=major,
        revision=revision,
        board=board,
        jetpack=_lookup(JETPACK_BY_L4T, l4t, (3, 2)),
        cuda=cuda or _lookup(DEFAULT_CUDA_BY_L4T, l4t, (2, 1)),
    )


class L4tRelease(FactBase[L4tInfo | None]):
    """
    Returns the L4T release of a Jetson, with its JetPack and CUDA versions, or None elsewhere.

    ``cuda`` comes from ``/usr/local/cuda/version.json``, else from the JetPack default for
    the L4T release; ``jetpack`` is None for releases missing from ``JETPACK_BY_L4T``.

    .. code:: python

        L4tInfo(l4t="36.4.7", major=36, revision="4.7", board="generic", jetpack="6.2.1",
                cuda="12.6.68")
    """

    def command(self) -> str:
        return SCRIPT

    def process(self, output: list[str]) -> L4tInfo | None:
        return from_sections(split_sections(output))
