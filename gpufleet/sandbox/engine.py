"""Start a Docker engine for the sandbox when none runs, and stop only the one it started.

``make test`` and ``make demo`` call this so that a fresh machine needs nothing but Python and
make. Where systemd runs, the distribution's unit is used; elsewhere (containers, CI runners)
``dockerd`` runs in the background with its log in ``.sandbox/dockerd.log``, never on the
terminal, and its pid in ``.sandbox/dockerd.pid`` so ``stop`` can end exactly that process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("GPUFLEET_SANDBOX_DIR", ".sandbox"))
PIDFILE = STATE / "dockerd.pid"
LOGFILE = STATE / "dockerd.log"


def _usable() -> bool:
    proc = subprocess.run(["docker", "info"], capture_output=True, check=False)
    return proc.returncode == 0


def _wait(timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _usable():
            return True
        time.sleep(0.5)
    return False


def start() -> str:
    if _usable():
        return "a Docker engine is already running; using it"
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "start", "docker"], check=True)
        how = "started docker.service"
    else:
        STATE.mkdir(parents=True, exist_ok=True)
        with open(LOGFILE, "ab") as log:
            proc = subprocess.Popen(
                ["dockerd"],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        PIDFILE.write_text(str(proc.pid))
        how = f"started dockerd (pid {proc.pid}, log {LOGFILE})"
    if not _wait():
        raise SystemExit(f"the Docker engine did not come up; see {LOGFILE}")
    return how


def stop() -> str:
    if not PIDFILE.exists():
        return "left the Docker engine as it was (gpufleet did not start it)"
    pid = int(PIDFILE.read_text())
    PIDFILE.unlink()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "dockerd had already stopped"
    for _ in range(60):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"stopped dockerd (pid {pid})"
        time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    return f"killed dockerd (pid {pid}) after 30s"


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else ""
    if action not in ("start", "stop"):
        raise SystemExit("usage: python -m gpufleet.sandbox.engine start|stop")
    print(f"engine: {start() if action == 'start' else stop()}")
