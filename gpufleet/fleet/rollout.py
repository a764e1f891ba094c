"""Fleet rollouts: a canary per hardware class, health-gated batches, rollback, a lease, audit.

    gpufleet rollout inventory/hosts.py --batch 25%

1. **Plan** every host (a ``--dry`` run): hosts the gate refuses, or that cannot be reached,
   are listed and left alone; hosts already in sync are skipped. When no host has anything
   to change, the rollout ends here with its verdict: no lease, no second plan.
2. **Lease** every host to be changed, all or none (``/var/lib/gpufleet/lease.json``: holder,
   control machine, pid, expiry), waiting up to ``--lock-wait`` for another rollout's.
3. **Canary**: the first host of each group that has changes, since failures are arch-specific
   (an sm_121 build, unified memory on GB10, the Jetson runtime). Then **batches** of the rest
   (``--batch 2`` or ``--batch 25%``), in inventory order.
4. Each batch is converged (its own health gates run), then **gated** again from outside: a
   fresh plan of the batch must be in sync, which means every service answers its health
   endpoint and a one-token chat completion.
5. A host that fails is **rolled back** to the release it ran before the rollout (compose file,
   ``.env``, build context, image kept by id, model files), and gated again. More failures
   than ``--max-failures`` in a batch stop the rollout; hosts of later batches are untouched.
6. Every host touched and the control machine get one **audit** line; the lease is released.

The driver and the toolkit are never rolled back: a release records them, a rollback leaves
them as they are. Decisions here (batches, the verdict of a gate) are pure and unit-tested;
the pyinfra runs go through ``gpufleet.fleet.runner``.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.core.duration import parse_duration as core_duration
from gpufleet.core.wire import ALL_LEASES, RunOptions
from gpufleet.fleet import runner
from gpufleet.fleet.documents import RolloutDocument, RolloutHost
from gpufleet.fleet.lease import held_for, lease_is_stale, new_lease, pid_alive
from gpufleet.fleet.runner import Run, UsageError

LEASE_DEPLOY = "deploys/lease.py"


# --- batches ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A host of the rollout as its plan says: its group, and whether it has changes."""

    host: str
    group: str
    changes: int
    current: str | None = None  # the release it runs now: what a rollback restores
    declared: str | None = None


