"""The sandbox's containers: how a host or the mirror is started, reused or replaced.

Each host is a container running systemd as PID 1, sshd and (where its profile says) its own
Docker engine, reachable only on a 127.0.0.1 port, on the sandbox's own Docker network. Every
container, network and volume carries the ``gpufleet.sandbox`` label.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import tarfile
import time
from pathlib import Path

from gpufleet.sandbox import docker, images, profiles
from gpufleet.sandbox.artefacts import MIRROR_ALIAS
from gpufleet.sandbox.docker import LABEL, SandboxError
from gpufleet.sandbox.roster import HostSpec, Sandbox

NETWORK = "gpufleet-sandbox"
MIRROR = "gpufleet-sandbox-mirror"
MIN_FREE_GIB = float(os.environ.get("GPUFLEET_SANDBOX_MIN_FREE_GIB", "8"))


def check_machine(sb: Sandbox) -> None:
    info = docker.engine_info()
    root = Path(info.get("DockerRootDir") or "/var/lib/docker")
    for path in (root, sb.state):
        probe = path if path.exists() else path.parent
        free = shutil.disk_usage(probe).free / 2**30
        if free < MIN_FREE_GIB:
            raise SandboxError(
                f"only {free:.1f} GiB free under {probe}; the sandbox needs {MIN_FREE_GIB:.0f} GiB "
                "(images, host engines, models). Free some space, e.g. `docker system prune`."
            )
    ours = {p for h in sb.hosts for p in published_ports(h.container)} | set(
        published_ports(MIRROR)
    )
    for port in [h.port for h in sb.hosts] + [sb.mirror_port]:
        if port in ours:
            continue
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise SandboxError(
                    f"port 127.0.0.1:{port} is already in use by another program; free it "
                    "or move the sandbox with GPUFLEET_SANDBOX_PORT_BASE and "
                    "GPUFLEET_SANDBOX_MIRROR_PORT"
                )


def published_ports(container: str) -> list[int]:
    data = docker.inspect(container)
    if not data:
        return []
    bindings = (data.get("HostConfig") or {}).get("PortBindings") or {}
    return [int(b["HostPort"]) for binds in bindings.values() for b in binds or [] if b["HostPort"]]


def capability_args() -> list[str]:
    """``--privileged`` where the bounding set allows it, else every capability we may have."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            if int(line.split()[1], 16) & (1 << 24):  # CAP_SYS_RESOURCE
                return ["--privileged"]
            break
    return ["--cap-add=ALL", "--cap-drop=SYS_RESOURCE"]


def host_files(sb: Sandbox, host: HostSpec) -> bytes:
    """A tar of the files a host gets before it boots: keys, GPU identity, vendor config."""
    buf = io.BytesIO()
    pub = (sb.ssh_dir / "id_ed25519.pub").read_bytes()
    hostkey = sb.ssh_dir / "hostkeys" / host.name / "ssh_host_ed25519_key"
    entries: list[tuple[str, bytes, int, int]] = [
        ("etc/ssh/ssh_host_ed25519_key", hostkey.read_bytes(), 0o600, 0),
        ("etc/ssh/ssh_host_ed25519_key.pub", hostkey.with_suffix(".pub").read_bytes(), 0o644, 0),
        ("root/.ssh/authorized_keys", pub, 0o600, 0),
        ("home/ops/.ssh/authorized_keys", pub, 0o600, 1000),
    ]
    if host.bootstrap:  # a fresh machine: no key for anyone yet
        entries = entries[:2]
    profile = profiles.for_host(host.profile, host.name)
    for path, content in profiles.render_profile_files(profile).items():
        entries.append((path.lstrip("/"), content, 0o644, 0))
    for path, asset in profile.executables.items():
        entries.append((path.lstrip("/"), asset.read_bytes(), 0o755, 0))
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = {} if host.bootstrap else {"root/.ssh": 0, "home/ops/.ssh": 1000}
        for d, uid in dirs.items():
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o700, uid, uid
            tar.addfile(info)
        for path, content, mode, uid in entries:
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.uid, info.gid = len(content), mode, uid, uid
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def image_for(profile: profiles.Profile, tags: dict[str, str]) -> str:
    if profile.key == "fresh":
        return tags["fresh"]
    if profile.toolkit_preinstalled:
        return tags["dgxos"]
    return tags["docker"] if profile.docker_preinstalled else tags["host"]


