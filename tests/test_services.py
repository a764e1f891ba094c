"""Services: schema errors with paths, llama-server argv, and rendered files.

Every compose file is checked by the real Compose v2 binary (``docker compose config``), the
one the sandbox installs on its hosts.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
from pathlib import Path

import pytest

from gpufleet.core.render import (
    ServedModel,
    build_inputs,
    llama_command,
    render_compose,
    render_dockerfile,
    vllm_command,
)
from gpufleet.core.schema import (
    ImageSource,
    Layout,
    LlamaBuild,
    LlamaServer,
    Vllm,
    parse_services,
    validate_services,
)

GROUP_DATA = Path(__file__).parent.parent / "group_data"
GROUPS = {
    group: {
        key: runpy.run_path(str(GROUP_DATA / f"{group}.py"))[key] for key in ("models", "services")
    }
    for group in ("spark", "rtx5090", "jetson")
}
LAYOUT = Layout()
COMMIT = "c" * 40


def served(services: dict, models: dict) -> dict[str, ServedModel]:
    """Each llama-server and vLLM service's snapshot, as a run would resolve it."""
    return {
        name: ServedModel(
            repo=models[svc.model]["repo"],
            commit=COMMIT,
            file=(models[svc.model].get("files") or ["config.json"])[0],
        )
        for name, svc in services.items()
        if isinstance(svc, LlamaServer | Vllm) and svc.model
    }


@pytest.fixture(scope="session")
def compose_bin() -> Path:
    from gpufleet.sandbox.artefacts import compose_binary
    from gpufleet.sandbox.roster import Sandbox

    return compose_binary(Sandbox())


