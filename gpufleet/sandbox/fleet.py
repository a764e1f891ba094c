"""The sandbox fleet: ``up``, ``down``, ``reset`` and ``status`` of a local fleet of real hosts.

``up`` prepares what is missing on the control machine (``artefacts``), starts the mirror and
every host of the roster (``roster``, ``containers``) and writes ``hosts.json``, the typed
contract ``inventory/sandbox.py`` reads (``state``). ``down`` removes exactly what carries the
sandbox's label.

What ``up`` writes under the state directory (``.sandbox/`` by default, git-ignored):

    hosts.json          the hosts, ports, groups and mirror URLs (gpufleet.sandbox.state)
    extras.json         the extra hosts per group the last ``up --extra`` asked for
    ssh/id_ed25519      the client key (root and ops accept it)
    ssh/known_hosts     pinned host keys: nothing is trusted on first use
    hf_token            the gated repository's token (0600), and nowhere else
    bootstrap_password  the fresh host's login password (0600)
"""

from __future__ import annotations

import os
import time

from gpufleet.sandbox import artefacts, containers, debs, docker, images, profiles
from gpufleet.sandbox import state as contract
from gpufleet.sandbox.containers import MIRROR, NETWORK
from gpufleet.sandbox.docker import LABEL, SandboxError
from gpufleet.sandbox.roster import HostSpec, Sandbox

__all__ = ["MIRROR", "NETWORK", "HostSpec", "Sandbox", "down", "reset", "status", "up"]


def _images(sb: Sandbox) -> tuple[dict[str, str], str, set[str]]:
    """Every host image the roster needs, built once: tags by kind, the base, all to keep."""
    cache = sb.state / "cache"
    base = images.base_image(cache, sb.log)
    host = images.host_image(base, sb.log)
    engine = images.docker_image(host, sb.log)
    # DGX OS ships an older toolkit and the compose plugin; gpufleet upgrades the former.
    preinstalled = debs.build_toolkit_debs(cache / "debs", versions=("1.17.8-1",))
    preinstalled.append(debs.build_compose_plugin_deb(cache / "debs", artefacts.compose_binary(sb)))
    tags = {
        "host": host,
        "docker": engine,
        "dgxos": images.dgxos_image(engine, preinstalled, sb.log),
        "fresh": images.fresh_image(base, sb.log),
    }
    return tags, base, set(tags.values()) | {base}


SHM = ["--shm-size", "1g"]


def _vllm(sb: Sandbox, base: str) -> tuple[str | None, str | None]:
    """The real vLLM's image for spark, or None and why the stand-in serves instead: a machine
    without the CPU torch wheel (or with no way to the package index) cannot build it."""
    if os.environ.get("GPUFLEET_SANDBOX_VLLM", "real") == "standin":
        return None, "GPUFLEET_SANDBOX_VLLM=standin"
    try:
        return artefacts.vllm(sb, base), None
    except SandboxError as exc:
        why = str(exc).splitlines()[0]
        sb.log(f"vLLM: the stand-in serves on spark (NOT vLLM): {why}")
        return None, why


def _start_host(
    sb: Sandbox,
    spec: HostSpec,
    tags: dict[str, str],
    caps: list[str],
    created: list[tuple[str, str]],
) -> None:
    profile = profiles.for_host(spec.profile, spec.name)
    image = containers.image_for(profile, tags)
    files = containers.host_files(sb, spec)
    password = sb.password_file.read_text() if spec.bootstrap else ""
    made_from = containers.origin(sb, image, files, str(spec.port), password, *SHM)
    volume = f"{spec.container}-docker"
    if containers.reusable(spec.container, made_from, volume):
        return
    docker.run(["volume", "create", "--label", f"{LABEL}=1", volume])
    created.append(("volume", volume))
    create = ["create", *containers.common_run_args(spec.container, made_from)]
    host = ["--hostname", spec.name, *caps, *containers.SYSTEMD_ARGS]
    host += ["--tmpfs", "/run", "--tmpfs", "/run/lock", "-v", f"{volume}:/var/lib/docker"]
    host += SHM  # vLLM's workers share a 160 MiB ring buffer in /dev/shm (ipc: host)
    docker.run([*create, *host, "-p", f"127.0.0.1:{spec.port}:22", image])
    created.append(("container", spec.container))
    docker.run(["cp", "-a", "-", f"{spec.container}:/"], input=files)
    docker.run(["start", spec.container])
    if spec.bootstrap:  # the installer's user gets its password: on stdin, never an argument
        login = f"ubuntu:{password}\n".encode()
        docker.run(["exec", "-i", spec.container, "chpasswd"], input=login)


def _remove_departed(sb: Sandbox) -> None:
    """Hosts an earlier ``up`` started that the roster no longer has (fewer extras)."""
    wanted = {spec.container for spec in sb.hosts} | {MIRROR}
    for name in docker.names("container"):
        if name.startswith("gpufleet-sandbox-") and name not in wanted:
            containers.remove("container", name)
            containers.remove("volume", f"{name}-docker")


