"""Rollout decisions without hosts: batch order, the lease's staleness, a gate's verdict."""

from __future__ import annotations

import socket
import time

import pytest

from gpufleet.fleet.lease import lease_is_stale
from gpufleet.fleet.rollout import Target, after_first_look, batches, gate_verdicts, parse_batch
from gpufleet.fleet.runner import Run, UsageError

FLEET = [
    Target("spark-01", "spark", 3), Target("ws-a", "rtx5090", 2), Target("spark-02", "spark", 3),
    Target("ws-b", "rtx5090", 2), Target("orin-1", "jetson", 4), Target("ws-c", "rtx5090", 0),
    Target("ws-d", "rtx5090", 1), Target("ws-e", "rtx5090", 1),
]  # fmt: skip


def test_a_canary_per_group_then_batches_in_inventory_order():
    assert batches(FLEET, batch="2") == [
        ["spark-01", "ws-a", "orin-1"], ["spark-02", "ws-b"], ["ws-d", "ws-e"]]  # fmt: skip


def test_a_share_is_of_the_hosts_to_change_rounded_up():
    # 7 hosts change (ws-c is in sync): 25% is 1.75, so 2 per batch
    assert batches(FLEET, batch="25%")[1:] == [["spark-02", "ws-b"], ["ws-d", "ws-e"]]
    assert batches(FLEET, batch="100%", canary=False) == [
        ["spark-01", "ws-a", "spark-02", "ws-b", "orin-1", "ws-d", "ws-e"]]  # fmt: skip


def test_hosts_in_sync_are_in_no_batch():
    assert "ws-c" not in {h for b in batches(FLEET, batch="1") for h in b}
    assert batches([Target("a", "spark", 0)], batch="1") == []


@pytest.mark.parametrize("text", ["0", "-1", "0%", "150%", "two", "", "2.5"])
def test_a_bad_batch_is_a_usage_error(text):
    with pytest.raises(UsageError, match="--batch"):
        parse_batch(text)


def test_a_lease_binds_until_it_expires_or_its_local_holder_is_gone():
    here = socket.gethostname()
    live = {"expires": 2000.0, "control": "ctl-2", "pid": 1}
    assert lease_is_stale(live, now=1000.0, alive=lambda pid: False) is None  # another machine
    assert lease_is_stale(live, now=2001.0, alive=lambda pid: True) == "expired 1s ago"
    mine = {"expires": 2000.0, "control": here, "pid": 4242}
    assert lease_is_stale(mine, now=1000.0, alive=lambda pid: True) is None
    assert lease_is_stale(mine, now=1000.0, alive=lambda pid: False) == (
        "its holder (pid 4242 on this machine) is gone")  # fmt: skip


def _reports(**hosts) -> Run:
    """A run whose report has these hosts: name -> HostReport fields."""
    from gpufleet.core.wire import HostReport, RunReport

    reports = {name: HostReport(host=name, **fields) for name, fields in hosts.items()}
    return Run(rc=0, report=RunReport(hosts=reports, order=tuple(hosts)))


def _change(reason):
    from gpufleet.core.wire import ChangeRecord, Op

    return ChangeRecord(step="recreate", op=Op.RECREATE, resource="llama", reason=reason,
                        action="recreate")  # fmt: skip


def test_a_gate_passes_only_a_host_that_converged_and_is_in_sync_now():
    from gpufleet.core.wire import Failure
    from tests.fleet.test_wire import _planned

    ok = _planned("spark", "a")
    snap = {"snapshot": ok.snapshot, "group": "spark"}
    gate = Failure(step="Inference services | Health gate: llama",
                   why="llama is not healthy after 60s (last HTTP status 000)",
                   log=("llama-1 | error: invalid argument",))  # fmt: skip
    converge = _reports(a=snap, b=snap | {"failed": gate}, c=snap, e=snap,
                        d={"unreachable": "Could not connect (timed out)"})  # fmt: skip
    check = _reports(
        a=snap, b=snap | {"changes": (_change("container exited"),)},
        c=snap | {"changes": (_change("running but its health endpoint gave no answer"),)},
        e={"unreachable": "stopped answering: no answer from the host within 30s"},
    )  # fmt: skip
    verdicts = {v.host: v for v in gate_verdicts(["a", "b", "c", "d", "e"], converge, check)}
    assert {h: (v.ok, v.why) for h, v in verdicts.items()} == {
        "a": (True, ""),
        "b": (False, "failed at 'Inference services | Health gate: llama': llama is not healthy "
                     "after 60s (last HTTP status 000)"),
        "c": (False, "recreate llama: running but its health endpoint gave no answer"),
        "d": (False, "unreachable: Could not connect (timed out)"),
        "e": (False, "unreachable: stopped answering: no answer from the host within 30s"),
    }  # fmt: skip
    assert verdicts["b"].log == ["llama-1 | error: invalid argument"]
    # the check alone (after a rollback): a host the check could not read never passes
    assert not gate_verdicts(["x"], None, _reports(x={"failed": gate}))[0].ok
    assert not gate_verdicts(["y"], None, _reports())[0].ok


