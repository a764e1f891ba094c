"""A service with an API key: refused without it (401), answered with it, gated and benched with
it, and the key in no output at `-vv --debug --diff`, no command line and no stray file."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gpufleet.bench.report import runs_of
from tests.sandbox.conftest import PYINFRA, ROOT, pyinfra
from tests.support.inventories import variant

pytestmark = pytest.mark.sandbox

GPUFLEET = str(Path(sys.executable).with_name("gpufleet"))
HOST = "sandbox-jetson"
PORT = 11434


def status_of(host, key: str | None = None) -> int:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    auth = f"-H 'Authorization: Bearer {key}' " if key else ""
    return int(host.check_output(
        f"curl -s -o /dev/null -w '%{{http_code}}' {auth}-H 'Content-Type: application/json' "
        f"-d '{body}' http://127.0.0.1:{PORT}/v1/chat/completions"))  # fmt: skip


@pytest.fixture(scope="module")
def keyed(sandbox, hosts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("key")
    key = "sk-" + secrets.token_hex(16)
    (tmp / "llama.key").write_text(key + "\n")
    (tmp / "llama.key").chmod(0o600)
    inv = variant(tmp / "keyed.py", {"jetson": {
        "secrets.LLAMA_API_KEY": f"file:{tmp / 'llama.key'}",
        "services.llama.api_key_secret": "LLAMA_API_KEY"}})  # fmt: skip
    host = hosts[HOST]
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # the host's process list, sampled while the converge runs
        while not stop.is_set():
            seen.append(host.run("ps -eo args").stdout)
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    proc = subprocess.run(
        [PYINFRA, "-y", inv, "deploys/fleet.py", "--limit", HOST, "-vv", "--debug", "--diff"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    stop.set()
    watcher.join()
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield {"key": key, "inventory": inv, "run": proc, "ps": seen, "host": host, "tmp": tmp}
    run = pyinfra("--limit", HOST)  # back to the sandbox's own data: no key
    assert run.rc == 0, run.stderr[-2000:]
    assert status_of(host) == 200


def test_without_the_key_401_with_it_answered(keyed):
    host, key = keyed["host"], keyed["key"]
    assert status_of(host) == 401
    assert status_of(host, "sk-wrong") == 401
    assert status_of(host, key) == 200


def test_the_key_is_in_no_output_no_command_line_and_no_stray_file(keyed):
    key, run, host = keyed["key"], keyed["run"], keyed["host"]
    assert key not in run.stdout and key not in run.stderr
    assert len(keyed["ps"]) >= 3
    assert not any(key in sample for sample in keyed["ps"])
    found = host.run(f"grep -rlsF '{key}' /tmp /var/tmp /root /home /opt /etc /run "
                     "/var/lib/gpufleet").stdout.split()  # fmt: skip
    for path in found:
        allowed = path == "/opt/gpufleet/.env" or (
            path.startswith("/var/lib/gpufleet/releases/") and path.endswith("/env")
        )
        assert allowed, path
        assert host.file(path).mode == 0o600, path
    assert "/opt/gpufleet/.env" in found
    inspect = host.check_output(
        "docker inspect $(docker ps -q --filter label=com.docker.compose.service=llama)"
    )
    assert key not in inspect


def test_bench_sends_the_key_and_never_shows_it(keyed):
    out = keyed["tmp"] / "bench.json"
    proc = subprocess.run(
        [GPUFLEET, "bench", keyed["inventory"], "--limit", HOST, "--requests", "6",
         "--max-tokens", "8", "--json-file", str(out), "--save-requests"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["settings"]["auth"] is True
    assert runs_of(doc)[0]["levels"][0]["figures"]["success_rate"] == 1.0
    for text in (proc.stdout, proc.stderr, out.read_text()):
        assert keyed["key"] not in text