def parse_batch(text: str) -> tuple[int | None, float | None]:
    """``"2"`` -> (2, None); ``"25%"`` -> (None, 0.25). UsageError for anything else."""
    if match := re.fullmatch(r"(\d+)", text.strip()):
        count = int(match[1])
        if count >= 1:
            return count, None
    if match := re.fullmatch(r"(\d+(?:\.\d+)?)%", text.strip()):
        share = float(match[1]) / 100
        if 0 < share <= 1:
            return None, share
    raise UsageError(f"--batch {text!r}: give a host count like 2, or a share like 25%")


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"5m"``, ``"1h"`` -> seconds. UsageError for anything else."""
    return core_duration(text, error=UsageError)


def batches(targets: list[Target], *, batch: str = "1", canary: bool = True) -> list[list[str]]:
    """The order hosts are changed in: canaries first (one per group), then batches.

    + targets: the hosts of the rollout in inventory order; those without changes are left out
    + batch: hosts per batch after the canaries, a count (``2``) or a share of the hosts to
      change (``25%``, rounded up, at least one)
    + canary: one host of each group goes first, alone in its batch

    .. code:: python

        batches([Target("spark-01", "spark", 3), Target("ws-a", "rtx5090", 2), ...], batch="2")
        # [["spark-01", "ws-a"], ["ws-b", "ws-c"], ["ws-d"]]
    """
    count, share = parse_batch(batch)
    todo = [t for t in targets if t.changes]
    order: list[list[str]] = []
    if canary:
        seen: set[str] = set()
        first = []
        for t in todo:
            if t.group not in seen:
                seen.add(t.group)
                first.append(t.host)
        if first:
            order.append(first)
        todo = [t for t in todo if t.host not in first]
    size = count or max(1, math.ceil((share or 1) * len([t for t in targets if t.changes])))
    for i in range(0, len(todo), size):
        order.append([t.host for t in todo[i : i + size]])
    return order


# --- gates ------------------------------------------------------------------------------


@dataclass
class Verdict:
    host: str
    ok: bool
    why: str = ""
    log: list[str] = field(default_factory=list)  # the service's last log lines, masked


def verdict(name: str, converge: Run | None, check: Run) -> Verdict:
    """One host's verdict after its batch, from the two runs' reports.

    + converge: the batch's converge run (a host that failed a step there fails); None when
      only checking (after a rollback)
    + check: a fresh ``--dry`` plan of the batch with chat probes: a host passes when it
      plans no change, which means every service answered its health endpoint and a chat
    """
    ran = converge.report.hosts.get(name) if converge else None
    now = check.report.hosts.get(name)
    if ran is not None and ran.unreachable:
        return Verdict(name, False, f"unreachable: {ran.unreachable}")
    if ran is not None and ran.failed:
        return Verdict(
            name,
            False,
            f"failed at '{ran.failed.step}': {ran.failed.why}",
            list(ran.failed.log[-10:]),
        )
    if converge is not None and converge.fatal and ran is None:
        return Verdict(name, False, converge.fatal.splitlines()[0])
    if now is None:
        return Verdict(name, False, "not checked: the check run did not reach it")
    if now.unreachable:
        return Verdict(name, False, f"unreachable: {now.unreachable}")
    if now.failed or not now.planned:
        why = now.failed.why if now.failed else "could not be checked"
        return Verdict(name, False, f"could not be checked: {why}")
    if now.refusal:
        return Verdict(name, False, now.refusal)
    if now.changes:
        first = now.changes[0]
        return Verdict(name, False, f"{first.step} {first.resource}: {first.reason}")
    return Verdict(name, True)


def gate_verdicts(hosts: list[str], converge: Run | None, check: Run) -> list[Verdict]:
    """Each host's verdict after its batch (``verdict``), in the batch's order."""
    return [verdict(name, converge, check) for name in hosts]


# --- the audit trail --------------------------------------------------------------------


def control_audit_path() -> Path:
    root = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(root) / "gpufleet" / "audit.jsonl"


def audit_line(**fields) -> str:
    return json.dumps({"at": round(time.time(), 3), **fields}, sort_keys=True)


def append_control_audit(line: str) -> None:
    path = control_audit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(line + "\n")


# --- the run ----------------------------------------------------------------------------


@dataclass
class Rollout:
    """One rollout's settings and what happened to each host."""

    inventory: str
    deploy: str = "deploys/fleet.py"
    limit: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    batch: str = "1"
    canary: bool = True
    max_failures: int = 0
    lock_wait: float = 0.0
    ttl: float = 3600.0
    action: str = "rollout"
    restore: str | None = None  # rollback: "previous" or a release id
    skip_unreachable: bool = False  # go on without hosts that cannot be reached (named)
    log: Callable[[str], None] = print
    extra: tuple[str, ...] = ()  # pyinfra options passed through to every run
    # each line a converge prints for one of its hosts, as it comes (None: kept quiet)
    progress: Callable[[str], None] | None = None
    outcome: dict[str, str] = field(default_factory=dict)  # host -> where it stands, in words
    states: dict[str, str] = field(default_factory=dict)  # host -> ``documents.Outcome``
    order: list[list[str]] = field(default_factory=list)
    stopped: str | None = None

    def mark(self, host: str, state: str, detail: str, *, keep: bool = False) -> None:
        """Where ``host`` stands now (``keep``: only when nothing was said yet)."""
        if keep and host in self.states:
            return
        self.states[host] = state
        self.outcome[host] = detail

    failures: list[Verdict] = field(default_factory=list)


def _targets(run: Run) -> list[Target]:
    """Every planned host of a run, in inventory order, with its change count and releases."""
    return [
        Target(
            host=r.host,
            group=r.group or "?",
            changes=0 if r.refusal else len(r.changes),
            current=r.current,
            declared=r.release_id,
        )
        for r in run.hosts.values()
    ]


