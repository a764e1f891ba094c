"""The rollout lease: one document per host, taken all or none before a rollout's first change.

A lease is ``/var/lib/gpufleet/lease.json`` on each host: who holds it (user@machine, pid), the
release it rolls out, and when it expires. This module holds everything about it that is not
pyinfra: the document, when another run's lease no longer binds, and the shell that takes,
renews, releases and breaks it on a host. ``deploys/lease.py`` runs that shell;
``gpufleet.fleet.rollout`` decides with the typed result (``HostReport.lease_held`` and
``lease_error``).

Every action holds ``flock`` on ``lease.json.lock`` while it reads and writes, so two operators
taking, renewing or breaking at once are serialised on the host: exactly one wins. The lease is
written to a temporary file, its size checked, then renamed. Another run's lease is replaced
only when it expired by the operator's clock and by the host's, each with a margin, and was not
renewed within that margin.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shlex
import socket
import time
from collections.abc import Callable
from pathlib import Path

from gpufleet.core.known import STATE_DIR

LEASE = f"{STATE_DIR}/lease.json"
AUDIT = f"{STATE_DIR}/audit.jsonl"
MARGIN_SECONDS = 60  # clocks may disagree by this much; a renewal this recent still holds
LOCK_SECONDS = 30  # how long an action waits for another one's flock
HELD, NOT_A_LEASE, LOCK_BUSY = 3, 4, 5  # the script's exit statuses

_PRELUDE = (
    "set -u; umask 077; command -v flock >/dev/null || "
    "{{ echo 'flock (util-linux) is not installed' >&2; exit 6; }}; "
    'mkdir -p {dir}; l={lease}; exec 9>>"$l.lock"; '
    "flock -w {wait} 9 || exit {busy}; "
    # the lease there is: its id and expiry; bad=1 when the file is not a lease
    "id=''; e=''; bad=0; if [ -e \"$l\" ]; then "
    'id=$(sed -n \'s/.*"id": *"\\([0-9a-f]*\\)".*/\\1/p\' "$l" | head -n 1); '
    'e=$(sed -n \'s/.*"expires": *\\([0-9]*\\).*/\\1/p\' "$l" | head -n 1); '
    'if [ -z "$id" ] || [ -z "$e" ]; then bad=1; fi; fi; '
)
# a take, or a drop of one lease, reads the lease first: a file that is not one is shown
_READ = 'if [ "$bad" = 1 ]; then head -c 2000 "$l"; exit {bad}; fi; '


def _prelude(path: str, *, read: bool = True) -> str:
    return (_PRELUDE + (_READ if read else "")).format(
        dir=shlex.quote(path.rsplit("/", 1)[0]),
        lease=shlex.quote(path),
        wait=LOCK_SECONDS,
        busy=LOCK_BUSY,
        bad=NOT_A_LEASE,
    )


def take_script(lease_id: str, now: float, size: int, *, path: str = LEASE) -> str:
    """Shell that writes the lease from stdin (``size`` bytes) unless another run holds one:
    then it prints that lease and exits ``HELD``."""
    return _prelude(path) + (
        f'if [ -n "$id" ] && [ "$id" != {shlex.quote(lease_id)} ]; then '
        'h=$(date +%s); m=$(stat -c %Y "$l"); '
        f"if [ $((e + {MARGIN_SECONDS})) -gt {int(now)} ] || "
        f'[ $((e + {MARGIN_SECONDS})) -gt "$h" ] || [ $((h - m)) -lt {MARGIN_SECONDS} ]; '
        f'then cat "$l"; exit {HELD}; fi; fi; '
        't=$(mktemp "$l.XXXXXX"); trap \'rm -f "$t"\' EXIT; cat > "$t"; '
        f'[ "$(wc -c < "$t")" -eq {size} ] || '
        '{ echo "the lease arrived cut short" >&2; exit 7; }; '
        'mv -f "$t" "$l"; trap - EXIT'
    )


def drop_script(lease_id: str | None, *, path: str = LEASE) -> str:
    """Shell that removes the lease: only the one with ``lease_id`` when given (exit ``HELD``
    with the lease printed when another one is there)."""
    if lease_id is None:  # broken by hand: whatever is there, lease or not
        return _prelude(path, read=False) + 'rm -f "$l"'
    return _prelude(path) + (
        f'if [ -z "$id" ]; then exit 0; fi; '
        f'if [ "$id" != {shlex.quote(lease_id)} ]; then cat "$l"; exit {HELD}; fi; rm -f "$l"'
    )


def new_lease(
    *, ttl: float, release: str | None, now: float | None = None, message: str | None = None
) -> dict:
    """A lease document for this run: who holds it, from where, until when.

    With a ``message`` it is a maintenance window (``gpufleet lock acquire``): no process holds
    it, so it binds until it expires or ``gpufleet lock release`` ends it, whatever runs here.
    """
    now = time.time() if now is None else now
    lease = {
        "id": secrets.token_hex(6),
        "holder": f"{getpass.getuser()}@{socket.gethostname()}",
        "control": socket.gethostname(),
        "pid": None if message else os.getpid(),
        "release": release,
        "started": round(now, 3),
        "expires": round(now + ttl, 3),
    }
    return lease | ({"message": message} if message else {})


MESSAGE_LIMIT = 200


def message_problem(message: str) -> str | None:
    """Why a maintenance window's reason cannot be used, or None."""
    if not message.strip():
        return 'the reason is empty: say why the fleet is held (-m "...")'
    if len(message) > MESSAGE_LIMIT:
        return f"the reason is {len(message)} characters long; keep it under {MESSAGE_LIMIT}"
    if any(ord(c) < 32 or ord(c) == 127 for c in message):
        return "the reason holds a control character (a newline?); give one line"
    return None


def held_for(lease) -> str:
    """What a lease holds its hosts for, in words: a rollout (of a release) or maintenance."""
    get = lease.get if isinstance(lease, dict) else lambda k: getattr(lease, k, None)
    if get("message"):
        return f"maintenance: {get('message')!r}"
    release = get("release")
    return f"a rollout of release {release}" if release else "a rollout"


def lease_is_stale(lease: dict, *, now: float, alive: Callable[[int], bool]) -> str | None:
    """Why another run's lease no longer binds anyone, or None while it does.

    Expired, or taken from this same control machine by a process that is gone (the control
    process was killed): the next rollout may replace it.
    """
    if lease.get("expires", 0) <= now:
        return f"expired {int(now - lease['expires'])}s ago"
    here = lease.get("control") == socket.gethostname()
    if here and lease.get("pid") and not alive(int(lease["pid"])):
        if lease.get("id") and lease_processes(lease["id"]):
            return None  # its holder died, but the run it started is still changing hosts
        return f"its holder (pid {lease['pid']} on this machine) is gone"
    return None


def lease_processes(lease_id: str) -> list[int]:
    """Processes on this machine still working under a lease: a killed rollout's pyinfra run
    goes on (it has its own session), and the lease must not be broken under it."""
    marker = f"GPUFLEET_LEASE={lease_id}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
