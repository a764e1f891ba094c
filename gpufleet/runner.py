"""Run pyinfra as a user would, and read back every host's plan from the run's report.

The fleet commands (``gpufleet drift``, ``status``, ``rollout``) all go through the pyinfra CLI
with the user's inventory and deploy file, so ``--limit``, SSH settings, ``_sudo`` and group
data work exactly as in ``pyinfra inventory/hosts.py deploys/fleet.py``. The converge writes
each host's plan to ``GPUFLEET_REPORT``; hosts pyinfra could not reach are read from its output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


class UsageError(ValueError):
    """A command line that names something that is not there: exit 64, as sysexits.h does."""


@dataclass
class Run:
    """What one pyinfra run said.

    + rc: pyinfra's exit status
    + hosts: host -> its report entry (plan, snapshot, release), for every host that planned
    + unreachable: host -> why pyinfra could not connect
    + errors: host -> the error lines pyinfra printed for it (refusals, failed operations)
    + fatal: a message that ended the whole run (invalid host data, ...)
    + interrupted: Ctrl-C came while it ran (an interruptible run finished anyway)
    + order: every host of the inventory, in inventory order
    """

    rc: int
    stdout: str
    stderr: str
    hosts: dict[str, dict] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    fatal: str | None = None
    interrupted: bool = False
    order: list[str] = field(default_factory=list)


def _names(values: tuple[str, ...]) -> list[str]:
    return [name for value in values for name in value.split(",") if name.strip()]


def pyinfra_bin() -> str:
    return str(Path(sys.executable).with_name("pyinfra"))


def check_paths(inventory: str, deploy: str) -> None:
    for what, path in (("inventory", inventory), ("deploy file", deploy)):
        if not Path(path).is_file():
            raise UsageError(f"{what} {path} not found (run from the project directory)")


_HOST_LINE = re.compile(r"^\s+\[([\w.@:-]+)\]\s+(.*)$")
_NOISE = re.compile(r"^(Connected|Ready:|Loaded fact|Success|No changes|Skipped|Changes)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# the converge's closing lines: what it built and sent, which host failed where (not fatal)
_SUMMARY = re.compile(r"^--> gpufleet: (\d+ image build\(s\)|images sent |[\w.@:-]+ failed at ')")
_CALLBACK = re.compile(
    r"Unexpected error in Python callback: \w+\((?P<q>['\"])(?P<message>.*)(?P=q),?\)$"
)


def parse_output(stderr: str) -> tuple[dict[str, str], dict[str, list[str]], str | None]:
    """Unreachable hosts, each host's error lines, and a message that ended the run."""
    unreachable: dict[str, str] = {}
    errors: dict[str, list[str]] = {}
    fatal = None
    lines = [_ANSI.sub("", line) for line in stderr.splitlines()]
    for i, line in enumerate(lines):
        if _SUMMARY.match(line):
            continue
        if line.startswith("--> gpufleet: ") or line.startswith("--> pyinfra error"):
            rest = [x for x in lines[i + 1 :] if x and not x.startswith("-->")]
            fatal = "\n".join([line.split(": ", 1)[1], *rest]).strip()
            continue
        match = _HOST_LINE.match(line)
        if not match:
            continue
        host, text = match.groups()
        if text.startswith("Could not connect"):
            unreachable[host] = text
        elif callback := _CALLBACK.match(text):
            # an operation's own message (a health gate's reason and log tail), unescaped
            message = callback["message"].encode().decode("unicode_escape", errors="replace")
            errors.setdefault(host, []).extend(message.splitlines())
        elif not _NOISE.match(text):
            errors.setdefault(host, []).append(text.strip())
    return unreachable, errors, fatal


def run(
    inventory: str,
    deploy: str,
    *,
    dry: bool,
    limit: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
    interruptible: bool = False,
) -> Run:
    """``pyinfra -y INVENTORY DEPLOY [--dry]`` with a report file; returns what it said.

    + interruptible: Ctrl-C does not stop the pyinfra run (it runs in its own session): the
      run finishes the hosts it is changing and its result says ``interrupted``
    """
    check_paths(inventory, deploy)
    with tempfile.TemporaryDirectory(prefix="gpufleet-run-") as tmp:
        report = Path(tmp) / "report.json"
        args = [pyinfra_bin(), "-y", inventory, deploy, *(["--dry"] if dry else []), *extra]
        # "a,b" is two names, as people write it (pyinfra itself takes one per flag)
        args += [a for name in _names(limit) for a in ("--limit", name)]
        args += [a for name in _names(exclude) for a in ("--exclude", name)]
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "GPUFLEET_REPORT": str(report), **(env or {})},
            start_new_session=interruptible,
        )  # fmt: skip
        interrupted = False
        while True:
            try:
                stdout, stderr = proc.communicate()
                break
            except KeyboardInterrupt:
                if not interruptible:
                    proc.kill()
                    raise
                interrupted = True
                print("gpufleet: interrupted: the hosts being changed finish their step first",
                      file=sys.stderr)  # fmt: skip
        written = json.loads(report.read_text()) if report.exists() else {}
    unreachable, errors, fatal = parse_output(stderr)
    return Run(proc.returncode, stdout, stderr, written.get("hosts", {}), unreachable, errors,
               fatal, interrupted, written.get("order", []))  # fmt: skip
