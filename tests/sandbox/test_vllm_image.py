"""The real vLLM image (vllm-cpu) on the control machine's Docker engine, before any host has it.

The seed's vLLM command line, rendered from group_data/spark.py, serves the tiny safetensors
Llama the sandbox mirror publishes, loaded from a Hugging Face cache (huggingface_hub's own
layout, filled from the mirror) mounted read-only, with ``HF_HUB_OFFLINE=1``, ``--revision
<commit>`` and no network at all (``--network none``: every request is made inside the
container). One container for the module; the image is built once per wheel lock and reused.

Cost, measured on a busy 2-core machine: the image's first build 3 to 4.5 minutes (pip's
resolve 17 to 30 s here with its cache warm, 107 s reported cold; the install the rest), later
runs none; then 32 to 54 s to ``/health``, seconds of requests, 2.6 GiB resident. Needs Docker,
not the sandbox fleet. ``GPUFLEET_VLLM_TEST_NAMESPACE`` names the image's repository and the
container (default ``gpufleet-sandbox``), so a developer's run keeps clear of a fleet on the same
engine.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pytest

from gpufleet.core.render import ServedModel, vllm_command
from gpufleet.core.schema import Vllm
from gpufleet.sandbox import artefacts, docker, images
from gpufleet.sandbox.models import CHAT_TEMPLATE, SANDBOX_REPOS, build_hf_tree
from gpufleet.sandbox.roster import Sandbox
from tests.conftest import IN_CI
from tests.support.mirror import start

pytestmark = pytest.mark.sandbox

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = os.environ.get("GPUFLEET_VLLM_TEST_NAMESPACE", "gpufleet-sandbox")
(SPEC,) = [spec for spec in SANDBOX_REPOS if spec.format == "safetensors"]
HF_MOUNT = "/hf"
# What the image cannot do that the seed's line assumes: no C++ compiler for torch.compile.
SANDBOX_ARGS = ["--enforce-eager"]
START_TIMEOUT = 300
FETCH = """\
import sys, huggingface_hub
huggingface_hub.snapshot_download(sys.argv[1], revision=sys.argv[2])
"""


def log(message: str) -> None:
    print(f"vllm test: {message}", file=sys.stderr)


@pytest.fixture(scope="module")
def image() -> str:
    try:
        docker.engine_info()
    except docker.SandboxError as exc:
        if IN_CI:
            pytest.fail(f"Docker unavailable under CI: {exc}")
        pytest.skip(f"no Docker engine: {exc}")
    sb = Sandbox(state=ROOT / ".sandbox", log=log)
    base = images.base_image(sb.state / "cache", log)
    return artefacts.vllm(sb, base, repo=f"{NAMESPACE}/vllm")


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> tuple[Path, str]:
    """An HF_HOME holding the tiny model at its commit, as `hf download` leaves it."""
    tmp = tmp_path_factory.mktemp("vllm-hf")
    (tmp / "www").mkdir()
    (tmp / "hf_token").write_text("unused\n")
    commit = build_hf_tree(tmp / "hf", [SPEC])[SPEC.repo_id]["sha"]
    mirror, url, _ = start(tmp)
    home = tmp / "home"
    try:
        env = {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
        # a child process: huggingface_hub reads its endpoint and home once, at import
        fetch = subprocess.run(
            [sys.executable, "-c", FETCH, SPEC.repo_id, commit],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert fetch.returncode == 0, fetch.stderr[-3000:]
    finally:
        mirror.terminate()
        mirror.wait(timeout=10)
    return home, commit


def seed_command(commit: str) -> list[str]:
    """The seed's vLLM service from group_data/spark.py, serving the tiny model at its commit."""
    seed = runpy.run_path(str(ROOT / "group_data" / "spark.py"))["services"]["vllm"]
    svc = Vllm.model_validate({**seed, "enabled": True, "model": "tiny"})
    served = ServedModel(repo=SPEC.repo_id, commit=commit, file="config.json")
    return [*vllm_command(svc, served), *SANDBOX_ARGS]


@dataclass
class Server:
    container: str
    port: int
    started_in: float
    command: list[str]

    def curl(self, path: str, body: dict | None = None) -> str:
        """An HTTP request made inside the container (it has no network to reach from here)."""
        cmd = ["exec", "-i", self.container, "curl", "-sS", "--max-time", "60"]
        if body is not None:
            cmd += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
        proc = docker.run(
            [*cmd, f"http://127.0.0.1:{self.port}{path}"],
            input=json.dumps(body).encode() if body is not None else None,
            timeout=90,
        )
        return proc.stdout.decode()

    def logs(self) -> str:
        proc = docker.run(["logs", self.container], check=False)
        return (proc.stdout + proc.stderr).decode(errors="replace")


