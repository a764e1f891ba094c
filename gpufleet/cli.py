"""The ``gpufleet`` command: fleet-wide checks and operations, and the sandbox fleet.

Exit status of every command: 0 success, 1 a host or the run failed, 2 drift (``drift``),
3 a missed SLO (``bench``), 64 a usage error (an unknown option, a file that is not there).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gpufleet.core.wire import RunOptions
from gpufleet.fleet.runner import UsageError

EX_USAGE = 64


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


def _show(doc: dict, as_json: bool, render, command: str, fatal: str | None) -> None:
    """A command's document as JSON or as its text, then the run's fatal message, if any."""
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        for line in render(doc):
            click.echo(line)
    if fatal:
        click.echo(f"gpufleet {command}: {fatal}", err=True)


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
    from gpufleet.fleet import drift as report
    from gpufleet.fleet import runner

    options = RunOptions(deep=deep)
    run = runner.run(inventory, deploy, dry=True, limit=limit, exclude=exclude, options=options)
    doc = report.drift_document(run, deep=deep)
    _show(doc, as_json, report.render_text, "drift", run.fatal)
    _exit(report.exit_code(doc, run))


@main.command("status")
@_targets
@click.option("--deploy", default="deploys/fleet.py", show_default=True, help="Deploy to compare.")
@click.option("--json", "as_json", is_flag=True, help="Print the gpufleet.status/1 document.")
def status(inventory: str, limit: tuple[str, ...], exclude: tuple[str, ...], deploy: str,
           as_json: bool) -> None:  # fmt: skip
    """Every host, service, release and GPU as they are now (one read per host)."""
    from gpufleet.fleet import runner
    from gpufleet.fleet import status as view

    options = RunOptions(status=True)
    run = runner.run(inventory, deploy, dry=True, limit=limit, exclude=exclude, options=options)
    doc = view.status_document(run)
    _show(doc, as_json, view.render_table, "status", run.fatal)
    _exit(1 if run.fatal or any(h["status"] in ("refused", "unreachable")
                                for h in doc["hosts"]) else 0)  # fmt: skip


def _rollout_options(f):
    f = click.option(
        "--batch", default="1", show_default=True,
        help="Hosts per batch after the canaries: a count (2) or a share (25%).",
    )(f)  # fmt: skip
    f = click.option("--max-failures", default=0, show_default=True,
                     help="Failed hosts a batch may have and the rollout go on.")(f)  # fmt: skip
    f = click.option("--dry", is_flag=True, help="Print the batches and plans; change nothing.")(f)
    f = click.option("--lock-wait", default="0s", show_default=True,
                     help="How long to wait for another rollout's lease (30s, 5m).")(f)  # fmt: skip
    f = click.option("--lease-ttl", default="1h", show_default=True,
                     help="How long the lease holds if this process dies.")(f)  # fmt: skip
    f = click.option(
        "--skip-unreachable", is_flag=True,
        help="Go on without hosts that cannot be reached or checked (they are still named, "
        "and the exit status is still 1).",
    )(f)  # fmt: skip
    return f


@main.command("rollout")
@_targets
@click.argument("deploy", default="deploys/fleet.py")
@_rollout_options
@click.option("--no-canary", is_flag=True, help="No canary batch: batches from the start.")
def rollout_cmd(inventory, limit, exclude, deploy, batch, max_failures, dry, lock_wait,
                lease_ttl, skip_unreachable, no_canary) -> None:  # fmt: skip
    """Converge the fleet batch by batch: a canary per group first, each batch health-gated,
    a failed host rolled back to its previous release.

    Exit status: 0 every host on its new release, 1 a host failed (and was rolled back) or the
    rollout could not start, 64 usage error.
    """
    from gpufleet.fleet import rollout

    r = rollout.Rollout(inventory=inventory, deploy=deploy, limit=limit, exclude=exclude,
                        batch=batch, canary=not no_canary, max_failures=max_failures,
                        lock_wait=rollout.parse_duration(lock_wait),
                        ttl=rollout.parse_duration(lease_ttl), log=click.echo,
                        skip_unreachable=skip_unreachable)  # fmt: skip
    rollout.parse_batch(batch)
    _exit(rollout.execute(r, dry=dry))


@main.command("rollback")
@_targets
@click.option(
    "--to", "to", default="previous", show_default=True,
    help="'previous' (each host's release before its current one) or a release id.",
)  # fmt: skip
@click.argument("deploy", default="deploys/fleet.py")
@_rollout_options
def rollback_cmd(inventory, limit, exclude, to, deploy, batch, max_failures, dry, lock_wait,
                 lease_ttl, skip_unreachable) -> None:  # fmt: skip
    """Bring hosts back to a kept release, batch by batch and gated like a rollout.

    Restores compose, .env, build context, image and model files; never the driver or toolkit.
    """
    from gpufleet.fleet import rollout

    if to != "previous" and not __import__("re").fullmatch(r"[0-9a-f]{12}", to):
        raise click.BadParameter("'previous' or a 12-digit release id", param_hint="--to")
    r = rollout.Rollout(inventory=inventory, deploy=deploy, limit=limit, exclude=exclude,
                        batch=batch, canary=False, max_failures=max_failures,
                        lock_wait=rollout.parse_duration(lock_wait),
                        ttl=rollout.parse_duration(lease_ttl), action="rollback", restore=to,
                        log=click.echo, skip_unreachable=skip_unreachable)  # fmt: skip
    rollout.parse_batch(batch)
    _exit(rollout.execute(r, dry=dry))


@main.command("releases")
@_targets
@click.option("--deploy", default="deploys/fleet.py", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def releases_cmd(inventory, limit, exclude, deploy, as_json) -> None:
    """The releases each host keeps for rollback, newest last, the current one marked."""
    import time as _time

    from gpufleet.fleet import runner

    options = RunOptions(releases=True)
    run = runner.run(inventory, deploy, dry=True, limit=limit, exclude=exclude, options=options)
    doc = {}
    for name, entry in sorted(run.hosts.items()):
        state = entry.snapshot.state
        kept = {rid: k.model_dump(mode="json") for rid, k in state.kept.items()}
        doc[name] = [{"id": rid, "current": rid == state.current,
                      "recorded": (kept.get(rid) or {}).get("at"),
                      "manifest": (kept.get(rid) or {}).get("manifest")}
                     for rid in state.releases]  # fmt: skip
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    for name, rows in doc.items() if not as_json else ():
        click.echo(f"{name}:")
        for row in rows:
            services = (row["manifest"] or {}).get("services", {})
            what = ", ".join(
                f"{svc} {s['image']} model {s.get('model') or '-'}" for svc, s in services.items()
            )
            when = _time.strftime("%Y-%m-%d %H:%M", _time.localtime(row["recorded"] or 0))
            click.echo(f"  {'*' if row['current'] else ' '} {row['id']}  {when}  {what}")
    for name, why in sorted(run.unreachable.items()):
        click.echo(f"{name}: unreachable: {why}", err=True)
    for name, failure in sorted(run.failures.items()):
        click.echo(f"{name}: could not be read: {failure.why}", err=True)
    _exit(1 if run.fatal or run.unreachable or run.failures else 0)


@main.group("lock")
def lock() -> None:
    """The rollout lease on each host: who holds it, and breaking a stale one."""


@lock.command("status")
@_targets
@click.option("--deploy", default="deploys/fleet.py", show_default=True)
def lock_status(inventory, limit, exclude, deploy) -> None:
    """Who holds each host's lease, until when; exit 0 when no host is leased."""
    import time as _time

    from gpufleet.fleet import runner

    run = runner.run(inventory, deploy, dry=True, limit=limit, exclude=exclude)
    held = 0
    for name, entry in sorted(run.hosts.items()):
        state = entry.snapshot.state
        lease = state.lease
        if state.lease_error:
            held += 1
            click.echo(f"{name}: {state.lease_error}")
        elif lease:
            held += 1
            left = int(lease.expires - _time.time())
            when = "expired" if left <= 0 else f"{left}s left"
            click.echo(f"{name}: leased by {lease.holder} (pid {lease.pid}) for "
                       f"{lease.release}, {when}")  # fmt: skip
        else:
            click.echo(f"{name}: free")
    for name, why in sorted(run.unreachable.items()):
        click.echo(f"{name}: unreachable: {why}", err=True)
    _exit(1 if held or run.unreachable or run.fatal else 0)