class Runner:
    """The pyinfra runs a rollout makes, with its lease in every one (tests swap this out)."""

    def __init__(self, rollout: Rollout) -> None:
        self.r = rollout
        self.lease: dict | None = None

    def _options(self, **asked) -> RunOptions:
        lease_id = self.lease["id"] if self.lease else None
        # asked wins: ALL_LEASES reads past any lease (dry runs only)
        return RunOptions(**({"lease_id": lease_id} | asked))

    def plan(self, hosts: tuple[str, ...] = (), **asked) -> Run:
        limit = hosts or self.r.limit
        exclude = () if hosts else self.r.exclude
        options = self._options(**asked)
        r = self.r
        return runner.run(
            r.inventory,
            r.deploy,
            dry=True,
            limit=limit,
            exclude=exclude,
            options=options,
            extra=r.extra,
        )

    def converge(self, hosts: tuple[str, ...], **asked) -> Run:
        """The batch's converge; each host's progress lines shown as they come."""
        options = self._options(**asked)
        on_line = host_lines(set(hosts), self.r.progress) if self.r.progress else None
        r = self.r
        return runner.run(
            r.inventory,
            r.deploy,
            dry=False,
            limit=hosts,
            options=options,
            extra=r.extra,
            interruptible=True,
            on_line=on_line,
        )

    def lease_action(
        self, hosts: tuple[str, ...], action: str, audit: dict[str, str] | None = None
    ) -> Run:
        options = RunOptions(
            lease_action=action, lease=self.lease, now=time.time(), audit_lines=audit or {}
        )
        r = self.r
        return runner.run(
            r.inventory, LEASE_DEPLOY, dry=False, limit=hosts, options=options, extra=r.extra
        )


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PREFIXED = re.compile(r"\s*\[([^\]]+)\]\s?(.*)")


def progress_line(line: str, hosts: set[str]) -> str | None:
    """A line pyinfra printed for one of ``hosts`` (``[host] text``) as ``host | text``;
    None for any other line (banners, pyinfra's own summary). For people only."""
    match = _PREFIXED.fullmatch(_ANSI.sub("", line).rstrip())
    if not match or match[1] not in hosts or not match[2].strip():
        return None
    return f"  {match[1]} | {match[2].strip()}"


def host_lines(hosts: set[str], show: Callable[[str], None]) -> Callable[[str], None]:
    """An ``on_line`` for ``runner.run`` that shows each of ``hosts``' lines as it comes."""

    def on_line(line: str) -> None:
        if (shown := progress_line(line, hosts)) is not None:
            show(shown)

    return on_line


def document(r: Rollout, *, dry: bool) -> RolloutDocument:
    """The ``gpufleet.rollout/1`` (or ``rollback/1``) document of a finished run."""
    hosts = [
        RolloutHost(host=h, outcome=r.states[h], detail=r.outcome[h]) for h in sorted(r.states)
    ]
    return RolloutDocument(
        schema=f"gpufleet.{r.action}/1", dry=dry, batches=r.order, stopped=r.stopped, hosts=hosts
    )


def _held_by(run: Run) -> dict[str, dict]:
    """Host -> the lease document another run holds there, from a failed take."""
    return {
        r.host: r.lease_held.model_dump()
        for r in run.report.hosts.values()
        if r.lease_held is not None
    }


def not_done(run: Run, hosts: tuple[str, ...]) -> dict[str, str]:
    """Host -> why a lease action did not happen there (empty: done on every host)."""
    why = {}
    for host in hosts:
        r = run.report.hosts.get(host)
        if r is None:
            why[host] = run.fatal or "the lease run did not reach it"
        elif r.unreachable:
            why[host] = f"unreachable: {r.unreachable}"
        elif r.lease_error:
            why[host] = r.lease_error
        elif r.lease_held is not None:
            why[host] = f"leased by {r.lease_held.holder}"
        elif r.failed:
            why[host] = r.failed.why
    return why


