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
        "services": {n: _service(n, s, config) for n, s in config.enabled_services.items()},
        "secret_sources": secrets or {},
        "release_id": "r-1",
    })  # fmt: skip


def _run(**hosts) -> Run:
    return Run(rc=0, report=RunReport(hosts=hosts, order=tuple(sorted(hosts))))


def _spark(**patch):
    base = {"services.vllm.enabled": True, "services.vllm.model": "gpt-oss-20b",
            "services.ollama.enabled": True,
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
    assert targets["vllm"].model_name == config.models["gpt-oss-20b"].repo  # what vLLM names it
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


def _standin_target(url: str, kind: str = "llama-server"):
    from gpufleet.bench.remote import SshTarget
    from gpufleet.bench.report import Target
    from gpufleet.bench.run import BenchTarget

    port = int(url.rsplit(":", 1)[1])
    return BenchTarget(
        target=Target(host="standin", service="llama", kind=kind, model="m", port=port),
        address="127.0.0.1",
        model_name="m",
        metrics_path="/metrics",
        key_source=None,
        release="r-1",
        ssh=SshTarget(name="standin", hostname="127.0.0.1"),
        gpu_sources=(),
    )


def test_bench_target_builds_its_endpoint_and_measures_a_standin():
    """Everything from the target to the figures, GPU sampling aside, against a stand-in server
    in its own process, reached --direct (its address as the SSH host name)."""
    from gpufleet.bench.prompts import builtin_prompts
    from tests.bench.standin import standin_server

    with standin_server("--first-token-delay", "0.02") as url:
        t = _standin_target(url)
        run = bench_target(t, settings=LoadSettings(requests=4, warmup=1), levels=[1, 2],
                           prompts=builtin_prompts(), direct=True, sample_gpu=False)  # fmt: skip
    assert run.error is None and run.release == "r-1"
    assert [lv.concurrency for lv in run.levels] == [1, 2]
    records = [r for lv in run.levels for r in lv.records]
    assert len(records) == 8 and all(r.success for r in records)
    assert all(r.ttft_s >= 0.02 for r in records)
    assert run.levels[0].scrapes  # its metrics path was joined to the endpoint's base


def test_bench_target_makes_random_prompts_with_the_targets_tokenizer():
    from gpufleet.bench.dataset import RandomDataset
    from tests.bench.standin import standin_server

    spec = RandomDataset(input_len=30, output_len=5, count=3)
    settings = LoadSettings(requests=3, warmup=0, extra_body=spec.body)
    with standin_server("--template-tokens", "4") as url:
        run = bench_target(_standin_target(url), settings=settings, levels=[1], prompts=[],
                           direct=True, sample_gpu=False, dataset=spec)  # fmt: skip
        refused = bench_target(_standin_target(url, kind="ollama"), settings=settings,
                               levels=[1], prompts=[], direct=True, sample_gpu=False,
                               dataset=spec)  # fmt: skip
    assert {(r.prompt_tokens, r.completion_tokens) for r in run.levels[0].records} == {(30, 5)}
    assert refused.levels == [] or refused.levels == ()
    assert "ollama serves none" in refused.error
