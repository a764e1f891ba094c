"""
Stand-in NVIDIA Container Toolkit and Docker Compose packages, and the signed flat apt
repositories the sandbox mirror serves them from.

The packages are real ``.deb`` files (built with ``dpkg-deb``) carrying NVIDIA's package names,
versions, dependencies and file paths; the programs inside are the stand-ins in
``assets/toolkit``. The repositories are flat (``deb [signed-by=...] URL /``), signed with a
local GnuPG key, laid out like nvidia.github.io/libnvidia-container:

    <root>/libnvidia-container/gpgkey                                 armored key
    <root>/libnvidia-container/stable/deb/nvidia-container-toolkit.list
    <root>/libnvidia-container/stable/deb/amd64/                      flat repo: toolkit
    <root>/docker/gpgkey                                              armored key
    <root>/docker/deb/                                                flat repo: compose plugin

Builds are reproducible (fixed timestamps, root-owned files) and skipped when the output
exists with the same inputs, so ``build_mirror_tree`` is cheap to call again.
"""

from __future__ import annotations

import filecmp
import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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

TOOLKIT_KEY_UID = "gpufleet sandbox libnvidia-container <libnvidia-container@gpufleet.invalid>"
DOCKER_KEY_UID = "gpufleet sandbox docker <docker@gpufleet.invalid>"
TOOLKIT_KEY_PATH = "libnvidia-container/gpgkey"
TOOLKIT_LIST_PATH = "libnvidia-container/stable/deb/nvidia-container-toolkit.list"
TOOLKIT_REPO_PATH = "libnvidia-container/stable/deb/amd64"
DOCKER_KEY_PATH = "docker/gpgkey"
DOCKER_REPO_PATH = "docker/deb"


def mirror_urls(base_url: str) -> dict[str, str]:
    """
    The URLs hosts use for a mirror tree served at ``base_url`` (apt expands ``$(ARCH)``).
    """
    base = base_url.rstrip("/")
    return {
        "toolkit_key": f"{base}/{TOOLKIT_KEY_PATH}",
        "toolkit_list": f"{base}/{TOOLKIT_LIST_PATH}",
        "toolkit_repo": f"{base}/libnvidia-container/stable/deb/$(ARCH)",
        "docker_key": f"{base}/{DOCKER_KEY_PATH}",
        "docker_repo": f"{base}/{DOCKER_REPO_PATH}",
    }


def toolkit_list_text(base_url: str) -> str:
    """
    ``nvidia-container-toolkit.list`` as upstream serves it, pointing at ``base_url``.
    """
    base = base_url.rstrip("/")
    return (
        f"deb {base}/libnvidia-container/stable/deb/$(ARCH) /\n"
        f"#deb {base}/libnvidia-container/experimental/deb/$(ARCH) /\n"
    )


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
    return text.encode()


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


# ---------------------------------------------------------------- signing


def _gpg(home: Path, *args: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--yes",
            "--no-tty",
            "--no-autostart",
            "--quiet",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            *args,
        ],
        input=stdin,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"gpg {' '.join(args)} failed: {proc.stderr.decode().strip()}")
    return proc.stdout


# Runs gpg-agent in systemd's supervised mode on a socket we pass as fd 3: the agent stays our
# child, so it is stopped and reaped here rather than left daemonized.
_AGENT = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="std")
os.execvp("gpg-agent", ["gpg-agent", "--homedir", sys.argv[2], "--supervised"])
"""


@contextmanager
def _gnupg(home: Path) -> Iterator[Path]:
    """
    A private GnuPG home with its own gpg-agent for the duration of the block.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    with tempfile.TemporaryDirectory(prefix="gpufleet-gpg-") as short:
        # The agent's socket goes in the home, and a socket path has ~107 bytes at most:
        # a deep home (a state directory in a long checkout path) is reached through a link.
        link = Path(short) / "home"
        link.symlink_to(home.resolve())
        with _agent(link) as used:
            yield used