def take_lease(rn: Runner, hosts: tuple[str, ...], *, wait: float, log) -> str | None:
    """Take the lease on every host, all or none; None on success, else why not."""
    deadline = time.monotonic() + wait
    while True:
        run = rn.lease_action(hosts, "take")
        failed = not_done(run, hosts)
        if not failed:
            return None
        taken = tuple(h for h in hosts if h not in failed)
        if taken:  # all or none: give back what this attempt took
            rn.lease_action(taken, "release")
        held = _held_by(run)
        errors = {h: r.lease_error for h, r in run.report.hosts.items() if r.lease_error}
        if errors:  # a lease file that is not a lease: a person must look
            h, why = sorted(errors.items())[0]
            return f"{h}: {why}"
        stale = {
            h: why
            for h, lease in held.items()
            if (why := lease_is_stale(lease, now=time.time(), alive=pid_alive))
        }
        if stale and set(stale) == set(held) == set(failed):
            for h, why in stale.items():
                log(f"{h}: breaking the lease of {held[h].get('holder')}: {why}")
            saved, rn.lease = rn.lease, None
            try:
                for h, why in stale.items():
                    # only that lease: a run that took it meanwhile keeps it
                    rn.lease = {"id": held[h]["id"]}
                    line = audit_line(action="lease-break", host=h, lease=held[h], why=why)
                    rn.lease_action((h,), "break", {h: line})
            finally:
                rn.lease = saved
            continue
        if time.monotonic() >= deadline:
            if held:
                h, lease = next(iter(sorted(held.items())))
                until = time.strftime("%H:%M:%S", time.localtime(lease.get("expires", 0)))
                if lease.get("message"):
                    return (
                        f"{h} is held by {lease.get('holder')} for {held_for(lease)} "
                        f"(until {until}); `gpufleet lock release` ends it"
                    )
                return (
                    f"{h} is leased by {lease.get('holder')} on {lease.get('control')} "
                    f"(release {lease.get('release')}, until {until}); wait with "
                    "--lock-wait, or `gpufleet lock break` if that run is gone"
                )
            why = "; ".join(f"{h}: {w}" for h, w in sorted(failed.items()))
            return f"could not take the lease: {why}"
        holders = sorted({str(lease.get("holder")) for lease in held.values()})
        log(f"waiting for the lease held by {', '.join(holders) or 'another run'} ...")
        time.sleep(min(5.0, max(0.5, deadline - time.monotonic())))


def _outcomes(r: Rollout, planned: Run, targets: list[Target]) -> None:
    """Where each host the rollout will not change stands, before the first batch."""
    for report in planned.report.ordered():
        name = report.host
        if report.unreachable:
            r.mark(name, "unreachable", f"unreachable, left alone: {report.unreachable}")
        elif report.failed and not report.planned:
            why = report.failed.why
            r.mark(name, "unreachable", f"could not be checked, left alone: {why}")
        elif report.refusal:
            r.mark(name, "refused", f"refused, left alone: {report.refusal}")
    for t in targets:
        if not t.changes:
            r.mark(t.host, "in-sync", f"in sync on release {t.current}, skipped", keep=True)


def _left_alone(r: Rollout) -> list[str]:
    """Hosts the rollout could not reach or check: never passed over in silence."""
    return sorted(h for h, state in r.states.items() if state == "unreachable")


LEASE, LOOK_AGAIN, BATCHES, VERDICT, REFUSE = "lease", "look again", "batches", "verdict", "refuse"


def after_first_look(
    targets: list[Target], *, unreachable: list[str], skip_unreachable: bool, dry: bool
) -> tuple[str, ...]:
    """What a rollout does once its first look has planned every host: the steps, in order.

    + targets: every planned host with its change count (``_targets``)
    + unreachable: the hosts the first look could not reach or check
    + skip_unreachable: go on without those (they are named in the verdict, exit 1)
    + dry: only say what would change

    Nothing to change on any host: no lease is taken and nothing is planned again, the
    verdict comes straight from the first look (a rollout over an in-sync fleet costs one
    pyinfra run, not four). Else the lease, a second plan under it, then the batches.

    .. code:: python

        after_first_look([Target("a", "spark", 2)], unreachable=[], ...)  # lease, ..., verdict
        after_first_look([Target("a", "spark", 0)], unreachable=[], ...)  # ("verdict",)
    """
    if unreachable and not skip_unreachable and not dry:
        return (REFUSE,)
    if dry or not any(t.changes for t in targets):
        return (VERDICT,)
    return (LEASE, LOOK_AGAIN, BATCHES, VERDICT)


