"""The ``gpufleet`` command: the sandbox fleet today, fleet-wide checks beside it."""

from __future__ import annotations

import json
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


@sandbox.command("up")
def sandbox_up() -> None:
    """Build what is missing, start the hosts and the mirror, write .sandbox/hosts.json."""
    from gpufleet.sandbox import fleet

    try:
        state = fleet.up()
    except (SandboxError, OSError) as exc:
        _fail(exc)
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
