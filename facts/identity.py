"""
The one fact preflight and drift checks need: everything about a GPU host, in one command.
"""

from __future__ import annotations

from pyinfra.api import FactBase, StringCommand

from facts import docker, host, jetson, nvidia
from facts._sections import Section, split_sections
from gpufleet.core.snapshot import Identity


def script(
    models_dir: str = "/", docker_known: docker.KnownVersions | None = None
) -> StringCommand:
    """The identity sections' script: host, nvidia, l4t and docker, one after the other
    (``docker_known``: what the docker CLI printed last time, see ``facts.docker.script``)."""
    return StringCommand(
        host.script(models_dir),
        nvidia.SCRIPT,
        jetson.SCRIPT,
        docker.script(docker_known),
        _separator="; ",
    )


def from_sections(sections: dict[str, Section]) -> Identity:
    return Identity(
        host=host.from_sections(sections),
        nvidia=nvidia.from_sections(sections),
        jetson=jetson.from_sections(sections),
        docker=docker.from_sections(sections),
    )


class HostIdentity(FactBase[Identity]):
    """
    Returns ``HostResources``, ``NvidiaGpus``, ``L4tRelease`` and ``DockerEngine`` together,
    gathered by a single remote command (their scripts run one after the other).

    + models_dir: directory whose free space (or its nearest existing parent's) is reported

    .. code:: python

        Identity(
            host=HostInfo(arch="aarch64", mem_total_bytes=130668924928, ...),
            nvidia=NvidiaInfo(status="ok", driver_version="580.95.05", cuda_version="13.0", ...),
            jetson=None,
            docker=DockerInfo(present=True, runtimes=("nvidia",), ...),
        )
    """

    def command(self, models_dir: str = "/") -> StringCommand:
        return script(models_dir)

    def process(self, output: list[str]) -> Identity:
        return from_sections(split_sections(output))