def test_a_dead_holders_lease_binds_while_the_run_it_started_still_works():
    import os
    import subprocess

    from gpufleet.fleet.lease import lease_processes

    lease = {"id": "feedc0ffee12", "expires": 2e10, "control": socket.gethostname(), "pid": 1}
    worker = subprocess.Popen(["sleep", "30"], env={**os.environ, "GPUFLEET_LEASE": lease["id"]})
    try:
        for _ in range(
            400
        ):  # until the child has exec'd with its own environment (a loaded machine)
            if worker.pid in lease_processes(lease["id"]):
                break
            time.sleep(0.05)
        assert worker.pid in lease_processes(lease["id"])
        assert lease_is_stale(lease, now=1000.0, alive=lambda pid: False) is None
    finally:
        worker.kill()
        worker.wait()
    assert lease_processes(lease["id"]) == []
    assert lease_is_stale(lease, now=1000.0, alive=lambda pid: False) == (
        "its holder (pid 1 on this machine) is gone")  # fmt: skip


def test_limit_names_may_be_comma_separated():
    from gpufleet.fleet.runner import _names

    assert _names(("sandbox-spark,sandbox-jetson", "rtx5090", "a,,")) == [
        "sandbox-spark", "sandbox-jetson", "rtx5090", "a"]  # fmt: skip


def test_a_heartbeat_renews_while_a_batch_runs_and_keeps_the_first_failure():
    from gpufleet.fleet.rollout import Heartbeat

    calls = []

    def renew():
        calls.append(time.monotonic())
        return {"ws-b": "leased by bob@ctl"} if len(calls) == 3 else {}

    with Heartbeat(renew, every=0.05) as beat:
        time.sleep(0.5)
    assert beat.lost == {"ws-b": "leased by bob@ctl"}
    assert len(calls) == 3  # it stopped at the first failure


def test_a_heartbeat_that_keeps_renewing_loses_nothing_and_stops_with_its_batch():
    from gpufleet.fleet.rollout import Heartbeat, heartbeat_seconds

    calls = []
    with Heartbeat(lambda: calls.append(1) or {}, every=0.05) as beat:
        time.sleep(0.3)
    count = len(calls)
    time.sleep(0.2)
    assert beat.lost == {} and count >= 3 and len(calls) == count  # no renewal after the batch
    # three renewals per lease, at most a minute apart
    assert heartbeat_seconds(3600) == 60 and heartbeat_seconds(90) == 30
    assert heartbeat_seconds(3) == 5


def test_a_rollout_whose_lease_is_lost_mid_batch_stops_after_it(monkeypatch):
    from gpufleet.core.snapshot import Lease
    from gpufleet.core.wire import HostReport, RunReport
    from gpufleet.fleet import rollout
    from tests.fleet.test_wire import _planned

    ok = _planned("spark", "a")
    changed = ok.model_copy(update={"changes": (_change("container exited"),)})
    bob = Lease(id="bbbbbbbbbbbb", holder="bob@ctl", control="ctl", started=0, expires=9e9)

    class Fleet:
        """Two hosts to change, one per batch; the lease is taken from us during batch 1."""

        def __init__(self):
            self.lease, self.converged, self.takes = None, [], 0

        def plan(self, hosts=(), **asked):
            names = hosts or ("a", "b")
            reports = {h: changed.model_copy(update={"host": h}) for h in names}
            return Run(0, RunReport(hosts=reports, order=tuple(names)))

        def converge(self, hosts, **asked):
            self.converged.append(hosts)
            time.sleep(0.3)  # the heartbeat renews meanwhile
            return Run(0, RunReport(hosts={h: ok.model_copy(update={"host": h}) for h in hosts}))

        def lease_action(self, hosts, action, audit=None):
            self.takes += action == "take"
            held = action == "take" and self.takes > 2  # the first two: before batch 1, then ok
            fields = {"lease_held": bob} if held else {}
            return Run(0, RunReport(hosts={h: HostReport(host=h, **fields) for h in hosts}))

    monkeypatch.setattr(rollout, "heartbeat_seconds", lambda ttl: 0.05)
    monkeypatch.setattr(rollout, "append_control_audit", lambda line: None)
    said = []
    r = rollout.Rollout(inventory="inv.py", batch="1", canary=False, log=said.append)
    fleet = Fleet()
    assert rollout.execute(r, rn=fleet) == 1
    assert fleet.converged == [("a",)]  # batch 2 never started
    text = "\n".join(said)
    assert "the lease could not be renewed on a during batch 1 (leased by bob@ctl)" in text
    assert "converged, not gated" in r.outcome["a"] and "untouched" in r.outcome["b"]