def execute(r: Rollout, *, dry: bool = False, rn: Runner | None = None) -> int:
    """Run the rollout (or the rollback); the exit status: 0 all done (or nothing to do),
    1 a host failed or was left alone, 2 a dry run with changes pending."""
    rn = rn or Runner(r)
    restore = {"*": r.restore} if r.restore else None
    planned = _first_look(r, rn, restore)
    if planned is None:
        return 1
    reachable = tuple(planned.hosts)
    steps = after_first_look(
        _targets(planned), unreachable=_left_alone(r), skip_unreachable=r.skip_unreachable, dry=dry
    )
    if steps == (REFUSE,):
        _refuse_unreachable(r)
        return 1
    if LEASE in steps:
        planned = _lease_and_look_again(r, rn, reachable, restore)
        if planned is None:
            return 1
    if r.restore:  # each host's target by id from here on: "previous" moves as hosts roll back
        restore = {h: e.release_id for h, e in planned.hosts.items() if e.release_id}
    targets = _targets(planned)
    r.order = batches(targets, batch=r.batch, canary=r.canary and not r.restore)
    _announce(r, planned, dry=dry)
    left_alone = bool(_left_alone(r))
    if dry or not r.order:
        return _only_planned(r, rn, planned, reachable, left_alone=left_alone)
    stopped = _Batches(r, rn, reachable, {t.host: t for t in targets}, restore).run()
    r.stopped = stopped
    _summary(r, stopped)
    return 1 if r.failures or stopped or left_alone else 0


def _first_look(r: Rollout, rn: Runner, restore: dict | None) -> Run | None:
    """A first look, whoever holds a lease: which hosts there are, which are refused, which
    have changes. None: the run itself failed (why is logged), nothing changed."""
    planned = rn.plan(lease_id=ALL_LEASES, restore=restore)
    if planned.fatal:
        r.stopped = planned.fatal
        r.log(f"gpufleet {r.action}: {planned.fatal}")
        return None
    _outcomes(r, planned, _targets(planned))
    return planned


def _refuse_unreachable(r: Rollout) -> None:
    """Some hosts could not be reached or checked: each named, nothing changed, audited."""
    missing = _left_alone(r)
    for host in missing:
        r.log(f"{host}: {r.outcome[host]}")
    r.stopped = f"{len(missing)} host(s) could not be reached or checked"
    r.log(
        f"gpufleet {r.action}: {r.stopped}; nothing was changed "
        "(--skip-unreachable goes on without them)"
    )
    line = audit_line(action=r.action, result="refused", why="unreachable", hosts=missing)
    append_control_audit(line)


def _lease_and_look_again(
    r: Rollout, rn: Runner, reachable: tuple[str, ...], restore: dict | None
) -> Run | None:
    """The lease first, on every host the rollout could touch (all or none), then the plan
    again under it: a host another rollout holds is waited for, not planned around. None:
    the lease was not taken (why is logged), nothing changed."""
    rn.lease = new_lease(ttl=r.ttl, release=r.restore or "rollout")
    if why := take_lease(rn, reachable, wait=r.lock_wait, log=r.log):
        r.stopped = why
        r.log(f"gpufleet {r.action}: {why}; nothing was changed")
        append_control_audit(audit_line(action=r.action, result="refused", why=why))
        return None
    planned = rn.plan(restore=restore)
    r.outcome.clear()
    r.states.clear()
    _outcomes(r, planned, _targets(planned))
    return planned


