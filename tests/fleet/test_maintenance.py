"""Maintenance windows (``gpufleet lock acquire/release``): decisions from reports, no hosts."""

from __future__ import annotations

import pytest

from gpufleet.core.snapshot import Lease
from gpufleet.core.wire import HostReport, RunReport
from gpufleet.fleet import maintenance, rollout
from gpufleet.fleet.lease import lease_is_stale, message_problem, new_lease
from gpufleet.fleet.runner import Run
from tests.fleet.test_wire import _planned


def _leased(host: str, lease: Lease | None) -> HostReport:
    report = _planned("spark", host)
    state = report.snapshot.state.model_copy(update={"lease": lease})
    return report.model_copy(
        update={"snapshot": report.snapshot.model_copy(update={"state": state})}
    )


def _look(*reports: HostReport) -> Run:
    hosts = {r.host: r for r in reports}
    return Run(0, RunReport(hosts=hosts, order=tuple(hosts)))


WINDOW = Lease(id="aaaaaaaaaaaa", holder="ann@ctl", control="ctl", started=0, expires=9e9,
               message="new PSUs in rack 3")  # fmt: skip
ROLLOUT = Lease(id="bbbbbbbbbbbb", holder="bob@ctl", control="ctl", pid=1, started=0, expires=9e9)


class Leases:
    """The lease runs a window makes; ``held`` hosts refuse a take (another run holds them)."""

    def __init__(self, held=()):
        self.lease, self.calls, self.held = None, [], set(held)

    def lease_action(self, hosts, action, audit=None):
        self.calls.append((action, tuple(hosts), dict(self.lease or {}).get("id")))
        refused = self.held if action == "take" else set()
        return Run(0, RunReport(hosts={
            h: HostReport(host=h, lease_held=ROLLOUT if h in refused else None) for h in hosts
        }))  # fmt: skip


@pytest.fixture(autouse=True)
def _no_audit(monkeypatch):
    monkeypatch.setattr(maintenance, "append_control_audit", lambda line: None)


def _window(**kw) -> rollout.Rollout:
    return rollout.Rollout(inventory="inv.py", ttl=3600, log=lambda line: None, **kw)


def test_a_window_holds_every_host_with_its_message_and_no_process():
    rn = Leases()
    lease, rows, why = maintenance.acquire(
        _window(), _look(_leased("a", None), _leased("b", None)), "new PSUs", rn=rn
    )
    assert why is None and [(h.host, h.state) for h in rows] == [("a", "held"), ("b", "held")]
    assert rn.calls == [("take", ("a", "b"), lease["id"])]
    assert lease["message"] == "new PSUs" and lease["pid"] is None
    # no process behind it: its holder's pid being gone never makes it stale; expiry does
    assert lease_is_stale(lease, now=lease["started"] + 60, alive=lambda pid: False) is None
    assert lease_is_stale(lease, now=lease["expires"] + 1, alive=lambda pid: True)


def test_a_window_is_all_or_none_a_leased_host_gives_back_what_was_taken():
    rn = Leases(held={"b"})
    _, rows, why = maintenance.acquire(
        _window(), _look(_leased("a", None), _leased("b", ROLLOUT)), "psu", rn=rn
    )
    assert "b is leased by bob@ctl" in why
    assert {h.state for h in rows} == {"refused"}
    assert [c[:2] for c in rn.calls] == [("take", ("a", "b")), ("release", ("a",))]


def test_a_host_that_cannot_be_read_holds_the_window_back_and_is_named():
    rn = Leases()
    look = _look(_leased("a", None), HostReport(host="gone", unreachable="timeout"))
    _, rows, why = maintenance.acquire(_window(), look, "psu", rn=rn)
    assert rn.calls == [] and "1 host(s) could not be read" in why
    assert ("gone", "unreachable", "timeout") in {(h.host, h.state, h.reason) for h in rows}


def test_release_ends_windows_by_their_id_and_leaves_a_rollouts_lease_alone():
    rn = Leases()
    look = _look(_leased("a", WINDOW), _leased("b", ROLLOUT), _leased("c", None))
    rows = maintenance.release(_window(), look, by="ann@ctl", rn=rn)
    assert rn.calls == [("release", ("a",), WINDOW.id)]
    states = {h.host: h.state for h in rows}
    assert states == {"a": "released", "b": "refused", "c": "free"}
    assert "not a maintenance window" in next(h.reason for h in rows if h.host == "b")
    # the no-change twin: nothing held, nothing run
    rn = Leases()
    rows = maintenance.release(_window(), _look(_leased("c", None)), by="x", rn=rn)
    assert {h.state for h in rows} == {"free"} and rn.calls == []


@pytest.mark.parametrize(
    "message, problem",
    [("", "empty"), ("  ", "empty"), ("a\nb", "control character"), ("x" * 201, "200")],
)
def test_a_reason_must_be_one_short_line(message, problem):
    assert problem in message_problem(message)


def test_a_plain_reason_is_taken_and_a_rollouts_lease_has_no_message():
    assert message_problem("kernel 6.8 upgrade, back by 14:00 (ann)") is None
    lease = new_lease(ttl=60, release="rollout")
    assert "message" not in lease and lease["pid"]
