"""The generated models load in a real llama-server built from llama.cpp's source."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
import requests

from gpufleet.sandbox.models import write_tiny_llama

pytestmark = pytest.mark.sandbox


@pytest.mark.parametrize("parts", [1, 3])
def test_llama_server_serves_the_generated_model(sandbox, tmp_path, parts):
    paths = write_tiny_llama(tmp_path / "tiny.gguf", seed=1, name="tiny", split_parts=parts)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"gpufleet-sandbox-test-llama-{parts}"
    subprocess.run(
        ["docker", "run", "-d", "--rm", "--name", name, "--label", "gpufleet.sandbox=1",
         "-v", f"{tmp_path}:/models:ro", "-p", f"127.0.0.1:{port}:{port}",
         sandbox["llama"]["image"], "--host", "0.0.0.0", "--port", str(port),
         "-m", f"/models/{paths[0].name}", "-c", "512", "--jinja", "-t", "2"],
        check=True, capture_output=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = requests.get(f"{base}/health", timeout=2)
                if health.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "llama-server did not become healthy"
            time.sleep(0.3)
        assert health.json() == {"status": "ok"}
        assert requests.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        chat = requests.post(
            f"{base}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
            timeout=60,
        ).json()
        assert chat["choices"][0]["message"]["role"] == "assistant"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