def _announce(r: Rollout, planned: Run, *, dry: bool) -> None:
    """The batches in order; a dry run lists each host's changes under its batch."""
    order = r.order
    r.log(f"{r.action}: {sum(len(b) for b in order)} host(s) to change in {len(order)} batch(es)")
    for i, group in enumerate(order):
        kind = "canary" if i == 0 and r.canary and not r.restore else f"batch {i + 1}"
        r.log(f"  {kind}: {', '.join(group)}")
        if dry:
            for host in group:
                for c in planned.hosts[host].changes:
                    r.log(f"      {host}: {c.step} {c.resource}: {c.reason}")


def _only_planned(
    r: Rollout, rn: Runner, planned: Run, reachable: tuple[str, ...], *, left_alone: bool
) -> int:
    """A dry run, or nothing to change: the lease given back, each host's pending changes.
    The exit status: 1 a host left alone, 2 changes pending, 0 all in sync."""
    if rn.lease:
        rn.lease_action(reachable, "release")
    for host in (h for group in r.order for h in group):
        r.mark(host, "planned", f"{len(planned.hosts[host].changes)} change(s) pending")
    _summary(r, None)
    return 1 if left_alone else (2 if r.order else 0)


STOPPED_BEFORE = "the rollout stopped before its batch"


@dataclass
class _Batches:
    """The batches of a rollout that holds its leases, run in order until one stops it.

    + everyone: every host leased, renewed before each batch and while it converges
    + by_host: each host's target (its current and declared release)
    + audit: host -> the audit line its lease release writes on the host
    """

    r: Rollout
    rn: Runner
    everyone: tuple[str, ...]
    by_host: dict[str, Target]
    restore: dict[str, str] | None
    audit: dict[str, str] = field(default_factory=dict)

    def renew(self) -> dict[str, str]:
        """Our leases renewed, their expiry moved on; host -> why not, where not."""
        return not_done(self.rn.lease_action(self.everyone, "take"), self.everyone)

    def run(self) -> str | None:
        """Every batch, then the leases released; why the rollout stopped, or None."""
        stopped = None
        try:
            for i, group in enumerate(self.r.order):
                stopped = self.batch(i, tuple(group))
                if stopped:
                    break
        except KeyboardInterrupt:
            stopped = "interrupted"
            for host in self.everyone:
                why = "untouched (interrupted before its batch)"
                self.r.mark(host, "untouched", why, keep=True)
        finally:
            self.release(stopped)
        return stopped

    def batch(self, i: int, hosts: tuple[str, ...]) -> str | None:
        """Converge batch ``i`` under renewed leases, gate it, roll back the hosts that fail
        their gate; why the rollout stops after it, or None."""
        r, rn, later = self.r, self.rn, self.r.order[i + 1 :]
        if lost := self.renew():
            h, why = sorted(lost.items())[0]
            _untouched(r, r.order[i:], STOPPED_BEFORE)
            return f"the lease could not be renewed on {h} ({why})"
        started = time.monotonic()
        r.log(f"{r.action}: converging {', '.join(hosts)}")
        with Heartbeat(self.renew, every=heartbeat_seconds(r.ttl)) as beat:
            converge = rn.converge(hosts, restore=self.restore)
        if beat.lost:
            h, why = sorted(beat.lost.items())[0]
            stopped = f"the lease could not be renewed on {h} during batch {i + 1} ({why})"
            for host in hosts:
                r.mark(host, "failed", f"converged, not gated: {stopped}")
            _untouched(r, later, STOPPED_BEFORE)
            return stopped
        check = rn.plan(hosts, chat=True, restore=self.restore)
        seconds = round(time.monotonic() - started, 1)
        verdicts = gate_verdicts(list(hosts), converge, check)
        self.passed([v.host for v in verdicts if v.ok], batch=i + 1, seconds=seconds)
        stopped = self.failed([v for v in verdicts if not v.ok], batch=i + 1)
        if converge.interrupted and not stopped:
            stopped = "interrupted"
        if stopped:
            _untouched(r, later, STOPPED_BEFORE)
        return stopped

    def passed(self, hosts: list[str], *, batch: int, seconds: float) -> None:
        """Hosts that passed their gate: changed, serving, and their audit line."""
        for host in hosts:
            t = self.by_host[host]
            line = {
                "action": self.r.action,
                "host": host,
                "from": t.current,
                "to": t.declared,
                "batch": batch,
                "seconds": seconds,
                "lease": self.rn.lease["id"],
            }
            detail = f"on release {t.declared} (was {t.current}), serving"
            self.r.mark(host, "changed", detail)
            self.audit[host] = audit_line(**line, result="ok")

    def failed(self, failed: list[Verdict], *, batch: int) -> str | None:
        """Hosts that failed their gate, rolled back; why the rollout stops, or None."""
        r = self.r
        if not failed:
            return None
        r.failures += failed
        _roll_back(r, self.rn, failed, self.by_host, self.audit, batch=batch)
        if len(failed) > r.max_failures:
            return f"{len(failed)} failed in batch {batch} (--max-failures {r.max_failures})"
        return None

    def release(self, stopped: str | None) -> None:
        """Give back every lease (writing each host's audit lines), then audit the run here."""
        r, rn = self.r, self.rn
        released = rn.lease_action(self.everyone, "release", self.audit)
        for h, why in sorted(not_done(released, self.everyone).items()):
            r.log(
                f"{h}: its lease could not be released ({why}); once it answers: "
                f"gpufleet lock break {r.inventory} --limit {h}"
            )
        result = stopped or ("failed" if r.failures else "ok")
        line = audit_line(action=r.action, result=result, hosts=r.outcome, lease=rn.lease["id"])
        append_control_audit(line)