def _after(targets, *, unreachable=(), skip=False, dry=False):
    return after_first_look(targets, unreachable=list(unreachable), skip_unreachable=skip, dry=dry)


CHANGED = [Target("a", "spark", 0), Target("b", "spark", 2)]
IN_SYNC = [Target("a", "spark", 0), Target("b", "spark", 0)]


def test_after_a_first_look_with_changes_the_lease_a_second_plan_and_the_batches():
    assert _after(CHANGED) == ("lease", "look again", "batches", "verdict")
    # its twin: nothing to change anywhere, so no lease and no second plan
    assert _after(IN_SYNC) == ("verdict",)


def test_after_a_first_look_an_unreachable_host_refuses_unless_skipped_and_dry_only_tells():
    assert _after(CHANGED, unreachable=["c"]) == ("refuse",)
    assert _after(IN_SYNC, unreachable=["c"]) == ("refuse",)
    assert _after(CHANGED, unreachable=["c"], skip=True)[0] == "lease"
    assert _after(IN_SYNC, unreachable=["c"], skip=True) == ("verdict",)
    assert _after(CHANGED, dry=True) == ("verdict",)


class _Fleet:
    """Hosts whose plans are given (host -> its report); every run asked for is noted."""

    def __init__(self, reports):
        self.reports, self.calls, self.lease = reports, [], None

    def plan(self, hosts=(), **asked):
        from gpufleet.core.wire import RunReport

        self.calls.append(("plan", hosts))
        names = hosts or tuple(self.reports)
        return Run(0, RunReport(hosts={h: self.reports[h] for h in names}, order=names))

    def converge(self, hosts, **asked):
        from gpufleet.core.wire import RunReport

        self.calls.append(("converge", hosts))
        in_sync = {h: self.reports[h].model_copy(update={"changes": ()}) for h in hosts}
        self.reports |= in_sync
        return Run(0, RunReport(hosts=in_sync, order=hosts))

    def lease_action(self, hosts, action, audit=None):
        from gpufleet.core.wire import HostReport, RunReport

        self.calls.append((action, hosts))
        return Run(0, RunReport(hosts={h: HostReport(host=h) for h in hosts}, order=hosts))


def _fleet(**changes) -> _Fleet:
    """A fleet of planned hosts: name -> how many changes its plan has."""
    from tests.fleet.test_wire import _planned

    ok = _planned("spark", "a")
    plan = {h: {"host": h, "changes": (_change("exited"),) * n} for h, n in changes.items()}
    return _Fleet({h: ok.model_copy(update=fields) for h, fields in plan.items()})


def test_a_rollout_with_a_change_leases_plans_again_converges_and_releases(monkeypatch):
    from gpufleet.fleet import rollout

    monkeypatch.setattr(rollout, "append_control_audit", lambda line: None)
    fleet, said = _fleet(a=0, b=1), []
    r = rollout.Rollout(inventory="inv.py", canary=False, log=said.append)
    assert rollout.execute(r, rn=fleet) == 0
    runs = [c[0] for c in fleet.calls]
    assert runs == ["plan", "take", "plan", "take", "converge", "plan", "release"]
    assert r.states == {"a": "in-sync", "b": "changed"}


def test_a_rollout_with_nothing_to_change_ends_after_its_first_look(monkeypatch):
    from gpufleet.fleet import rollout

    monkeypatch.setattr(rollout, "append_control_audit", lambda line: None)
    fleet, said = _fleet(a=0, b=0), []
    r = rollout.Rollout(inventory="inv.py", canary=False, log=said.append)
    assert rollout.execute(r, rn=fleet) == 0
    assert fleet.calls == [("plan", ())]  # no lease taken, no second plan
    assert "rollout: 0 host(s) to change in 0 batch(es)" in said
    assert r.states == {"a": "in-sync", "b": "in-sync"}


def test_nothing_to_change_but_a_host_not_checked_is_named_and_fails_the_rollout(monkeypatch):
    from gpufleet.core.wire import HostReport
    from gpufleet.fleet import rollout

    monkeypatch.setattr(rollout, "append_control_audit", lambda line: None)
    fleet = _fleet(a=0)
    fleet.reports["c"] = HostReport(host="c", unreachable="Could not connect (timed out)")
    said = []
    r = rollout.Rollout(inventory="inv.py", log=said.append)
    assert rollout.execute(r, rn=fleet) == 1  # refused: nothing leased, nothing changed
    assert fleet.calls == [("plan", ())]
    assert "c: unreachable, left alone: Could not connect (timed out)" in said
    said.clear()
    fleet.calls.clear()
    r = rollout.Rollout(inventory="inv.py", skip_unreachable=True, log=said.append)
    assert rollout.execute(r, rn=fleet) == 1
    assert fleet.calls == [("plan", ())]
    assert "  c: unreachable, left alone: Could not connect (timed out)" in said
