"""The vLLM and Ollama stand-ins, run as the sandbox runs them: system python3, subprocesses.

They answer on free ports on 127.0.0.1; the bench client loads them as it would the real
servers, so these tests also prove the client against two more server dialects.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import SecretStr

from gpufleet.bench.client import Endpoint, LevelResult, LoadSettings, run_sweep
from gpufleet.bench.prompts import builtin_prompts
from gpufleet.bench.servermetrics import counters_from_text, parse_prometheus

ASSETS = Path(__file__).resolve().parents[2] / "gpufleet" / "sandbox" / "assets"
VLLM = ASSETS / "standin-vllm"
OLLAMA = ASSETS / "standin-ollama"
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else shutil.which("python3")
MODEL = "Qwen/Qwen3-32B-FP8"
HF_TOKEN = "hf_standin_secret_0123"
API_KEY = "sk-vllm-standin-4567"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None):
    """``(status, headers, body bytes)``; HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


class Proc:
    def __init__(self, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.popen, self.log_path = popen, log

    @property
    def log(self) -> str:
        return self.log_path.read_text()


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str], ready_url: str, log: Path) -> Iterator[Proc]:
    with log.open("wb") as out:
        popen = subprocess.Popen([PYTHON, *argv], env=env, stdout=out, stderr=out)
    proc = Proc(popen, log)
    try:
        deadline = time.monotonic() + 10
        while True:
            if popen.poll() is not None:
                raise AssertionError(f"exited {popen.returncode}: {proc.log}")
            with contextlib.suppress(OSError):
                if http("GET", ready_url)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready: {proc.log}")
            time.sleep(0.05)
        yield proc
    finally:
        popen.terminate()
        popen.wait(timeout=10)


