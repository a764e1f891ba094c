"""Docker engine and Compose v2 plugin for hosts that have none (a fresh Ubuntu workstation)."""

from __future__ import annotations

from pyinfra.api.deploy import deploy
from pyinfra.operations import apt, systemd

from deploys._apt import apt_source, source_line
from gpufleet.schema import HostConfig


def engine_packages(config: HostConfig, identity: dict) -> list[str]:
    """Packages this host lacks: the engine where none is present, else only the plugin."""
    docker = identity["docker"]
    wanted = []
    if not docker["present"]:
        engine = list(config.docker.engine_packages)
        if config.docker.version:
            engine[0] = f"{engine[0]}={config.docker.version}"
        wanted += engine
    if not docker["present"] or not docker["compose_version"]:
        wanted += config.docker.compose_packages
    return wanted


@deploy("Docker engine")
def docker_engine(config: HostConfig, identity: dict, current: dict):
    """Install the engine and the Compose plugin where missing; keep an existing engine as is.

    + config: validated host config (``docker_*`` settings)
    + identity: ``facts.identity.HostIdentity``
    + current: ``facts.managed.ManagedFiles`` of the managed paths
    """
    packages = engine_packages(config, identity)
    if not packages:
        return
    settings = config.docker
    if settings.repo_url:
        fmt = {"os_id": identity["host"]["os_id"], "codename": identity["host"]["os_codename"]}
        apt_source(
            title="Docker",
            key_url=settings.key_url.format(**fmt),
            keyring=settings.keyring,
            list_path="/etc/apt/sources.list.d/docker.list",
            line=source_line(
                keyring=settings.keyring,
                url=settings.repo_url.format(**fmt),
                dist=settings.repo_dist.format(**fmt),
            ),
            current=current,
        )
    apt.packages(name="Install Docker engine packages", packages=packages, update=True)
    systemd.service(name="Start Docker", service="docker", running=True, enabled=True)
