"""What bench loads comes from the run's report (host data), never typed by hand."""

from __future__ import annotations

from deploys._report import _service
from gpufleet.bench import run as bench_run
from gpufleet.bench.client import LoadSettings
from gpufleet.bench.run import bench_target, direct_refusal, read_secret, targets_from
from gpufleet.core.wire import HostReport, RunReport, SshRecord
from gpufleet.fleet.runner import Run
from tests.fleet.test_wire import _planned
from tests.support.plans import config_for

SSH = {"hostname": "10.0.0.7", "port": 2221, "user": "ops", "key": "~/.ssh/id", "known_hosts": None,
       "sudo": True}  # fmt: skip


def _entry(config, *, refusal=None, secrets=None) -> HostReport:
    planned = _planned(config.group, config.host)
    return planned.model_copy(update={
        "refusal": refusal,
        "ssh": SshRecord(**SSH),
        "jetson": config.gpu.min_l4t is not None,
        "unified_memory": config.gpu.unified_memory,
        "settings": {n: s.model_dump(mode="json") for n, s in config.enabled_services.items()},
        "services": {n: _service(s) for n, s in config.enabled_services.items()},
        "secret_sources": secrets or {},
        "release_id": "r-1",
    })  # fmt: skip


def _run(**hosts) -> Run:
    return Run(rc=0, report=RunReport(hosts=hosts, order=tuple(sorted(hosts))))


def _spark(**patch):
    base = {"services.vllm.enabled": True, "services.ollama.enabled": True,
            "services.ollama.models": ["llama3.2:3b", "qwen3:8b"]}  # fmt: skip
    return config_for(
        "spark",
        patch=base | patch,
        secrets={"HF_TOKEN": "env:HF_TOKEN", "VLLM_KEY": "env:VLLM_KEY"},
    )


def test_every_serving_service_with_the_model_it_is_asked_for():
    config = _spark(
        **{"services.vllm.api_key_secret": "VLLM_KEY", "services.ollama.bind": "10.1.2.3"}
    )
    run = _run(**{"spark-01": _entry(config, secrets={"VLLM_KEY": "env:VLLM_KEY"})})
    targets = {t.target.service: t for t in targets_from(run)}
    assert sorted(targets) == ["llama", "ollama", "vllm"]
    assert targets["vllm"].model_name == config.services["vllm"].model_id
    assert targets["vllm"].key_source == "env:VLLM_KEY"
    assert targets["vllm"].metrics_path == "/metrics"
    assert targets["ollama"].model_name == "llama3.2:3b"  # the first model, as the gate chats
    assert targets["ollama"].target.model == "llama3.2:3b"
    assert targets["ollama"].address == "10.1.2.3"
    assert targets["llama"].address == "127.0.0.1"  # published on 0.0.0.0: reached as localhost
    assert targets["llama"].key_source is None
    assert targets["llama"].ssh.port == 2221 and targets["llama"].release == "r-1"


def test_service_filter_refused_hosts_and_an_ollama_with_nothing_pulled():
    config = _spark(**{"services.ollama.models": []})
    refused = config_for("rtx5090")
    run = _run(**{"spark-01": _entry(config), "rtx-01": _entry(refused, refusal="driver 550")})
    assert [t.target.service for t in targets_from(run)] == ["llama", "vllm"]
    assert [t.target.service for t in targets_from(run, service="vllm")] == ["vllm"]
    assert [t.target.service for t in targets_from(run, service="llama-server")] == ["llama"]


def test_a_secret_is_read_on_the_control_machine_and_never_shown(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_KEY", "s3cret")
    key = read_secret("env:BENCH_KEY")
    assert key.get_secret_value() == "s3cret" and "s3cret" not in repr(key)
    (tmp_path / "k").write_text("from-file\n")
    assert read_secret(f"file:{tmp_path / 'k'}").get_secret_value() == "from-file"
    monkeypatch.delenv("BENCH_KEY")
    try:
        read_secret("env:BENCH_KEY")
    except ValueError as exc:
        assert "env:BENCH_KEY" in str(exc)
    else:
        raise AssertionError("an unset key must be refused")


def _targets(**patch) -> dict:
    config = _spark(**patch)
    run = _run(**{"spark-01": _entry(config)})
    return {t.target.service: t for t in targets_from(run)}


def test_direct_is_refused_for_a_service_published_on_loopback_only(monkeypatch):
    targets = _targets(**{"services.llama.bind": "127.0.0.1", "services.vllm.bind": "::1"})
    for name in ("llama", "vllm"):
        why = direct_refusal(targets[name])
        assert why and why.startswith(f"spark-01/{name} is published on ")
        assert "bench it without --direct" in why

    def never(*args, **kwargs):
        raise AssertionError("nothing may be sent to a target --direct cannot reach")

    monkeypatch.setattr(bench_run, "Sampler", never)
    monkeypatch.setattr(bench_run.asyncio, "run", never)
    result = bench_target(
        targets["llama"], settings=LoadSettings(), levels=[1], prompts=[], direct=True
    )
    assert result.error == direct_refusal(targets["llama"])


def test_direct_is_allowed_for_a_service_published_on_the_network():
    targets = _targets(**{"services.ollama.bind": "10.1.2.3"})
    assert targets["llama"].bind == "0.0.0.0"
    assert direct_refusal(targets["llama"]) is None
    assert direct_refusal(targets["ollama"]) is None
