"""The ``gpufleet`` command: the sandbox fleet today, fleet-wide checks beside it."""

from __future__ import annotations

import json
import re
import sys

import click

from gpufleet.sandbox.docker import SandboxError


@click.group()
@click.version_option(package_name="gpufleet")
def main() -> None:
    """Provision NVIDIA GPU inference hosts with pyinfra."""


@main.group()
def sandbox() -> None:
    """A local fleet of real hosts (systemd, sshd, Docker) with GPU identities."""


def _fail(exc: Exception) -> None:
    click.echo(f"gpufleet sandbox: {exc}", err=True)
    sys.exit(1)


def _unexpected(what: str, exc: Exception) -> None:
    """One line for a failure no check foresaw; the traceback goes to a log file, not the screen."""
    import traceback

    from gpufleet.sandbox.fleet import Sandbox

    log = Sandbox().state / "sandbox-error.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(exc)))
        where = f"; the details are in {log}"
    except OSError:
        where = ""
    first = (str(exc).strip().splitlines() or [""])[0]
    click.echo(
        f"gpufleet sandbox: {what} failed: {type(exc).__name__}: {first}{where}. "
        "Fix what it names and run it again: finished steps are reused.",
        err=True,
    )
    sys.exit(1)


@sandbox.command("up")
def sandbox_up() -> None:
    """Build what is missing, start the hosts and the mirror, write .sandbox/hosts.json."""
    from gpufleet.sandbox import fleet

    try:
        state = fleet.up()
    except SandboxError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("gpufleet sandbox: up interrupted; run it again to finish", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one place that turns the unforeseen into a line
        _unexpected("up", exc)
    for host in state["hosts"]:
        click.echo(
            f"{host['name']:<20} ssh root@127.0.0.1 -p {host['port']}  groups: "
            + ",".join(host["groups"])
        )
    click.echo(f"{'mirror':<20} {state['mirror']['url']}")


@sandbox.command("down")
def sandbox_down() -> None:
    """Remove every container, network and volume the sandbox made."""
    from gpufleet.sandbox import fleet

    try:
        removed = fleet.down()
    except SandboxError as exc:
        _fail(exc)
    click.echo(f"removed {len(removed)} sandbox objects")


@sandbox.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def sandbox_status(as_json: bool) -> None:
    """Show each sandbox host's state and address."""
    from gpufleet.sandbox import fleet

    try:
        rows = fleet.status()
    except SandboxError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']:<20} {row['state']:<9} {row['ssh']:<24} {row['groups']}")
    if any(row["state"] != "running" for row in rows):
        sys.exit(3)


@sandbox.command("services")
def sandbox_services() -> None:
    """Show each demo host's services: port, model, health."""
    from gpufleet.sandbox import fleet

    rows = fleet.services()
    click.echo(f"{'host':<18} {'service':<8} {'port':<6} {'model':<20} {'health':<8} status")
    for r in rows:
        click.echo(
            f"{r['host']:<18} {r['service']:<8} {r['port']:<6} {r['model']:<20} "
            f"{r['health']:<8} {r['status']}"
        )
    if not rows or any(r["health"] != "ok" for r in rows):
        sys.exit(3)


@main.command("drift")
@click.argument("inventory")
@click.option("--deploy", default="deploys/fleet.py", show_default=True, help="Deploy to compare.")
@click.option("--limit", multiple=True, help="Hosts or groups, as pyinfra's --limit.")
@click.option("--exclude", multiple=True, help="Hosts or groups, as pyinfra's --exclude.")
def drift(inventory: str, deploy: str, limit: tuple[str, ...], exclude: tuple[str, ...]) -> None:
    """Say what differs from the declared state, changing nothing.

    Exit status: 0 in sync, 2 drift found, 1 a host could not be checked.
    """
    import subprocess
    from pathlib import Path

    pyinfra = Path(sys.executable).with_name("pyinfra")
    args = [str(pyinfra), inventory, deploy, "--dry", "--json"]
    args += [a for host in limit for a in ("--limit", host)]
    args += [a for host in exclude for a in ("--exclude", host)]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        click.echo(proc.stderr[-3000:], err=True)
        sys.exit(1)
    drifted: dict[str, list[str]] = {}
    for op in report.get("plan", []):
        # Conditional operations (a restart if a config changes) follow a definite change.
        for host in op["hosts_with_change"]:
            drifted.setdefault(host, []).append(op["name"])
    for host in sorted(drifted):
        click.echo(f"{host}: {len(drifted[host])} to change")
        for name in drifted[host]:
            click.echo(f"  - {name}")
    if proc.returncode != 0:  # pyinfra exits 1 when a host failed (e.g. the preflight gate)
        for line in proc.stderr.splitlines():
            host_line = re.match(r"\s+\[[^\]]+\]\s+(.*)", line)
            if host_line and not re.match(r"(Connected|Ready:|Loaded fact)", host_line[1]):
                click.echo(line.strip(), err=True)
        sys.exit(1)
    if drifted:
        sys.exit(2)
    click.echo("in sync")
