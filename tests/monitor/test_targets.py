"""Scrape targets from the inventory, read without connecting; keys stay in their files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from gpufleet.core.schema import ConfigError
from gpufleet.monitor import bundle, fleet, targets
from tests.support.plans import ROOT, group_data

KEY = "sk-" + "9" * 24


def inventory(tmp_path: Path, hosts: str) -> str:
    # a new name each time: pyinfra keeps each inventory file's code by its path
    path = tmp_path / f"hosts{len(list(tmp_path.glob('hosts*.py')))}.py"
    path.write_text(hosts)
    return str(path)


def keyed_fleet(tmp_path: Path) -> str:
    (tmp_path / "key").write_text(KEY + "\n")
    services = group_data("spark")["services"]
    services["llama"]["api_key_secret"] = "LLAMA_API_KEY"
    services["vllm"] |= {"enabled": True, "bind": "127.0.0.1", "model": "gpt-oss-20b"}
    services["ollama"] |= {"enabled": True, "port": 11435}
    spark = {
        "ssh_hostname": "10.0.0.7",
        "services": services,
        "secrets": {"HF_TOKEN": "env:HF_TOKEN", "LLAMA_API_KEY": f"file:{tmp_path / 'key'}"},
    }
    orin = {"monitor_address": "orin-01.mgmt", "monitor_node_exporter": True}
    return inventory(
        tmp_path,
        f"spark = [('spark-01', {spark!r})]\n"
        "rtx5090 = [('ws-01', {'monitor_node_exporter': True, 'monitor_dcgm_exporter': True})]\n"
        f"jetson = [('orin-01', {orin!r})]\n",
    )


def load(path: str, **kw) -> list[fleet.FleetHost]:
    return fleet.load(path, cwd=str(ROOT), **kw)


def by_target(groups: list[dict]) -> dict[str, dict]:
    return {g["targets"][0]: g["labels"] for g in groups}


def test_one_target_per_scrapeable_service_with_its_labels(tmp_path):
    groups, skipped = targets.targets(load(keyed_fleet(tmp_path)))
    found = by_target(groups)
    assert found["10.0.0.7:8000"] == {
        "host": "spark-01",
        "group": "spark",
        "service": "llama",
        "kind": "llama-server",
        "model": "gpt-oss-20b",
        "gpu": "sm_121",
        "__metrics_path__": "/metrics",
        "__gpufleet_auth": "LLAMA_API_KEY",
    }
    assert found["ws-01:8000"]["gpu"] == "sm_120"
    assert found["ws-01:9100"]["exporter"] == "node"
    assert found["ws-01:9100"]["memory"] == "dedicated"
    assert found["ws-01:9400"] == {
        "host": "ws-01",
        "group": "rtx5090",
        "exporter": "dcgm",
        "__gpufleet_auth": "",
    }
    assert found["orin-01.mgmt:11434"]["kind"] == "llama-server"
    assert found["orin-01.mgmt:9100"]["memory"] == "unified"
    # the textfile's own labels (service, kind, release) are never a node target's
    assert not {"service", "kind", "release"} & set(found["ws-01:9100"])
    assert {(s.host, s.service) for s in skipped} == {("spark-01", "vllm"), ("spark-01", "ollama")}


def test_release_and_gpu_labels_come_from_a_status_report(tmp_path):
    report = tmp_path / "status.json"
    report.write_text(
        json.dumps(
            {
                "schema": "gpufleet.status/1",
                "hosts": [
                    {
                        "host": "spark-01",
                        "release": {"current": "3f9c2a1b7d0e"},
                        "gpus": [{"name": "NVIDIA GB10"}],
                    },
                ],
            }
        )
    )
    hosts = load(keyed_fleet(tmp_path))
    found = by_target(targets.targets(hosts, fleet.releases_from_report(str(report)))[0])
    assert found["10.0.0.7:8000"]["release"] == "3f9c2a1b7d0e"
    assert found["10.0.0.7:8000"]["gpu"] == "NVIDIA GB10"
    # the twin: without a report, no release label (not an empty one)
    assert "release" not in by_target(targets.targets(hosts)[0])["10.0.0.7:8000"]


def test_a_report_that_is_not_gpufleets_is_a_usage_error(tmp_path):
    (tmp_path / "r.json").write_text('{"schema": "other/1"}')
    with pytest.raises(fleet.UsageError, match="not a gpufleet.status/1"):
        fleet.releases_from_report(str(tmp_path / "r.json"))


def test_limit_and_exclude_select_hosts_like_pyinfra(tmp_path):
    path = keyed_fleet(tmp_path)
    assert [h.config.host for h in load(path, limit=("spark",))] == ["spark-01"]
    assert sorted(h.config.host for h in load(path, exclude=("spark,orin-01",))) == ["ws-01"]


def test_invalid_host_data_names_group_host_and_key(tmp_path):
    path = inventory(tmp_path, "spark = [('spark-01', {'monitor_dcgm_exporter': True})]\n")
    with pytest.raises(ConfigError, match=r"spark/spark-01/monitor_dcgm_exporter: dcgm-exporter"):
        load(path)
    path = inventory(tmp_path, "rtx5090 = [('ws-01', {'monitor_textfile_pth': '/x.prom'})]\n")
    with pytest.raises(ConfigError, match="did you mean monitor_textfile_path"):
        load(path)
    path = inventory(tmp_path, "rtx5090 = [('ws-01', {'monitor_textfile_path': '/x.txt'})]\n")
    with pytest.raises(ConfigError, match=r"monitor/textfile_path: '/x.txt' must be a file named"):
        load(path)


def test_an_exporter_port_taken_by_a_service_is_refused(tmp_path):
    data = {"monitor_node_exporter": True, "monitor_node_exporter_port": 8000}
    path = inventory(tmp_path, f"rtx5090 = [('ws-01', {data!r})]\n")
    with pytest.raises(ConfigError, match="monitor_node_exporter_port: 8000 is already used by"):
        load(path)


def test_keyed_jobs_read_the_key_from_a_file_and_no_output_holds_it(tmp_path):
    hosts = load(keyed_fleet(tmp_path))
    out = bundle.write(tmp_path / "mon", hosts)
    for path in out.files:
        assert KEY not in path.read_text(), path
    config = yaml.safe_load((tmp_path / "mon/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    keyed = jobs["gpufleet-llama_api_key"]
    assert keyed["authorization"] == {"credentials_file": "/run/secrets/LLAMA_API_KEY"}
    assert keyed["relabel_configs"][0]["regex"] == "LLAMA_API_KEY"
    assert "authorization" not in jobs["gpufleet"]
    compose = yaml.safe_load((tmp_path / "mon/compose.yaml").read_text())
    assert compose["secrets"] == {"LLAMA_API_KEY": {"file": str(tmp_path / "key")}}
    assert compose["services"]["prometheus"]["secrets"] == ["LLAMA_API_KEY"]
    assert compose["services"]["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]


def test_one_secret_with_two_sources_is_refused(tmp_path):
    (tmp_path / "a").write_text("x")
    services = group_data("rtx5090")["services"]
    services["llama"]["api_key_secret"] = "K"
    one = {"services": services, "secrets": {"K": f"file:{tmp_path / 'a'}"}}
    two = {"services": services, "secrets": {"K": "env:K"}}
    path = inventory(tmp_path, f"rtx5090 = [('a', {one!r}), ('b', {two!r})]\n")
    with pytest.raises(ValueError, match="one scrape job reads one file"):
        targets.credential_sources(load(path))


def test_the_cli_writes_file_sd_and_static(tmp_path):
    path = keyed_fleet(tmp_path)
    cli = [str(Path(__import__("sys").executable)), "-c", "from gpufleet.cli import main; main()"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [*cli, "targets", path, "--out", str(tmp_path / "sd.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "spark-01 ollama: not a target: Ollama serves no /metrics" in run.stderr
    assert len(json.loads((tmp_path / "sd.json").read_text())) == 6
    run = subprocess.run(
        [*cli, "targets", path, "--format", "static"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    jobs = yaml.safe_load(run.stdout)["scrape_configs"]
    assert [j["job_name"] for j in jobs] == ["gpufleet", "gpufleet-llama_api_key"]
    assert KEY not in run.stdout + run.stderr
    run = subprocess.run(
        [*cli, "targets", str(tmp_path / "none.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 64
