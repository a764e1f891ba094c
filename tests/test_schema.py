"""Host data validation: the real group data parses, and bad input names group/host/field."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from gpufleet.schema import ConfigError, parse, resolve_secrets

GROUP_DATA = Path(__file__).parent.parent / "group_data"


def group_data(group: str, **overrides) -> dict:
    """Host data as pyinfra merges it: all.py, then the group's file, then host overrides."""
    data: dict = {}
    for name in ("all", group):
        values = runpy.run_path(str(GROUP_DATA / f"{name}.py"))
        data.update({k: v for k, v in values.items() if not k.startswith("_")})
    data.update(overrides)
    return data


@pytest.mark.parametrize("group", ["spark", "rtx5090", "jetson"])
def test_shipped_group_data_is_valid(group):
    config = parse(f"{group}-01", group, group_data(group))
    assert config.group == group
    assert config.toolkit.version == "1.18.0-1"


def test_group_minimums():
    assert parse("s", "spark", group_data("spark")).gpu.min_cuda == "13.0"
    assert parse("r", "rtx5090", group_data("rtx5090")).gpu.min_cuda == "12.8"
    jetson = parse("j", "jetson", group_data("jetson"))
    assert jetson.gpu.min_l4t == "36.0" and jetson.toolkit.set_default_runtime


def test_misspelt_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as exc:
        parse("spark-01", "spark", group_data("spark", toolkit_verison="1.18.0-1"))
    assert str(exc.value) == (
        "spark/spark-01/toolkit_verison: unknown setting (did you mean toolkit_version?)"
    )


def test_partial_toolkit_version_is_refused():
    with pytest.raises(ConfigError) as exc:
        parse("ws-1", "rtx5090", group_data("rtx5090", toolkit_version="1.18"))
    assert "rtx5090/ws-1/toolkit/version: '1.18' is not a full package version" in str(exc.value)


def test_minimum_that_is_not_a_version():
    with pytest.raises(ConfigError) as exc:
        parse("spark-01", "spark", group_data("spark", gpu_min_cuda="thirteen"))
    message = str(exc.value)
    assert message.startswith("spark/spark-01/gpu/min_cuda:")
    assert "is not a version" in message


def test_conflicting_driver_and_cuda_minimums():
    with pytest.raises(ConfigError) as exc:
        parse("spark-01", "spark", group_data("spark", gpu_min_driver="550"))
    assert str(exc.value).startswith("spark/spark-01/gpu")
    assert "580.65.06" in str(exc.value)


def test_several_errors_are_reported_together():
    with pytest.raises(ConfigError) as exc:
        parse("j", "jetson", group_data("jetson", layout_models_mode="rwx", probe_imgae="x"))
    lines = str(exc.value).splitlines()
    assert len(lines) == 2
    assert any(line.startswith("jetson/j/layout/models_mode:") for line in lines)
    assert any(line.startswith("jetson/j/probe_imgae: unknown setting") for line in lines)


