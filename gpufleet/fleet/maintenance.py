"""Maintenance windows: hold the fleet with a reason, then give it back.

``gpufleet lock acquire -m "new PSUs in rack 3" --for 4h`` takes the lease on every selected
host, all or none, as a lease with a message and no process behind it: every rollout, rollback
and converge is refused with that message until the window expires or ``gpufleet lock
release`` ends it. The lease is the rollout's own (``gpufleet.fleet.lease``): taking it is
atomic on the host, an expired window is replaced like any expired lease, and ``lock release``
removes only maintenance windows, by their id, so a rollout that holds a host keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.fleet.lease import held_for, new_lease
from gpufleet.fleet.rollout import (
    Rollout,
    Runner,
    append_control_audit,
    audit_line,
    not_done,
    take_lease,
)
from gpufleet.fleet.runner import Run


@dataclass(frozen=True)
class HostLock:
    """What a lock command did on one host."""

    host: str
    state: str  # held, released, free, refused, unreachable
    reason: str | None = None


def acquire(
    r: Rollout, looked: Run, message: str, *, rn: Runner | None = None
) -> tuple[dict, list[HostLock], str | None]:
    """Hold every host the look read for maintenance: the lease, each host's row, and why the
    window was not taken (None: held on every host). A host that could not be read holds the
    whole window back: all or none."""
    rn = rn or Runner(r)
    rn.lease = new_lease(ttl=r.ttl, release=None, message=message)
    hosts = tuple(looked.hosts)
    missing = {h: why for h, (_, why) in looked.unread.items()}
    if missing:
        why = f"{len(missing)} host(s) could not be read; nothing was held (--exclude them)"
        rows = [HostLock(h, "unreachable", w) for h, w in sorted(missing.items())]
        rows += [HostLock(h, "refused", "not held: another host could not be read") for h in hosts]
    elif not hosts:
        why, rows = "no host selected", []
    elif why := take_lease(rn, hosts, wait=r.lock_wait, log=r.log):
        rows = [HostLock(h, "refused", why) for h in hosts]
    else:
        rows = [HostLock(h, "held", message) for h in hosts]
    line = audit_line(
        action="lock-acquire",
        result="refused" if why else "held",
        lease=rn.lease["id"],
        by=rn.lease["holder"],
        message=message,
        expires=rn.lease["expires"],
        hosts=sorted(hosts),
        why=why,
    )
    append_control_audit(line)
    return rn.lease, sorted(rows, key=lambda row: row.host), why


def release(r: Rollout, looked: Run, *, by: str, rn: Runner | None = None) -> list[HostLock]:
    """End the maintenance windows on the hosts the look read, each by its id; a rollout's
    lease is named and left alone."""
    rows = [HostLock(h, "unreachable", why) for h, (_, why) in looked.unread.items()]
    windows: dict[str, list[str]] = {}  # lease id -> its hosts
    for name, entry in looked.hosts.items():
        state = entry.snapshot.state
        lease = state.lease
        if state.lease_error:
            rows.append(HostLock(name, "refused", state.lease_error))
        elif lease is None:
            rows.append(HostLock(name, "free"))
        elif not lease.message:
            why = (
                f"leased by {lease.holder} for {held_for(lease)}, not a maintenance window; "
                "left alone (`gpufleet lock break` if that run is gone)"
            )
            rows.append(HostLock(name, "refused", why))
        else:
            windows.setdefault(lease.id, []).append(name)
    rn = rn or Runner(r)
    for lease_id, hosts in sorted(windows.items()):
        rn.lease = {"id": lease_id}
        line = audit_line(action="lock-release", lease=lease_id, by=by)
        done = rn.lease_action(tuple(hosts), "release", {"*": line})
        failed = not_done(done, tuple(hosts))
        rows += [
            HostLock(h, "refused", failed[h]) if h in failed else HostLock(h, "released")
            for h in hosts
        ]
        append_control_audit(audit_line(action="lock-release", lease=lease_id, by=by, hosts=hosts))
    return sorted(rows, key=lambda row: row.host)
