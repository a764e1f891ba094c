"""The ``gpufleet`` command: fleet-wide checks and operations, and the sandbox fleet.

Exit status, the same for every command:

    ==== ========================================================================
    0    ok: done, in sync, nothing to report (``lock status`` with hosts leased too)
    1    a host could not be done (unreachable, refused, failed), or the run failed
    2    drift found, or changes pending (``drift``, ``rollout --dry``, ``converge --dry``)
    3    an SLO missed (``bench``)
    64   usage: an unknown option, a file that is not there, a value that does not parse
    ==== ========================================================================

``--json`` prints one JSON document to stdout, ``{"schema": "gpufleet.<command>/1", "hosts":
[...], ...}``, described in ``gpufleet/fleet/schemas/``. Every fleet command passes what
follows ``--`` to pyinfra: ``gpufleet drift hosts.py -- --data toolkit_version=1.17.8-1 -v``.
Shell completion (bash; zsh and fish alike): ``eval "$(_GPUFLEET_COMPLETE=bash_source
gpufleet)"``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from gpufleet.core.wire import ALL_LEASES, RunOptions
from gpufleet.fleet.documents import ExitCode
from gpufleet.fleet.runner import UsageError

if TYPE_CHECKING:
    from gpufleet.bench.client import LoadSettings
    from gpufleet.bench.dataset import RandomDataset

EX_USAGE = ExitCode.USAGE


class _Gpufleet(click.Group):
    """Usage errors exit 64 (sysexits.h), so they never look like drift (2)."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        # text a host printed that is not UTF-8 is kept as surrogates: shown escaped, not fatal
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            # one line, as for every bad input: what is wrong, and where help is
            where = exc.ctx.command_path if exc.ctx else "gpufleet"
            click.echo(f"{where}: {exc.format_message()} (see {where} --help)", err=True)
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


class _FleetCommand(click.Command):
    """A fleet command: what follows ``--`` is pyinfra's, passed through to every run."""

    def parse_args(self, ctx, args):
        if "--" in args:
            at = args.index("--")
            args, ctx.meta["pyinfra_args"] = args[:at], tuple(args[at + 1 :])
        return super().parse_args(ctx, args)

    def format_usage(self, ctx, formatter):
        pieces = [*self.collect_usage_pieces(ctx), "[-- PYINFRA_OPTIONS...]"]
        formatter.write_usage(ctx.command_path, " ".join(pieces))


@click.group(cls=_Gpufleet)
@click.version_option(package_name="gpufleet")
@click.option(
    "--project",
    default=None,
    envvar="GPUFLEET_PROJECT",
    metavar="DIR",
    help="Your ops directory: its group_data/ is read (else group_data/ beside the inventory "
    "or in the current directory), and inventories are found there.",
)
@click.pass_context
def main(ctx: click.Context, project: str | None) -> None:
    """Provision NVIDIA GPU inference hosts with pyinfra.

    Exit status: 0 ok, 1 a host could not be done, 2 drift or changes pending, 3 an SLO
    missed, 64 usage. `--json` prints one document (gpufleet/fleet/schemas/); `-- OPTIONS`
    passes pyinfra options through. Completion: eval "$(_GPUFLEET_COMPLETE=bash_source
    gpufleet)".
    """
    if project is not None and not Path(project).is_dir():
        raise UsageError(f"--project {project}: not a directory")
    ctx.obj = {"project": project}


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
    from gpufleet.sandbox.docker import SandboxError
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
    from gpufleet.sandbox.docker import SandboxError

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
    from gpufleet.sandbox.docker import SandboxError

    try:
        rows = fleet.status()
    except SandboxError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            click.echo(f"{row['name']:<20} {row['state']:<9} {row['ssh']:<24} {row['groups']}")
    # a host not running could not be done: 1, as everywhere (3 is bench's missed SLO)
    if any(row["state"] != "running" for row in rows):
        sys.exit(ExitCode.HOST_FAILED)


@sandbox.command("services")
def sandbox_services() -> None:
    """Show each demo host's services: port, model, health."""
    from gpufleet.sandbox import report

    rows = report.services()
    width = max([len(r["model"]) for r in rows] + [20])
    click.echo(f"{'host':<18} {'service':<8} {'port':<6} {'model':<{width}} {'health':<8} status")
    for r in rows:
        click.echo(
            f"{r['host']:<18} {r['service']:<8} {r['port']:<6} {r['model']:<{width}} "
            f"{r['health']:<8} {r['status']}"
        )
    click.echo(report.vllm_line())
    if not rows or any(r["health"] != "ok" for r in rows):
        sys.exit(ExitCode.HOST_FAILED)


def _targets(f):
    f = click.option("--exclude", multiple=True, help="Hosts or groups, as pyinfra's --exclude.")(f)
    f = click.option("--limit", multiple=True, help="Hosts or groups, as pyinfra's --limit.")(f)
    return click.argument("inventory", type=click.Path())(f)


def _json_flag(schema: str):
    return click.option("--json", "as_json", is_flag=True, help=f"Print the {schema} document.")


def _project(ctx: click.Context) -> str | None:
    return (ctx.find_root().obj or {}).get("project")


def _inventory(ctx: click.Context, inventory: str) -> str:
    """The inventory file (in the current directory, else in --project), or exit 64."""
    project = _project(ctx)
    if not Path(inventory).is_file() and project and (Path(project) / inventory).is_file():
        inventory = str(Path(project) / inventory)
    return need_file(inventory, "inventory")


def need_file(path: str, what: str) -> str:
    """``path`` when it is a readable file; else a one-line usage error (exit 64)."""
    if not Path(path).is_file():
        raise UsageError(f"{what} {path}: no such file")
    return path


def _pyinfra_args(ctx: click.Context) -> tuple[str, ...]:
    """What goes to pyinfra: the project's group data, then what followed ``--``."""
    from gpufleet.fleet.runner import check_extra

    extra = tuple(ctx.meta.get("pyinfra_args", ()))
    check_extra(extra)
    project = _project(ctx)
    if project and (Path(project) / "group_data").is_dir():
        extra = ("--group-data", str(Path(project) / "group_data"), *extra)
    return extra