def compose(binary: Path, workdir: Path, text: str, *args: str, dotenv: str = "") -> str:
    """Run ``docker compose -f compose.yaml <args>`` on ``text`` in a clean environment."""
    (workdir / "compose.yaml").write_text(text)
    (workdir / ".env").write_text(dotenv)
    result = subprocess.run(
        [str(binary), "-f", "compose.yaml", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def group_services(group: str, enable: tuple[str, ...] = ()) -> tuple[dict, dict]:
    data = GROUPS[group]
    raw = {name: {**svc, "enabled": True} if name in enable else svc
           for name, svc in data["services"].items()}  # fmt: skip
    if (
        "vllm" in enable and "vllm" in raw
    ):  # the shipped vLLM names no model: it serves llama-server's repository
        raw["vllm"]["model"] = next(iter(data["models"]))
    services, errors = parse_services(raw, set(data["models"]))
    assert errors == []
    return services, data["models"]


def render_group(group: str, enable: tuple[str, ...] = ()) -> str:
    services, models = group_services(group, enable)
    return render_compose(
        project=f"gpufleet-{group}",
        services=services,
        models=served(services, models),
        layout=LAYOUT,
        labels={"llama": {"gpufleet.inputs": "0" * 64}},
    )


A_MODEL = ServedModel(repo="org/a-GGUF", commit=COMMIT, file="a.gguf")


def llama(**overrides) -> dict:
    return {"kind": "llama-server", "port": 8000, "model": "a", "ctx_size": 4096,
            "image": {"ref": "ghcr.io/ggml-org/llama.cpp:server-cuda"}, **overrides}  # fmt: skip


# --- validation ----------------------------------------------------------------------------


def test_port_conflict_names_the_later_service_and_the_owner():
    services, errors = parse_services(
        {"vllm": {"kind": "vllm", "enabled": True, "port": 8000, "model": "a"}, "llama": llama()},
        {"a"},
    )
    assert errors == [("services/llama/port", "8000 is already used by vllm")]


def test_disabled_services_may_share_a_port():
    _, errors = parse_services({"llama": llama(), "vllm": {"kind": "vllm", "port": 8000}}, {"a"})
    assert errors == []


def test_undeclared_model():
    _, errors = parse_services({"llama": llama(model="x")}, {"b", "a"})
    assert errors == [("services/llama/model", "'x' is not one of the declared models: a, b")]


def test_build_required_for_built_image():
    svc = LlamaServer.model_validate(llama(image={"ref": "gpufleet/llama.cpp", "source": "build"}))
    assert validate_services({"llama": svc}, {"a"}) == [
        ("services/llama/build", "required when image source is build")
    ]


@pytest.mark.parametrize(
    ("build", "field", "message"),
    [
        ({"source_ref": "b7000", "source_archive": "/srv/llama.tar.gz",
          "source_git": "https://github.com/ggml-org/llama.cpp"},
         "source_archive", "set either source_git or source_archive, not both"),
        ({"source_git": None},
         "source_git", "set source_git (with source_ref) or source_archive"),
        ({}, "source_ref", "required with source_git: a pinned tag like v0.6.0"),
    ],
)  # fmt: skip
def test_build_source_is_one_of_git_or_archive(build, field, message):
    _, errors = parse_services({"llama": llama(build=build)}, {"a"})
    assert errors == [(f"services/llama/build/{field}", message)]


def test_archive_alone_replaces_the_default_git_source():
    build = LlamaBuild(source_archive="/srv/llama_cpp_python-0.3.36.tar.gz")
    assert build.source_git is None and build.problems() == []


def test_schema_errors_name_the_field():
    _, errors = parse_services(
        {"llama": llama(ctx_sise=1, port=70000), "x": {"kind": "tgi"}}, {"a"}
    )
    assert ("services/llama/ctx_sise", "unknown setting") in errors
    assert ("services/llama/port", "Input should be less than or equal to 65535") in errors
    assert [path for path, _ in errors if path.startswith("services/x")] == ["services/x"]


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_group_proposals_are_valid(group):
    group_services(group, enable=("vllm", "ollama"))


# --- llama-server --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "argv"),
    [
        ("spark", ["--host", "0.0.0.0", "--port", "8000",
                   "-m", "/models/gpt-oss-20b/gpt-oss-20b-Q4_K_M.gguf",
                   "-c", "8192", "-ngl", "99", "--jinja", "--metrics"]),
        ("rtx5090", ["--host", "0.0.0.0", "--port", "8000",
                     "-m", "/models/qwen3-vl-30b-a3b/Qwen3-VL-30B-A3B-Instruct-Q4_K_M.gguf",
                     "-c", "8192", "-ngl", "99", "--jinja", "-fa", "on", "--metrics"]),
        ("jetson", ["--host", "0.0.0.0", "--port", "11434",
                    "-m", "/models/llama-3.2-3b/Llama-3.2-3B-Instruct-Q4_K_M.gguf",
                    "-c", "4096", "-ngl", "99", "--metrics", "-t", "6", "-np", "4"]),
    ],
)  # fmt: skip
def test_llama_command(group, argv):
    services, models = group_services(group)
    svc = services["llama"]
    path = f"/models/{svc.model}/{models[svc.model]['files'][0]}"
    assert llama_command(svc, path) == argv


def test_llama_command_optional_flags():
    svc = LlamaServer.model_validate(
        llama(
            jinja=False,
            cont_batching=False,
            alias="gpt",
            gpu_layers="all",
            api_key_secret="LLAMA_API_KEY",
            extra_args=["--no-webui"],
        )  # fmt: skip
    )
    assert llama_command(svc, "/models/a.gguf")[8:] == [
        "-ngl", "all", "--no-jinja", "--metrics", "-nocb", "--alias", "gpt",
        "--api-key-file", "/run/secrets/llama_api_key", "--no-webui",
    ]  # fmt: skip


def test_metrics_are_on_by_default_and_share_the_apis_key_and_address():
    # /metrics is served on the API's own port: the same published address, and llama-server
    # asks for the same key on it as on /v1 (only /health and /models are public)
    svc = LlamaServer.model_validate(llama(bind="127.0.0.1", api_key_secret="LLAMA_API_KEY"))
    argv = llama_command(svc, "/models/a.gguf")
    assert "--metrics" in argv
    assert argv[argv.index("--api-key-file") + 1] == "/run/secrets/llama_api_key"
    spec = render_compose(
        project="p", services={"llama": svc}, layout=LAYOUT, models={"llama": A_MODEL}
    )
    assert '"127.0.0.1:8000:8000"' in spec


def test_metrics_off_renders_no_metrics_flag():
    # the twin: a service that turns them off keeps the command line it had before
    svc = LlamaServer.model_validate(llama(metrics=False))
    assert "--metrics" not in llama_command(svc, "/models/a.gguf")
    before = "--host 0.0.0.0 --port 8000 -m /models/a.gguf -c 4096 -ngl 99 --jinja"
    assert llama_command(svc, "/models/a.gguf") == before.split()


# --- compose -------------------------------------------------------------------------------


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_compose_is_valid_for_compose_v2(compose_bin, tmp_path, group):
    text = render_group(group)
    compose(compose_bin, tmp_path, text, "config", "-q")
    config = json.loads(compose(compose_bin, tmp_path, text, "config", "--format", "json"))
    svc = config["services"]["llama"]
    assert list(config["services"]) == ["llama"]  # disabled services are left out
    port = GROUPS[group]["services"]["llama"]["port"]
    assert [(p["target"], p["published"]) for p in svc["ports"]] == [(port, str(port))]
    assert svc["healthcheck"]["test"] == ["CMD", "curl", "-fsS", f"http://127.0.0.1:{port}/health"]
    (volume,) = svc["volumes"]
    assert (volume["source"], volume["target"], volume["read_only"]) == (
        "/opt/gpufleet/huggingface",
        "/root/.cache/huggingface",
        True,
    )
    assert svc["init"] is True and svc["restart"] == "unless-stopped"
    assert svc["labels"] == {"gpufleet.inputs": "0" * 64}
    if group == "jetson":
        assert svc["runtime"] == "nvidia" and "deploy" not in svc
        assert svc["entrypoint"] == ["llama-server"] and svc.get("pull_policy") is None
    else:
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["count"] == -1  # "all"
        assert "runtime" not in svc and svc["pull_policy"] == "never"
    env = svc.get("environment", {})
    assert (env.get("GGML_CUDA_ENABLE_UNIFIED_MEMORY") == "1") == (group == "spark")


def test_vllm_and_ollama_enabled(compose_bin, tmp_path):
    text = render_group("spark", enable=("vllm", "ollama"))
    secret = "hf_sekrit_value_123"
    out = compose(compose_bin, tmp_path, text, "config", "--format", "json",
                  dotenv=f"HF_TOKEN={secret}\n")  # fmt: skip
    assert secret not in out  # secrets reach containers as files, never config output
    config = json.loads(out)
    assert sorted(config["services"]) == ["llama", "ollama", "vllm"]
    vllm, ollama = config["services"]["vllm"], config["services"]["ollama"]
    assert vllm["command"][:5] == [
        "vllm",
        "serve",
        "unsloth/gpt-oss-20b-GGUF",
        "--revision",
        COMMIT,
    ]
    assert (
        "--port" in vllm["command"]
        and vllm["command"][vllm["command"].index("--port") + 1] == "8001"
    )
    for flag in ("--gpu-memory-utilization", "--max-model-len", "--max-num-batched-tokens",
                 "--max-num-seqs"):  # fmt: skip
        assert flag in vllm["command"]
    # it loads what gpufleet placed, offline: no token, no endpoint, the cache read-only
    assert (
        vllm["environment"]["HF_HUB_OFFLINE"] == "1" and "HF_TOKEN_PATH" not in vllm["environment"]
    )
    assert "secrets" not in vllm and "HF_ENDPOINT" not in vllm["environment"]
    assert vllm["healthcheck"]["test"][-1] == "http://127.0.0.1:8001/health"
    assert ollama["environment"]["OLLAMA_KEEP_ALIVE"] == "30m"
    assert ollama["environment"]["OLLAMA_HOST"] == "0.0.0.0:11434"
    assert ollama["healthcheck"]["test"] == ["CMD", "ollama", "list"]  # GET /api/tags, no curl


def test_config_hash_is_stable(compose_bin, tmp_path):
    first = render_group("spark", enable=("vllm", "ollama"))
    assert render_group("spark", enable=("vllm", "ollama")) == first
    lines = compose(compose_bin, tmp_path, first, "config", "--hash", "*").splitlines()
    assert sorted(line.split()[0] for line in lines) == ["llama", "ollama", "vllm"]
    assert all(len(line.split()) == 2 and len(line.split()[1]) == 64 for line in lines)
    again = compose(compose_bin, tmp_path, render_group("spark", enable=("vllm", "ollama")),
                    "config", "--hash", "*", dotenv="HF_TOKEN=x\n")  # fmt: skip
    assert again.splitlines() == lines


def test_dollar_signs_stay_literal(compose_bin, tmp_path):
    svc = LlamaServer.model_validate(llama(extra_args=["--alias", "$HOME"], env={"A": "${B}"}))
    text = render_compose(project="p", services={"llama": svc}, models={"llama": A_MODEL},
                          layout=LAYOUT)  # fmt: skip
    config = json.loads(compose(compose_bin, tmp_path, text, "config", "--format", "json"))
    # `config` prints a literal "$" escaped again; an interpolated one would be the value
    assert config["services"]["llama"]["command"][-1] == "$$HOME"
    assert config["services"]["llama"]["environment"]["A"] == "$${B}"


def test_a_server_whose_model_is_not_resolved_is_refused():
    svc = LlamaServer.model_validate(llama())
    with pytest.raises(ValueError, match="model 'a' is not resolved"):
        render_compose(project="p", services={"llama": svc}, models={}, layout=LAYOUT)


def test_llama_server_reads_its_snapshot_through_the_read_only_hub_cache():
    svc = LlamaServer.model_validate(llama())
    text = render_compose(project="p", services={"llama": svc}, models={"llama": A_MODEL},
                          layout=LAYOUT)  # fmt: skip
    hub = "/root/.cache/huggingface/hub"
    assert f'"{hub}/models--org--a-GGUF/snapshots/{COMMIT}/a.gguf"' in text
    assert '"/opt/gpufleet/huggingface:/root/.cache/huggingface:ro"' in text


def test_vllm_loads_the_pinned_snapshot_offline_and_never_writes_the_cache():
    svc = Vllm.model_validate({"kind": "vllm", "enabled": True, "model": "a"})
    argv = vllm_command(svc, A_MODEL)
    assert argv[:5] == ["vllm", "serve", "org/a-GGUF", "--revision", COMMIT]
    text = render_compose(project="p", services={"vllm": svc}, models={"vllm": A_MODEL},
                          layout=LAYOUT)  # fmt: skip
    assert '"/opt/gpufleet/huggingface:/root/.cache/huggingface:ro"' in text
    assert 'HF_HUB_OFFLINE: "1"' in text and "HF_TOKEN" not in text
    assert '"/opt/gpufleet/cache/vllm:/root/.cache/vllm"' in text


# --- Dockerfile ----------------------------------------------------------------------------


def group_build(group: str) -> LlamaBuild:
    services, _ = group_services(group)
    return services["llama"].build


def test_dockerfile_spark():
    text = render_dockerfile(group_build("spark"))
    assert "ARG BASE_DEVEL=nvidia/cuda:13.0.1-devel-ubuntu24.04" in text
    assert "ARG BASE_RUNTIME=nvidia/cuda:13.0.1-runtime-ubuntu24.04" in text
    assert "-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=121" in text
    assert "-DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON" in text
    assert "--target llama-server llama-cli llama-bench llama-quantize" in text
    assert 'gpufleet.llama.source="https://github.com/ggml-org/llama.cpp@v0.6.0"' in text
    assert 'ENTRYPOINT ["/app/llama-server"]' in text


def test_dockerfile_rtx5090():
    text = render_dockerfile(group_build("rtx5090"))
    assert "nvidia/cuda:12.8.1-devel-ubuntu24.04" in text
    assert "-DCMAKE_CUDA_ARCHITECTURES=120 " in text
    assert 'gpufleet.build.cuda_archs="120"' in text


def test_dockerfile_cpu_build_from_an_archive():
    build = LlamaBuild(source_archive="/srv/llama_cpp_python-0.3.36.tar.gz",
                       archive_subdir="llama_cpp_python-0.3.36/vendor/llama.cpp", cuda=False,
                       cpu_all_variants=False, base_devel="debian:bookworm",
                       base_runtime="debian:bookworm-slim", targets=["llama-server"])  # fmt: skip
    text = render_dockerfile(build, source_id="ab" * 32)
    assert "GGML_CUDA" not in text and "CUDA_ARCHITECTURES" not in text
    assert "GGML_CPU_ALL_VARIANTS" not in text
    assert "ARG BASE_DEVEL=debian:bookworm\n" in text
    assert f'gpufleet.llama.source="sha256:{"ab" * 32}"' in text
    assert "cp build/bin/llama-server /app/" in text


def test_multiple_archs_are_one_shell_word():
    text = render_dockerfile(LlamaBuild(source_ref="b7000", cuda_archs=["120", "121"]))
    assert "'-DCMAKE_CUDA_ARCHITECTURES=120;121'" in text


def test_build_inputs_follow_what_decides_the_image():
    spark = group_build("spark")

    def inputs(build, source="c0ffee", arch="aarch64"):
        return build_inputs(build, render_dockerfile(build), source, arch=arch)

    digest = inputs(spark)
    assert inputs(spark) == digest
    other = spark.model_copy(update={"cuda_archs": ["120"]})
    assert inputs(other) != digest
    assert inputs(spark, source="decaf") != digest
    # the same settings built on another CPU are another image
    assert inputs(spark, arch="x86_64") != digest
    archive = LlamaBuild(source_archive="/a/llama.tar.gz")
    moved = LlamaBuild(source_archive="/b/llama.tar.gz")
    assert build_inputs(archive, render_dockerfile(archive, "ab"), "ab", arch="x86_64") == (
        build_inputs(moved, render_dockerfile(moved, "ab"), "ab", arch="x86_64")
    )


def test_image_source_default_is_pull():
    assert ImageSource(ref="x").source == "pull"
    assert Vllm().image.ref == "nvcr.io/nvidia/vllm:25.09-py3" and Vllm().port == 8001


def test_vllm_settings_of_the_old_layout_are_refused_with_what_to_do():
    _, errors = parse_services({"vllm": {"kind": "vllm", "model_id": "Qwen/Qwen3-32B-FP8"}}, set())
    assert errors and "declare the repository in the group's `models`" in errors[0][1]
    _, errors = parse_services({"vllm": {"kind": "vllm", "enabled": True, "port": 8001}}, {"a"})
    assert errors == [("services/vllm/model", "None is not one of the declared models: a")]


def test_a_service_bound_to_one_address_publishes_only_there(compose_bin, tmp_path):
    services, _ = parse_services({"llama": llama(bind="127.0.0.1")}, {"a"})
    text = render_compose(project="p", services=services, layout=LAYOUT,
                          models={"llama": A_MODEL})  # fmt: skip
    config = json.loads(compose(compose_bin, tmp_path, text, "config", "--format", "json"))
    published = config["services"]["llama"]["ports"][0]
    assert (published["host_ip"], published["published"]) == ("127.0.0.1", "8000")
    everywhere, _ = parse_services({"llama": llama()}, {"a"})
    plain = render_compose(project="p", services=everywhere, layout=LAYOUT,
                           models={"llama": A_MODEL})  # fmt: skip
    assert '"8000:8000"' in plain


def test_a_bind_address_must_be_an_address():
    _, errors = parse_services({"llama": llama(bind="all")}, {"a"})
    assert errors == [("services/llama/bind",
                       "'all' is not an IP address like 0.0.0.0 or 127.0.0.1")]  # fmt: skip


def test_vllm_gets_its_api_key_from_a_secret_never_from_its_command_line(compose_bin, tmp_path):
    services, _ = parse_services({"vllm": {"kind": "vllm", "enabled": True, "model": "a",
                                           "api_key_secret": "VLLM_KEY"}}, {"a"})  # fmt: skip
    text = render_compose(project="p", services=services, layout=LAYOUT, models={"vllm": A_MODEL})
    config = json.loads(compose(compose_bin, tmp_path, text, "config", "--format", "json",
                                dotenv="VLLM_KEY='s3cr3t-value'\nHF_TOKEN='hf'\n"))  # fmt: skip
    vllm = config["services"]["vllm"]
    assert vllm["entrypoint"][:2] == ["/bin/sh", "-c"]
    assert "/run/secrets/vllm_key" in vllm["entrypoint"][2]
    assert "s3cr3t-value" not in json.dumps(config)


def test_an_api_key_naming_an_undeclared_secret_is_an_error():
    from gpufleet.core.schema import ConfigError, parse
    from tests.support.plans import group_data

    data = group_data("rtx5090")
    data["services"] = json.loads(json.dumps(data["services"]))
    data["services"]["llama"]["api_key_secret"] = "LLAMA_KEY"
    with pytest.raises(ConfigError) as err:
        parse("ws-1", "rtx5090", data)
    assert str(err.value) == (
        "rtx5090/ws-1/services/llama/api_key_secret: 'LLAMA_KEY' is not one of the secrets: "
        "HF_TOKEN"
    )
