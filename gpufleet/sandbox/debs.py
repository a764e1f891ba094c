"""
Stand-in NVIDIA Container Toolkit and Docker Compose packages, built as real ``.deb`` files.

The packages (built with ``dpkg-deb``) carry NVIDIA's package names, versions, dependencies and
file paths; the programs inside are the stand-ins in ``assets/toolkit``. Builds are
reproducible (fixed timestamps, root-owned files) and skipped when the output exists with the
same inputs. ``gpufleet.sandbox.aptrepo`` serves them from signed flat repositories.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TOOLKIT_VERSIONS = ("1.17.8-1", "1.18.0-1")
COMPOSE_VERSION = "2.40.3"
# 2025-01-01T00:00:00Z: every file, package and Release date, so rebuilds are byte-identical.
SOURCE_DATE_EPOCH = 1735689600
MAINTAINER = "gpufleet sandbox <sandbox@gpufleet.invalid>"
# Commit ids printed by `--version`; 1.17.8's is from a captured `nvidia-ctk --version`.
KNOWN_COMMITS = {"1.17.8": "f202b80a9b9d0db00d9b1d73c0128c8962c55f4d"}
_FORMAT = "1"  # part of every package's input hash: bump to force rebuilds
_INPUTS_FILE = ".gpufleet-inputs.json"


def upstream_commit(version: str) -> str:
    """
    The commit id a toolkit version reports (``1.18.0`` or ``1.18.0-1``).
    """
    upstream = version.split("-")[0]
    known = KNOWN_COMMITS.get(upstream)
    return known or hashlib.sha1(f"nvidia-container-toolkit v{upstream}".encode()).hexdigest()


def render_asset(name: str, version: str) -> bytes:
    """
    A stand-in script from ``assets/`` with ``@VERSION@`` / ``@COMMIT@`` filled in.
    """
    text = (ASSETS / name).read_text()
    upstream = version.split("-")[0]
    text = text.replace("@VERSION@", upstream).replace("@COMMIT@", upstream_commit(version))
    if text.startswith("#!/usr/bin/python3\n"):
        # The real tools are Go binaries and need no Python; a fresh host has none on its PATH
        # (its stand-ins' interpreter is kept aside), so the script finds one: this second
        # line is an exec to sh, and two harmless string literals to Python.
        text = PYTHON_SHEBANG + text.removeprefix("#!/usr/bin/python3\n")
    return text.encode()


PYTHON_SHEBANG = (
    "#!/bin/sh\n"
    '"exec" "$(command -v python3 || echo /usr/lib/gpufleet-standin/python3)" "$0" "$@"\n'
)


# ---------------------------------------------------------------- .deb building


@dataclass(frozen=True)
class _Package:
    name: str
    version: str
    description: str
    architecture: str = "all"
    fields: dict[str, str] = field(default_factory=dict)
    # path -> (content, or a file to copy, and the mode)
    files: dict[str, tuple[bytes | Path, int]] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    conffiles: tuple[str, ...] = ()
    compression: str = "xz"

    @property
    def filename(self) -> str:
        version = self.version.split(":", 1)[-1]
        return f"{self.name}_{version}_{self.architecture}.deb"

    def input_hash(self) -> str:
        digest = hashlib.sha256(_FORMAT.encode())
        meta = {k: v for k, v in self.__dict__.items() if k != "files"}
        digest.update(json.dumps(meta, sort_keys=True).encode())
        for path, (content, mode) in sorted(self.files.items()):
            digest.update(f"\0{path}\0{mode:o}\0".encode())
            digest.update(_sha256(content).encode())
        return digest.hexdigest()


def _sha256(content: bytes | Path) -> str:
    if isinstance(content, bytes):
        return hashlib.sha256(content).hexdigest()
    digest = hashlib.sha256()
    with content.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _control(pkg: _Package, installed_kib: int) -> str:
    lines = [
        f"Package: {pkg.name}",
        f"Version: {pkg.version}",
        f"Architecture: {pkg.architecture}",
        f"Maintainer: {MAINTAINER}",
        f"Installed-Size: {installed_kib}",
        *(f"{key}: {value}" for key, value in pkg.fields.items()),
    ]
    summary, _, body = pkg.description.partition("\n")
    lines.append(f"Description: {summary}")
    lines += [f" {line}" if line.strip() else " ." for line in body.splitlines()]
    return "\n".join(lines) + "\n"


def _build_deb(pkg: _Package, outdir: Path) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / pkg.filename
    inputs_file = outdir / _INPUTS_FILE
    recorded = json.loads(inputs_file.read_text()) if inputs_file.exists() else {}
    digest = pkg.input_hash()
    if out.exists() and recorded.get(pkg.filename) == digest:
        return out

    with tempfile.TemporaryDirectory(prefix=".stage-", dir=outdir) as tmp:
        stage = Path(tmp) / "root"
        md5sums, size = [], 0
        for path, (content, mode) in sorted(pkg.files.items()):
            dest = stage / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                dest.write_bytes(content)
            else:
                shutil.copyfile(content, dest)
            dest.chmod(mode)
            size += dest.stat().st_size
            md5sums.append(f"{hashlib.md5(dest.read_bytes()).hexdigest()}  {path.lstrip('/')}")
        for path, target in pkg.symlinks.items():
            link = stage / path.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)
        debian = stage / "DEBIAN"
        debian.mkdir(parents=True)
        (debian / "control").write_text(_control(pkg, max(1, -(-size // 1024))))
        (debian / "md5sums").write_text("\n".join(md5sums) + "\n")
        if pkg.conffiles:
            (debian / "conffiles").write_text("\n".join(pkg.conffiles) + "\n")
        for entry in [stage, *stage.rglob("*")]:
            if entry.is_dir() and not entry.is_symlink():
                entry.chmod(0o755)
            elif entry.parent == debian:
                entry.chmod(0o644)
            os.utime(entry, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH), follow_symlinks=False)
        partial = Path(tmp) / pkg.filename
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}
        build = ["dpkg-deb", "--root-owner-group", f"-Z{pkg.compression}", "--build"]
        proc = subprocess.run(
            [*build, str(stage), str(partial)], capture_output=True, text=True, env=env
        )
        if proc.returncode != 0:
            raise RuntimeError(f"dpkg-deb failed for {pkg.filename}: {proc.stderr.strip()}")
        os.utime(partial, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
        partial.replace(out)

    recorded[pkg.filename] = digest
    inputs_file.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    return out


def _doc(name: str) -> dict[str, tuple[bytes | Path, int]]:
    text = (
        f"{name}: stand-in built by the gpufleet sandbox. Same package name, version,\n"
        "dependencies and program paths as NVIDIA's; the programs only emulate.\n"
    )
    return {f"/usr/share/doc/{name}/README.gpufleet-sandbox": (text.encode(), 0o644)}


def toolkit_packages(version: str) -> list[_Package]:
    """
    The four NVIDIA Container Toolkit packages of one version (``1.18.0-1``).
    """

    def script(name: str) -> tuple[bytes | Path, int]:
        return render_asset(f"toolkit/{name}", version), 0o755

    common = {
        "Section": "utils",
        "Priority": "optional",
        "Homepage": "https://github.com/NVIDIA/nvidia-container-toolkit",
    }
    return [
        _Package(
            "libnvidia-container1",
            version,
            "NVIDIA container runtime library (gpufleet sandbox stand-in)\n"
            "The nvidia-container library provides an interface to configure GNU/Linux\n"
            "containers leveraging NVIDIA hardware. This stand-in ships no library.",
            fields={
                **common,
                "Section": "libs",
                "Homepage": "https://github.com/NVIDIA/libnvidia-container",
            },
            files=_doc("libnvidia-container1"),
        ),
        _Package(
            "libnvidia-container-tools",
            version,
            "NVIDIA container runtime library (command-line tools) (gpufleet sandbox stand-in)\n"
            "This package contains command-line tools that facilitate using the library.",
            fields={
                "Depends": f"libnvidia-container1 (= {version}), python3",
                **common,
                "Homepage": "https://github.com/NVIDIA/libnvidia-container",
            },
            files={
                "/usr/bin/nvidia-container-cli": script("nvidia-container-cli"),
                **_doc("libnvidia-container-tools"),
            },
        ),
        _Package(
            "nvidia-container-toolkit-base",
            version,
            "NVIDIA Container Toolkit Base (gpufleet sandbox stand-in)\n"
            "Provides tools such as the NVIDIA Container Runtime and NVIDIA Container Toolkit\n"
            "CLI to enable GPU support in containers.",
            fields={"Depends": "python3", **common},
            files={
                "/usr/bin/nvidia-ctk": script("nvidia-ctk"),
                "/usr/bin/nvidia-container-runtime": script("nvidia-container-runtime"),
                "/usr/bin/nvidia-cdi-hook": script("nvidia-cdi-hook"),
                "/etc/nvidia-container-runtime/config.toml": (
                    (ASSETS / "toolkit/config.toml").read_bytes(),
                    0o644,
                ),
                **_doc("nvidia-container-toolkit-base"),
            },
            conffiles=("/etc/nvidia-container-runtime/config.toml",),
        ),
        _Package(
            "nvidia-container-toolkit",
            version,
            "NVIDIA Container toolkit (gpufleet sandbox stand-in)\n"
            "Provides tools and utilities to enable GPU support in containers.",
            fields={
                "Depends": f"nvidia-container-toolkit-base (= {version}), "
                f"libnvidia-container-tools (= {version})",
                **common,
            },
            files={
                "/usr/bin/nvidia-container-runtime-hook": script("nvidia-container-runtime-hook"),
                **_doc("nvidia-container-toolkit"),
            },
            symlinks={"/usr/bin/nvidia-container-toolkit": "nvidia-container-runtime-hook"},
        ),
    ]


def build_toolkit_debs(outdir: Path, versions: Sequence[str] = TOOLKIT_VERSIONS) -> list[Path]:
    """
    Build the four toolkit packages for each version into ``outdir``.

    + outdir: directory for the ``.deb`` files (created)
    + versions: Debian versions, e.g. ``("1.17.8-1", "1.18.0-1")``
    """
    return [_build_deb(pkg, Path(outdir)) for v in versions for pkg in toolkit_packages(v)]


def _elf_arch(binary: Path) -> str:
    with binary.open("rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        raise ValueError(f"{binary} is not an ELF executable")
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    arches = {62: "amd64", 183: "arm64", 3: "i386", 40: "armhf"}
    if machine not in arches:
        raise ValueError(f"{binary}: unknown ELF machine {machine}")
    return arches[machine]


def build_compose_plugin_deb(
    outdir: Path, compose_binary: Path, version: str = COMPOSE_VERSION
) -> Path:
    """
    Package a Docker Compose v2 binary as Docker's ``docker-compose-plugin``.

    + outdir: directory for the ``.deb`` (created)
    + compose_binary: the static ``docker-compose`` binary; its ELF header gives the
      package architecture
    + version: upstream version; the package version is Docker's form for bookworm,
      ``<version>-1~debian.12~bookworm``
    """
    compose_binary = Path(compose_binary)
    pkg = _Package(
        "docker-compose-plugin",
        f"{version}-1~debian.12~bookworm",
        "Docker Compose (V2) plugin for the Docker CLI. (gpufleet sandbox package)\n"
        "This plugin provides the 'docker compose' subcommand.\n"
        "\n"
        "The binary can also be run standalone as a direct replacement for\n"
        "Docker Compose V1 ('docker-compose').",
        architecture=_elf_arch(compose_binary),
        fields={
            "Section": "admin",
            "Priority": "optional",
            "Homepage": "https://github.com/docker/compose",
        },
        files={"/usr/libexec/docker/cli-plugins/docker-compose": (compose_binary, 0o755)},
        # xz takes a minute on a 76 MB binary with 2 cores; gzip a few seconds.
        compression="gzip",
    )
    return _build_deb(pkg, Path(outdir))
