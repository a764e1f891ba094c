"""The ``engine`` step (applied by ``deploys/docker_engine.py``): Docker's apt source and
packages where the engine or its Compose plugin is missing, a start where it is stopped.
"""

from __future__ import annotations

from gpufleet.core import known
from gpufleet.core.schema import HostConfig
from gpufleet.core.snapshot import Snapshot
from gpufleet.core.wire import Op
from gpufleet.plan.draft import PlanDraft, apt_line
from gpufleet.plan.types import AptSource


def engine_packages(config: HostConfig, snap: Snapshot) -> list[str]:
    """Packages this host lacks: the engine where none is present, else only the plugin."""
    docker = snap.identity.docker
    wanted = []
    if not docker.present:
        engine = list(config.docker.engine_packages)
        if config.docker.version:
            engine[0] = f"{engine[0]}={config.docker.version}"
        wanted += engine
    if not docker.present or not docker.compose_version:
        wanted += config.docker.compose_packages
    return wanted


def docker_source(config: HostConfig, snap: Snapshot) -> AptSource:
    """Docker's repository (``{os_id}``/``{codename}`` come from the host)."""
    fmt = {"os_id": snap.identity.host.os_id, "codename": snap.identity.host.os_codename}
    settings = config.docker
    line = apt_line(
        keyring=settings.keyring,
        url=(settings.repo_url or "").format(**fmt),
        dist=settings.repo_dist.format(**fmt),
    )
    key_url = settings.key_url.format(**fmt)
    return AptSource("Docker", key_url, settings.keyring, known.DOCKER_LIST, line)


def plan_engine(draft: PlanDraft, config: HostConfig, snap: Snapshot) -> None:
    docker = snap.identity.docker
    packages = engine_packages(config, snap)
    if packages:
        if config.docker.repo_url:
            draft.apt_source(snap, "engine", docker_source(config, snap))
        why = "no Docker engine found" if not docker.present else "no Compose v2 plugin found"
        draft.add(
            "engine",
            " ".join(packages),
            why,
            "install and start",
            expected="installed",
            found="absent",
            op=Op.INSTALL,
        )
    elif not docker.active:
        draft.add(
            "engine",
            "docker.service",
            "the Docker engine is not running; images and services are planned once it runs",
            "start",
            expected="active",
            found="inactive",
            op=Op.START,
        )


def engine_stopped(snap: Snapshot) -> bool:
    """Installed but not running: the snapshot could not see images, containers or health,
    so nothing that depends on them can be decided from it (a converge starts the engine,
    reads the host again and plans from that: ``deploys/_converge.py``)."""
    docker = snap.identity.docker
    return docker.present and not docker.active