def heartbeat_seconds(ttl: float) -> float:
    """How often a running batch renews its leases: three times per lease, at most a minute
    apart, so a lease renewed on time never expires under a long build or download."""
    return max(5.0, min(60.0, ttl / 3))


class Heartbeat:
    """Renews the rollout's leases while a batch converges, in a thread of its own.

    ``renew`` returns host -> why for each host where the renewal failed; the first failure
    is kept in ``lost`` and the heartbeat stops: the rollout then stops after the batch,
    leaving its hosts as their converge left them (each service gated, serving).
    """

    def __init__(self, renew: Callable[[], dict[str, str]], *, every: float) -> None:
        self.renew, self.every = renew, every
        self.lost: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            lost = self.renew()
            if lost:
                self.lost = lost
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _untouched(r: Rollout, later: list[list[str]], why: str) -> None:
    for group in later:
        for host in group:
            r.mark(host, "untouched", f"untouched ({why})")


def _roll_back(r, rn, failed: list[Verdict], by_host, audit: dict[str, str], *, batch: int):
    """Each failed host back to the release it ran before the rollout, gated again."""
    log = r.log
    back = {v.host: by_host[v.host].current for v in failed if by_host[v.host].current}
    for v in failed:
        log(f"{v.host}: FAILED: {v.why}")
        for line in v.log:
            log(f"    | {line}")
    if back and not r.restore:
        log(f"rolling back {', '.join(back)} to their previous releases")
        rn.converge(tuple(back), restore=back)
        again = rn.plan(tuple(back), chat=True, restore=back)
        for v in gate_verdicts(list(back), None, again):
            if v.ok:
                r.mark(v.host, "rolled-back", f"rolled back to {back[v.host]}, serving")
            else:
                r.mark(v.host, "failed", f"rolled back to {back[v.host]}, NOT serving: {v.why}")
    for v in failed:
        if v.host not in back:
            r.mark(v.host, "failed", f"failed, no previous release to go back to: {v.why}")
        r.mark(v.host, "failed", f"failed: {v.why}", keep=True)
        audit[v.host] = audit_line(
            action=r.action,
            host=v.host,
            batch=batch,
            result="failed",
            why=v.why,
            to=by_host[v.host].declared,
            rolled_back_to=back.get(v.host),
            lease=rn.lease["id"],
        )


def _summary(r: Rollout, stopped: str | None) -> None:
    r.log(f"{r.action} {'stopped: ' + stopped if stopped else 'done'}; where each host stands:")
    for host in sorted(r.outcome):
        r.log(f"  {host}: {r.outcome[host]}")