@pytest.fixture(scope="module")
def server(image: str, hf_home: tuple[Path, str]) -> Iterator[Server]:
    home, commit = hf_home
    command = seed_command(commit)
    port = int(command[command.index("--port") + 1])
    name = f"{NAMESPACE}-vllm-test-{os.getpid()}"
    docker.run(["rm", "-f", name], check=False)
    docker.run(
        [
            "run", "-d", "--name", name, "--network", "none",
            "--shm-size", "1g",  # vLLM's workers share a 160 MiB ring buffer in /dev/shm
            # without HF_HUB_OFFLINE vLLM asks the Hub even for a commit whose snapshot is in
            # the cache, and exits after two minutes of retries
            "-e", f"HF_HOME={HF_MOUNT}", "-e", "HF_HUB_OFFLINE=1",
            # a KV cache of 1 GiB; without it, on CPU the seed's --gpu-memory-utilization 0.85
            # reserves 85% of the machine's memory and refuses to start if less is free
            "-e", "VLLM_CPU_KVCACHE_SPACE=1", "-e", "VLLM_CACHE_ROOT=/var/cache/vllm",
            "-v", f"{home}:{HF_MOUNT}:ro",
            image, *command,
        ]
    )  # fmt: skip
    try:
        started = time.monotonic()
        while True:
            probe = docker.run(
                ["exec", name, "curl", "-fsS", f"http://127.0.0.1:{port}/health"], check=False
            )
            if probe.returncode == 0:
                break
            state = docker.inspect(name) or {}
            running = state.get("State", {}).get("Running")
            if not running or time.monotonic() - started > START_TIMEOUT:
                tail = "\n".join(Server(name, port, 0, command).logs().splitlines()[-30:])
                why = "in time" if running else "and exited"
                pytest.fail(f"vLLM did not answer /health {why}:\n{tail}")
            time.sleep(1)
        server = Server(name, port, time.monotonic() - started, command)
        log(f"/health after {server.started_in:.0f}s")
        yield server
    finally:
        docker.run(["rm", "-f", name], check=False)


def test_the_seed_flags_are_accepted(server: Server) -> None:
    """Every flag of the rendered line reaches vLLM's engine (an unknown one stops it at start)."""
    assert server.command[:3] == ["vllm", "serve", SPEC.repo_id]
    logs = server.logs()
    line = next(ln for ln in logs.splitlines() if "non-default args:" in ln)
    flags = [arg[2:].replace("-", "_") for arg in server.command if arg.startswith("--")]
    assert {"gpu_memory_utilization", "max_model_len", "max_num_seqs"} <= set(flags)
    assert [f for f in flags if f"'{f.removeprefix('no_')}'" not in line] == []
    assert "Using max model len 32000" in logs
    assert "Chunked prefill is enabled with max_num_batched_tokens=8192" in logs


def test_loaded_from_the_cache_at_its_commit(server: Server, hf_home: tuple[Path, str]) -> None:
    _, commit = hf_home
    folder = "models--" + SPEC.repo_id.replace("/", "--")
    assert f"{HF_MOUNT}/hub/{folder}/snapshots/{commit}" in server.logs()
    models = json.loads(server.curl("/v1/models"))
    assert [m["id"] for m in models["data"]] == [SPEC.repo_id]
    assert models["data"][0]["max_model_len"] == 32000


def test_chat_completion(server: Server) -> None:
    body = {
        "model": SPEC.repo_id,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "ignore_eos": True,
    }
    answer = json.loads(server.curl("/v1/chat/completions", body))
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] == 8
    # the chat template applied: its 3 ChatML markers a token each, every other byte a token
    prompt = jinja2.Template(CHAT_TEMPLATE).render(
        messages=body["messages"], add_generation_prompt=True
    )
    markers = re.findall(r"<\|im_(?:start|end)\|>", prompt)
    unmarked = re.sub(r"<\|im_(?:start|end)\|>", "", prompt)
    assert answer["usage"]["prompt_tokens"] == len(unmarked.encode()) + len(markers) == 29


def test_streamed_chat_completion(server: Server) -> None:
    body = {
        "model": SPEC.repo_id,
        "messages": [{"role": "user", "content": "Count."}],
        "max_tokens": 6,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    lines = [ln[6:] for ln in server.curl("/v1/chat/completions", body).splitlines() if ln]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(ln) for ln in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == ["length"]


def test_metrics_carry_vllm_series(server: Server) -> None:
    server.curl(
        "/v1/chat/completions",
        {"model": SPEC.repo_id, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
    )
    text = server.curl("/metrics")
    families = set(re.findall(r"^# TYPE (vllm:\w+)", text, re.MULTILINE))
    log(f"{len(families)} vllm: metric families")
    assert len(families) > 20
    assert {"vllm:num_requests_running", "vllm:prompt_tokens", "vllm:generation_tokens"} <= {
        f.removesuffix("_total") for f in families
    }
    # one series per finish reason; this module's requests all finished
    served = re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)", text, re.MULTILINE)
    assert sum(map(float, served)) >= 1


def test_memory(server: Server) -> None:
    """About 2.6 GiB resident with a 1 GiB KV cache: the budget a 24 GiB machine allows."""
    out = docker.out(["exec", server.container, "ps", "-eo", "rss="])
    rss_mib = sum(int(v) for v in out.split()) / 1024
    log(f"resident {rss_mib:.0f} MiB, /health after {server.started_in:.0f}s")
    assert rss_mib < 4096
