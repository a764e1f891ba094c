"""NVIDIA Container Toolkit: pinned packages from NVIDIA's (or a mirror's) signed repository,
wired into Docker through ``nvidia-ctk`` without touching keys gpufleet does not own."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api.deploy import deploy
from pyinfra.operations import apt, server, systemd

from deploys._apt import apt_source, source_line
from facts.aptrepo import FlatRepoVersions
from gpufleet import ops
from gpufleet.schema import HostConfig

PACKAGES = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)
DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def needs_install(config: HostConfig, identity: dict) -> bool:
    installed = identity["docker"]["toolkit_packages"]
    return any(installed.get(p) != config.toolkit.version for p in PACKAGES)


def repo_url(config: HostConfig, identity: dict) -> str:
    return config.toolkit.repo_url.replace(
        "$(ARCH)", DEB_ARCH.get(identity["host"]["arch"], identity["host"]["arch"])
    )


def unavailable(config: HostConfig, identity: dict) -> str | None:
    """Why the pinned version cannot be installed, checked before any change; None if it can."""
    if not needs_install(config, identity):
        return None
    url = repo_url(config, identity)
    offered = host.get_fact(FlatRepoVersions, url=url)
    if "" in offered:
        return f"cannot read the toolkit repository {url}: {offered[''][0]}"
    have = offered.get(PACKAGES[0], [])
    if config.toolkit.version not in have:
        return (
            f"NVIDIA Container Toolkit {config.toolkit.version} is not in {url} "
            f"(it has {', '.join(have) or 'no nvidia-container-toolkit'}); "
            "set toolkit_version to one of those"
        )
    return None


@deploy("NVIDIA Container Toolkit")
def container_toolkit(config: HostConfig, identity: dict, current: dict):
    """Install the pinned toolkit and configure Docker's ``nvidia`` runtime.

    + config: validated host config (``toolkit_*`` settings)
    + identity: ``facts.identity.HostIdentity``
    + current: ``facts.managed.ManagedFiles`` of the managed paths

    Docker restarts only when ``nvidia-ctk`` changed its config.
    """
    tk = config.toolkit
    apt_source(
        title="NVIDIA Container Toolkit",
        key_url=tk.key_url,
        keyring=tk.keyring,
        list_path=tk.list_path,
        line=source_line(keyring=tk.keyring, url=tk.repo_url, dist="/"),
        current=current,
    )
    if needs_install(config, identity):
        apt.packages(
            name=f"Install NVIDIA Container Toolkit {tk.version}",
            packages=[f"{p}={tk.version}" for p in PACKAGES],
            update=True,
            extra_install_args="--allow-downgrades",
        )
    runtime = ops.nvidia_runtime(
        name="Configure Docker's nvidia runtime",
        daemon_json=identity["docker"]["daemon_json"],
        set_default=tk.set_default_runtime,
        cdi=tk.cdi,
    )
    # Only emitted when the runtime can change: a no-change run then reads no systemd fact.
    if ops.owned_daemon_keys(
        identity["docker"]["daemon_json"], set_default=tk.set_default_runtime, cdi=tk.cdi
    ):
        systemd.service(
            name="Restart Docker (its config changed)",
            service="docker",
            restarted=True,
            _if=runtime.did_change,
        )
    if tk.cdi and (current.get("/etc/cdi/nvidia.yaml") is None or needs_install(config, identity)):
        server.shell(
            name="Generate the CDI spec",
            commands=["nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"],
        )