def vllm_argv(port: int, *extra: str) -> list[str]:
    # exactly what the compose file gives vLLM's image, with the stand-in as `vllm`
    return [
        str(VLLM),
        "serve",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--gpu-memory-utilization",
        "0.85",
        "--max-model-len",
        "32000",
        "--max-num-batched-tokens",
        "8192",
        "--max-num-seqs",
        "32",
        "--enable-chunked-prefill",
        "--enable-prefix-caching",
        *extra,
    ]


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "home").mkdir()
    token = tmp_path / "hf_token"
    token.write_text(HF_TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OLLAMA_", "VLLM_"))}
    return {
        **env,
        "HOME": str(tmp_path / "home"),
        "HF_TOKEN_PATH": str(token),
        "GPUFLEET_STANDIN_TOKEN_DELAY_MS": "2",
    }


def bench(
    url: str,
    model: str,
    *,
    key: str | None = None,
    levels=(2,),
    requests: int = 4,
    max_tokens: int = 6,
    metrics: str | None = None,
) -> list[LevelResult]:
    endpoint = Endpoint(
        base_url=url, model=model, api_key=SecretStr(key) if key else None, metrics_path=metrics
    )
    settings = LoadSettings(requests=requests, warmup=1, max_tokens=max_tokens)
    return asyncio.run(
        run_sweep(
            endpoint=endpoint,
            settings=settings,
            levels=list(levels),
            prompts=builtin_prompts(),
            scrape_interval_s=0.05,
        )
    )


# --------------------------------------------------------------------------- vLLM


def test_vllm_serves_the_compose_command_line(home, tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = vllm_argv(port, "--api-key", API_KEY)
    with running(argv, home, f"{url}/health", tmp_path / "vllm.log") as proc:
        status, headers, body = http("GET", f"{url}/health")
        assert (status, body) == (200, b"")
        assert http("GET", f"{url}/v1/models")[0] == 401  # the key guards /v1
        auth = {"Authorization": f"Bearer {API_KEY}"}
        status, _, body = http("GET", f"{url}/v1/models", headers=auth)
        assert status == 200
        [model] = json.loads(body)["data"]
        assert (model["id"], model["max_model_len"]) == (MODEL, 32000)
        [result] = bench(url, MODEL, key=API_KEY, metrics="/metrics")
        assert all(r.success for r in result.records), result.records[0].error
        assert {r.completion_tokens for r in result.records} == {6}
        assert all(len(r.itl_s) == 5 for r in result.records)
        # the stand-in's 2 ms per token, on the median: a busy CPU can deliver two chunks in
        # one read, so a single gap may be near zero
        assert statistics.median(g for r in result.records for g in r.itl_s) >= 0.0015
        counters = counters_from_text([(s.at, s.text) for s in result.scrapes])
        assert counters is not None and counters.engine == "vllm"
        assert counters.generated_tokens == 6 * 4
        assert counters.prompt_tokens == sum(r.prompt_tokens or 0 for r in result.records)
        assert counters.requests_finished == 4 and counters.ttft_mean_s is not None
        status, _, body = http(
            "POST",
            f"{url}/v1/chat/completions",
            headers=auth,
            body={
                "model": MODEL,
                "messages": [{"role": "user", "content": "one two three"}],
                "max_tokens": 4,
            },
        )
        answer = json.loads(body)
        assert status == 200 and answer["usage"]["completion_tokens"] == 4
        assert answer["usage"]["prompt_tokens"] == 7  # three words and the template's four
        assert len(answer["choices"][0]["message"]["content"].split()) == 4
        status, _, body = http(
            "POST",
            f"{url}/v1/chat/completions",
            headers=auth,
            body={"model": "other", "messages": [{"role": "user", "content": "x"}]},
        )
        assert status == 404 and "does not exist" in json.loads(body)["error"]["message"]
        status, _, body = http(
            "POST",
            f"{url}/v1/chat/completions",
            headers=auth,
            body={"messages": [{"role": "user", "content": "x"}], "max_tokens": 40000},
        )
        assert status == 400 and "maximum context length is 32000" in body.decode()
        metrics = parse_prometheus(http("GET", f"{url}/metrics")[2].decode())
        assert metrics.total("vllm:num_requests_running") == 0
        assert metrics.types["vllm:generation_tokens"] == "counter"
    log = proc.log
    first = log.splitlines()[0]
    assert "gpufleet sandbox stand-in for vLLM" in first and "NOT the real vLLM" in first
    assert "Hugging Face token: set, from HF_TOKEN_PATH" in log
    assert HF_TOKEN not in log and API_KEY not in log
    repo = Path(home["HOME"]) / ".cache/huggingface/hub/models--Qwen--Qwen3-32B-FP8"
    commit = (repo / "refs" / "main").read_text()
    assert (repo / "snapshots" / commit / "GPUFLEET-STANDIN").is_file()
    assert proc.popen.returncode == 0  # SIGTERM is a clean shutdown


def test_vllm_queues_beyond_max_num_seqs(home, tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        str(VLLM),
        "serve",
        MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-num-seqs",
        "1",
    ]
    env = {**home, "GPUFLEET_STANDIN_TOKEN_DELAY_MS": "15"}
    with running(argv, env, f"{url}/health", tmp_path / "vllm.log"):
        [result] = bench(url, MODEL, requests=4, max_tokens=8, metrics="/metrics")
    counters = counters_from_text([(s.at, s.text) for s in result.scrapes])
    assert counters is not None and counters.waiting is not None
    assert counters.waiting.peak >= 1 and counters.running is not None
    assert counters.running.peak == 1
    # two clients, one sequence at a time: the second waits for the first's whole answer
    ttfts = sorted(r.ttft_s or 0 for r in result.records)
    assert ttfts[-1] >= 7 * 0.015


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", MODEL, "--bogus-flag", "1"], "unrecognized arguments: --bogus-flag 1"),
        (["serve", MODEL, "--gpu-memory-utilization", "1.5"], "must be in (0, 1]"),
        (["run", MODEL], "invalid choice: 'run'"),
        ([], "the following arguments are required"),
    ],
)
def test_vllm_rejects_what_vllm_rejects(home, argv, message):
    done = subprocess.run(
        [PYTHON, str(VLLM), *argv],
        env=home,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.startswith("usage: vllm")


@pytest.mark.parametrize("content", ["", "  \n"])
def test_vllm_needs_a_non_empty_token_file(home, tmp_path: Path, content: str):
    (tmp_path / "hf_token").write_text(content)
    done = subprocess.run(
        [PYTHON, str(VLLM), *vllm_argv(free_port())[1:]],
        env=home,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 1
    assert f"HF_TOKEN_PATH={tmp_path / 'hf_token'}: the token file is empty" in done.stderr
    missing = {**home, "HF_TOKEN_PATH": str(tmp_path / "absent")}
    done = subprocess.run(
        [PYTHON, str(VLLM), *vllm_argv(free_port())[1:]],
        env=missing,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 1 and "cannot read the token file" in done.stderr


@contextlib.contextmanager
def hub(token: str, sha: str) -> Iterator[str]:
    """A minimal HF endpoint: model info for MODEL, gated behind ``token``."""

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path != f"/api/models/{MODEL}":
                self.send_response(404)
            elif self.headers.get("Authorization") != f"Bearer {token}":
                self.send_response(401)
            else:
                body = json.dumps({"id": MODEL, "sha": sha, "siblings": []}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = HTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_vllm_asks_hf_endpoint_with_the_token(home, tmp_path: Path):
    sha = "a" * 40
    with hub(HF_TOKEN, sha) as endpoint:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**home, "HF_ENDPOINT": endpoint}
        with running(vllm_argv(port), env, f"{url}/health", tmp_path / "vllm.log") as proc:
            pass
        assert f"found on {endpoint} at commit {sha}" in proc.log
        repo = Path(home["HOME"]) / ".cache/huggingface/hub/models--Qwen--Qwen3-32B-FP8"
        assert (repo / "refs" / "main").read_text() == sha
        (tmp_path / "hf_token").write_text("hf_wrong")
        done = subprocess.run(
            [PYTHON, *vllm_argv(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert done.returncode == 1
        assert "refused" in done.stderr and "HTTP 401" in done.stderr
        assert "hf_wrong" not in done.stderr
    done = subprocess.run(
        [PYTHON, *vllm_argv(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 1 and "cannot reach" in done.stderr  # the endpoint is gone


# --------------------------------------------------------------------------- Ollama


def load_script(path: Path) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(path.name.replace("-", "_"), str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ("http", "127.0.0.1", 11434)),
        ("0.0.0.0:11434", ("http", "0.0.0.0", 11434)),
        ("0.0.0.0", ("http", "0.0.0.0", 11434)),
        ("example.com", ("http", "example.com", 11434)),
        (":8080", ("http", "", 8080)),
        ("http://10.0.0.1", ("http", "10.0.0.1", 80)),
        ("https://host:9000/path", ("https", "host", 9000)),
        ("[::1]:11435", ("http", "::1", 11435)),
        ("host:99999", ("http", "host", 11434)),
    ],
)
def test_ollama_host(value, expected):
    assert load_script(OLLAMA).parse_host(value) == expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30m", 1800.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("300ms", 0.3),
        ("0", 0.0),
        ("3600", 3600.0),
        ("-1", float("inf")),
        ("-1s", float("inf")),
        ("5 m", None),
        ("forever", None),
        ("m", None),
    ],
)
def test_ollama_keep_alive_durations(value, seconds):
    assert load_script(OLLAMA).parse_duration(value) == seconds


def ollama(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, str(OLLAMA), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )


def test_ollama_serves_pulls_and_answers(home, tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    models = tmp_path / "ollama" / "models"
    env = {
        **home,
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OLLAMA_MODELS": str(models),
        "OLLAMA_KEEP_ALIVE": "30m",
    }
    assert ollama(env, "list").returncode == 1  # the healthcheck fails while nothing listens
    with running([str(OLLAMA), "serve"], env, f"{url}/", tmp_path / "ollama.log") as proc:
        listed = ollama(env, "list")
        assert listed.returncode == 0 and listed.stdout.split() == [
            "NAME",
            "ID",
            "SIZE",
            "MODIFIED",
        ]
        assert json.loads(http("GET", f"{url}/api/tags")[2]) == {"models": []}
        assert json.loads(http("GET", f"{url}/api/version")[2])["version"]
        # not pulled: 404 as Ollama answers, counted by the client as a failure class
        [missing] = bench(url, "llama3.2:3b", requests=2)
        assert {r.error_class for r in missing.records} == {"http_404"}
        pulled = ollama(env, "pull", "llama3.2:3b")
        assert pulled.returncode == 0 and pulled.stdout.splitlines()[-1] == "success"
        assert (models / "manifests/registry.ollama.ai/library/llama3.2/3b").is_file()
        tags = json.loads(http("GET", f"{url}/api/tags")[2])["models"]
        assert [m["name"] for m in tags] == ["llama3.2:3b"]
        assert "llama3.2:3b" in ollama(env, "list").stdout
        status, _, body = http("GET", f"{url}/v1/models")
        assert [m["id"] for m in json.loads(body)["data"]] == ["llama3.2:3b"]
        [result] = bench(url, "llama3.2:3b", requests=3, max_tokens=5)
        assert all(r.success for r in result.records), result.records[0].error
        assert {r.completion_tokens for r in result.records} == {5}
        # the native API: NDJSON by default, one object with stream false
        status, headers, body = http(
            "POST",
            f"{url}/api/chat",
            body={
                "model": "llama3.2:3b",
                "messages": [{"role": "user", "content": "hi"}],
                "options": {"num_predict": 3},
            },
        )
        lines = [json.loads(x) for x in body.splitlines()]
        assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
        assert [x["done"] for x in lines] == [False, False, False, True]
        assert lines[-1]["eval_count"] == 3 and lines[-1]["done_reason"] == "length"
        status, _, body = http(
            "POST",
            f"{url}/api/generate",
            body={"model": "llama3.2:3b", "prompt": "why", "stream": False},
        )
        answer = json.loads(body)
        assert answer["done"] and answer["done_reason"] == "stop" and answer["response"]
        # keep-alive: used models stay in /api/ps for OLLAMA_KEEP_ALIVE (30m)
        [loaded] = json.loads(http("GET", f"{url}/api/ps")[2])["models"]
        expires = time.mktime(time.strptime(loaded["expires_at"][:19], "%Y-%m-%dT%H:%M:%S"))
        assert 1790 <= expires - time.mktime(time.gmtime()) <= 1810
        http("POST", f"{url}/api/generate", body={"model": "llama3.2:3b", "keep_alive": 0})
        assert json.loads(http("GET", f"{url}/api/ps")[2]) == {"models": []}
    log = proc.log
    assert "gpufleet sandbox stand-in for Ollama" in log.splitlines()[0]
    assert "NOT the real Ollama" in log.splitlines()[0]
    assert "keep_alive=1800s" in log
    assert proc.popen.returncode == 0


def test_ollama_default_models_dir_and_bad_keep_alive(home, tmp_path: Path):
    port = free_port()
    env = {**home, "OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_KEEP_ALIVE": "soon"}
    with running(
        [str(OLLAMA), "serve"], env, f"http://127.0.0.1:{port}/", tmp_path / "ollama.log"
    ) as proc:
        assert ollama(env, "list").returncode == 0
    assert (Path(home["HOME"]) / ".ollama" / "models" / "manifests").is_dir()
    assert "keep_alive=300s" in proc.log and "not a duration" in proc.log


def test_ollama_cli_errors(home):
    assert ollama(home, "frobnicate").returncode == 1
    assert ollama(home, "--version").stdout.startswith("ollama version is ")
    assert ollama(home, "pull").returncode == 1
