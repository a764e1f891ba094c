"""Container images present on a host."""

from __future__ import annotations

from pyinfra.api import FactBase, QuoteString, StringCommand


class DockerImageId(FactBase[str | None]):
    """The id of a local image (``sha256:...``), or None when the host does not have it.

    + ref: image reference, e.g. ``nvidia/cuda:12.8.1-base-ubuntu24.04``
    """

    def requires_command(self, ref: str) -> str:
        return "docker"

    def command(self, ref: str) -> StringCommand:
        inspect = "docker image inspect --format '{{.Id}}'"
        return StringCommand(inspect, QuoteString(ref), "2>/dev/null || true")

    def process(self, output: list[str]) -> str | None:
        return output[0].strip() if output and output[0].startswith("sha256:") else None