def test_missing_secret_names_its_source_not_a_value(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    config = parse("spark-01", "spark", group_data("spark"))
    with pytest.raises(ConfigError) as exc:
        resolve_secrets(config)
    assert str(exc.value) == (
        "spark/spark-01/secrets/HF_TOKEN: not set (environment variable HF_TOKEN is empty or "
        "missing)"
    )


def test_secret_from_file_and_env(monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("hf_file_value\n")
    monkeypatch.setenv("API_KEY", "from-env")
    config = parse(
        "s",
        "spark",
        group_data("spark", secrets={"HF_TOKEN": f"file:{token}", "API_KEY": "env:API_KEY"}),
    )
    assert resolve_secrets(config) == {"HF_TOKEN": "hf_file_value", "API_KEY": "from-env"}


def test_secret_source_must_be_env_or_file():
    with pytest.raises(ConfigError, match="must be"):
        parse("s", "spark", group_data("spark", secrets={"HF_TOKEN": "hf_plaintext_in_git"}))


def test_port_conflict_names_group_host_and_field():
    data = group_data("spark")
    services = {**data["services"], "vllm": {**data["services"]["vllm"], "enabled": True,
                                             "port": 8000}}  # fmt: skip
    with pytest.raises(ConfigError) as exc:
        parse("spark-01", "spark", {**data, "services": services})
    assert str(exc.value) == "spark/spark-01/services/vllm/port: 8000 is already used by llama"


def test_served_models_and_build_archs():
    config = parse("spark-01", "spark", group_data("spark"))
    assert list(config.served_models()) == ["gpt-oss-20b"]
    assert config.cuda_archs() == ("121",)
    assert parse("j", "jetson", group_data("jetson")).cuda_archs() == ()


def test_undeclared_model_is_refused():
    data = group_data("jetson")
    services = {"llama": {**data["services"]["llama"], "model": "llama-70b"}}
    with pytest.raises(ConfigError, match=r"^jetson/j/services/llama/model: 'llama-70b' is not"):
        parse("j", "jetson", {**data, "services": services})


def _with_ollama(models, **service) -> dict:
    data = group_data("spark")
    ollama = {**data["services"]["ollama"], "enabled": True, "models": models, **service}
    return {**data, "services": {**data["services"], "ollama": ollama}}


def test_ollama_models_are_checked_and_the_first_is_the_chat_model():
    config = parse("s", "spark", _with_ollama(["llama3.2:3b", "reg.example/team/m:q4"]))
    ollama = config.services["ollama"]
    assert ollama.chats and ollama.chat_model == "llama3.2:3b"
    assert not parse("s", "spark", _with_ollama([])).services["ollama"].chats


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (["Llama 3"], "is not an Ollama model name"),
        (["llama3.2:3b", "llama3.2:3b"], "a model is listed twice"),
    ],
)
def test_bad_ollama_models_are_refused_by_field(models, message):
    with pytest.raises(ConfigError) as exc:
        parse("s", "spark", _with_ollama(models))
    assert str(exc.value).startswith("spark/s/services/ollama/models")
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("bind", "probe"),
    [("0.0.0.0", "127.0.0.1"), ("127.0.0.1", "127.0.0.1"), ("10.0.0.5", "10.0.0.5")],
)
def test_bind_decides_where_the_host_probes(bind, probe):
    assert (
        parse("s", "spark", _with_ollama([], bind=bind)).services["ollama"].probe_address == probe
    )


def test_a_bind_that_is_not_an_address_is_refused():
    with pytest.raises(ConfigError, match="services/ollama/bind: .*not an IP address"):
        parse("s", "spark", _with_ollama([], bind="localhost"))


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("llama3.2", "registry.ollama.ai/library/llama3.2/latest"),
        ("llama3.2:3b", "registry.ollama.ai/library/llama3.2/3b"),
        ("team/m:q4", "registry.ollama.ai/team/m/q4"),
        ("reg.example/team/m:q4", "reg.example/team/m/q4"),
    ],
)
def test_ollama_manifest_paths(name, path):
    from gpufleet import known

    assert known.ollama_manifest("/srv/ollama", name) == f"/srv/ollama/models/manifests/{path}"


def test_download_retry_settings_are_bounded():
    config = parse("ws-1", "rtx5090", group_data("rtx5090", models_download_attempts=2,
                                                 models_stall_seconds=30))  # fmt: skip
    assert (config.models_download_attempts, config.models_stall_seconds) == (2, 30)
    assert parse("ws-1", "rtx5090", group_data("rtx5090")).models_download_attempts == 4
    with pytest.raises(ConfigError) as exc:
        parse("ws-1", "rtx5090", group_data("rtx5090", models_stall_seconds=0))
    assert str(exc.value).startswith("rtx5090/ws-1/models_stall_seconds:")
