"""
The one fact preflight and drift checks need: everything about a GPU host, in one command.
"""

from __future__ import annotations

from typing import TypedDict

from pyinfra.api import FactBase, StringCommand

from facts import docker, host, jetson, nvidia
from facts._sections import split_sections


class IdentityInfo(TypedDict):
    host: host.HostInfo
    nvidia: nvidia.NvidiaInfo
    jetson: jetson.L4tInfo | None
    docker: docker.DockerInfo


class HostIdentity(FactBase[IdentityInfo]):
    """
    Returns ``HostResources``, ``NvidiaGpus``, ``L4tRelease`` and ``DockerEngine`` together,
    gathered by a single remote command (their scripts run one after the other).

    + models_dir: directory whose free space (or its nearest existing parent's) is reported

    .. code:: python

        {
            "host": {"arch": "aarch64", "mem_total_bytes": 130668924928, ...},
            "nvidia": {"status": "ok", "driver_version": "580.95.05", "cuda_version": "13.0", ...},
            "jetson": None,
            "docker": {"present": True, "runtimes": ["nvidia"], ...},
        }
    """

    def command(self, models_dir: str = "/") -> StringCommand:
        return StringCommand(
            host.script(models_dir), nvidia.SCRIPT, jetson.SCRIPT, docker.SCRIPT, _separator="; "
        )

    def process(self, output: list[str]) -> IdentityInfo:
        sections = split_sections(output)
        return {
            "host": host.from_sections(sections),
            "nvidia": nvidia.from_sections(sections),
            "jetson": jetson.from_sections(sections),
            "docker": docker.from_sections(sections),
        }
