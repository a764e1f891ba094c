"""Host data validation: the real group data parses, and bad input names group/host/field."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

from gpufleet.core.render import public_env, render_env, restore_env
from gpufleet.core.schema import ConfigError, hub_token_needs, parse, resolve_secrets

GROUP_DATA = Path(__file__).parents[2] / "group_data"


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


def test_a_misspelt_key_inside_a_table_is_named_by_its_path_once():
    with pytest.raises(ConfigError) as exc:
        parse("s", "spark", group_data("spark", monitor_dcgm_image={"reff": "x"}))
    lines = str(exc.value).splitlines()
    assert "spark/s/monitor/dcgm_image/reff: Extra inputs are not permitted" in lines
    assert len(lines) == len(set(lines)) and not any("unknown setting" in x for x in lines)


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
    monkeypatch.delenv("API_KEY", raising=False)
    config = parse("spark-01", "spark", group_data("spark", secrets={"API_KEY": "env:API_KEY"}))
    with pytest.raises(ConfigError) as exc:
        resolve_secrets(config)
    assert str(exc.value) == (
        "spark/spark-01/secrets/API_KEY: not set (environment variable API_KEY is empty or missing)"
    )


def test_hf_token_is_needed_only_for_a_gated_model_or_a_service_naming_it(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    public = parse("spark-01", "spark", group_data("spark"))  # shipped: public GGUF repos
    assert hub_token_needs(public) == [] and resolve_secrets(public) == {}
    models = group_data("spark")["models"]
    gated = {**models, "gpt-oss-20b": {**models["gpt-oss-20b"], "gated": True}}
    config = parse("spark-01", "spark", group_data("spark", models=gated))
    with pytest.raises(ConfigError) as exc:
        resolve_secrets(config)
    assert str(exc.value) == (
        "spark/spark-01/secrets/HF_TOKEN: not set (environment variable HF_TOKEN is empty or "
        "missing); needed because services/llama loads unsloth/gpt-oss-20b-GGUF, which is gated"
    )
    services = group_data("spark")["services"]
    vllm = {**services, "vllm": {**services["vllm"], "enabled": True, "model": "gpt-oss-20b"}}
    config = parse("spark-01", "spark", group_data("spark", services=vllm))
    # vLLM loads what gpufleet fetched into the cache, offline: it needs no token of its own
    assert hub_token_needs(config) == []
    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    assert resolve_secrets(config) == {"HF_TOKEN": "hf_abc"}


def test_an_env_without_the_hub_token_renders_and_restores_without_it(monkeypatch):
    config = parse("spark-01", "spark", group_data("spark"))
    env = render_env(config, {})
    assert "HF_TOKEN" not in env
    public = public_env(config)  # the release keeps the name: a later token is no new release
    assert "# secret HF_TOKEN" in public
    assert "HF_TOKEN" not in restore_env(public, {}, where="kept/.env")
    assert "HF_TOKEN='t'" in restore_env(public, {"HF_TOKEN": "t"}, where="kept/.env")


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
                                             "port": 8000, "model": "gpt-oss-20b"}}  # fmt: skip
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
    from gpufleet.core import known

    assert known.ollama_manifest("/srv/ollama", name) == f"/srv/ollama/models/manifests/{path}"


def test_download_retry_settings_are_bounded():
    config = parse("ws-1", "rtx5090", group_data("rtx5090", models_download_attempts=2,
                                                 models_stall_seconds=30))  # fmt: skip
    assert (config.models_download_attempts, config.models_stall_seconds) == (2, 30)
    assert parse("ws-1", "rtx5090", group_data("rtx5090")).models_download_attempts == 4
    with pytest.raises(ConfigError) as exc:
        parse("ws-1", "rtx5090", group_data("rtx5090", models_stall_seconds=0))
    assert str(exc.value).startswith("rtx5090/ws-1/models_stall_seconds:")


# --- what reaches a shell: refused here, before anything connects -------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    lines = str(exc.value).splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("key", "value", "path"),
    [
        ("layout_stack_dir", "/opt/gpu\nfleet", "layout/stack_dir"),
        ("env", {"MODE": "a\nEVIL=1"}, "env"),
        ("toolkit_version", "1.18.0-1\r", "toolkit/version"),
        ("probe_command", ["nvidia-smi", "-L\n"], "probe/command"),
        ("hf_endpoint", "https://hf.example/\x00", "hf_endpoint"),
        ("env", {"TAB": "a\tb"}, "env"),
    ],
)
def test_a_control_character_in_any_string_is_refused(key, value, path):
    with pytest.raises(ConfigError) as exc:
        parse("spark-01", "spark", group_data("spark", **{key: value}))
    assert _one_line(exc).startswith(f"spark/spark-01/{path}: ")


def test_control_characters_are_refused_in_nested_services():
    services = group_data("spark")["services"]
    llama = {**services["llama"], "extra_args": ["--x", "1\n2"]}
    with pytest.raises(ConfigError) as exc:
        parse("spark-01", "spark", group_data("spark", services={**services, "llama": llama}))
    assert _one_line(exc).startswith("spark/spark-01/services/llama/extra_args: '1\\n2' holds")


def test_printable_strings_with_spaces_and_unicode_still_pass():
    config = parse("spark-01", "spark", group_data("spark", env={"GREETING": "hé llo €"}))
    assert config.env["GREETING"] == "hé llo €"


BAD_PATHS = ["/opt/$(reboot)", "/opt/a;b", "/opt/a b", "/opt/`id`", "/opt/it's", "/opt/a|b"]


@pytest.mark.parametrize("path", [*BAD_PATHS, "/opt/a*", "/opt/a:b", "/opt/../etc"])
def test_shell_metacharacters_in_a_path_are_refused(path):
    with pytest.raises(ConfigError) as exc:
        parse("spark-01", "spark", group_data("spark", layout_stack_dir=path))
    assert _one_line(exc).startswith("spark/spark-01/layout/stack_dir: ")


def test_ordinary_paths_pass():
    data = group_data(
        "spark", layout_stack_dir="/srv/gpu-fleet_2.0", layout_models_dir="/data/models@ssd"
    )
    config = parse("spark-01", "spark", data)
    assert config.layout.stack_dir == "/srv/gpu-fleet_2.0"


@pytest.mark.parametrize("group", ["Spark", "spark\nx", "spark;id", "-spark", "sp ark", ""])
def test_group_names_are_one_lower_case_word(group):
    with pytest.raises(ConfigError) as exc:
        parse("spark-01", group, group_data("spark"))
    line = _one_line(exc)
    assert line.startswith("spark-01/gpufleet_group: ") and "is not a group name" in line


def test_a_custom_group_name_passes():
    assert parse("spark-01", "spark_lab-2", group_data("spark")).project == "gpufleet-spark_lab-2"


@pytest.mark.parametrize("owner", ["root; id", "r oot", "Root", "$(id)"])
def test_models_owner_is_a_user_name(owner):
    with pytest.raises(ConfigError) as exc:
        parse("spark-01", "spark", group_data("spark", layout_models_owner=owner))
    assert _one_line(exc).startswith("spark/spark-01/layout/models_owner: ")


def test_models_owner_as_name_or_id_passes():
    data = group_data("spark", layout_models_owner="svc-llm", layout_models_group="1000")
    config = parse("s", "spark", data)
    assert (config.layout.models_owner, config.layout.models_group) == ("svc-llm", "1000")


@pytest.mark.parametrize("key", ["hf_endpoint", "hf_control_endpoint", "toolkit_key_url"])
def test_credentials_in_a_url_are_refused_and_not_shown(key):
    with pytest.raises(ConfigError) as exc:
        parse("spark-01", "spark", group_data("spark", **{key: "https://ann:s3cr3t@mirror.lan/hf"}))
    line = _one_line(exc)
    assert "holds credentials" in line and "https://<credentials>@mirror.lan/hf" in line
    assert "s3cr3t" not in line and "ann" not in line


def test_a_mirror_without_credentials_passes():
    config = parse("s", "spark", group_data("spark", hf_endpoint="https://mirror.lan:8443/hf"))
    assert config.hf_endpoint == "https://mirror.lan:8443/hf"


@pytest.mark.parametrize("value", ["abc'def", 'ab"c', "a b", "tok\\en", "a$b", "a`b", "a;b"])
def test_a_secret_outside_the_safe_characters_is_refused_without_its_value(monkeypatch, value):
    monkeypatch.setenv("HF_TOKEN", value)
    config = parse("spark-01", "spark", group_data("spark", secrets={"HF_TOKEN": "env:HF_TOKEN"}))
    with pytest.raises(ConfigError) as exc:
        resolve_secrets(config)
    line = _one_line(exc)
    assert line.startswith("spark/spark-01/secrets/HF_TOKEN: the value in environment variable")
    assert value not in line


def test_real_token_shapes_pass(monkeypatch):
    tokens = ["hf_AbCdEf0123456789", "sk-proj-abc_DEF-123", "dGVzdA+/x==", "eyJhbGc.eyJzdWI.sig-_"]
    for token in tokens:
        monkeypatch.setenv("HF_TOKEN", token)
        config = parse("s", "spark", group_data("spark", secrets={"HF_TOKEN": "env:HF_TOKEN"}))
        assert resolve_secrets(config) == {"HF_TOKEN": token}


# Shipped models the Hub could not be asked about when they were pinned (no network there):
# each still says NOT PINNED YET beside its revision. Nothing may join this list.
UNPINNED = {("jetson", "qwen2.5-coder-7b"), ("rtx5090", "qwen3-vl-30b-a3b")}


@pytest.mark.parametrize("group", ["spark", "rtx5090", "jetson"])
def test_shipped_models_are_pinned_to_commits(group):
    """A branch moves under a fleet: the same group data would fetch other bytes next month."""
    models = group_data(group)["models"]
    for name, model in models.items():
        pinned = bool(re.fullmatch(r"[0-9a-f]{40}", model["revision"]))
        assert pinned != ((group, name) in UNPINNED), f"{group}/models/{name}"
