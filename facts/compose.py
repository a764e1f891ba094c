"""A compose project's containers and the images its services run, in one command."""

from __future__ import annotations

import json

from pyinfra.api import FactBase, FactProcessError, QuoteString, StringCommand

from facts._sections import Section, excerpt, get_section, mark, split_sections
from gpufleet.core import snapshot
from gpufleet.core.snapshot import Container, LocalImage

SECTION = "compose.state"
_CONTAINER = (
    '\'c\t{{.Label "com.docker.compose.service"}}\t{{.ID}}\t{{.State}}'
    '\t{{.Label "gpufleet.inputs"}}\t{{.Status}}\''
)


_RESTARTS = "'r {{.Id}} {{.RestartCount}}'"


def script(project: str, images: list[str] | tuple[str, ...] = ()) -> StringCommand:
    """``c`` lines for the project's containers, ``i`` lines for each image asked for."""
    asked = [QuoteString(i) for i in images] or ["''"]
    label = QuoteString(f"label=com.docker.compose.project={project}")
    return StringCommand(
        f"{mark(SECTION)}; if command -v docker >/dev/null; then",
        "docker ps -a --no-trunc --filter",
        label,
        f"--format {_CONTAINER} 2>/dev/null;",
        # how often Docker restarted each one: a crash loop can be caught between restarts
        "ids=$(docker ps -aq --no-trunc --filter",
        label,
        '2>/dev/null); [ -z "$ids" ] || docker inspect --format',
        f"{_RESTARTS} $ids 2>/dev/null;",
        *("for i in", *asked, "; do"),
        '[ -n "$i" ] || continue;',
        'printf \'i\\t%s\\t%s\\n\' "$i" "$(docker image inspect --format'
        ' \'{{.Id}}\t{{json .Config.Labels}}\' "$i" 2>/dev/null)"; done; fi',
    )


def _health(status: str) -> str | None:
    for word in ("healthy", "unhealthy", "starting"):
        if f"({word})" in status or f"(health: {word})" in status:
            return word
    return None


def parse_lines(lines: list[str]) -> snapshot.ComposeState:
    containers: dict[str, Container] = {}
    images: dict[str, LocalImage | None] = {}
    restarts: dict[str, int] = {}
    for line in lines:
        if line.startswith("r "):  # r <container id> <restart count>
            words = line.split()
            if len(words) != 3 or not words[2].isdigit():
                raise FactProcessError(f"unexpected restart-count line: {excerpt(line)}")
            restarts[words[1]] = int(words[2])
            continue
        kind, *parts = line.split("\t")
        if kind == "c" and len(parts) == 5:
            service, cid, state, inputs, status = parts
            containers[service] = Container(
                id=cid, state=state, inputs=inputs or None, health=_health(status), status=status
            )
        elif kind == "i" and 1 <= len(parts) <= 3:
            ref, image_id, labels = (parts + ["", ""])[:3]
            if not image_id:
                images[ref] = None
                continue
            try:
                label_map = json.loads(labels) or {}
            except (ValueError, RecursionError):
                label_map = None
            if not isinstance(label_map, dict) or not all(
                isinstance(value, str) for value in label_map.values()
            ):
                raise FactProcessError(
                    f"image {ref}: labels are not JSON of string values: {excerpt(labels)}"
                )
            images[ref] = LocalImage(
                id=image_id, inputs=label_map.get("gpufleet.inputs") or None, labels=label_map
            )
        else:
            raise FactProcessError(f"unexpected compose-state line: {excerpt(line)}")
    containers = {
        service: c.model_copy(update={"restarts": restarts.get(c.id, 0)})
        for service, c in containers.items()
    }
    return snapshot.ComposeState(containers=containers, images=images)


def from_sections(sections: dict[str, Section]) -> snapshot.ComposeState:
    return parse_lines(get_section(sections, SECTION).lines)


class ComposeState(FactBase[snapshot.ComposeState]):
    """Containers of a compose project and the images its services run.

    + project: compose project name
    + images: image references whose id and labels are wanted

    .. code:: python

        ComposeState(
            containers={"llama": Container(id="3f2a...", state="running", inputs="9c1e...",
                                           health="healthy", status="Up 2 hours (healthy)")},
            images={"gpufleet/llama.cpp:spark": LocalImage(id="sha256:...", inputs="5d0b...",
                                                           labels={...})},
        )

    No Docker on the host gives the empty state.
    """

    @staticmethod
    def default() -> snapshot.ComposeState:
        return snapshot.ComposeState()

    def command(self, project: str, images: list[str] | tuple[str, ...] = ()) -> StringCommand:
        return script(project, images)

    def process(self, output: list[str]) -> snapshot.ComposeState:
        return from_sections(split_sections(output))
