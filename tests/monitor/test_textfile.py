"""The host metrics textfile: parsed back with prometheus_client's own parser."""

from __future__ import annotations

import copy
import re

from prometheus_client.parser import text_string_to_metric_families

from gpufleet.core.snapshot import Snapshot
from gpufleet.monitor import textfile
from gpufleet.plan.host import plan_host
from gpufleet.plan.models import cached_files
from gpufleet.plan.types import PlanOptions
from tests.support.plans import config_for, control_for, converged, set_path

NOW = 1_790_000_000
TEGRA = (
    "RAM 2113/7620MB (lfb 1x512kB) SWAP 0/3810MB CPU [1%@729,2%@729] "
    "GR3D_FREQ 45%@[305] VDD_GPU_SOC 1234mW/1234mW"
)


def host(group: str = "spark", *, snapshot: dict | None = None, **overrides):
    config = config_for(group, **overrides)
    control = control_for(config)
    data = converged(config, control)
    for path, value in (snapshot or {}).items():
        set_path(data, path, value)
    snap = Snapshot.model_validate(data)
    return config, plan_host(config, snap, control, PlanOptions()), snap


def samples(text: str) -> dict[tuple, float]:
    """{(name, sorted labels): value} for every sample of the textfile."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def test_a_converged_host_is_in_sync_healthy_and_verified():
    config, plan, snap = host()
    assert plan.in_sync
    text = textfile.render(config, plan, snap, converged_at=NOW, applied=False)
    release = plan.release
    info = dict(
        release=release.id, version="0.1.0", driver="580.95.05", toolkit="1.18.0-1", cuda="13.0"
    )
    assert value(text, "gpufleet_release_info", **info) == 1
    assert value(text, "gpufleet_last_converge_timestamp_seconds") == NOW
    assert value(text, "gpufleet_drift_changes") == 0
    assert value(text, "gpufleet_service_healthy", service="llama", kind="llama-server") == 1
    model = {"model": "gpt-oss-20b", "file": "gpt-oss-20b-Q4_K_M.gguf"}
    assert value(text, "gpufleet_model_verified", **model) == 1


def test_a_stopped_service_is_drift_and_unhealthy_as_found_and_healthy_once_applied():
    config, plan, snap = host(
        "rtx5090",
        snapshot={
            "compose.containers.llama.state": "exited",
            "health.llama.status": None,
            "health.llama.error": "refused",
        },
    )
    assert plan.recreated == ("llama",)
    found = textfile.render(config, plan, snap, converged_at=NOW, applied=False)
    assert value(found, "gpufleet_drift_changes") == len(plan.changes) > 0
    assert value(found, "gpufleet_service_healthy", service="llama", kind="llama-server") == 0
    left = textfile.render(config, plan, snap, converged_at=NOW, applied=True)
    assert value(left, "gpufleet_drift_changes") == 0
    assert value(left, "gpufleet_service_healthy", service="llama", kind="llama-server") == 1


def test_a_model_file_never_verified_is_0_until_fetched():
    config, plan, snap = host()
    path = cached_files(config, control_for(config))["gpt-oss-20b"][0].blob
    data = snap.model_dump(mode="json")
    data["models"]["files"][path]["stamp"] = None
    snap = Snapshot.model_validate(data)
    plan = plan_host(config, snap, control_for(config), PlanOptions())
    assert path in plan.fetches
    model = {"model": "gpt-oss-20b", "file": "gpt-oss-20b-Q4_K_M.gguf"}
    found = textfile.render(config, plan, snap, converged_at=NOW, applied=False)
    assert value(found, "gpufleet_model_verified", **model) == 0
    left = textfile.render(config, plan, snap, converged_at=NOW, applied=True)
    assert value(left, "gpufleet_model_verified", **model) == 1


def test_the_same_host_renders_the_same_bytes():
    config, plan, snap = host()
    before = textfile.render(config, plan, snap, converged_at=NOW, applied=True)
    assert textfile.render(config, plan, snap, converged_at=NOW, applied=True) == before


def test_jetson_gpu_figures_come_from_tegrastats():
    config, plan, snap = host("jetson", snapshot={"gpu_now": [f"@TEGRA 100.0 {TEGRA}"]})
    text = textfile.render(config, plan, snap, converged_at=NOW, applied=True)
    assert value(text, "gpufleet_gpu_utilization_percent", gpu="0", source="tegrastats") == 45
    used = value(text, "gpufleet_gpu_memory_used_bytes", gpu="0", source="tegrastats")
    assert used == 2113 * 2**20


def test_gb10_memory_comes_from_meminfo():
    lines = ["@SMI 100.0 0, 3, [N/A], [N/A], 4.5", "@MEM 100.0 131072000 65536000"]
    config, plan, snap = host("spark", snapshot={"gpu_now": lines})
    text = textfile.render(config, plan, snap, converged_at=NOW, applied=True)
    assert value(text, "gpufleet_gpu_memory_used_bytes", gpu="0", source="meminfo") == (
        65536000 * 1024
    )
    assert value(text, "gpufleet_gpu_utilization_percent", gpu="0", source="nvidia-smi") == 3


def test_no_gpu_figures_where_dcgm_exporter_runs():
    lines = ["@SMI 100.0 0, 45, 1024, 32607, 250.12"]
    on = {"monitor_dcgm_exporter": True}
    config, plan, snap = host("rtx5090", snapshot={"gpu_now": lines}, **on)
    text = textfile.render(config, plan, snap, converged_at=NOW, applied=True)
    assert not [name for name, _ in samples(text) if name.startswith("gpufleet_gpu_")]
    # the twin: without the exporter the same sample is in the file
    config, plan, snap = host("rtx5090", snapshot={"gpu_now": lines})
    text = textfile.render(config, plan, snap, converged_at=NOW, applied=True)
    assert value(text, "gpufleet_gpu_utilization_percent", gpu="0", source="nvidia-smi") == 45


def test_no_metric_or_label_carries_a_secret(tmp_path, monkeypatch):
    key, token = "sk-" + "k" * 20, "hf_" + "t" * 20
    (tmp_path / "key").write_text(key)
    monkeypatch.setenv("HF_TOKEN", token)
    secrets = {"HF_TOKEN": "env:HF_TOKEN", "LLAMA_API_KEY": f"file:{tmp_path / 'key'}"}
    config, plan, snap = host(
        secrets=secrets, services=_keyed(config_for("spark").model_dump()["services"])
    )
    text = textfile.render(config, plan, snap, converged_at=NOW, applied=False)
    assert key not in text and token not in text
    for name, labels in samples(text):
        assert not re.search(r"key|token|secret|password", name, re.I)
        for label, val in labels:
            assert not re.search(r"key|token|secret|password", label, re.I)
            assert val not in (key, token)


def _keyed(services: dict) -> dict:
    services = copy.deepcopy(services)
    services["llama"]["api_key_secret"] = "LLAMA_API_KEY"
    return {name: {k: v for k, v in s.items() if v is not None} for name, s in services.items()}


def test_the_last_converge_time_reads_back_from_a_textfile_or_its_one_line():
    config, plan, snap = host()
    text = textfile.render(config, plan, snap, converged_at=NOW, applied=True)
    assert textfile.converged_at_of(text.splitlines()) == NOW
    assert textfile.converged_at_of([f"{textfile.TIMESTAMP} 1.79e+09"]) == 1.79e09
    assert textfile.converged_at_of([]) is None
    assert textfile.converged_at_of(["not { a metric"]) is None


def test_the_snapshot_of_a_status_reads_the_textfiles_converge_time():
    import subprocess

    from facts._sections import MARKER, split_sections
    from facts.snapshot import HostSnapshot

    fact = HostSnapshot()
    # only the status asks: the converge's read is unchanged
    assert "grep -m1" not in str(fact.command("/m"))
    command = str(fact.command("/m", textfile="/tmp/x y.prom"))
    assert f"grep -m1 '^{textfile.TIMESTAMP} ' '/tmp/x y.prom'" in command
    sections = split_sections([f"{MARKER}metrics.textfile", f"{textfile.TIMESTAMP} 1.7e+09"])
    assert textfile.converged_at_of(sections["metrics.textfile"].lines) == 1.7e09
    assert subprocess.run(["sh", "-n", "-c", command], check=False).returncode == 0


def test_a_status_that_finds_a_service_down_rewrites_the_textfile_as_found(monkeypatch):
    from deploys import metrics

    written = {}
    monkeypatch.setattr(metrics, "_dry", lambda: True)
    monkeypatch.setattr(metrics, "run_options", lambda: type("O", (), {"status": True})())
    monkeypatch.setattr(metrics, "write_now", lambda s, h, path, body: written.update({path: body}))
    down = {"health.llama.status": None, "health.llama.error": "refused",
            "compose.containers.llama.state": "exited"}  # fmt: skip
    config, plan, snap = host(snapshot=down)
    snap = snap.model_copy(update={"metrics_converged_at": NOW - 60})
    metrics.host_metrics._inner(config, plan, snap)
    body = written[config.monitor.textfile_path]
    assert value(body, "gpufleet_service_healthy", service="llama", kind="llama-server") == 0
    assert value(body, "gpufleet_drift_changes") == len(plan.changes) > 0
    assert value(body, textfile.TIMESTAMP) == NOW - 60  # the last converge's, kept
    # its twins: a host in sync, or one with no textfile yet, is left as it is
    written.clear()
    config, plan, snap = host()
    metrics.host_metrics._inner(config, plan, snap.model_copy(update={"metrics_converged_at": 1}))
    config, plan, snap = host(snapshot=down)
    metrics.host_metrics._inner(config, plan, snap)
    assert written == {}
