"""Run pyinfra as a user would, and read back every host's typed report.

The fleet commands (``gpufleet drift``, ``status``, ``rollout``) all go through pyinfra's own
command line with the user's inventory and deploy file, so ``--limit``, SSH settings, ``_sudo``
and group data work exactly as in ``pyinfra inventory/hosts.py deploys/fleet.py``. The run is
started as ``python -m gpufleet.fleet.pyinfra_main`` with ``GPUFLEET_REPORT=<file>``: every host's
plan, failure or unreachability comes back as a ``gpufleet.core.wire.RunReport``. pyinfra's console
output is kept only to show people (and streamed to ``on_line`` as it comes, for live progress);
no decision reads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from gpufleet import paths
from gpufleet.core.wire import ENV_NAMES, REPORT_ENV, Failure, HostReport, RunOptions, RunReport

# pyinfra options a fleet command sets itself: passed through, they would change what it means
RESERVED = frozenset({"-y", "--yes", "--dry"})


class UsageError(ValueError):
    """A command line that names something that is not there: exit 64, as sysexits.h does."""


@dataclass
class Run:
    """What one pyinfra run reported.

    + rc: pyinfra's exit status
    + report: every targeted host's report, and what ended the run if anything did
    + output: pyinfra's console output (stderr), for people only
    + interrupted: Ctrl-C came while it ran (an interruptible run finished anyway)
    """

    rc: int
    report: RunReport = field(default_factory=RunReport)
    output: str = ""
    interrupted: bool = False

    @property
    def hosts(self) -> dict[str, HostReport]:
        """Host -> its report, for every host that planned (its snapshot was read)."""
        return {r.host: r for r in self.report.ordered() if r.planned}

    @property
    def unreachable(self) -> dict[str, str]:
        return {r.host: r.unreachable for r in self.report.ordered() if r.unreachable}

    @property
    def failures(self) -> dict[str, Failure]:
        """Host -> the step it failed at and why (applying its plan, or reading it)."""
        return {r.host: r.failed for r in self.report.ordered() if r.failed}

    @property
    def unread(self) -> dict[str, tuple[str, str]]:
        """Hosts this run could not read: host -> ("unreachable" or "failed", why)."""
        out = {h: ("unreachable", why) for h, why in self.unreachable.items()}
        for h, failure in self.failures.items():
            if h not in self.hosts:
                out.setdefault(h, ("failed", failure.why))
        return out

    @property
    def order(self) -> list[str]:
        return list(self.report.order)

    @property
    def fatal(self) -> str | None:
        """What ended the whole run (invalid host data, a usage error pyinfra found)."""
        if self.report.fatal:
            return self.report.fatal
        if self.rc not in (0, 1) and not self.report.hosts and not self.interrupted:
            tail = [line for line in self.output.splitlines() if line.strip()][-3:]
            return f"pyinfra exited {self.rc} before reading any host: " + " / ".join(tail)
        return None


def _names(values: tuple[str, ...]) -> list[str]:
    return [name for value in values for name in value.split(",") if name.strip()]


def pyinfra_bin() -> str:
    return str(Path(sys.executable).with_name("pyinfra"))


def check_paths(inventory: str, deploy: str) -> None:
    for what, path in (("inventory", inventory), ("deploy file", deploy)):
        if not Path(path).is_file():
            raise UsageError(f"{what} {path} not found")


def check_extra(extra: tuple[str, ...]) -> None:
    """pyinfra options after ``--``: any but those the command sets itself."""
    if taken := sorted(RESERVED.intersection(extra)):
        raise UsageError(f"{', '.join(taken)} after '--': gpufleet sets it (use its own --dry)")


def child_env(options: RunOptions | None) -> dict[str, str]:
    """The run's environment: only the options this command asks (others left in the caller's
    environment do not leak through), and gpufleet's deploys and facts importable."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES and k != REPORT_ENV}
    env |= (options or RunOptions()).to_env()
    path = [str(paths.project_root()), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(path)
    return env


def read_report(path: Path) -> RunReport:
    """The run's report; an empty one when the run ended before writing it."""
    try:
        return RunReport.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        return RunReport()
    except (ValidationError, ValueError) as exc:
        raise RuntimeError(f"the run's report {path} does not parse: {exc}") from None


def command(
    inventory: str,
    deploy: str,
    *,
    dry: bool,
    limit: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The pyinfra command line a run starts (the report hook in front of pyinfra's CLI)."""
    args = [sys.executable, "-m", "gpufleet.fleet.pyinfra_main", "-y", inventory, deploy]
    args += ["--dry"] if dry else []
    args += list(extra)
    return args + selection(limit, exclude)


def selection(limit: tuple[str, ...], exclude: tuple[str, ...]) -> list[str]:
    """pyinfra's ``--limit``/``--exclude`` flags; "a,b" is two names, as people write it
    (pyinfra itself takes one per flag)."""
    args = [a for name in _names(limit) for a in ("--limit", name)]
    return args + [a for name in _names(exclude) for a in ("--exclude", name)]


def _pump(stream, sink: list[str], on_line: Callable[[str], None] | None) -> None:
    for line in stream:
        sink.append(line)
        if on_line is not None:
            on_line(line.rstrip("\n"))


def spawn(
    args: list[str],
    env: dict[str, str],
    *,
    on_line: Callable[[str], None] | None = None,
    interruptible: bool = False,
) -> tuple[int, str, bool]:
    """Start ``args``; each line of its stderr goes to ``on_line`` as it comes.

    Returns (exit status, the whole stderr, interrupted). stdout is read and dropped.
    """
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=env,
        start_new_session=interruptible,
    )
    lines: list[str] = []
    readers = [
        threading.Thread(target=_pump, args=(proc.stderr, lines, on_line), daemon=True),
        threading.Thread(target=_pump, args=(proc.stdout, [], None), daemon=True),
    ]
    for reader in readers:
        reader.start()
    interrupted = False
    while True:
        try:
            proc.wait()
            for reader in readers:
                reader.join()
            break
        except KeyboardInterrupt:
            if not interruptible:
                proc.kill()
                raise
            interrupted = True
            print(
                "gpufleet: interrupted: the hosts being changed finish their step first",
                file=sys.stderr,
            )
    return proc.returncode, "".join(lines), interrupted


def run(
    inventory: str,
    deploy: str,
    *,
    dry: bool,
    limit: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    options: RunOptions | None = None,
    extra: tuple[str, ...] = (),
    interruptible: bool = False,
    on_line: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
) -> Run:
    """``pyinfra -y INVENTORY DEPLOY [--dry] [EXTRA]`` with a report file; returns what it reported.

    + deploy: a path, or one of gpufleet's own (``deploys/fleet.py``, from any directory)
    + options: what the deploy is asked for (``RunOptions``, passed as its environment)
    + extra: pyinfra options passed through (``--data k=v``, ``-v``, ``--parallel 4``)
    + interruptible: Ctrl-C does not stop the pyinfra run (it runs in its own session): the
      run finishes the hosts it is changing and its result says ``interrupted``
    + on_line: called with each line pyinfra prints, as it prints it (for people only)
    + env: more environment for the run (``drift --diff``'s output directory)
    """
    deploy = paths.resolve_deploy(deploy)
    check_paths(inventory, deploy)
    check_extra(extra)
    env = child_env(options) | (env or {})
    with tempfile.TemporaryDirectory(prefix="gpufleet-run-") as tmp:
        report = Path(tmp) / "report.json"
        env[REPORT_ENV] = str(report)
        args = command(inventory, deploy, dry=dry, limit=limit, exclude=exclude, extra=extra)
        rc, output, interrupted = spawn(args, env, on_line=on_line, interruptible=interruptible)
        written = read_report(report)
    return Run(rc, written, output, interrupted)
