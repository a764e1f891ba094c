"""Signed flat apt repositories, and the mirror tree the sandbox serves them from.

Laid out like nvidia.github.io/libnvidia-container, plus a repository for the Compose plugin:

    <root>/libnvidia-container/gpgkey                                 armored key
    <root>/libnvidia-container/stable/deb/nvidia-container-toolkit.list
    <root>/libnvidia-container/stable/deb/amd64/                      flat repo: toolkit
    <root>/docker/gpgkey                                              armored key
    <root>/docker/deb/                                                flat repo: compose plugin

Repositories are flat (``deb [signed-by=...] URL /``) and signed with a local key; an unchanged
repository is not signed again, so ``build_mirror_tree`` is cheap to call again.
"""

from __future__ import annotations

import filecmp
import gzip
import hashlib
import shutil
import subprocess
import time
from pathlib import Path

from gpufleet.sandbox.debs import (
    SOURCE_DATE_EPOCH,
    build_compose_plugin_deb,
    build_toolkit_debs,
)
from gpufleet.sandbox.gnupg import (
    DOCKER_KEY_UID,
    TOOLKIT_KEY_UID,
    export_public_key,
    gpg,
    make_signing_key,
    private_home,
    write_if_changed,
)

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
        signed_text = gpg(home, "--decrypt", str(inrelease))
        gpg(home, "--verify", str(detached), str(repo_dir / "Release"))
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
    write_if_changed(repo_dir / "Packages", packages)
    write_if_changed(repo_dir / "Packages.gz", gzip.compress(packages, 9, mtime=0))
    newest = max((repo_dir / n).stat().st_mtime for n in names) if names else SOURCE_DATE_EPOCH
    release = _release(repo_dir, newest).encode()
    changed = write_if_changed(repo_dir / "Release", release)

    fingerprint = make_signing_key(gnupg_home)
    with private_home(gnupg_home) as home:
        if not changed and _signatures_valid(home, repo_dir):
            return
        key = ["--local-user", fingerprint, "--digest-algo", "SHA512"]
        signed = gpg(home, *key, "--clearsign", stdin=release)
        detached = gpg(home, *key, "--armor", "--detach-sign", stdin=release)
    write_if_changed(repo_dir / "InRelease", signed)
    write_if_changed(repo_dir / "Release.gpg", detached)


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
    write_if_changed(list_file, toolkit_list_text(base_url).encode())
