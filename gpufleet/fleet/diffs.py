"""What ``gpufleet drift --diff`` shows: how a file differs, not only that it does.

A normal drift costs one read per host and carries hashes only. With ``--diff`` the run uses
``deploys/diff.py``: the same plan, plus, for a host whose plan rewrites its compose file,
its ``.env`` or a build context's Dockerfile (or rebuilds from it), one more read of those
files (the ``.env``'s key names only: a value never
leaves the host). The texts are diffed on the control machine, every secret value the
control machine knows is masked, and each host's diffs come back as ``FileDiff`` documents in
a file of their own (``DIFF_DIR_ENV``), beside the run's typed report. Image changes need no
read: the plan's change already names the image found and the one declared.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

from pydantic import TypeAdapter

from gpufleet.core.wire import Op
from gpufleet.fleet.documents import FileDiff

DIFF_DIR_ENV = "GPUFLEET_DIFF_DIR"  # where deploys/diff.py writes <host>.json
# a .env line's key (the value is never read: the host prints names only)
ENV_NAMES_COMMAND = r"sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p' -- "
_FILES = TypeAdapter(list[FileDiff])


def unified(found: str, declared: str, path: str) -> str:
    """A unified diff from the host's text to the declared one ('' when they are equal)."""
    lines = difflib.unified_diff(
        found.splitlines(keepends=True),
        declared.splitlines(keepends=True),
        fromfile=f"{path} (on the host)",
        tofile=f"{path} (declared)",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def mask(text: str, secrets: dict[str, str]) -> str:
    for value in sorted(filter(None, secrets.values()), key=len, reverse=True):
        text = text.replace(value, "<secret>")
    return text


def compose_diff(found: str | None, declared: str, path: str, secrets: dict[str, str]):
    """The compose file's diff, masked; None when the texts are the same."""
    text = unified(found or "", declared, path)
    return FileDiff(kind="compose", resource=path, diff=mask(text, secrets)) if text else None


def dockerfile_diff(found: str | None, declared: str, path: str, secrets: dict[str, str]):
    """A build context's Dockerfile, the host's against the rendered one, masked; None when
    the texts are the same."""
    text = unified(found or "", declared, path)
    return FileDiff(kind="dockerfile", resource=path, diff=mask(text, secrets)) if text else None


def env_diff(found_names: str | None, declared: list[str], path: str):
    """The ``.env``'s key names, host against declared (values never); None when equal."""
    found = sorted(set((found_names or "").split()))
    text = unified("".join(f"{n}\n" for n in found), "".join(f"{n}\n" for n in declared), path)
    return FileDiff(kind="env", resource=path, diff=text) if text else None


def image_diffs(changes) -> list[FileDiff]:
    """Each image the plan replaces: the id found, the one declared (from the plan alone).
    A file the build step writes (its Dockerfile) is no image: ``dockerfile_diff`` shows it."""
    out = []
    for c in changes:
        if c.op is Op.WRITE:
            continue
        if c.step in ("image", "build") and (c.found or c.expected):
            diff = f"- {c.found or 'absent'}\n+ {c.expected or '?'}\n"
            out.append(FileDiff(kind="image", resource=c.resource, diff=diff))
    return out


def write(directory: str, host: str, diffs: list[FileDiff]) -> None:
    """One host's diffs, written whole (the deploy's side)."""
    safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", host)
    path = Path(directory) / f"{safe}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([d.model_dump() for d in diffs]))
    tmp.replace(path)


def read(directory: str, host: str) -> list[FileDiff]:
    """One host's diffs (the command's side); none when its run wrote none."""
    safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", host)
    path = Path(directory) / f"{safe}.json"
    if not path.is_file():
        return []
    return _FILES.validate_json(path.read_text())
