"""A real Prometheus scraping the sandbox fleet through the targets `gpufleet monitor` wrote:
every target up with gpufleet's labels, llama.cpp and vLLM series labelled with host, group,
model and release, and a stopped service seen down within two scrape intervals.

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

from tests.conftest import IN_CI
from tests.sandbox.conftest import ROOT, pyinfra

pytestmark = pytest.mark.sandbox

GPUFLEET = str(Path(sys.executable).with_name("gpufleet"))
INVENTORY = "inventory/sandbox.py"


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
    assert pyinfra("--exclude", "broken").rc == 0
    status = subprocess.run(
        [GPUFLEET, "status", INVENTORY, "--exclude", "broken", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (tmp / "status.json").write_text(status.stdout)
    run = subprocess.run(
        [
            GPUFLEET,
            "monitor",
            INVENTORY,
            "--exclude",
            "broken",
            "--out",
            str(tmp / "out"),
            "--report",
            str(tmp / "status.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
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
        yield base, groups, json.loads(status.stdout)
    finally:
        server.terminate()
        server.wait(timeout=30)
        for proc in forwards:
            proc.terminate()
            proc.wait(timeout=10)
        log.close()


def test_every_target_is_up_with_gpufleets_labels(monitored):
    base, groups, status = monitored
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
    base, _, _ = monitored
    for query in ("llamacpp:prompt_tokens_total", "vllm:num_requests_running"):
        result = _query(base, query)
        assert result, query
        for r in result:
            assert {"host", "group", "model", "release"} <= set(r["metric"]), r


def test_a_stopped_service_is_down_within_two_scrape_intervals(monitored, hosts):
    base, _, _ = monitored
    host = hosts["sandbox-rtx5090"]
    host.run("docker compose -p gpufleet-rtx5090 stop llama")
    try:
        time.sleep(5)  # two 2s scrape intervals and a margin
        down = _query(base, 'up{host="sandbox-rtx5090",service="llama"}')
        assert down and down[0]["value"][1] == "0"
    finally:
        assert pyinfra("--limit", "sandbox-rtx5090").rc == 0
