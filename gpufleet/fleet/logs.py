"""``gpufleet logs``: each host's compose logs, read through pyinfra's own ``exec``.

One command for every host, whatever its group: compose v2 reads a project's logs by its name
alone, and every project gpufleet starts is named ``gpufleet-<group>``. pyinfra prints each
output line as ``[host] text``; each line is masked (every secret value the control machine
resolves for that host, and the value after any ``<SECRET_NAME>=``) before it is shown.
pyinfra's own lines (banners, ``    [host] Success``) are left out.
"""

from __future__ import annotations

import re
import shlex

from gpufleet.fleet.rollout import _ANSI, progress_line

SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def remote_command(*, service: str | None, tail: int, follow: bool) -> str:
    """The shell command every host runs: the logs of each gpufleet compose project."""
    args = ["logs", "--no-color", "--timestamps", "--tail", str(tail)]
    args += ["--follow"] if follow else []
    args += [service] if service else []
    logs = " ".join(shlex.quote(a) for a in args)
    return (
        "for p in $(docker compose ls --all --format json 2>/dev/null "
        '| grep -o \'"Name":"gpufleet-[a-z0-9_-]*"\' | cut -d\'"\' -f4); '
        f'do docker compose -p "$p" {logs}; done'
    )


def masker(secrets: dict[str, dict[str, str]]):
    """``mask(host, text)``: ``text`` with ``host``'s secret values, and any value after one
    of its secret names and ``=`` or ``:``, replaced by ``<secret>``."""

    def mask(host: str, text: str) -> str:
        values = secrets.get(host, {})
        for value in sorted(filter(None, values.values()), key=len, reverse=True):
            text = text.replace(value, "<secret>")
        for name in values:
            text = re.sub(rf"({re.escape(name)}\s*[=:]\s*)\S+", r"\1<secret>", text)
        return text

    return mask


def shown(line: str, hosts: set[str], mask) -> str | None:
    """A host's log line as ``host | text``, masked; None for pyinfra's own lines (its
    status lines, ``    [host] Connected``, are indented; a command's output is not)."""
    if not _ANSI.sub("", line).startswith("["):
        return None
    text = progress_line(line, hosts)
    if text is None:
        return None
    host = text.split(" | ", 1)[0].strip()
    return mask(host, text)
