"""The sandbox mirror (``assets/mirror.py``) run as a local process, for tests that need a Hub
or an apt repository without the sandbox."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

MIRROR = Path(__file__).resolve().parents[2] / "gpufleet" / "sandbox" / "assets" / "mirror.py"


@dataclass
class Mirror:
    url: str
    log: Path
    token: str
    repos: dict
    port: int

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=10, **kw)

    def head(self, path: str, **kw) -> requests.Response:
        return requests.head(self.url + path, timeout=10, **kw)

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}


def start(tmp: Path, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    log = tmp / f"mirror-{len(list(tmp.glob('mirror-*.log')))}.log"
    cmd = [
        sys.executable,
        str(MIRROR),
        "--root",
        str(tmp / "www"),
        "--hf-root",
        str(tmp / "hf"),
        "--token-file",
        str(tmp / "hf_token"),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *extra,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stderr=out, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not (m := re.search(r"listening on (http://\S+)", log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc, m.group(1), log


class Server:
    """A running mirror.py with its URL and request log."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.proc, self.url, self.log = start(tmp, *extra)

    def requests(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if '"GET ' in line]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
