"""A compose project's containers and the images its services run, in one command."""

from __future__ import annotations

from pyinfra.api import FactBase, QuoteString, StringCommand


class ComposeState(FactBase[dict]):
    """Containers of a compose project and the gpufleet label of each image.

    + project: compose project name
    + images: image references whose id and ``gpufleet.inputs`` label are wanted

    .. code:: python

        {
            "containers": {"llama": {"id": "3f2a...", "state": "running",
                                     "inputs": "9c1e...", "health": "healthy"}},
            "images": {"gpufleet/llama.cpp:spark": {"id": "sha256:...", "inputs": "5d0b..."}},
        }
    """

    @staticmethod
    def default() -> dict:
        return {"containers": {}, "images": {}}

    def command(self, project: str, images: list[str] | tuple[str, ...] = ()) -> StringCommand:
        fmt = (
            '\'c\t{{.Label "com.docker.compose.service"}}\t{{.ID}}\t{{.State}}'
            '\t{{.Label "gpufleet.inputs"}}\t{{.Status}}\''
        )
        return StringCommand(
            "command -v docker >/dev/null || exit 0;",
            "docker ps -a --no-trunc --filter",
            QuoteString(f"label=com.docker.compose.project={project}"),
            "--format", fmt, ";",
            "for i in", *[QuoteString(i) for i in images] or ["''"], "; do",
            "[ -n \"$i\" ] || continue;",
            "printf 'i\\t%s\\t%s\\n' \"$i\" \"$(docker image inspect --format"
            " '{{.Id}}\t{{index .Config.Labels \"gpufleet.inputs\"}}' \"$i\" 2>/dev/null)\"; done",
        )  # fmt: skip

    def process(self, output: list[str]) -> dict:
        result: dict = {"containers": {}, "images": {}}
        for line in output:
            kind, *parts = line.split("\t")
            if kind == "c" and len(parts) == 5:
                service, cid, state, inputs, status = parts
                health = (
                    "healthy"
                    if "(healthy)" in status
                    else ("unhealthy" if "(unhealthy)" in status else None)
                )
                result["containers"][service] = {
                    "id": cid, "state": state, "inputs": inputs or None, "health": health,
                }  # fmt: skip
            elif kind == "i" and parts:
                ref, image_id, inputs = (parts + ["", ""])[:3]
                result["images"][ref] = (
                    {"id": image_id, "inputs": inputs or None} if image_id else None
                )
        return result