def up(sb: Sandbox | None = None, *, extras: dict[str, int] | None = None) -> dict:
    """Build what is missing, start the mirror and the hosts, and write ``hosts.json``.

    + extras: extra light hosts per group (``{"rtx5090": 4}``); None keeps the last ones
    """
    sb = sb or Sandbox()
    if extras is not None:
        sb.set_extras(extras)
    started = time.monotonic()
    containers.check_machine(sb)
    artefacts.ssh_material(sb)
    artefacts.secrets_files(sb)
    hf = artefacts.mirror_tree(sb)
    tags, base, keep = _images(sb)
    probe = images.probe_image(sb.log)
    standins = images.standins_image(base, sb.log)
    llama = artefacts.llama(sb, base)
    vllm, standin_because = _vllm(sb, base)
    _remove_departed(sb)

    created: list[tuple[str, str]] = []
    try:
        if not docker.inspect(NETWORK):
            docker.run(["network", "create", "--label", f"{LABEL}=1", NETWORK])
            created.append(("network", NETWORK))
        containers.start_mirror(sb, tags["host"], created)
        caps = containers.capability_args()
        for spec in sb.hosts:
            _start_host(sb, spec, tags, caps, created)
        for spec in sb.hosts:
            profile = profiles.for_host(spec.profile, spec.name)
            containers.wait_ready(sb, spec, profile.docker_preinstalled)
        containers.wait_mirror(sb)
    except BaseException:
        sb.log("start-up failed: removing what this run created")
        for kind, name in reversed(created):
            containers.remove(kind, name)
        raise
    images.remove_unused(keep | {probe, standins, *llama.pop("keep"), *([vllm] if vllm else [])})
    state = _write_state(sb, hf, probe, llama, standins, (vllm, standin_because))
    sb.log(f"up in {time.monotonic() - started:.0f}s: {len(sb.hosts)} hosts and the mirror")
    return state.model_dump(mode="json")


def _address(container: str) -> str:
    """The container's address on the sandbox network."""
    fmt = f'{{{{(index .NetworkSettings.Networks "{containers.NETWORK}").IPAddress}}}}'
    return docker.out(["inspect", "--format", fmt, container]).strip()


def _write_state(
    sb: Sandbox,
    hf: dict,
    probe: str,
    llama: dict,
    standins: str,
    vllm: tuple[str | None, str | None],
) -> contract.SandboxState:
    state = contract.SandboxState(
        probe_image=probe,
        standins_image=standins,
        llama=contract.Llama(**llama),
        vllm_image=vllm[0],
        vllm_standin_because=vllm[1],
        hosts=tuple(
            contract.SandboxHost(
                name=h.name,
                profile=h.profile,
                groups=h.groups,
                port=h.port,
                container=h.container,
                light=h.light,
                bootstrap=h.bootstrap,
            )
            for h in sb.hosts
        ),
        ssh=contract.SshMaterial(
            key=str(sb.ssh_dir / "id_ed25519"),
            known_hosts=str(sb.ssh_dir / "known_hosts"),
            config=str(sb.ssh_dir / "config"),
        ),
        mirror=contract.Mirror(
            internal_url=f"http://{artefacts.MIRROR_ALIAS}",
            url=f"http://127.0.0.1:{sb.mirror_port}",
            container_url=f"http://{_address(containers.MIRROR)}",
        ),
        hf=contract.HubRepos(token_file=str(sb.token_file), repos=hf),
        bootstrap=contract.Bootstrap(user="ubuntu", password_file=str(sb.password_file)),
    )
    contract.write(state, sb.hosts_file)
    return state


def down(sb: Sandbox | None = None) -> list[str]:
    """Remove every container, network and volume the sandbox made, and nothing else."""
    sb = sb or Sandbox()
    removed = []
    for kind in ("container", "network", "volume"):
        for name in docker.names(kind):
            containers.remove(kind, name)
            removed.append(f"{kind} {name}")
    for path in (sb.hosts_file, sb.extras_file):
        path.unlink(missing_ok=True)
    return removed


def reset(names: list[str], sb: Sandbox | None = None) -> dict:
    """Return the named hosts to their profile's first state: recreated from their images."""
    sb = sb or Sandbox()
    for spec in sb.hosts:
        if spec.name in names:
            containers.remove("container", spec.container)
            containers.remove("volume", f"{spec.container}-docker")
    return up(sb)


def status(sb: Sandbox | None = None) -> list[dict]:
    """One row per sandbox container: name, state, published port."""
    sb = sb or Sandbox()
    rows = []
    for spec in sb.hosts:
        data = docker.inspect(spec.container)
        rows.append(
            {
                "name": spec.name,
                "profile": spec.profile,
                "groups": ",".join(spec.groups),
                "state": data["State"]["Status"] if data else "absent",
                "ssh": f"127.0.0.1:{spec.port}",
            }
        )
    data = docker.inspect(MIRROR)
    rows.append(
        {
            "name": "mirror",
            "profile": "apt + hf",
            "groups": "",
            "state": data["State"]["Status"] if data else "absent",
            "ssh": f"http://127.0.0.1:{sb.mirror_port}",
        }
    )
    return rows