def _show(doc, as_json: bool, lines: list[str], command: str, fatal: str | None) -> None:
    """A command's document as JSON or as its text, then the run's fatal message, if any."""
    if as_json:
        click.echo(doc.to_json())
    else:
        for line in lines:
            click.echo(line)
    if fatal:
        click.echo(f"gpufleet {command}: {fatal}", err=True)


def _fleet_run(ctx, inventory, deploy, limit, exclude, options=None, *, dry=True, **kw):
    """One pyinfra run of ``deploy`` over the selected hosts, pass-through options included."""
    from gpufleet.fleet import runner

    return runner.run(
        _inventory(ctx, inventory),
        deploy,
        dry=dry,
        limit=limit,
        exclude=exclude,
        options=options,
        extra=_pyinfra_args(ctx),
        **kw,
    )


DIFF_DEPLOY = "deploys/diff.py"
_DEPLOY = click.option(
    "--deploy", default="deploys/fleet.py", show_default=True, help="Deploy to compare."
)


@main.command("drift", cls=_FleetCommand)
@_targets
@_DEPLOY
@_json_flag("gpufleet.drift/1")
@click.option("--deep", is_flag=True, help="Re-hash every model file (slow on big models).")
@click.option(
    "--diff",
    "show_diff",
    is_flag=True,
    help="Unified diffs of the compose file, the .env's key names (never values) and image "
    "ids; one more read of a host whose files differ.",
)
@click.pass_context
def drift(ctx, inventory, limit, exclude, deploy, as_json, deep, show_diff) -> None:
    """Say what differs from the declared state, and why, changing nothing.

    Exit status: 0 in sync, 2 drift found, 1 a host could not be checked, 64 usage error.
    """
    import tempfile

    from gpufleet.fleet import diffs
    from gpufleet.fleet import drift as report

    options = RunOptions(deep=deep)
    if not show_diff:
        run = _fleet_run(ctx, inventory, deploy, limit, exclude, options)
        doc = report.drift_document(run, deep=deep)
    else:
        if deploy != "deploys/fleet.py":
            raise UsageError("--diff compares the whole fleet's plan: leave out --deploy")
        with tempfile.TemporaryDirectory(prefix="gpufleet-diff-") as where:
            env = {diffs.DIFF_DIR_ENV: where}
            run = _fleet_run(ctx, inventory, DIFF_DEPLOY, limit, exclude, options, env=env)
            doc = report.drift_document(run, deep=deep)
            for h in doc.hosts:
                h.diffs = diffs.read(where, h.host)
    _show(doc, as_json, report.render_text(doc), "drift", run.fatal)
    _exit(report.exit_code(doc, run))


@main.command("status", cls=_FleetCommand)
@_targets
@_DEPLOY
@_json_flag("gpufleet.status/1")
@click.pass_context
def status(ctx, inventory, limit, exclude, deploy, as_json) -> None:
    """Every host, service, release and GPU as they are now (one read per host).

    Exit status: 0 read (drift is shown, not an error), 1 a host could not be read.
    """
    from gpufleet.fleet import status as view

    run = _fleet_run(ctx, inventory, deploy, limit, exclude, RunOptions(status=True))
    doc = view.status_document(run)
    _show(doc, as_json, view.render_table(doc), "status", run.fatal)
    _exit(view.exit_code(doc, run))