def wait_ready(sb: Sandbox, host: HostSpec, need_docker: bool, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = docker.out(
            ["exec", host.container, "systemctl", "is-system-running"], check=False
        ).strip()
        if state in ("running", "degraded"):
            break
        time.sleep(0.5)
    else:
        raise SandboxError(f"{host.name}: systemd did not finish booting ({state or 'no state'})")
    while need_docker and time.monotonic() < deadline:
        if docker.run(["exec", host.container, "docker", "info"], check=False).returncode == 0:
            break
        time.sleep(0.5)
    else:
        if need_docker:
            raise SandboxError(f"{host.name}: its Docker engine did not start")
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", host.port), timeout=2) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SandboxError(f"{host.name}: sshd did not answer on 127.0.0.1:{host.port}")


# A container is reused only while everything it was started from is unchanged: its image,
# the files copied into it (host key, client key, GPU identity), its port and the state
# directory whose keys and token it holds. A sandbox left running by another checkout, or
# one started with other ports, is replaced instead of being trusted.
ORIGIN = "gpufleet.origin"


def origin(sb: Sandbox, *parts: bytes | str) -> str:
    return images._digest(str(sb.state), *parts)


def reusable(name: str, origin: str, volume: str | None = None) -> bool:
    """Whether container ``name`` exists with this origin (started again if it had stopped).

    Otherwise the container goes, and with it ``volume``: a host that is replaced starts
    from its profile's first state, engine data included.
    """
    current = docker.inspect(name)
    if current and current["Config"]["Labels"].get(ORIGIN) == origin:
        if not current["State"]["Running"]:
            docker.run(["start", name])
        return True
    if current:
        remove("container", name)
    if volume:
        remove("volume", volume)
    return False


# what a container needs to run systemd (or an init) and its own Docker engine as PID 1's child
SYSTEMD_ARGS = [
    *("--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined"),
    *("--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw"),
]


def common_run_args(name: str, origin: str) -> list[str]:
    labels = ["--label", f"{LABEL}=1", "--label", f"{ORIGIN}={origin}"]
    return ["--name", name, *labels, "--network", NETWORK]


def mounts(pairs: dict[str, str]) -> list[str]:
    """``-v`` arguments, read-only, for ``{host path: container path}``."""
    return [arg for host, inside in pairs.items() for arg in ("-v", f"{host}:{inside}:ro")]


def start_mirror(sb: Sandbox, image: str, created: list[tuple[str, str]]) -> None:
    root = sb.state / "mirror"
    script = images.ASSETS / "mirror.py"
    made_from = origin(sb, image, script.read_bytes(), str(sb.mirror_port))
    if reusable(MIRROR, made_from):
        return
    volumes = mounts(
        {
            str(script): "/srv/mirror.py",
            str(root / "www"): "/srv/www",
            str(root / "hf"): "/srv/hf",
            str(sb.token_file): "/srv/hf_token",
        }
    )
    publish = ["--network-alias", MIRROR_ALIAS, "-p", f"127.0.0.1:{sb.mirror_port}:80"]
    serve = ["python3", "/srv/mirror.py", "--root", "/srv/www", "--hf-root", "/srv/hf"]
    serve += ["--token-file", "/srv/hf_token", "--port", "80"]
    run = ["run", "-d", *common_run_args(MIRROR, made_from), *publish, *volumes]
    docker.run([*run, image, *serve])
    created.append(("container", MIRROR))


def wait_mirror(sb: Sandbox, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{sb.mirror_port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise SandboxError(f"the mirror did not answer on 127.0.0.1:{sb.mirror_port}")


def remove(kind: str, name: str) -> None:
    cmd = {
        "container": ["rm", "-f", "-v"],
        "network": ["network", "rm"],
        "volume": ["volume", "rm", "-f"],
    }
    docker.run([*cmd[kind], name], check=False)