@lock.command("break")
@_targets
def lock_break(inventory, limit, exclude) -> None:
    """Remove the lease on these hosts (a rollout that died and will not come back)."""
    from gpufleet.fleet import rollout, runner
    from gpufleet.fleet.lease import new_lease

    by = new_lease(ttl=0, release=None)["holder"]
    line = rollout.audit_line(
        action="lease-break", by=by, why="broken by hand (gpufleet lock break)"
    )
    options = RunOptions(lease_action="break", audit_lines={"*": line})
    run = runner.run(inventory, rollout.LEASE_DEPLOY, dry=False, limit=limit, exclude=exclude,
                     options=options)  # fmt: skip
    rollout.append_control_audit(line)
    failed = {r.host: r.unreachable or (r.failed.why if r.failed else "")
              for r in run.report.ordered() if r.unreachable or r.failed}  # fmt: skip
    for name in sorted(set(run.report.hosts) - set(failed)):
        click.echo(f"{name}: lease removed")
    for name, why in sorted(failed.items()):
        click.echo(f"{name}: lease NOT removed: {why}", err=True)
    if run.fatal:
        click.echo(f"gpufleet lock break: {run.fatal}", err=True)
    _exit(1 if failed or run.fatal or not run.report.hosts else 0)


@main.command("audit")
@_targets
@click.option("--deploy", default="deploys/fleet.py", show_default=True)
@click.option("--tail", default=20, show_default=True, help="Lines per host.")
def audit_cmd(inventory, limit, exclude, deploy, tail) -> None:
    """Each host's rollout and rollback trail, and the control machine's."""
    from gpufleet.fleet import rollout, runner

    options = RunOptions(audit=tail)
    run = runner.run(inventory, deploy, dry=True, limit=limit, exclude=exclude, options=options)
    for name, entry in sorted(run.hosts.items()):
        click.echo(f"{name}:")
        for line in entry.snapshot.state.audit or ["(nothing yet)"]:
            click.echo(f"  {line}")
    path = rollout.control_audit_path()
    click.echo(f"control machine ({path}):")
    lines = path.read_text().splitlines()[-tail:] if path.exists() else ["(nothing yet)"]
    for line in lines:
        click.echo(f"  {line}")


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