def _rollout_options(f):
    options = [
        click.option(
            "--batch",
            default="1",
            show_default=True,
            help="Hosts per batch after the canaries: a count (2) or a share (25%).",
        ),
        click.option(
            "--max-failures",
            default=0,
            show_default=True,
            help="Failed hosts a batch may have and the rollout go on.",
        ),
        click.option("--dry", is_flag=True, help="Print the batches and plans; change nothing."),
        click.option(
            "--lock-wait",
            default="0s",
            show_default=True,
            help="How long to wait for another rollout's lease (30s, 5m).",
        ),
        click.option(
            "--lease-ttl",
            default="1h",
            show_default=True,
            help="How long the lease holds if this process dies.",
        ),
        click.option(
            "--skip-unreachable",
            is_flag=True,
            help="Go on without hosts that cannot be reached or checked (they are still "
            "named, and the exit status is still 1).",
        ),
        click.option("--quiet", is_flag=True, help="No progress lines while hosts converge."),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print the gpufleet.<action>/1 document at the end (progress goes to stderr).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _rollout(ctx, inventory, limit, exclude, deploy, o: dict, **settings) -> None:
    """Run a rollout or a rollback; its log to stdout, or to stderr under --json."""
    from gpufleet.fleet import rollout

    rollout.parse_batch(o["batch"])
    out = (lambda line: click.echo(line, err=True)) if o["as_json"] else click.echo
    r = rollout.Rollout(
        inventory=_inventory(ctx, inventory),
        deploy=deploy,
        limit=limit,
        exclude=exclude,
        batch=o["batch"],
        max_failures=o["max_failures"],
        lock_wait=rollout.parse_duration(o["lock_wait"]),
        ttl=rollout.parse_duration(o["lease_ttl"]),
        skip_unreachable=o["skip_unreachable"],
        extra=_pyinfra_args(ctx),
        log=out,
        progress=None if o["quiet"] else out,
        **settings,
    )
    code = rollout.execute(r, dry=o["dry"])
    if o["as_json"]:
        click.echo(rollout.document(r, dry=o["dry"]).to_json())
    _exit(code)


@main.command("rollout", cls=_FleetCommand)
@_targets
@click.argument("deploy", default="deploys/fleet.py")
@_rollout_options
@click.option("--no-canary", is_flag=True, help="No canary batch: batches from the start.")
@click.pass_context
def rollout_cmd(ctx, inventory, limit, exclude, deploy, no_canary, **o) -> None:
    """Converge the fleet batch by batch: a canary per group first, each batch health-gated,
    a failed host rolled back to its previous release. Each host's progress lines show as
    they come, prefixed by its name.

    Exit status: 0 every host on its new release, 1 a host failed (and was rolled back) or the
    rollout could not start, 2 changes pending (--dry), 64 usage error.
    """
    _rollout(ctx, inventory, limit, exclude, deploy, o, canary=not no_canary)


@main.command("rollback", cls=_FleetCommand)
@_targets
@click.option(
    "--to",
    "to",
    default="previous",
    show_default=True,
    help="'previous' (each host's release before its current one) or a release id.",
)
@click.argument("deploy", default="deploys/fleet.py")
@_rollout_options
@click.pass_context
def rollback_cmd(ctx, inventory, limit, exclude, to, deploy, **o) -> None:
    """Bring hosts back to a kept release, batch by batch and gated like a rollout.

    Restores compose, .env, build context, image and model files; never the driver or toolkit.
    Exit status as for rollout.
    """
    import re

    if to != "previous" and not re.fullmatch(r"[0-9a-f]{12}", to):
        raise click.BadParameter("'previous' or a 12-digit release id", param_hint="--to")
    _rollout(ctx, inventory, limit, exclude, deploy, o, canary=False, action="rollback", restore=to)


@main.command("converge", cls=_FleetCommand)
@_targets
@click.argument("deploy", default="deploys/fleet.py")
@click.option("--dry", is_flag=True, help="Say what would change; change nothing.")
@click.pass_context
def converge_cmd(ctx, inventory, limit, exclude, deploy, dry) -> None:
    """pyinfra's run of DEPLOY (gpufleet's own deploys/fleet.py by default) over the
    inventory, its output live: what `pyinfra INVENTORY deploys/fleet.py` does in a clone.

    Exit status: 0 done, 1 a host refused, failed or could not be reached, 2 changes pending
    (--dry), 64 usage error.
    """
    from gpufleet.fleet import drift as report

    run = _fleet_run(ctx, inventory, deploy, limit, exclude, dry=dry, on_line=click.echo)
    refused = {r.host: f"refused: {r.refusal}" for r in run.report.ordered() if r.refusal}
    bad = {**refused, **run.unreachable, **{h: f.why for h, f in run.failures.items()}}
    for host, why in sorted(bad.items()):
        click.echo(f"gpufleet converge: {host}: {why}", err=True)
    if run.fatal:
        click.echo(f"gpufleet converge: {run.fatal}", err=True)
    if run.fatal or bad or not run.report.hosts:
        _exit(ExitCode.HOST_FAILED)
    _exit(report.exit_code(report.drift_document(run), run) if dry else ExitCode.OK)


def _kept(state) -> list:
    from gpufleet.fleet.documents import KeptRelease

    kept = {rid: k.model_dump(mode="json") for rid, k in state.kept.items()}
    return [
        KeptRelease(
            id=rid,
            current=rid == state.current,
            recorded=(kept.get(rid) or {}).get("at"),
            manifest=(kept.get(rid) or {}).get("manifest"),
        )
        for rid in state.releases
    ]


def releases_document(run):
    from gpufleet.fleet.documents import ReleasesDocument, ReleasesHost

    rows = [
        ReleasesHost(host=name, status="ok", releases=_kept(entry.snapshot.state))
        for name, entry in run.hosts.items()
    ]
    rows += [
        ReleasesHost(host=h, status=status, reason=why, releases=[])
        for h, (status, why) in run.unread.items()
    ]
    return ReleasesDocument(hosts=sorted(rows, key=lambda h: h.host))


def _release_line(row) -> str:
    import time as _time

    services = (row.manifest or {}).get("services", {})
    what = ", ".join(
        f"{svc} {s['image']} model {s.get('model') or '-'}" for svc, s in services.items()
    )
    when = _time.strftime("%Y-%m-%d %H:%M", _time.localtime(row.recorded or 0))
    return f"  {'*' if row.current else ' '} {row.id}  {when}  {what}"


@main.command("releases", cls=_FleetCommand)
@_targets
@_DEPLOY
@_json_flag("gpufleet.releases/1")
@click.pass_context
def releases_cmd(ctx, inventory, limit, exclude, deploy, as_json) -> None:
    """The releases each host keeps for rollback, newest last, the current one marked.

    Exit status: 0 read, 1 a host could not be read.
    """
    run = _fleet_run(ctx, inventory, deploy, limit, exclude, RunOptions(releases=True))
    doc = releases_document(run)
    lines = []
    for h in doc.hosts:
        if h.status == "ok":
            lines += [f"{h.host}:", *(_release_line(row) for row in h.releases)]
    _show(doc, as_json, lines, "releases", run.fatal)
    for h in doc.hosts:
        if h.status != "ok":
            click.echo(f"{h.host}: {h.status}: {h.reason}", err=True)
    _exit(1 if run.fatal or any(h.status != "ok" for h in doc.hosts) else 0)


@main.group("lock")
def lock() -> None:
    """The rollout lease on each host: who holds it, and breaking a stale one."""


def lock_document(run, now: float):
    """Each host's lease: free, leased, expired, invalid (a file that is not a lease), or
    unreachable."""
    from gpufleet.fleet.documents import LockHost, LockStatusDocument

    rows = []
    for name, entry in run.hosts.items():
        state = entry.snapshot.state
        lease = state.lease
        if state.lease_error:
            rows.append(LockHost(host=name, state="invalid", reason=state.lease_error))
        elif lease:
            rows.append(
                LockHost(
                    host=name,
                    state="leased" if lease.expires > now else "expired",
                    holder=lease.holder,
                    pid=lease.pid,
                    release=lease.release,
                    message=lease.message,
                    expires=lease.expires,
                )
            )
        else:
            rows.append(LockHost(host=name, state="free"))
    for h, (_, why) in run.unread.items():
        rows.append(LockHost(host=h, state="unreachable", reason=why))
    return LockStatusDocument(hosts=sorted(rows, key=lambda h: h.host))


def lock_exit(doc, run) -> int:
    """A lease is a state, not an error (0); a host unread or a lease file unreadable is 1."""
    bad = any(h.state in ("invalid", "unreachable") for h in doc.hosts)
    return ExitCode.HOST_FAILED if run.fatal or bad or not doc.hosts else ExitCode.OK


def _lock_line(h, now: float) -> str:
    if h.state in ("leased", "expired"):
        left = int(h.expires - now)
        when = "expired" if left <= 0 else f"{left}s left"
        if h.message:
            return f"{h.host}: held by {h.holder} for maintenance: {h.message!r}, {when}"
        return f"{h.host}: leased by {h.holder} (pid {h.pid}) for {h.release}, {when}"
    return f"{h.host}: {h.reason}" if h.state == "invalid" else f"{h.host}: {h.state}"


@lock.command("status", cls=_FleetCommand)
@_targets
@_DEPLOY
@_json_flag("gpufleet.lock-status/1")
@click.pass_context
def lock_status(ctx, inventory, limit, exclude, deploy, as_json) -> None:
    """Who holds each host's lease, until when.

    Exit status: 0 read (leased or free: a lease is a state), 1 a host could not be read or
    holds a lease file that is not a lease.
    """
    import time as _time

    run = _fleet_run(ctx, inventory, deploy, limit, exclude)
    now = _time.time()
    doc = lock_document(run, now)
    lines = [_lock_line(h, now) for h in doc.hosts if h.state != "unreachable"]
    _show(doc, as_json, lines, "lock status", run.fatal)
    for h in doc.hosts:
        if h.state == "unreachable":
            click.echo(f"{h.host}: unreachable: {h.reason}", err=True)
    _exit(lock_exit(doc, run))


@lock.command("break", cls=_FleetCommand)
@_targets
@_json_flag("gpufleet.lock-break/1")
@click.pass_context
def lock_break(ctx, inventory, limit, exclude, as_json) -> None:
    """Remove the lease on these hosts (a rollout that died and will not come back).

    Exit status: 0 removed everywhere, 1 a host's lease could not be removed.
    """
    from gpufleet.fleet import rollout
    from gpufleet.fleet.documents import LockBreakDocument, LockBreakHost
    from gpufleet.fleet.lease import new_lease

    by = new_lease(ttl=0, release=None)["holder"]
    line = rollout.audit_line(
        action="lease-break", by=by, why="broken by hand (gpufleet lock break)"
    )
    options = RunOptions(lease_action="break", audit_lines={"*": line})
    run = _fleet_run(ctx, inventory, rollout.LEASE_DEPLOY, limit, exclude, options, dry=False)
    rollout.append_control_audit(line)
    rows = [
        LockBreakHost(
            host=r.host,
            removed=not (r.unreachable or r.failed),
            reason=r.unreachable or (r.failed.why if r.failed else None),
        )
        for r in run.report.ordered()
    ]
    doc = LockBreakDocument(hosts=sorted(rows, key=lambda h: h.host))
    lines = [f"{h.host}: lease removed" for h in doc.hosts if h.removed]
    _show(doc, as_json, lines, "lock break", run.fatal)
    for h in doc.hosts:
        if not h.removed:
            click.echo(f"{h.host}: lease NOT removed: {h.reason}", err=True)
    failed = any(not h.removed for h in doc.hosts)
    _exit(1 if failed or run.fatal or not doc.hosts else 0)


def _window(ctx, inventory, limit, exclude, ttl: float = 0.0):
    from gpufleet.fleet.rollout import Rollout

    return Rollout(
        inventory=_inventory(ctx, inventory),
        limit=limit,
        exclude=exclude,
        ttl=ttl,
        extra=_pyinfra_args(ctx),
        log=lambda line: click.echo(line, err=True),
    )


def _window_lines(rows) -> list[str]:
    return [f"{h.host}: {h.state}" + (f": {h.reason}" if h.reason else "") for h in rows]


@lock.command("acquire", cls=_FleetCommand)
@_targets
@_DEPLOY
@click.option("-m", "--message", required=True, help="Why the fleet is held; shown to everyone.")
@click.option(
    "--for",
    "duration",
    default="24h",
    show_default=True,
    help="How long the window holds unless released (90m, 4h).",
)
@_json_flag("gpufleet.lock-acquire/1")
@click.pass_context
def lock_acquire(ctx, inventory, limit, exclude, deploy, message, duration, as_json) -> None:
    """Hold these hosts for maintenance: every rollout, rollback and converge is refused with
    the message until the window expires or ``gpufleet lock release`` ends it. All or none.

    Exit status: 0 held on every host, 1 held nowhere (a host leased, unread or refusing).
    """
    from gpufleet.fleet import maintenance
    from gpufleet.fleet.documents import LockAcquireDocument, LockWindowHost
    from gpufleet.fleet.lease import message_problem
    from gpufleet.fleet.rollout import parse_duration

    try:
        ttl = parse_duration(duration)
    except UsageError as exc:
        raise UsageError(f"--for {duration!r}: {exc}") from None
    if why := message_problem(message):
        raise UsageError(f"-m: {why}")
    looked = _fleet_run(ctx, inventory, deploy, limit, exclude, RunOptions(lease_id=ALL_LEASES))
    r = _window(ctx, inventory, limit, exclude, ttl)
    lease, rows, why = maintenance.acquire(r, looked, message)
    doc = LockAcquireDocument(
        held=why is None,
        lease=lease["id"],
        message=message,
        expires=lease["expires"],
        hosts=[LockWindowHost(host=h.host, state=h.state, reason=h.reason) for h in rows],
    )
    lines = [f"{h.host}: held for maintenance: {message!r}" for h in doc.hosts if why is None]
    _show(doc, as_json, lines, "lock acquire", looked.fatal)
    if why:
        for line in _window_lines(h for h in rows if h.state == "unreachable"):
            click.echo(line, err=True)
        click.echo(f"gpufleet lock acquire: {why}", err=True)
    _exit(1 if why or looked.fatal else 0)


@lock.command("release", cls=_FleetCommand)
@_targets
@_DEPLOY
@_json_flag("gpufleet.lock-release/1")
@click.pass_context
def lock_release(ctx, inventory, limit, exclude, deploy, as_json) -> None:
    """End the maintenance window on these hosts (a rollout's lease is left alone).

    Exit status: 0 no window left, 1 a host could not be read or released.
    """
    from gpufleet.fleet import maintenance
    from gpufleet.fleet.documents import LockReleaseDocument, LockWindowHost
    from gpufleet.fleet.lease import new_lease

    looked = _fleet_run(ctx, inventory, deploy, limit, exclude, RunOptions(lease_id=ALL_LEASES))
    r = _window(ctx, inventory, limit, exclude)
    rows = maintenance.release(r, looked, by=new_lease(ttl=0, release=None)["holder"])
    doc = LockReleaseDocument(
        hosts=[LockWindowHost(host=h.host, state=h.state, reason=h.reason) for h in rows]
    )
    bad = [h for h in rows if h.state in ("refused", "unreachable")]
    shown = _window_lines(h for h in rows if h not in bad)
    _show(doc, as_json, shown, "lock release", looked.fatal)
    for line in _window_lines(bad):
        click.echo(line, err=True)
    _exit(1 if bad or looked.fatal or not rows else 0)


def audit_entries(lines) -> list[dict]:
    """Audit lines as objects; a line that is not a JSON object is kept as ``{"text": ...}``."""
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        out.append(entry if isinstance(entry, dict) else {"text": line})
    return out


@main.command("audit", cls=_FleetCommand)
@_targets
@_DEPLOY
@click.option("--tail", default=20, show_default=True, help="Lines per host.")
@_json_flag("gpufleet.audit/1")
@click.pass_context
def audit_cmd(ctx, inventory, limit, exclude, deploy, tail, as_json) -> None:
    """Each host's rollout and rollback trail, and the control machine's.

    Exit status: 0 read, 1 a host could not be read.
    """
    from gpufleet.fleet import rollout
    from gpufleet.fleet.documents import AuditDocument, AuditHost, ControlAudit

    run = _fleet_run(ctx, inventory, deploy, limit, exclude, RunOptions(audit=tail))
    rows = [
        AuditHost(host=n, status="ok", lines=audit_entries(e.snapshot.state.audit))
        for n, e in run.hosts.items()
    ]
    unread = run.unread.items()
    rows += [AuditHost(host=h, status=s, reason=why, lines=[]) for h, (s, why) in unread]
    path = rollout.control_audit_path()
    mine = path.read_text().splitlines()[-tail:] if path.exists() else []
    control = ControlAudit(path=str(path), lines=audit_entries(mine))
    doc = AuditDocument(hosts=sorted(rows, key=lambda h: h.host), control=control)
    lines = []
    for name, entry in sorted(run.hosts.items()):
        lines += [f"{name}:", *(f"  {x}" for x in entry.snapshot.state.audit or ["(nothing yet)"])]
    lines += [f"control machine ({path}):", *(f"  {x}" for x in mine or ["(nothing yet)"])]
    _show(doc, as_json, lines, "audit", run.fatal)
    for h in doc.hosts:
        if h.status != "ok":
            click.echo(f"{h.host}: {h.status}: {h.reason}", err=True)
    _exit(1 if run.fatal or any(h.status != "ok" for h in doc.hosts) else 0)


@main.command("logs", cls=_FleetCommand)
@_targets
@click.option("--service", default=None, help="Only this service (its compose name).")
@click.option(
    "--tail",
    default=100,
    show_default=True,
    type=click.IntRange(0, 100_000),
    help="Lines per service from the end of its log.",
)
@click.option("--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@_json_flag("gpufleet.logs/1")
@click.pass_context
def logs_cmd(ctx, inventory, limit, exclude, service, tail, follow, as_json) -> None:
    """Each host's service logs (its gpufleet compose project), prefixed by host, with every
    secret value masked. Bounded by --tail unless --follow.

    Exit status: 0 read, 1 a host could not be read, 64 usage error.
    """
    from gpufleet.fleet import logs, runner
    from gpufleet.fleet.documents import LogsDocument, LogsHost

    if service is not None and not logs.SERVICE_RE.fullmatch(service):
        raise UsageError(f"--service {service!r}: not a compose service name")
    if follow and as_json:
        raise UsageError("--follow and --json: a document ends; a followed log does not")
    inv = _inventory(ctx, inventory)
    hosts = _fleet(inv, limit, exclude)
    secrets = {h.config.host: _secrets_of(h.config) for h in hosts}
    mask = logs.masker(secrets)
    names = set(secrets)
    got: dict[str, list[str]] = {name: [] for name in names}

    def on_line(line: str) -> None:
        if (text := logs.shown(line, names, mask)) is None:
            return
        host, _, rest = text.strip().partition(" | ")
        got[host].append(rest)
        if not as_json:
            click.echo(text.strip())

    cmd = logs.remote_command(service=service, tail=tail, follow=follow)
    extra = _pyinfra_args(ctx)
    sel = runner.selection(limit, exclude)
    args = [
        sys.executable,
        "-m",
        "gpufleet.fleet.pyinfra_main",
        "-y",
        *sel,
        *extra,
        inv,
        "exec",
        "--",
        cmd,
    ]
    try:
        rc, _, _ = runner.spawn(args, runner.child_env(None), on_line=on_line)
    except KeyboardInterrupt:
        _exit(ExitCode.OK)
    status = "ok" if rc == 0 else "failed"
    why = None if rc == 0 else f"pyinfra exited {rc}"
    rows = [LogsHost(host=h, status=status, reason=why, lines=got[h]) for h in sorted(names)]
    if as_json:
        click.echo(LogsDocument(service=service, hosts=rows).to_json())
    if rc:
        click.echo(f"gpufleet logs: pyinfra exited {rc}; run with -- -v to see why", err=True)
    _exit(ExitCode.HOST_FAILED if rc else ExitCode.OK)


def _secrets_of(config) -> dict[str, str]:
    """The secret values this machine resolves for ``config``, to mask; names alone (their
    values masked after ``NAME=``) when one cannot be read here."""
    from gpufleet.core.schema import resolve_secrets

    try:
        return resolve_secrets(config)
    except ValueError:
        return dict.fromkeys(config.secrets, "")


@main.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite files that are there.")
def init_cmd(directory, force) -> None:
    """Write a starter ops directory: an inventory and group data, with comments.

    Exit status: 0 written, 64 a file is there already (without --force).
    """
    from gpufleet import starter

    written = starter.write(Path(directory), force=force)
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"next: edit {Path(directory) / 'inventory.py'}, then")
    click.echo(f"  cd {directory} && gpufleet drift inventory.py && gpufleet converge inventory.py")


@main.command("bootstrap")
@click.argument("host")
@click.option("--user", required=True, help="The installer's user; logs in with its password.")
@click.option("--port", default=22, show_default=True, type=click.IntRange(1, 65535))
@click.option("--name", default=None, help="The host's inventory name (default: HOST).")
@click.option("--group", default=None, help="Its group, whose converge runs: rtx5090, spark, ...")
@click.option(
    "--password-file",
    default=None,
    help="The password is its first line (else $GPUFLEET_BOOTSTRAP_PASSWORD, else a prompt).",
)
@click.option("--host-key", default=None, metavar="SHA256:...", help="As `ssh-keygen -lf` says.")
@click.option("--known-hosts", default=None, help="Checked and recorded in [~/.ssh/known_hosts].")
@click.option("--key", default=None, help="Private key; KEY.pub is installed [~/.ssh/id_ed25519].")
@click.option("--ops-user", default=None, metavar="NAME", help="Create it (passwordless sudo).")
@click.option("--passwordless-sudo", is_flag=True, help="Write /etc/sudoers.d/gpufleet-USER.")
@click.option("--inventory", default=None, help="Add the host to it (plain lists), converge.")
@click.option("--converge-inventory", default=None, help="Converge with it (reads --inventory).")
@click.option("--dry", is_flag=True, help="The checks only; print what would change.")
def bootstrap_cmd(**options) -> None:
    """Take over a fresh machine that knows only its user's password: check its host key,
    install this machine's key, then converge its group.

    Exit status: 0 done, 1 refused (one line says why; nothing changed) or failed, 64 usage.
    """
    from gpufleet import bootstrap

    _exit(bootstrap.main(**options))


def check_outputs(*paths: str | None) -> None:
    """Each file a command will write: its directory must be there (exit 64 before work)."""
    for path in filter(None, paths):
        if not Path(path).resolve().parent.is_dir():
            raise UsageError(f"{path}: directory {Path(path).parent} not found")


def check_plot(png: str | None) -> None:
    import importlib.util

    if png and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--png needs matplotlib: pip install 'gpufleet[plot]'")


@main.command("bench", cls=_FleetCommand)
@_targets
@click.option("--deploy", default="deploys/fleet.py", show_default=True)
@click.option("--service", default=None, help="Only this service (its name or kind).")
@click.option(
    "--concurrency",
    default="1",
    show_default=True,
    help="Closed-loop levels, run one after another: 1,4,16.",
)
@click.option(
    "--requests",
    type=int,
    default=None,
    help="Requests per level (default 50 unless --duration).",
)
@click.option("--duration", default=None, help="Seconds per level instead of a count: 60s.")
@click.option(
    "--rate",
    default="inf",
    show_default=True,
    help="Open-loop Poisson arrivals per second, or inf.",
)
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--warmup", default=2, show_default=True, help="Uncounted requests first.")
@click.option("--prompts", "prompts_file", default=None, help="A JSONL file of prompts.")
@click.option(
    "--dataset",
    type=click.Choice(["builtin", "random"]),
    default="builtin",
    show_default=True,
    help="random: prompts of --input-len tokens asking for --output-len (ignore_eos), "
    "as vllm bench serve --dataset-name random.",
)
@click.option("--input-len", type=int, default=None, help="Prompt tokens (--dataset random).")
@click.option("--output-len", type=int, default=None, help="Output tokens (--dataset random).")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--body",
    "extra_body",
    default=None,
    metavar="JSON",
    help='Merged into every request: \'{"temperature": 0, "ignore_eos": true}\'.',
)
@click.option("--direct", is_flag=True, help="Reach services over the network, not SSH.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the document to stdout (the table to stderr)."
)
@click.option("--json-file", "json_out", default=None, metavar="FILE", help="Write the document.")
@click.option(
    "--format",
    "json_format",
    type=click.Choice(["gpufleet", "vllm"]),
    default="gpufleet",
    show_default=True,
    help="The JSON's shape: gpufleet.bench/1, or vllm bench serve's result keys (one "
    "object per target and level, a line each).",
)
@click.option("--csv", "csv_out", default=None)
@click.option("--png", "png_out", default=None, help="Plot latency and GPU utilisation.")
@click.option("--save-requests", is_flag=True, help="Every request's record in the JSON.")
@click.option("--compare", "compare_with", default=None, help="An older JSON to compare with.")
@click.pass_context
def bench_cmd(ctx, inventory, limit, exclude, deploy, **options) -> None:
    """Load every service the fleet serves: latency percentiles, throughput, the GPU meanwhile.

    Exit status: 0 done, 1 a target could not be benched or answered nothing, 3 an SLO was
    missed, 64 usage error.
    """
    from gpufleet.bench import report as bench_report
    from gpufleet.bench.run import targets_from

    opts = BenchOptions(**options)
    # every argument and file checked before the first request: a bench can run for an hour
    load = opts.load()
    say = _bench_say(opts)
    older = _older(opts.compare_with)
    run = _fleet_run(ctx, inventory, deploy, limit, exclude)
    if run.fatal:
        click.echo(f"gpufleet bench: {run.fatal}", err=True)
        _exit(1)
    targets = targets_from(run, service=opts.service)
    if not targets:
        click.echo("gpufleet bench: no service to bench in this selection", err=True)
        _exit(1)
    runs = [_bench_one(t, opts, load) for t in targets]
    doc = bench_report.build_document(
        settings=load.settings,
        levels=load.levels,
        prompts="random" if load.dataset else opts.prompts_file or "builtin",
        auth=any(t.key_source for t in targets),
        runs=runs,
        save_requests=opts.save_requests,
        dataset=load.dataset_doc(),
    )
    models = {(t.target.host, t.target.service): t.model_name for t in targets}
    _bench_outputs(doc, opts, older, say=say, runs=runs, models=models)
    if doc["slo_missed"]:
        _exit(3)
    # a service that answered nothing at some level is a failed target, though it was measured
    dead = [
        f"{r['target']['host']} {r['target']['service']}"
        for r in bench_report.runs_of(doc)
        if any(not lv["figures"]["completed"] for lv in r["levels"])
    ]
    if dead:
        click.echo(f"gpufleet bench: no request succeeded on {', '.join(dead)}", err=True)
    _exit(1 if dead or any(r.error for r in runs) else 0)


