"""A fleet's bad day, injected for real on the demo fleet: a host frozen mid-rollout, a host
that cannot be reached, a lease file cut short.

Each run must end within its bounds, name the host and why, exit non-zero, print no
traceback, and leave every other host serving.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.sandbox.conftest import ROOT, pyinfra
from tests.support.inventories import variant

pytestmark = pytest.mark.sandbox

DEMO = ("sandbox-spark", "sandbox-rtx5090", "sandbox-jetson")
GROUPS = ("spark", "rtx5090", "jetson")
GPUFLEET = str(Path(sys.executable).with_name("gpufleet"))
LLAMA = "docker ps -q --no-trunc --filter label=com.docker.compose.service=llama"
LEASE = "/var/lib/gpufleet/lease.json"


def gpufleet(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([GPUFLEET, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def ctx(host) -> str:
    cmd = json.loads(host.check_output(f"docker inspect --format '{{{{json .Config.Cmd}}}}' "
                                       f"$({LLAMA})"))  # fmt: skip
    return cmd[cmd.index("-c") + 1]


def serving(host, name: str) -> bool:
    port = 11434 if "jetson" in name else 8000
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    out = host.run(f"curl -fsS -m 30 -H 'Content-Type: application/json' -d '{body}' "
                   f"http://127.0.0.1:{port}/v1/chat/completions")  # fmt: skip
    return out.rc == 0 and '"choices"' in out.stdout


@pytest.fixture(scope="module")
def demo(sandbox, hosts):
    """The three demo hosts converged as declared; converged back after the module."""
    run = pyinfra("--exclude", "broken")
    assert run.rc == 0, run.stderr[-3000:]
    yield {name: hosts[name] for name in DEMO}
    subprocess.run(["docker", "unpause", "gpufleet-sandbox-jetson"], capture_output=True)
    gpufleet("lock", "break", "inventory/sandbox.py", "--exclude", "broken")
    run = pyinfra("--exclude", "broken")
    assert run.rc == 0, run.stderr[-3000:]


def _ctx_variant(tmp_path, size: int, **extra) -> str:
    return variant(tmp_path / f"ctx{size}.py", {g: {"services.llama.ctx_size": size, **extra}
                                                for g in GROUPS})  # fmt: skip


def test_a_host_frozen_mid_rollout_fails_within_its_bound_and_the_others_finish(demo, tmp_path):
    inv = _ctx_variant(tmp_path, 3072, ssh_liveness_seconds=10)
    started = time.monotonic()
    proc = subprocess.Popen([GPUFLEET, "rollout", inv, "--exclude", "broken", "--no-canary",
                             "--batch", "3"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen = []
    frozen_at = None
    deadline = started + 600  # the test's own bound: the rollout must end well before it
    try:
        while proc.poll() is None or not lines.empty():
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    break
                continue
            seen.append(line)
            if line.startswith("rollout: converging") and frozen_at is None:
                time.sleep(3)  # inside the converge: connected, reading or changing
                subprocess.run(["docker", "pause", "gpufleet-sandbox-jetson"], check=True)
                frozen_at = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["pkill", "-f", "ctx3072.py"], check=False)  # its pyinfra run
        subprocess.run(["docker", "unpause", "gpufleet-sandbox-jetson"], check=False)
    took = time.monotonic() - started
    out = "".join(seen)
    assert frozen_at is not None, out
    print(f"frozen-host rollout: {took:.0f}s in all, {time.monotonic() - frozen_at:.0f}s after "
          "the freeze")  # fmt: skip
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    assert "sandbox-jetson: FAILED: unreachable: stopped answering" in out or (
        "sandbox-jetson: FAILED: unreachable:" in out), out  # fmt: skip
    assert time.monotonic() - frozen_at < 300, out  # every wait had its bound
    for name in ("sandbox-spark", "sandbox-rtx5090"):  # the others finished, serving
        assert ctx(demo[name]) == "3072", name
        assert serving(demo[name], name), name
        assert f"{name}: on release" in out
    # the frozen host, back: its lease is named for breaking, then a converge repairs it
    assert gpufleet("lock", "break", "inventory/sandbox.py", "--limit", "sandbox-jetson"
                    ).returncode == 0  # fmt: skip
    run = pyinfra("--limit", "sandbox-jetson")
    assert run.rc == 0, run.stderr[-3000:]
    assert serving(demo["sandbox-jetson"], "sandbox-jetson")


def test_an_unreachable_host_is_named_and_nothing_changes_unless_skipped(demo, tmp_path):
    key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pinned = Path(ROOT / ".sandbox" / "ssh" / "known_hosts").read_text().splitlines()
    port = next(h for h in json.loads((ROOT / ".sandbox" / "hosts.json").read_text())["hosts"]
                if h["name"] == "sandbox-jetson")["port"]  # fmt: skip
    wrong = tmp_path / "known_hosts"
    other = key.with_suffix(".pub").read_text().split()[:2]
    wrong.write_text("\n".join(
        f"[127.0.0.1]:{port} {' '.join(other)}" if line.startswith(f"[127.0.0.1]:{port} ")
        else line for line in pinned) + "\n")  # fmt: skip
    patches = {g: {"services.llama.ctx_size": 2048} for g in GROUPS}
    patches["jetson"]["ssh_known_hosts_file"] = str(wrong)  # its host key "changed"
    inv = variant(tmp_path / "changed-key.py", patches)
    before = {n: h.check_output(LLAMA) for n, h in demo.items()}
    run = gpufleet("rollout", inv, "--exclude", "broken")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "sandbox-jetson: unreachable, left alone:" in out, out
    assert "nothing was changed (--skip-unreachable goes on without them)" in out
    assert "Traceback" not in out
    assert {n: h.check_output(LLAMA) for n, h in demo.items()} == before
    drift = gpufleet("drift", inv, "--exclude", "broken", "--json")
    doc = json.loads(drift.stdout)
    assert drift.returncode == 1
    jetson = next(h for h in doc["hosts"] if h["host"] == "sandbox-jetson")
    assert jetson["status"] == "unreachable" and jetson["reason"]
    # explicitly going on without it: the others change, it is still named, still exit 1
    run = gpufleet("rollout", inv, "--exclude", "broken", "--skip-unreachable")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "sandbox-jetson: unreachable, left alone:" in out
    for name in ("sandbox-spark", "sandbox-rtx5090"):
        assert ctx(demo[name]) == "2048", name
    assert demo["sandbox-jetson"].check_output(LLAMA) == before["sandbox-jetson"]


@pytest.mark.parametrize("content", ['{"id": "0123456789ab", "holder": "op@ct', ""])
def test_a_lease_file_cut_short_is_one_line_and_changes_nothing(demo, tmp_path, content):
    host = demo["sandbox-spark"]
    host.run(f"printf %s {json.dumps(content)!r} > {LEASE}")
    before = host.check_output(LLAMA)
    inv = _ctx_variant(tmp_path, 1536)
    run = gpufleet("rollout", inv, "--limit", "sandbox-spark")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert f"sandbox-spark: {LEASE} is not a gpufleet lease" in out, out
    assert "`gpufleet lock break`" in out and "nothing was changed" in out
    assert "Traceback" not in out and "KeyError" not in out
    assert host.check_output(LLAMA) == before
    status = gpufleet("lock", "status", "inventory/sandbox.py", "--limit", "sandbox-spark")
    assert status.returncode == 1 and "Traceback" not in status.stdout + status.stderr
    assert gpufleet("lock", "break", "inventory/sandbox.py", "--limit", "sandbox-spark"
                    ).returncode == 0  # fmt: skip
    assert not host.file(LEASE).exists


def test_a_maintenance_window_refuses_every_change_until_it_is_released(demo, tmp_path):
    inv = _ctx_variant(tmp_path, 1024)
    held = gpufleet("lock", "acquire", "inventory/sandbox.py", "--exclude", "broken",
                    "-m", "new PSUs in rack 3", "--for", "2h")  # fmt: skip
    assert held.returncode == 0, held.stdout + held.stderr
    before = {name: h.check_output(LLAMA) for name, h in demo.items()}
    status = gpufleet("lock", "status", "inventory/sandbox.py", "--exclude", "broken")
    assert status.returncode == 0
    for name in DEMO:
        assert f"{name}: held by " in status.stdout and "'new PSUs in rack 3'" in status.stdout
    run = gpufleet("rollout", inv, "--exclude", "broken")
    out = run.stdout + run.stderr
    assert run.returncode == 1 and "for maintenance: 'new PSUs in rack 3'" in out, out
    assert "`gpufleet lock release` ends it" in out and "nothing was changed" in out
    conv = gpufleet("converge", inv, "--limit", "sandbox-spark")
    assert conv.returncode == 1 and "refused: held by" in conv.stderr, conv.stderr[-2000:]
    assert {name: h.check_output(LLAMA) for name, h in demo.items()} == before
    released = gpufleet("lock", "release", "inventory/sandbox.py", "--exclude", "broken")
    assert released.returncode == 0, released.stdout + released.stderr
    assert all(f"{name}: released" in released.stdout for name in DEMO)
    assert not any(h.file(LEASE).exists for h in demo.values())


def test_a_host_whose_engine_hangs_fails_within_its_read_bound_and_the_others_converge(
    demo, tmp_path
):
    spark = "gpufleet-sandbox-spark"
    patches = {g: {"services.llama.ctx_size": 2560, "read_timeout_seconds": 15} for g in GROUPS}
    inv = variant(tmp_path / "hung-engine.py", patches)
    before = demo["sandbox-spark"].check_output(LLAMA)
    subprocess.run(["docker", "exec", spark, "sh", "-c", "kill -STOP $(pidof dockerd)"],
                   check=True)  # fmt: skip
    try:
        started = time.monotonic()
        run = gpufleet("converge", inv, "--exclude", "broken", timeout=600)
        took = time.monotonic() - started
    finally:
        subprocess.run(["docker", "exec", spark, "sh", "-c", "kill -CONT $(pidof dockerd)"],
                       check=True)  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-3000:]
    assert "sandbox-spark: could not be read (HostSnapshot): no answer within its bound" in out
    assert "Traceback" not in out, out[-3000:]
    assert demo["sandbox-spark"].check_output(LLAMA) == before
    for name in ("sandbox-rtx5090", "sandbox-jetson"):
        assert ctx(demo[name]) == "2560" and serving(demo[name], name), name
    print(f"hung engine: converge ended in {took:.0f}s, the other two recreated and serving")


def test_a_host_not_in_known_hosts_is_refused_by_default_with_what_to_do(demo, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    inv = variant(tmp_path / "unknown-key.py", {"spark": {"ssh_known_hosts_file": str(empty)}})
    run = gpufleet("drift", inv, "--limit", "sandbox-spark")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "No host key for" in out and "`gpufleet bootstrap` records it" in out
    assert empty.read_text() == ""  # nothing trusted on first use
    # the inventory may say otherwise: trusted on first use, and recorded
    tofu = {"ssh_known_hosts_file": str(empty), "ssh_strict_host_key_checking": "accept-new"}
    inv = variant(tmp_path / "tofu.py", {"spark": tofu})
    tofu_run = gpufleet("drift", inv, "--limit", "sandbox-spark")
    # read (in sync, or drifted by this module's earlier rollouts), never unreachable
    assert tofu_run.returncode in (0, 2), tofu_run.stdout + tofu_run.stderr
    assert "unreachable" not in tofu_run.stdout.replace("0 unreachable", "")
    assert empty.read_text().strip()  # its key, recorded on first use
