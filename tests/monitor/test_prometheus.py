"""The generated files, checked by the real Prometheus: promtool, and a running server.

Debian's ``prometheus`` package provides both binaries (the README's test command installs
it). Without them these tests skip, except under CI=true, where they fail.
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

from gpufleet.core.snapshot import Snapshot
from gpufleet.monitor import bundle, dashboard, fleet, rules, textfile
from gpufleet.plan.host import plan_host
from gpufleet.plan.types import PlanOptions
from tests.conftest import IN_CI
from tests.support.plans import ROOT, config_for, control_for, converged, group_data

HERE = Path(__file__).parent
KEY = "sk-" + "7" * 24


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not installed (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def fleet_dir(tmp_path):
    """A two-host fleet on loopback ports, and the bundle gpufleet monitor writes for it."""
    ports = dict(
        zip(
            ("ws_llama", "ws_node", "ws_dcgm", "sp_llama", "sp_vllm", "sp_node"),
            free_ports(6),
            strict=True,
        )
    )
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "LLAMA_API_KEY").write_text(KEY + "\n")
    ws_services = group_data("rtx5090")["services"]
    ws_services["llama"] |= {"port": ports["ws_llama"], "api_key_secret": "LLAMA_API_KEY"}
    ws = {
        "monitor_address": "127.0.0.1",
        "services": ws_services,
        "secrets": {"LLAMA_API_KEY": f"file:{tmp_path / 'secrets' / 'LLAMA_API_KEY'}"},
        "monitor_node_exporter": True,
        "monitor_node_exporter_port": ports["ws_node"],
        "monitor_dcgm_exporter": True,
        "monitor_dcgm_port": ports["ws_dcgm"],
    }
    sp_services = group_data("spark")["services"]
    sp_services["llama"]["port"] = ports["sp_llama"]
    sp_services["vllm"] |= {"enabled": True, "port": ports["sp_vllm"], "model": "gpt-oss-20b"}
    sp = {
        "monitor_address": "127.0.0.1",
        "services": sp_services,
        "monitor_node_exporter": True,
        "monitor_node_exporter_port": ports["sp_node"],
    }
    inventory = tmp_path / "hosts.py"
    inventory.write_text(f"rtx5090 = [('ws-01', {ws!r})]\nspark = [('spark-01', {sp!r})]\n")
    hosts = fleet.load(str(inventory), cwd=str(ROOT))
    out = tmp_path / "monitor"
    bundle.write(out, hosts)
    return out, ports, tmp_path


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_promtool_checks_the_config_and_its_rules(fleet_dir):
    out, _, tmp = fleet_dir
    # as written: the key's file is the container's /run/secrets/..., not here
    run = _promtool("check", "config", "--syntax-only", "prometheus.yml", cwd=out / "prometheus")
    assert run.returncode == 0, run.stdout + run.stderr
    # with the key where this machine has it, every file it names is checked too
    config = bundle.prometheus_config(["LLAMA_API_KEY"], credentials_dir=str(tmp / "secrets"))
    (out / "prometheus/local.yml").write_text(rules.dump(config))
    run = _promtool("check", "config", "local.yml", cwd=out / "prometheus")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS: 1 rule files found" in run.stdout
    run = _promtool("check", "rules", "gpufleet.rules.yml", cwd=out / "prometheus/rules")
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_fires_on_its_made_up_series(fleet_dir):
    out, _, _ = fleet_dir
    cases = yaml.safe_load((out / "prometheus/rules/gpufleet.rules.test.yml").read_text())
    tested = {t["alert_rule_test"][0]["alertname"] for t in cases["tests"]}
    assert tested == {a.name for a in rules.alerts()}
    run = _promtool("test", "rules", "gpufleet.rules.test.yml", cwd=out / "prometheus/rules")
    assert run.returncode == 0, run.stdout + run.stderr


def test_an_alert_that_cannot_fire_fails_promtool(tmp_path):
    # the test above proves something: a threshold no series reaches makes promtool fail
    strict = rules.Thresholds(memory_ratio=0.999)
    (tmp_path / "gpufleet.rules.yml").write_text(rules.dump(rules.rules_document(strict)))
    cases = rules.rule_tests("gpufleet.rules.yml", strict)
    (tmp_path / "t.yml").write_text(rules.dump(cases))
    run = _promtool("test", "rules", "t.yml", cwd=tmp_path)
    assert run.returncode != 0 and "GpufleetGpuMemoryNearFull" in run.stdout + run.stderr


def _textfile(group: str, host: str, gpu_now: list[str]) -> str:
    config = config_for(group, host)
    control = control_for(config)
    data = converged(config, control)
    data["gpu_now"] = gpu_now
    snap = Snapshot.model_validate(data)
    plan = plan_host(config, snap, control, PlanOptions())
    return textfile.render(config, plan, snap, converged_at=1_790_000_000, applied=True)


LLAMA = """# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 1200
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 1.5
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 800
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total 9.5
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
"""

NODE = """# TYPE node_memory_MemTotal_bytes gauge
node_memory_MemTotal_bytes 1.3e+11
# TYPE node_memory_MemAvailable_bytes gauge
node_memory_MemAvailable_bytes 6.5e+10
"""

DCGM = """# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",modelName="NVIDIA GeForce RTX 5090"} 37
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu="0",modelName="NVIDIA GeForce RTX 5090"} 20000
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{gpu="0",modelName="NVIDIA GeForce RTX 5090"} 12600
"""


def _vllm() -> str:
    label = 'model_name="Qwen/Qwen3-32B-FP8",engine="0"'
    lines = [
        f"vllm:num_requests_running{{{label}}} 2",
        f"vllm:num_requests_waiting{{{label}}} 0",
        f"vllm:kv_cache_usage_perc{{{label}}} 0.25",
        f"vllm:prompt_tokens_total{{{label}}} 900",
        f"vllm:generation_tokens_total{{{label}}} 400",
        f'vllm:request_success_total{{{label},finished_reason="stop"}} 9',
    ]
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"):
        lines += [
            f'{name}_bucket{{{label},le="{le}"}} {n}'
            for le, n in (("0.1", 3), ("1.0", 8), ("+Inf", 9))
        ]
        lines += [f"{name}_count{{{label}}} 9", f"{name}_sum{{{label}}} 4.2"]
    return "\n".join(lines) + "\n"


def _get(base: str, path: str, **params) -> dict:
    answer = requests.get(f"{base}{path}", params=params, timeout=5)
    answer.raise_for_status()
    return answer.json()["data"]


def test_every_dashboard_query_returns_series_from_a_real_prometheus(fleet_dir):
    out, ports, tmp = fleet_dir
    prometheus = binary("prometheus")
    bodies = {
        "ws_llama": LLAMA,
        "sp_llama": LLAMA,
        "sp_vllm": _vllm(),
        "ws_dcgm": DCGM,
        "ws_node": NODE + _textfile("rtx5090", "ws-01", []),
        "sp_node": NODE
        + _textfile(
            "spark",
            "spark-01",
            ["@SMI 100.0 0, 12, [N/A], [N/A], 9.5", "@MEM 100.0 127000000 60000000"],
        ),
    }
    spec = {}
    for name, body in bodies.items():
        (tmp / f"{name}.prom").write_text(body)
        spec[ports[name]] = {
            "body": str(tmp / f"{name}.prom"),
            "key": KEY if name == "ws_llama" else None,
        }
    (tmp / "spec.json").write_text(json.dumps(spec))
    # as gpufleet monitor writes it, scraped every second, keys read from this test's files
    config = bundle.prometheus_config(["LLAMA_API_KEY"], credentials_dir=str(tmp / "secrets"))
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    for job in config["scrape_configs"]:
        job["scrape_interval"] = "1s"
    (out / "prometheus/prometheus.yml").write_text(rules.dump(config))
    web = free_ports(1)[0]
    base = f"http://127.0.0.1:{web}"
    log = (tmp / "prometheus.log").open("w")
    exporter = subprocess.Popen(
        [sys.executable, str(HERE / "fake_exporter.py"), str(tmp / "spec.json")],
        stdout=subprocess.PIPE,
        text=True,
    )
    server = None
    try:
        assert exporter.stdout.readline().strip() == "ready"
        server = subprocess.Popen(
            [
                prometheus,
                f"--config.file={out / 'prometheus/prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        queries = [q.replace("$__rate_interval", "30s") for q in dashboard.queries()]
        empty: list[str] = queries
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                up = _get(base, "/api/v1/query", query="up")["result"]
            except requests.RequestException:
                continue
            if len(up) < 6 or any(r["value"][1] != "1" for r in up):
                continue
            empty = [q for q in queries if not _get(base, "/api/v1/query", query=q)["result"]]
            if not empty:
                break
        assert not empty, f"queries without series: {empty}; up: {up}"
        # every target up, the keyed one included, each with the labels gpufleet gave it
        by_port = {r["metric"]["instance"].rsplit(":", 1)[1]: r["metric"] for r in up}
        llama = by_port[str(ports["ws_llama"])]
        assert llama["job"] == "gpufleet-llama_api_key"
        assert (llama["host"], llama["group"], llama["service"]) == ("ws-01", "rtx5090", "llama")
        assert llama["model"] == "qwen3-vl-30b-a3b"
        vllm = _get(base, "/api/v1/query", query="vllm:num_requests_running")["result"][0]
        assert vllm["metric"]["host"] == "spark-01" and vllm["metric"]["kind"] == "vllm"
        memory = _get(base, "/api/v1/query", query=rules.GPU_MEMORY)["result"]
        assert {(m["metric"]["host"], m["metric"]["source"]) for m in memory} == {
            ("ws-01", "dcgm"),
            ("spark-01", "meminfo"),
        }
    finally:
        for proc in (server, exporter):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        log.close()


def test_every_threshold_is_filled_into_the_alerts_that_name_it():
    t = rules.Thresholds(
        down_for="7m", drift_for="8m", mixed_for="9m", memory_for="11m", unverified_for="13m"
    )
    waits = {a.name: a.wait for a in rules.alerts(t)}
    assert waits == {
        "GpufleetServiceDown": "7m",
        "GpufleetServiceUnhealthy": "7m",
        "GpufleetDrift": "8m",
        "GpufleetMixedReleases": "9m",
        "GpufleetGpuMemoryNearFull": "11m",
        "GpufleetModelUnverified": "13m",
    }
    exprs = {a.name: a.expr for a in rules.alerts(rules.Thresholds(memory_ratio=0.9))}
    assert exprs["GpufleetGpuMemoryNearFull"] == "gpufleet:gpu_memory_used:ratio > 0.9"
    assert exprs["GpufleetServiceDown"] == 'up{job=~"gpufleet.*",kind!=""} == 0'