@contextmanager
def _agent(home: Path) -> Iterator[Path]:
    path = subprocess.run(
        ["gpgconf", "--homedir", str(home), "--list-dirs", "agent-socket"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The socket lives in the home, or under /run/user/<uid>/gnupg where that exists.
    subprocess.run(
        ["gpgconf", "--homedir", str(home), "--create-socketdir"], capture_output=True, check=False
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        Path(path).unlink(missing_ok=True)
        listener.bind(path)
        listener.listen(16)
        fd = listener.fileno()
        agent = subprocess.Popen(
            [sys.executable, "-c", _AGENT, str(fd), str(home)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        yield home
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        Path(path).unlink(missing_ok=True)


def _secret_fingerprints(home: Path) -> list[str]:
    out = _gpg(home, "--list-secret-keys", "--with-colons").decode()
    fprs, after_sec = [], False
    for line in out.splitlines():
        kind = line.split(":", 1)[0]
        if kind == "sec":
            after_sec = True
        elif kind == "fpr" and after_sec:
            fprs.append(line.split(":")[9])
            after_sec = False
    return fprs


def make_signing_key(gnupg_home: Path, uid: str = TOOLKIT_KEY_UID) -> str:
    """
    Create (or reuse) the repository signing key in ``gnupg_home``; returns its fingerprint.

    + gnupg_home: private GnuPG home (created, mode 0700); an existing secret key is reused
    + uid: user id for a new key (ed25519, signing only, no passphrase, no expiry)
    """
    with _gnupg(gnupg_home) as home:
        fprs = _secret_fingerprints(home)
        if not fprs:
            _gpg(home, "--quick-generate-key", uid, "ed25519", "sign", "never")
            fprs = _secret_fingerprints(home)
        return fprs[0]


def export_public_key(gnupg_home: Path, path: Path) -> None:
    """
    Write the ASCII-armored public key of ``gnupg_home`` to ``path`` (like upstream ``gpgkey``).
    """
    fingerprint = make_signing_key(gnupg_home)
    with _gnupg(gnupg_home) as home:
        armored = _gpg(home, "--armor", "--export", fingerprint)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_if_changed(path, armored)


# ---------------------------------------------------------------- flat repositories


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.exists() and path.read_bytes() == data:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def _stanza(deb: Path) -> str:
    control = subprocess.run(
        ["dpkg-deb", "-f", str(deb)], check=True, capture_output=True, text=True
    ).stdout
    head, _, description = control.partition("\nDescription:")
    data = deb.read_bytes()
    index = [
        f"Filename: ./{deb.name}",
        f"Size: {len(data)}",
        f"MD5sum: {hashlib.md5(data).hexdigest()}",
        f"SHA1: {hashlib.sha1(data).hexdigest()}",
        f"SHA256: {hashlib.sha256(data).hexdigest()}",
    ]
    text = head.rstrip("\n") + "\n" + "\n".join(index) + "\n"
    if description:
        text += "Description:" + description.rstrip("\n") + "\n"
    return text


def _release(repo_dir: Path, date: float) -> str:
    lines = [
        "Origin: gpufleet sandbox",
        "Label: gpufleet sandbox mirror",
        "Date: " + time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime(date)),
    ]
    for field_name, algo in (("MD5Sum", "md5"), ("SHA256", "sha256")):
        lines.append(f"{field_name}:")
        for name in ("Packages", "Packages.gz"):
            data = (repo_dir / name).read_bytes()
            lines.append(f" {hashlib.new(algo, data).hexdigest()} {len(data):>16} {name}")
    return "\n".join(lines) + "\n"


def _signatures_valid(home: Path, repo_dir: Path) -> bool:
    inrelease, detached = repo_dir / "InRelease", repo_dir / "Release.gpg"
    if not (inrelease.exists() and detached.exists()):
        return False
    try:
        signed_text = _gpg(home, "--decrypt", str(inrelease))
        _gpg(home, "--verify", str(detached), str(repo_dir / "Release"))
    except RuntimeError:
        return False
    return signed_text == (repo_dir / "Release").read_bytes()


def build_flat_repo(repo_dir: Path, debs: list[Path], gnupg_home: Path) -> None:
    """
    Make ``repo_dir`` a signed flat apt repository holding exactly ``debs``.

    Copies the packages in (removing other ``.deb`` files), writes ``Packages``,
    ``Packages.gz``, ``Release`` (dated by the newest package), ``InRelease`` (clearsigned)
    and ``Release.gpg`` (detached, armored). Signs with the key of ``gnupg_home``, made if
    missing; an unchanged repository is not signed again.

    + repo_dir: the directory apt reads as ``deb [signed-by=...] URL /``
    + debs: package files (may already live in ``repo_dir``)
    + gnupg_home: GnuPG home of the signing key
    """
    repo_dir = Path(repo_dir)
    repo_dir.mkdir(parents=True, exist_ok=True)
    names = set()
    for deb in map(Path, debs):
        dest = repo_dir / deb.name
        if deb.resolve() != dest.resolve() and not (
            dest.exists() and filecmp.cmp(deb, dest, shallow=False)
        ):
            shutil.copy2(deb, dest)
        names.add(deb.name)
    for stale in repo_dir.glob("*.deb"):
        if stale.name not in names:
            stale.unlink()

    stanzas = [_stanza(repo_dir / name) for name in sorted(names)]
    packages = "\n".join(stanzas).encode()
    _write_if_changed(repo_dir / "Packages", packages)
    _write_if_changed(repo_dir / "Packages.gz", gzip.compress(packages, 9, mtime=0))
    newest = max((repo_dir / n).stat().st_mtime for n in names) if names else SOURCE_DATE_EPOCH
    release = _release(repo_dir, newest).encode()
    changed = _write_if_changed(repo_dir / "Release", release)

    fingerprint = make_signing_key(gnupg_home)
    with _gnupg(gnupg_home) as home:
        if not changed and _signatures_valid(home, repo_dir):
            return
        key = ["--local-user", fingerprint, "--digest-algo", "SHA512"]
        signed = _gpg(home, *key, "--clearsign", stdin=release)
        detached = _gpg(home, *key, "--armor", "--detach-sign", stdin=release)
    _write_if_changed(repo_dir / "InRelease", signed)
    _write_if_changed(repo_dir / "Release.gpg", detached)


def build_mirror_tree(root: Path, *, compose_binary: Path, base_url: str, gnupg_home: Path) -> None:
    """
    Build the whole mirror tree (see the module docstring) into ``root``; idempotent.

    + root: directory the mirror's web server serves at ``base_url``
    + compose_binary: the static Docker Compose v2 binary to package
    + base_url: URL of ``root`` as hosts reach it, e.g. ``http://mirror``
    + gnupg_home: directory for the two signing keys (``libnvidia-container/``, ``docker/``)
    """
    root, gnupg_home = Path(root), Path(gnupg_home)
    repos = (
        (
            TOOLKIT_REPO_PATH,
            TOOLKIT_KEY_PATH,
            "libnvidia-container",
            TOOLKIT_KEY_UID,
            lambda out: build_toolkit_debs(out),
        ),
        (
            DOCKER_REPO_PATH,
            DOCKER_KEY_PATH,
            "docker",
            DOCKER_KEY_UID,
            lambda out: [build_compose_plugin_deb(out, Path(compose_binary))],
        ),
    )
    for repo_path, key_path, home_name, uid, build in repos:
        home = gnupg_home / home_name
        make_signing_key(home, uid)
        repo_dir = root / repo_path
        build_flat_repo(repo_dir, build(repo_dir), home)
        export_public_key(home, root / key_path)
    list_file = root / TOOLKIT_LIST_PATH
    _write_if_changed(list_file, toolkit_list_text(base_url).encode())
