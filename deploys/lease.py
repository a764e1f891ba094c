"""The rollout lease and the audit trail on each host: `gpufleet rollout` runs this deploy.

The command asks for one action (``gpufleet.core.wire.RunOptions.lease_action``):

    take     take the lease, or renew ours; refused while another run holds it
    release  drop our lease (only ours: its id must match)
    break    drop the lease there is (with an id: only that lease, so a run that took it since
             keeps it); ``gpufleet lock break``
    none     only append the audit line

The shell and the rules are ``gpufleet.fleet.lease``'s. What refused a take reaches the command as a
typed field of the host's report (the lease held, or a lease file that is not a lease).
"""

from __future__ import annotations

import json
import shlex

from pydantic import ValidationError
from pyinfra import host
from pyinfra.api import OperationError, operation

from deploys._config import fail_host, run_options
from gpufleet.core.known import STATE_DIR
from gpufleet.core.snapshot import Lease
from gpufleet.fleet.lease import (
    AUDIT,
    HELD,
    LEASE,
    LOCK_BUSY,
    LOCK_SECONDS,
    NOT_A_LEASE,
    drop_script,
    take_script,
)
from gpufleet.fleet.pyinfra_main import FIELDS
from gpufleet.ops.operations import function_command, run_state, run_with_stdin


def _note(host_name: str, state, **fields) -> None:
    run_state(state, FIELDS).setdefault(host_name, {}).update(fields)


def _refused(state, host, status: int, out: str, err: str) -> OperationError:
    """The typed reason an action was refused, kept for the report, and its one line."""
    if status == HELD:
        try:
            held = Lease.model_validate(json.loads(out))
        except (ValueError, ValidationError):
            status = NOT_A_LEASE
        else:
            _note(host.name, state, lease_held=held)
            return OperationError(f"leased by {held.holder} (lease {held.id})")
    if status == NOT_A_LEASE:
        shown = out.strip()[:60] or "empty"
        why = (
            f"{LEASE} is not a gpufleet lease ({shown!r}); look at it, then "
            "`gpufleet lock break` to remove it"
        )
        _note(host.name, state, lease_error=why)
        return OperationError(why)
    if status == LOCK_BUSY:
        return OperationError(f"another gpufleet held {LEASE}.lock for {LOCK_SECONDS}s")
    return OperationError(f"lease command failed ({status}): {err.strip()[-300:]}")


def _act(state, host, script: str, body: str = "") -> None:
    status, out, err = run_with_stdin(state, host, script, body.encode(), timeout=LOCK_SECONDS * 2)
    if status != 0:
        raise _refused(state, host, status, out, err)


def _append(state, host, line: str) -> None:
    script = f"umask 077; mkdir -p {shlex.quote(STATE_DIR)}; cat >> {shlex.quote(AUDIT)}"
    status, _, err = run_with_stdin(state, host, script, (line + "\n").encode(), timeout=60)
    if status != 0:
        raise OperationError(f"audit line not written ({status}): {err.strip()[-300:]}")


@operation(is_idempotent=False, idempotent_notice="A rollout step, not a state")
def lease(*, action: str, lease: dict | None = None, now: float = 0.0, audit: str | None = None):
    """Take, release or break the rollout lease, and append an audit line.

    + action: ``take``, ``release``, ``break`` or ``none``
    + lease: the lease document (``take``: written; ``release``/``break``: its id only)
    + now: the operator's epoch seconds, against which a held lease has expired
    + audit: one JSON line for ``/var/lib/gpufleet/audit.jsonl``
    """
    if action == "take":
        body = json.dumps(lease, sort_keys=True)
        script = take_script(lease["id"], now, len(body.encode()))
        yield function_command(_act, (script, body), {})
    elif action in ("release", "break"):
        lease_id = lease["id"] if lease else None
        yield function_command(_act, (drop_script(lease_id),), {})
    if audit:
        yield function_command(_append, (audit,), {})


def main() -> None:
    options = run_options()
    action = options.lease_action or "none"
    # one audit line per host: host name (or "*") -> line
    audit = options.audit_lines.get(host.name) or options.audit_lines.get("*")
    if action not in ("take", "release", "break", "none"):
        fail_host(f"lease action {action!r} is not take, release, break or none")
        return
    if action in ("take", "release") and not options.lease:
        fail_host(f"a lease document is needed to {action} a lease")
        return
    lease(
        name=f"Lease: {action}" + (" and audit" if audit else ""),
        action=action,
        lease=options.lease,
        now=options.now,
        audit=audit,
    )


main()
