"""The ``gpufleet`` command: fleet-wide checks and operations, and the sandbox fleet.

Exit status of every command: 0 success, 1 a host or the run failed, 2 drift (``drift``),
3 a missed SLO (``bench``), 64 a usage error (an unknown option, a file that is not there).
"""

from __future__ import annotations

import json
import sys

import click

from gpufleet.runner import UsageError
from gpufleet.sandbox.docker import SandboxError

EX_USAGE = 64


class _Gpufleet(click.Group):
    """Usage errors exit 64 (sysexits.h), so they never look like drift (2)."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            exc.show()
            sys.exit(EX_USAGE)
        except UsageError as exc:
            click.echo(f"gpufleet: {exc}", err=True)
            sys.exit(EX_USAGE)
        except click.exceptions.Abort:
            click.echo("gpufleet: aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)


@click.group(cls=_Gpufleet)
@click.version_option(package_name="gpufleet")
def main() -> None:
    """Provision NVIDIA GPU inference hosts with pyinfra."""


def _exit(code: int | None) -> None:
    sys.exit(code or 0)


@main.group()
def sandbox() -> None:
    """A local fleet of real hosts (systemd, sshd, Docker) with GPU identities."""


def _fail(exc: Exception) -> None:
    click.echo(f"gpufleet sandbox: {exc}", err=True)
    sys.exit(1)


def _unexpected(what: str, exc: Exception) -> None:
    """One line for a failure no check foresaw; the traceback goes to a log file, not the screen."""
    import traceback

    from gpufleet.sandbox.roster import Sandbox

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
@click.option(
    "--extra",
    "extra",
    default=None,
    metavar="GROUP=N,...",
    help="Extra light hosts per group, e.g. rtx5090=4,spark=1 (kept until down); "
    "'none' removes them.",
)
def sandbox_up(extra: str | None) -> None:
    """Build what is missing, start the hosts and the mirror, write .sandbox/hosts.json."""
    from gpufleet.sandbox import fleet
    from gpufleet.sandbox.roster import parse_extras

    try:
        extras = None if extra is None else parse_extras("" if extra == "none" else extra)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--extra") from None
    try:
        state = fleet.up(extras=extras)
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
    from gpufleet.sandbox import report

    rows = report.services()
    click.echo(f"{'host':<18} {'service':<8} {'port':<6} {'model':<20} {'health':<8} status")
    for r in rows:
        click.echo(
            f"{r['host']:<18} {r['service']:<8} {r['port']:<6} {r['model']:<20} "
            f"{r['health']:<8} {r['status']}"
        )
    if not rows or any(r["health"] != "ok" for r in rows):
        sys.exit(3)


def _targets(f):
    f = click.option("--exclude", multiple=True, help="Hosts or groups, as pyinfra's --exclude.")(f)
    f = click.option("--limit", multiple=True, help="Hosts or groups, as pyinfra's --limit.")(f)
    return click.argument("inventory")(f)


@main.command("drift")
@_targets
@click.option("--deploy", default="deploys/fleet.py", show_default=True, help="Deploy to compare.")
@click.option("--json", "as_json", is_flag=True, help="Print the gpufleet.drift/1 JSON document.")
@click.option("--deep", is_flag=True, help="Re-hash every model file (slow on big models).")
def drift(inventory: str, limit: tuple[str, ...], exclude: tuple[str, ...], deploy: str,
          as_json: bool, deep: bool) -> None:  # fmt: skip
    """Say what differs from the declared state, and why, changing nothing.

    Exit status: 0 in sync, 2 drift found, 1 a host could not be checked, 64 usage error.
    """
    from gpufleet import report, runner

    run = runner.run(inventory, deploy, dry=True, limit=limit, exclude=exclude,
                     env={"GPUFLEET_DEEP": "1"} if deep else {})  # fmt: skip
    doc = report.drift_document(run, deep=deep)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        for line in report.render_text(doc):
            click.echo(line)
    if run.fatal:
        click.echo(f"gpufleet drift: {run.fatal}", err=True)
    _exit(report.exit_code(doc, run))