@dataclass(frozen=True)
class BenchLoad:
    """What ``gpufleet bench`` sends to each target: its levels, settings and prompts."""

    levels: list[int]
    settings: LoadSettings
    prompts: list
    dataset: RandomDataset | None = None

    def dataset_doc(self) -> dict | None:
        if self.dataset is None:
            return None
        d = self.dataset
        return {"name": "random", "input_len": d.input_len, "output_len": d.output_len}


@dataclass(frozen=True)
class BenchOptions:
    """``gpufleet bench``'s options, as the command line gave them (see its ``--help``).

    + service: only this service (its name or kind)
    + concurrency: closed-loop levels, ``1,4,16``; requests / duration: per level
    + rate: open-loop arrivals per second, or ``inf``
    + prompts_file: a JSONL file of prompts; extra_body: JSON merged into every request
    + dataset / input_len / output_len: ``random`` prompts of exact token lengths instead
    + direct: reach services over the network, not SSH
    + as_json: the document to stdout; json_format: ``gpufleet`` or ``vllm``'s result keys
    + json_out / csv_out / png_out: the reports to write; compare_with: an older JSON
    """

    service: str | None = None
    concurrency: str = "1"
    requests: int | None = None
    duration: str | None = None
    rate: str = "inf"
    max_tokens: int = 128
    warmup: int = 2
    prompts_file: str | None = None
    dataset: str = "builtin"
    input_len: int | None = None
    output_len: int | None = None
    seed: int = 0
    extra_body: str | None = None
    direct: bool = False
    as_json: bool = False
    json_format: str = "gpufleet"
    json_out: str | None = None
    csv_out: str | None = None
    png_out: str | None = None
    save_requests: bool = False
    compare_with: str | None = None

    def levels(self) -> list[int]:
        try:
            levels = [int(x) for x in self.concurrency.split(",") if x.strip()]
            if not levels or min(levels) < 1:
                raise ValueError
        except ValueError:
            why = "comma-separated counts like 1,4,16"
            raise click.BadParameter(why, param_hint="--concurrency") from None
        return levels

    def body(self) -> dict:
        try:
            body = json.loads(self.extra_body) if self.extra_body else {}
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--body") from None
        if not isinstance(body, dict):
            example = "a JSON object, like '{\"temperature\": 0}'"
            raise click.BadParameter(example, param_hint="--body")
        return body

    def load(self) -> BenchLoad:
        """The options checked and parsed, and the output files checked: a usage error (64)
        names the first that is wrong."""
        import math

        from gpufleet.bench import prompts as prompt_mod
        from gpufleet.bench.client import LoadSettings
        from gpufleet.fleet.rollout import parse_duration

        levels, body = self.levels(), self.body()
        dataset = self.random_dataset()
        if dataset is not None:
            body = {**dataset.body, **body}  # --body may still say otherwise
        try:
            settings = LoadSettings(
                rate=math.inf if self.rate == "inf" else float(self.rate),
                requests=None if self.duration else (self.requests or 50),
                duration_s=parse_duration(self.duration) if self.duration else None,
                warmup=self.warmup,
                max_tokens=self.max_tokens,
                seed=self.seed,
                extra_body=body,
            )
            if self.prompts_file:
                prompts = prompt_mod.load_jsonl(self.prompts_file)
            elif dataset is not None:
                prompts = []  # made per target, with its server's tokenizer
            else:
                prompts = prompt_mod.builtin_prompts()
        except (ValueError, prompt_mod.PromptFileError) as exc:
            raise click.UsageError(str(exc)) from None
        check_outputs(self.json_out, self.csv_out, self.png_out)
        check_plot(self.png_out)
        return BenchLoad(levels, settings, prompts, dataset)

    def random_dataset(self) -> RandomDataset | None:
        """``--dataset random``'s lengths, checked; None for the other prompt sources."""
        from gpufleet.bench.dataset import RandomDataset

        lengths = {"--input-len": self.input_len, "--output-len": self.output_len}
        if self.dataset != "random":
            if given := [name for name, value in lengths.items() if value is not None]:
                raise click.UsageError(f"{given[0]} is for --dataset random")
            return None
        if self.prompts_file:
            raise click.UsageError("--prompts and --dataset random: choose one")
        for name, value in lengths.items():
            if value is None or value < 1:
                raise click.BadParameter("a token count of at least 1", param_hint=name)
        assert self.input_len is not None and self.output_len is not None
        # each prompt sent once, as vLLM's client does: every level and its warm-up its own
        # (a server's prompt cache would otherwise answer a repeated one without prefill)
        per_level = (self.requests or 50) + self.warmup
        count = min(per_level * len(self.levels()), 4096)
        return RandomDataset(
            input_len=self.input_len, output_len=self.output_len, count=count, seed=self.seed
        )


