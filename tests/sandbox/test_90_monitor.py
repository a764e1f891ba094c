"""A real Prometheus scraping the sandbox fleet through the targets `gpufleet monitor` wrote:
every target up with gpufleet's labels, llama.cpp and vLLM series labelled with host, group,
model and release, a stopped service seen down within two scrape intervals and unhealthy in
gpufleet's textfile after the next `gpufleet status`, and a group on two releases while a
rollout has reached only part of it.

The fleet here is the demo's three hosts plus two light rtx5090 hosts (declared alike),
each running the distribution's prometheus-node-exporter (``monitor_node_exporter``, installed by
the converge from Debian's archive), whose textfile collector serves gpufleet's textfile.

Sandbox hosts publish service ports inside their own containers only; the test reaches each
target through an SSH forward over the sandbox's pinned config (as `gpufleet bench` does),
rewriting only the file_sd addresses, never the labels.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from gpufleet.sandbox import fleet
from tests.conftest import IN_CI
from tests.sandbox.conftest import ROOT
from tests.support.inventories import variant

pytestmark = pytest.mark.sandbox

GPUFLEET = str(Path(sys.executable).with_name("gpufleet"))
GROUPS = ("spark", "rtx5090", "jetson")
MONITORED = {g: {"monitor_node_exporter": True} for g in GROUPS}


def gpufleet(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GPUFLEET, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def _wait_for(base: str, query: str, want: str, seconds: float = 30) -> list[dict]:
    """The query's result once its first value is ``want`` (asked every second)."""
    deadline = time.monotonic() + seconds
    result: list[dict] = []
    while time.monotonic() < deadline:
        result = _query(base, query)
        if result and result[0]["value"][1] == want:
            return result
        time.sleep(1)
    raise AssertionError(f"{query}: {result} after {seconds}s, wanted {want}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(base: str, query: str) -> list[dict]:
    answer = requests.get(f"{base}/api/v1/query", params={"query": query}, timeout=5)
    answer.raise_for_status()
    return answer.json()["data"]["result"]


@pytest.fixture(scope="module")
def monitored(sandbox, tmp_path_factory):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        if IN_CI:
            pytest.fail("prometheus not installed (apt-get install prometheus)")
        pytest.skip("prometheus not installed")
    tmp = tmp_path_factory.mktemp("monitor")
    fleet.up(extras={"rtx5090": 2})
    try:
        yield from _monitored(tmp, sandbox, prometheus)
    finally:
        fleet.up(extras={})
        assert gpufleet("converge", "inventory/sandbox.py", "--exclude", "broken").returncode == 0


def _monitored(tmp, sandbox, prometheus: str):
    """The fleet converged with node_exporter, Prometheus started on its targets; stopped after."""
    inventory = variant(tmp / "monitored.py", MONITORED)
    converged = gpufleet("converge", inventory, "--exclude", "broken")
    assert converged.returncode == 0, converged.stderr[-3000:]
    status = gpufleet("status", inventory, "--exclude", "broken", "--json", timeout=600)
    (tmp / "status.json").write_text(status.stdout)
    out, report = str(tmp / "out"), str(tmp / "status.json")
    run = gpufleet("monitor", inventory, "--exclude", "broken", "--out", out, "--report", report)
    assert run.returncode == 0, run.stderr
    sd = tmp / "out/prometheus/targets/gpufleet.json"
    groups = json.loads(sd.read_text())
    forwards = []
    for group in groups:
        port = int(group["targets"][0].rsplit(":", 1)[1])
        local = _free_port()
        forwards.append(
            subprocess.Popen(
                [
                    "ssh",
                    "-F",
                    sandbox["ssh"]["config"],
                    "-N",
                    "-o",
                    "ExitOnForwardFailure=yes",
                    "-L",
                    f"127.0.0.1:{local}:127.0.0.1:{port}",
                    group["labels"]["host"],
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        group["targets"] = [f"127.0.0.1:{local}"]
    sd.write_text(json.dumps(groups))
    config_path = tmp / "out/prometheus/prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    config["global"] |= {"scrape_interval": "2s", "evaluation_interval": "2s"}
    for job in config["scrape_configs"]:
        job["scrape_interval"] = "2s"
    config_path.write_text(yaml.safe_dump(config))
    web = _free_port()
    log = (tmp / "prometheus.log").open("w")
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{web}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(2)
            try:
                up = _query(base, "up")
            except requests.RequestException:
                continue
            if len(up) == len(groups) and all(r["value"][1] == "1" for r in up):
                break
        yield base, groups, json.loads(status.stdout), inventory
    finally:
        server.terminate()
        server.wait(timeout=30)
        for proc in forwards:
            proc.terminate()
            proc.wait(timeout=10)
        log.close()


def test_every_target_is_up_with_gpufleets_labels(monitored):
    base, groups, status, _ = monitored
    up = _query(base, "up")
    assert len(up) == len(groups)
    assert all(r["value"][1] == "1" for r in up), up
    releases = {h["host"]: h["release"]["current"] for h in status["hosts"]}
    for r in up:
        m = r["metric"]
        if "service" in m:
            assert m["release"] == releases[m["host"]]
            assert m["model"] and m["group"] and m["kind"] in ("llama-server", "vllm")


def test_llama_and_vllm_series_carry_host_group_model_release(monitored):
    base, *_ = monitored
    for query in ("llamacpp:prompt_tokens_total", "vllm:num_requests_running"):
        result = _query(base, query)
        assert result, query
        for r in result:
            assert {"host", "group", "model", "release"} <= set(r["metric"]), r


def test_a_stopped_service_is_down_then_unhealthy_in_the_textfile_after_status(monitored, hosts):
    base, _, _, inventory = monitored
    host = hosts["sandbox-rtx5090"]
    healthy = 'gpufleet_service_healthy{host="sandbox-rtx5090",service="llama"}'
    assert _query(base, healthy)[0]["value"][1] == "1"
    host.run("docker compose -p gpufleet-rtx5090 stop llama")
    try:
        time.sleep(5)  # two 2s scrape intervals and a margin
        down = _query(base, 'up{host="sandbox-rtx5090",service="llama"}')
        assert down and down[0]["value"][1] == "0"
        status = gpufleet("status", inventory, "--limit", "sandbox-rtx5090")
        assert "sandbox-rtx5090" in status.stdout, status.stderr[-2000:]
        _wait_for(base, healthy, "0", seconds=10)
        assert _query(base, 'gpufleet_drift_changes{host="sandbox-rtx5090"}')[0]["value"][1] != "0"
    finally:
        assert gpufleet("converge", inventory, "--limit", "sandbox-rtx5090").returncode == 0
    _wait_for(base, healthy, "1", seconds=10)


def test_a_rollout_half_way_shows_two_releases_in_one_group(monitored, tmp_path):
    base, _, _, _ = monitored
    pair = ("sandbox-rtx5090-2", "sandbox-rtx5090-3")  # two hosts declared alike

    def releases() -> dict[str, str]:
        info = _query(base, 'gpufleet_release_info{group="rtx5090"}')
        return {r["metric"]["host"]: r["metric"]["release"] for r in info}

    count = 'gpufleet:group_releases:count{group="rtx5090"}'
    before = int(_query(base, count)[0]["value"][1])
    assert releases()[pair[0]] == releases()[pair[1]]
    moved = variant(tmp_path / "moved.py", {**MONITORED, "rtx5090": {
        "monitor_node_exporter": True, "services.llama.ctx_size": 3072}})  # fmt: skip
    # the rollout has reached one of the two: the group runs one release more
    run = gpufleet("rollout", moved, "--limit", pair[0])
    assert run.returncode == 0, run.stdout + run.stderr
    _wait_for(base, count, str(before + 1), seconds=15)
    assert releases()[pair[0]] != releases()[pair[1]]
    # and then the other: the pair is on one release again
    run = gpufleet("rollout", moved, "--limit", pair[1])
    assert run.returncode == 0, run.stdout + run.stderr
    _wait_for(base, count, str(before), seconds=15)
    assert releases()[pair[0]] == releases()[pair[1]]
