"""The GPU probe: a container started with the group's GPU request must start and exit 0."""

from __future__ import annotations

import shlex
import subprocess

from pyinfra import host
from pyinfra.api.deploy import deploy
from pyinfra.operations import server

from facts.images import DockerImageId
from gpufleet import ops
from gpufleet.schema import HostConfig, Image


def local_image_id(ref: str) -> str | None:
    """The image's id in the control machine's Docker, for images sent from there."""
    proc = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", ref],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return proc.stdout.strip() or None


def ensure_image(image: Image, *, name: str, present_id: str | None | bool = False):
    """Pull or transfer ``image`` unless the host already has it (the same id, when sent).

    + present_id: the image's id on the host when a fact already read it (None: absent);
      left out, it is read here
    """
    if present_id is False:
        present_id = host.get_fact(DockerImageId, ref=image.ref)
    return ops.image(
        name=name,
        ref=image.ref,
        source=image.source,
        present_id=present_id,
        local_id=local_image_id(image.ref) if image.source == "transfer" else None,
    )


@deploy("GPU probe")
def gpu_probe(config: HostConfig):
    """Start a container with ``--gpus all`` (or ``--runtime nvidia``) and require exit 0.

    + config: validated host config (``probe_*`` settings)
    """
    probe = config.probe
    ensure_image(probe.image, name=f"Probe image {probe.image.ref}")
    request = "--gpus all" if probe.gpu_request == "gpus" else "--runtime nvidia"
    command = " ".join(shlex.quote(part) for part in probe.command)
    server.shell(
        name="GPU probe: a container with the group's GPU request exits 0",
        commands=[f"docker run --rm {request} {shlex.quote(probe.image.ref)} {command}"],
    )