def _bench_say(opts: BenchOptions):
    """Where the table goes: stdout, or stderr when stdout carries the JSON (``--json``)."""
    return lambda text: click.echo(text, err=opts.as_json)


def _bench_one(t, opts: BenchOptions, load: BenchLoad):
    """One target benched at every level, its progress on stderr."""
    from gpufleet.bench.run import bench_target

    target = t.target
    what = ""
    if load.dataset is not None:
        what = f", random {load.dataset.input_len} in / {load.dataset.output_len} out"
    click.echo(
        f"bench: {target.host} {target.service} ({target.kind} :{target.port},"
        f" {target.model}) at concurrency {opts.concurrency}{what}",
        err=True,
    )

    def progress(p) -> None:
        if p.warmup or not p.total:
            return
        if p.done % max(1, p.total // 4) == 0 or p.done == p.total:
            click.echo(
                f"  {target.host} c={p.concurrency}: {p.done}/{p.total} done, "
                f"{p.failed} failed, {p.elapsed_s:.1f}s",
                err=True,
            )

    return bench_target(
        t,
        settings=load.settings,
        levels=load.levels,
        prompts=load.prompts,
        direct=opts.direct,
        on_progress=progress,
        dataset=load.dataset,
    )


def _bench_outputs(doc: dict, opts: BenchOptions, older, *, say, runs, models) -> None:
    """The table (on stdout, or stderr under ``--json``), the JSON (``--json`` to stdout,
    ``--json-file``, in ``--format``'s shape), the other files, and ``--compare``."""
    from gpufleet.bench import report as bench_report
    from gpufleet.bench import vllmformat

    say(bench_report.text_report(doc))
    if opts.json_format == "vllm":
        text = vllmformat.jsonl(
            vllmformat.results(runs, models=models, detailed=opts.save_requests)
        )
    else:
        text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    if opts.as_json:
        click.echo(text, nl=False)
    if opts.json_out:
        Path(opts.json_out).write_text(text, encoding="utf-8")
    if opts.csv_out:
        Path(opts.csv_out).write_text(bench_report.csv_report(doc))
    if opts.png_out:
        bench_report.write_png(doc, opts.png_out)
    if opts.compare_with:
        say(bench_report.compare(older, doc))


def _older(path: str | None):
    """The bench document ``--compare`` names, read now (before any work), or exit 64."""
    from gpufleet.bench import report as bench_report

    if path is None:
        return None
    need_file(path, "--compare")
    try:
        return bench_report.load_json(path)
    except bench_report.ReportError as exc:
        raise UsageError(f"--compare {exc}") from None


def _fleet(inventory: str, limit: tuple[str, ...], exclude: tuple[str, ...]):
    """The selected hosts, validated, or exit 1 naming every bad field."""
    from gpufleet.core.schema import ConfigError
    from gpufleet.monitor import fleet

    try:
        return fleet.load(inventory, limit=limit, exclude=exclude)
    except ConfigError as exc:
        click.echo(f"gpufleet: invalid host data:\n{exc}", err=True)
        sys.exit(1)


def _skipped(skipped) -> None:
    for s in skipped:
        click.echo(f"{s.host} {s.service}: not a target: {s.why}", err=True)


@main.command("targets")
@_targets
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["file_sd", "static"]),
    default="file_sd",
    show_default=True,
    help="file_sd JSON, or a scrape_configs block.",
)
@click.option("--out", default=None, help="Write here (atomically) instead of stdout.")
@click.option(
    "--report",
    default=None,
    help="A `gpufleet status --json` or `drift --json` document: release and GPU "
    "labels from it (without one, targets carry no release label).",
)
@click.option(
    "--credentials-dir",
    default="/etc/prometheus/secrets",
    show_default=True,
    help="Where Prometheus reads each keyed service's key, as <dir>/<SECRET_NAME>.",
)
def targets_cmd(inventory, limit, exclude, fmt, out, report, credentials_dir) -> None:
    """Prometheus scrape targets for every service that serves /metrics, from the inventory
    (nothing connects). A keyed service's job reads its key from a file; no key is written.

    Exit status: 0 written, 1 invalid host data, 64 usage error.
    """
    from gpufleet.monitor import bundle, fleet, rules, targets

    hosts = _fleet(inventory, limit, exclude)
    groups, skipped = targets.targets(hosts, fleet.releases_from_report(report))
    _skipped(skipped)
    if fmt == "file_sd":
        text = json.dumps(groups, indent=2) + "\n"
    else:
        try:
            secrets = sorted(targets.credential_sources(hosts))
        except ValueError as exc:
            click.echo(f"gpufleet targets: {exc}", err=True)
            sys.exit(1)
        jobs = targets.scrape_configs(secrets, static=groups, credentials_dir=credentials_dir)
        text = rules.dump({"scrape_configs": jobs})
    if out:
        bundle.write_if_changed(Path(out), text)
    else:
        click.echo(text, nl=False)


