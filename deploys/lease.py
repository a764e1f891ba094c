"""The rollout lease and the audit trail on each host: `gpufleet rollout` runs this deploy.

    GPUFLEET_LEASE_ACTION=take     take the lease (or renew ours); refuse if another run holds it
    GPUFLEET_LEASE_ACTION=release  drop our lease
    GPUFLEET_LEASE_ACTION=break    drop whatever lease there is (``gpufleet lock break``)
    GPUFLEET_LEASE=<json>          the lease: id, holder, control machine, pid, release, expiry
    GPUFLEET_AUDIT=<json>          optional: one line to append to the host's audit log

The lease file is created with the shell's noclobber (``O_EXCL``), so two control machines
taking it at once cannot both win; an expired lease, or ours, is replaced.
"""

from __future__ import annotations

import json
import os
import shlex

from pyinfra import host
from pyinfra.api import OperationError, operation

from deploys._config import fail_host
from gpufleet.known import STATE_DIR
from gpufleet.ops import exec_with_stdin, function_command

LEASE = f"{STATE_DIR}/lease.json"
AUDIT = f"{STATE_DIR}/audit.jsonl"


def take_script(lease: dict, now: float) -> str:
    """Shell that writes the lease from stdin unless another live lease is there (exit 3)."""
    q = shlex.quote
    return "; ".join((
        f"umask 077; mkdir -p {q(STATE_DIR)}; l={q(LEASE)}",
        'if [ -f "$l" ]; then '
        f"  if grep -q {q(chr(34) + 'id' + chr(34) + ': ' + json.dumps(lease['id']))} \"$l\"; "
        '  then rm -f "$l"; '
        "  else e=$(sed -n 's/.*\"expires\": *\\([0-9]*\\).*/\\1/p' \"$l\"); "
        f'    if [ -n "$e" ] && [ "$e" -le {int(now)} ]; then mv -f "$l" "$l.expired"; '
        '    else echo "HELD $(cat "$l")" >&2; exit 3; fi; fi; fi',
        'if ! (set -C; cat > "$l") 2>/dev/null; then echo "HELD $(cat "$l")" >&2; exit 3; fi',
    ))  # fmt: skip


def _take(state, host, lease: dict, now: float) -> None:
    body = json.dumps(lease, sort_keys=True)
    try:
        exec_with_stdin(state, host, take_script(lease, now), lambda s: s.write(body.encode()))
    except OperationError as exc:
        raise OperationError(f"lease not taken: {exc}") from None


def _append(state, host, line: str) -> None:
    script = f"umask 077; mkdir -p {shlex.quote(STATE_DIR)}; cat >> {shlex.quote(AUDIT)}"
    exec_with_stdin(state, host, script, lambda s: s.write((line + "\n").encode()))


@operation(is_idempotent=False, idempotent_notice="A rollout step, not a state")
def lease(*, action: str, lease: dict | None = None, now: float = 0.0, audit: str | None = None):
    """Take, release or break the rollout lease, and append an audit line.

    + action: ``take``, ``release``, ``break`` or ``none``
    + lease: the lease document (``take``: written; ``release``: only this id is removed)
    + now: epoch seconds, against which a held lease has expired
    + audit: one JSON line for ``/var/lib/gpufleet/audit.jsonl``
    """
    if action == "take":
        yield function_command(_take, (lease, now), {})
    elif action == "release":
        marker = shlex.quote(f'"id": {json.dumps(lease["id"])}')
        yield f'l={shlex.quote(LEASE)}; if grep -q {marker} "$l" 2>/dev/null; then rm -f "$l"; fi'
    elif action == "break":
        yield f"rm -f {shlex.quote(LEASE)}"
    if audit:
        yield function_command(_append, (audit,), {})


def main() -> None:
    action = os.environ.get("GPUFLEET_LEASE_ACTION", "none")
    document = json.loads(os.environ.get("GPUFLEET_LEASE") or "null")
    # one audit line per host: GPUFLEET_AUDIT is a JSON object, host name -> line
    lines = json.loads(os.environ.get("GPUFLEET_AUDIT") or "{}")
    audit = lines.get(host.name) or lines.get("*")
    if action not in ("take", "release", "break", "none"):
        fail_host(f"GPUFLEET_LEASE_ACTION={action!r} is not take, release, break or none")
        return
    if action in ("take", "release") and not document:
        fail_host(f"GPUFLEET_LEASE is needed to {action} a lease")
        return
    lease(
        name=f"Lease: {action}" + (" and audit" if audit else ""),
        action=action,
        lease=document,
        now=float(os.environ.get("GPUFLEET_NOW") or 0),
        audit=audit,
    )


main()
