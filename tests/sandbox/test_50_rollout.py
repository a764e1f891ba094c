"""Fleet rollouts on six serving hosts: canary first, gated batches, rollback, lease, audit."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpufleet.core.wire import RunOptions
from gpufleet.sandbox import fleet
from tests.sandbox.conftest import ROOT, pyinfra
from tests.support.inventories import variant

pytestmark = pytest.mark.sandbox

SERVING = ("sandbox-spark", "sandbox-rtx5090", "sandbox-jetson", "sandbox-spark-2",
           "sandbox-rtx5090-2", "sandbox-rtx5090-3")  # fmt: skip
LLAMA = "docker ps -q --no-trunc --filter label=com.docker.compose.service=llama"
GPUFLEET = str(Path(sys.executable).with_name("gpufleet"))


def gpufleet(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([GPUFLEET, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def port(name: str) -> int:
    return 11434 if "jetson" in name else 8000


def chat(host, name: str) -> dict:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    return json.loads(host.check_output(
        f"curl -fsS -H 'Content-Type: application/json' -d '{body}' "
        f"http://127.0.0.1:{port(name)}/v1/chat/completions"))  # fmt: skip


def ctx(host) -> str:
    cmd = json.loads(host.check_output(f"docker inspect --format '{{{{json .Config.Cmd}}}}' "
                                       f"$({LLAMA})"))  # fmt: skip
    return cmd[cmd.index("-c") + 1]


def current(host) -> str:
    return host.check_output("cat /var/lib/gpufleet/current")


def audit(host) -> list[dict]:
    text = host.run("cat /var/lib/gpufleet/audit.jsonl").stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def six_converged(sandbox, hosts):
    """The demo fleet plus three fresh light hosts, converged: the run."""
    fleet.up(extras={"rtx5090": 2, "spark": 1})
    run = pyinfra("--exclude", "broken")
    assert run.rc == 0, run.stderr[-3000:]
    yield run
    fleet.up(extras={})


@pytest.fixture(scope="module")
def six(six_converged, sandbox):
    """The six serving hosts, converged and serving."""
    import testinfra

    config = sandbox["ssh"]["config"]
    return {n: testinfra.get_host(f"ssh://{n}", ssh_config=config) for n in SERVING}


def test_light_hosts_are_sent_one_gzipped_save_of_the_control_machines_image(
    six_converged, six, sandbox
):
    ref = sandbox["llama"]["image"]
    said = "--> gpufleet: images sent from the control machine: "
    line = next(ln for ln in six_converged.stderr.splitlines() if said in ln)
    sent = dict(re.findall(r"(sandbox-[\w-]+) ([\d.]+) MiB", line.partition(said)[2]))
    light = ("sandbox-spark-2", "sandbox-rtx5090-2", "sandbox-rtx5090-3")
    assert set(light) <= set(sent), line
    assert len({sent[name] for name in light}) == 1  # the same file to each
    local = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}} {{.Size}}", ref],
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert float(sent[light[0]]) * 2**20 < 0.6 * int(local[1])  # gzipped: 137 of 319 MiB
    for name in light:
        assert (
            six[name].check_output(f"docker image inspect --format '{{{{.Id}}}}' {ref}") == local[0]
        )


def test_a_good_release_goes_canary_first_then_batch_by_batch(six, tmp_path):
    inv = variant(tmp_path / "ctx.py", {g: {"services.llama.ctx_size": 2048}
                                        for g in ("spark", "rtx5090", "jetson")})  # fmt: skip
    before = {n: current(h) for n, h in six.items()}
    run = gpufleet("rollout", inv, "--exclude", "broken", "--batch", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert "  canary: sandbox-spark, sandbox-rtx5090, sandbox-jetson" in lines
    assert "  batch 2: sandbox-spark-2, sandbox-rtx5090-2" in lines
    assert "  batch 3: sandbox-rtx5090-3" in lines
    order = [line for line in lines if line.startswith("rollout: converging")]
    assert order == ["rollout: converging sandbox-spark, sandbox-rtx5090, sandbox-jetson",
                     "rollout: converging sandbox-spark-2, sandbox-rtx5090-2",
                     "rollout: converging sandbox-rtx5090-3"]  # fmt: skip
    for name, host in six.items():
        assert ctx(host) == "2048", name
        assert chat(host, name)["choices"], name
        last = audit(host)[-1]
        assert (last["action"], last["result"], last["from"]) == ("rollout", "ok", before[name])
        assert last["to"] == current(host)
        assert last["batch"] == (1 if name in SERVING[:3] else 2 if name in SERVING[3:5] else 3)
        assert not host.file("/var/lib/gpufleet/lease.json").exists

    # then a switched model, on the jetson hosts' group
    inv2 = variant(tmp_path / "model.py", {
        **{g: {"services.llama.ctx_size": 2048} for g in ("spark", "rtx5090", "jetson")},
        "jetson": {"services.llama.ctx_size": 2048, "services.llama.model": "qwen2.5-coder-7b"},
    })  # fmt: skip
    run = gpufleet("rollout", inv2, "--exclude", "broken")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "  canary: sandbox-jetson" in run.stdout.splitlines()
    models = json.loads(six["sandbox-jetson"].check_output(
        "curl -fsS http://127.0.0.1:11434/v1/models"))  # fmt: skip
    # llama-server names its model by its path: the coder model's snapshot in the Hub cache
    assert "/hub/models--gpufleet-sandbox--tiny-coder-GGUF/snapshots/" in models["data"][0]["id"]


def test_a_bad_release_stops_after_the_canary_and_rolls_it_back(six, tmp_path):
    good = variant(tmp_path / "good.py", {g: {"services.llama.ctx_size": 2048}
                                          for g in ("spark", "rtx5090", "jetson")})  # fmt: skip
    assert gpufleet("rollout", good, "--exclude", "broken").returncode == 0
    containers = {n: h.check_output(LLAMA) for n, h in six.items()}
    images = {n: h.check_output(f"docker inspect --format '{{{{.Image}}}}' $({LLAMA})")
              for n, h in six.items()}  # fmt: skip
    releases = {n: current(h) for n, h in six.items()}
    bad = variant(tmp_path / "bad.py", {g: {"services.llama.ctx_size": 2048,
                                            "services.llama.extra_args": ["--no-such-flag"]}
                                        for g in ("spark", "rtx5090", "jetson")})  # fmt: skip
    run = gpufleet("rollout", bad, "--exclude", "broken", "--batch", "2")
    assert run.returncode == 1, run.stdout + run.stderr
    out = run.stdout
    failed = next(line for line in out.splitlines() if line.startswith("sandbox-spark: FAILED:"))
    assert "Health gate: llama" in failed and "llama exited" in failed, failed  # step and why
    assert "error: invalid argument: --no-such-flag" in out  # the log tail says why
    assert "rollout stopped: 3 failed in batch 1" in out
    for name in SERVING[:3]:  # the canaries: back on the release they ran, serving
        host = six[name]
        assert current(host) == releases[name]
        assert (
            host.check_output(f"docker inspect --format '{{{{.Image}}}}' $({LLAMA})")
            == (images[name])
        )
        assert chat(host, name)["choices"]
        assert f"{name}: rolled back to {releases[name]}, serving" in out
        assert audit(host)[-1]["result"] == "failed"
    for name in SERVING[3:]:  # every other host untouched
        assert six[name].check_output(LLAMA) == containers[name], name
        assert f"{name}: untouched" in out


def test_a_model_whose_bytes_do_not_match_its_sha256_is_refused_and_rolled_back(
        six, tmp_path, sandbox):  # fmt: skip
    repo = sandbox["hf"]["repos"]["gpufleet-sandbox/tiny-corrupt-GGUF"]
    files = [p for p in repo["files"] if p.endswith(".gguf")]
    size = sum(repo["files"][p]["size"] for p in files)
    model = {"repo": "gpufleet-sandbox/tiny-corrupt-GGUF", "revision": repo["sha"],
             "files": files, "size_bytes": size}  # fmt: skip
    served = {n: h.check_output(LLAMA) for n, h in six.items()}
    releases = {n: current(h) for n, h in six.items()}
    inv = variant(tmp_path / "corrupt.py", {
        "rtx5090": {"models.corrupt": model, "services.llama.model": "corrupt"}})  # fmt: skip
    run = gpufleet("rollout", inv, "--limit", "rtx5090", "--exclude", "broken")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "sandbox-rtx5090: FAILED:" in run.stdout and "sha256" in run.stdout
    host = six["sandbox-rtx5090"]
    assert current(host) == releases["sandbox-rtx5090"]
    assert chat(host, "sandbox-rtx5090")["choices"]
    corrupt = repo["files"][files[0]]
    blobs = "/opt/gpufleet/huggingface/hub/models--gpufleet-sandbox--tiny-corrupt-GGUF/blobs"
    assert not host.file(f"{blobs}/{corrupt['sha256']}").exists  # never in place
    for name in ("sandbox-rtx5090-2", "sandbox-rtx5090-3"):
        assert six[name].check_output(LLAMA) == served[name]


def test_a_rollout_while_another_holds_the_lease_waits_then_names_the_holder(six, tmp_path):
    holder = subprocess.Popen(["sleep", "120"])  # a live process stands for the other rollout
    lease = {"id": "0e0e0e0e0e0e", "holder": "alice@elsewhere", "control": "elsewhere",
             "pid": holder.pid, "release": "rollout", "started": time.time(),
             "expires": time.time() + 600}  # fmt: skip
    env = RunOptions(lease_action="take", lease=lease, now=time.time()).to_env()
    try:
        took = subprocess.run([str(Path(sys.executable).with_name("pyinfra")), "-y",
                               "inventory/sandbox.py", "deploys/lease.py", "--limit",
                               "sandbox-rtx5090-3"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, **env}, check=False)  # fmt: skip
        assert took.returncode == 0, took.stderr[-2000:]
        inv = variant(tmp_path / "ctx.py", {"rtx5090": {"services.llama.ctx_size": 4096}})
        before = {n: six[n].check_output(LLAMA) for n in ("sandbox-rtx5090", "sandbox-rtx5090-2")}
        started = time.monotonic()
        run = gpufleet("rollout", inv, "--limit", "rtx5090", "--exclude", "broken",
                       "--lock-wait", "3s")  # fmt: skip
        waited = time.monotonic() - started
        assert run.returncode == 1
        assert "sandbox-rtx5090-3 is leased by alice@elsewhere on elsewhere" in run.stdout
        assert "nothing was changed" in run.stdout
        assert waited >= 3
        # all or none: the hosts it could lease were given back and left as they were
        for name, cid in before.items():
            assert six[name].check_output(LLAMA) == cid
            assert not six[name].file("/var/lib/gpufleet/lease.json").exists
        status = gpufleet("lock", "status", "inventory/sandbox.py", "--limit", "sandbox-rtx5090-3")
        assert "leased by alice@elsewhere" in status.stdout and status.returncode == 0
    finally:
        holder.kill()
        gpufleet("lock", "break", "inventory/sandbox.py", "--limit", "sandbox-rtx5090-3")
    assert not six["sandbox-rtx5090-3"].file("/var/lib/gpufleet/lease.json").exists


def test_a_rollout_killed_mid_batch_leaves_every_host_serving_and_the_next_one_finishes(
        six, tmp_path):  # fmt: skip
    inv = variant(tmp_path / "ctx.py", {g: {"services.llama.ctx_size": 3072}
                                        for g in ("spark", "rtx5090", "jetson")})  # fmt: skip
    t0 = time.time()
    proc = subprocess.Popen([GPUFLEET, "rollout", inv, "--exclude", "broken", "--batch", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    seen = []
    for line in proc.stdout:  # kill it once its second batch is converging
        seen.append(line)
        if len([x for x in seen if x.startswith("rollout: converging")]) == 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run = gpufleet("rollout", inv, "--exclude", "broken", "--batch", "2", "--lock-wait", "5m")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "breaking the lease of" in run.stdout  # the dead rollout's, once its run had ended
    for name, host in six.items():
        assert ctx(host) == "3072", name
        assert chat(host, name)["choices"], name
        assert not host.file("/var/lib/gpufleet/lease.json").exists
    broken = [e for n in SERVING for e in audit(six[n])
              if e["action"] == "lease-break" and e["at"] >= t0]  # fmt: skip
    assert broken and all(e["why"] == broken[0]["why"] for e in broken)


def test_rollback_to_previous_restores_the_earlier_release_on_every_host(six, tmp_path):
    first = variant(tmp_path / "a.py", {g: {"services.llama.ctx_size": 2048}
                                        for g in ("spark", "rtx5090", "jetson")})  # fmt: skip
    second = variant(tmp_path / "b.py", {g: {"services.llama.ctx_size": 1024}
                                         for g in ("spark", "rtx5090", "jetson")})  # fmt: skip
    assert gpufleet("rollout", first, "--exclude", "broken").returncode == 0
    earlier = {n: current(h) for n, h in six.items()}
    assert gpufleet("rollout", second, "--exclude", "broken").returncode == 0
    assert all(ctx(h) == "1024" for h in six.values())
    run = gpufleet("rollback", second, "--exclude", "broken", "--to", "previous", "--batch", "3")
    assert run.returncode == 0, run.stdout + run.stderr
    for name, host in six.items():
        assert current(host) == earlier[name], name
        assert ctx(host) == "2048", name
        assert chat(host, name)["choices"], name
        assert audit(host)[-1]["action"] == "rollback"
    # what the hosts run now is drift against the declared state, said as such
    drift = gpufleet("drift", second, "--exclude", "broken")
    assert drift.returncode == 2
    releases = gpufleet("releases", "inventory/sandbox.py", "--limit", "sandbox-spark")
    assert f"* {earlier['sandbox-spark']}" in releases.stdout