@main.command("bench")
@_targets
@click.option("--deploy", default="deploys/fleet.py", show_default=True)
@click.option("--service", default=None, help="Only this service (its name or kind).")
@click.option("--concurrency", default="1", show_default=True,
              help="Closed-loop levels, run one after another: 1,4,16.")  # fmt: skip
@click.option("--requests", "requests_", type=int, default=None,
              help="Requests per level (default 50 unless --duration).")  # fmt: skip
@click.option("--duration", default=None, help="Seconds per level instead of a count: 60s.")
@click.option("--rate", default="inf", show_default=True,
              help="Open-loop Poisson arrivals per second, or inf.")  # fmt: skip
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--warmup", default=2, show_default=True, help="Uncounted requests first.")
@click.option("--prompts", "prompts_file", default=None, help="A JSONL file of prompts.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--body",
    "extra_body",
    default=None,
    metavar="JSON",
    help='Merged into every request: \'{"temperature": 0, "ignore_eos": true}\'.',
)
@click.option("--direct", is_flag=True, help="Reach services over the network, not SSH.")
@click.option("--json", "json_out", default=None, help="Write the gpufleet-bench/1 document.")
@click.option("--csv", "csv_out", default=None)
@click.option("--png", "png_out", default=None, help="Plot latency and GPU utilisation.")
@click.option("--save-requests", is_flag=True, help="Every request's record in the JSON.")
@click.option("--compare", "compare_with", default=None, help="An older JSON to compare with.")
def bench_cmd(inventory, limit, exclude, deploy, service, concurrency, requests_, duration, rate,
              max_tokens, warmup, prompts_file, seed, extra_body, direct, json_out, csv_out,
              png_out, save_requests, compare_with) -> None:  # fmt: skip
    """Load every service the fleet serves: latency percentiles, throughput, the GPU meanwhile.

    Exit status: 0 done, 1 a target could not be benched or answered nothing, 3 an SLO was
    missed, 64 usage error.
    """
    import math

    from gpufleet.bench import prompts as prompt_mod
    from gpufleet.bench import report as bench_report
    from gpufleet.bench.client import LoadSettings
    from gpufleet.bench.run import bench_target, targets_from
    from gpufleet.fleet import runner
    from gpufleet.fleet.rollout import parse_duration

    try:
        levels = [int(x) for x in concurrency.split(",") if x.strip()]
        if not levels or min(levels) < 1:
            raise ValueError
    except ValueError:
        raise click.BadParameter("comma-separated counts like 1,4,16",
                                 param_hint="--concurrency") from None  # fmt: skip
    try:
        body = json.loads(extra_body) if extra_body else {}
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--body") from None
    if not isinstance(body, dict):
        raise click.BadParameter("a JSON object, like '{\"temperature\": 0}'",
                                 param_hint="--body")  # fmt: skip
    try:
        speed = math.inf if rate == "inf" else float(rate)
        settings = LoadSettings(
            rate=speed, requests=None if duration else (requests_ or 50),
            duration_s=parse_duration(duration) if duration else None, warmup=warmup,
            max_tokens=max_tokens, seed=seed, extra_body=body,
        )  # fmt: skip
        prompts = (prompt_mod.load_jsonl(prompts_file) if prompts_file
                   else prompt_mod.builtin_prompts())  # fmt: skip
    except (ValueError, prompt_mod.PromptFileError) as exc:
        raise click.UsageError(str(exc)) from None
    run = runner.run(inventory, deploy, dry=True, limit=limit, exclude=exclude)
    if run.fatal:
        click.echo(f"gpufleet bench: {run.fatal}", err=True)
        _exit(1)
    targets = targets_from(run, service=service)
    if not targets:
        click.echo("gpufleet bench: no service to bench in this selection", err=True)
        _exit(1)
    runs = []
    for t in targets:
        click.echo(f"bench: {t.target.host} {t.target.service} ({t.target.kind} :{t.target.port},"
                   f" {t.target.model}) at concurrency {concurrency}", err=True)  # fmt: skip

        def progress(p, _t=t) -> None:
            if p.warmup or not p.total:
                return
            if p.done % max(1, p.total // 4) == 0 or p.done == p.total:
                click.echo(f"  {_t.target.host} c={p.concurrency}: {p.done}/{p.total} done, "
                           f"{p.failed} failed, {p.elapsed_s:.1f}s", err=True)  # fmt: skip

        runs.append(bench_target(t, settings=settings, levels=levels, prompts=prompts,
                                 direct=direct, on_progress=progress))  # fmt: skip
    doc = bench_report.build_document(
        settings=settings, levels=levels, prompts=prompts_file or "builtin",
        auth=any(t.key_source for t in targets), runs=runs, save_requests=save_requests,
    )  # fmt: skip
    click.echo(bench_report.text_report(doc))
    if json_out:
        bench_report.write_json(doc, json_out)
    if csv_out:
        Path(csv_out).write_text(bench_report.csv_report(doc))
    if png_out:
        bench_report.write_png(doc, png_out)
    if compare_with:
        click.echo(bench_report.compare(bench_report.load_json(compare_with), doc))
    if doc["slo_missed"]:
        _exit(3)
    # a service that answered nothing at some level is a failed target, though it was measured
    dead = [f"{r['target']['host']} {r['target']['service']}" for r in doc["runs"]
            if any(not lv["figures"]["completed"] for lv in r["levels"])]  # fmt: skip
    if dead:
        click.echo(f"gpufleet bench: no request succeeded on {', '.join(dead)}", err=True)
    _exit(1 if dead or any(r.error for r in runs) else 0)


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