@main.command("monitor")
@_targets
@click.option("--out", required=True, help="The directory to write.")
@click.option("--report", default=None, help="As for `gpufleet targets`.")
@click.option(
    "--bind",
    default="127.0.0.1",
    show_default=True,
    help="Address Prometheus (9090) and Grafana (3000) are published on.",
)
def monitor_cmd(inventory, limit, exclude, out, report, bind) -> None:
    """Everything to watch the fleet: targets, alert rules, the Grafana dashboard and its
    provisioning, and a compose file running Prometheus and Grafana against them.

    Exit status: 0 written, 1 invalid host data, 64 usage error.
    """
    from gpufleet.monitor import bundle, fleet

    hosts = _fleet(inventory, limit, exclude)
    try:
        written = bundle.write(Path(out), hosts, fleet.releases_from_report(report), bind=bind)
    except ValueError as exc:
        click.echo(f"gpufleet monitor: {exc}", err=True)
        sys.exit(1)
    except ImportError as exc:
        click.echo(f"gpufleet monitor: {exc}: pip install 'gpufleet[monitor]'", err=True)
        sys.exit(1)
    _skipped(written.skipped)
    click.echo(f"{written.targets} targets; {len(written.files)} files in {out}")
    click.echo(f"  docker compose -f {Path(out) / 'compose.yaml'} up -d   # Prometheus, Grafana")
