"""Each host's plan and snapshot, written as JSON for the gpufleet command that started the run.

``gpufleet drift``, ``status`` and ``rollout`` run ``pyinfra ... --dry`` (or a converge) with
``GPUFLEET_REPORT=<file>``; the converge writes every host's plan there as it is made, so the
command reads the same plans pyinfra applies. Nothing secret is in it: plans hold hashes.
"""

from __future__ import annotations

import atexit
import json
import os
import tempfile

from pyinfra import host
from pyinfra.context import state

from gpufleet.ops import run_state
from gpufleet.plan import HostPlan
from gpufleet.schema import HostConfig
from gpufleet.snapshot import Snapshot


def _path() -> str | None:
    return os.environ.get("GPUFLEET_REPORT") or None


def entry(config: HostConfig, plan: HostPlan, snap: Snapshot) -> dict:
    return {
        "host": config.host,
        "group": config.group,
        "refusal": plan.refusal,
        "warnings": list(plan.warnings),
        "changes": [
            c.as_item() | {"recreates": list(c.recreates), "restarts": list(c.restarts)}
            for c in plan.changes
        ],  # fmt: skip
        "release": plan.release.model_dump(mode="json") if plan.release else None,
        "release_id": plan.release.id if plan.release else None,
        "snapshot": snap.model_dump(mode="json"),
        "services": {
            name: {
                "kind": svc.kind,
                "port": svc.port,
                # llama-server's model name, else what a chat asks for (vLLM's id, Ollama's
                # first model); None: an Ollama with nothing to pull
                "model": getattr(svc, "model", None) or svc.chat_model,
                "image": svc.image.ref,
                "address": svc.probe_address,  # where the host itself reaches it
            }
            for name, svc in config.enabled_services.items()
        },  # fmt: skip
        # for gpufleet bench: every setting of each service (secret names, never values), where
        # each secret is read on the control machine, and how pyinfra reaches the host
        "settings": {
            name: svc.model_dump(mode="json") for name, svc in config.enabled_services.items()
        },
        "secret_sources": dict(config.secrets),
        "unified_memory": config.gpu.unified_memory,
        "jetson": config.gpu.min_l4t is not None,
        "ssh": {
            "hostname": host.data.get("ssh_hostname") or config.host,
            "port": host.data.get("ssh_port") or 22,
            "user": host.data.get("ssh_user"),
            "key": host.data.get("ssh_key"),
            "known_hosts": host.data.get("ssh_known_hosts_file"),
            "sudo": bool(host.data.get("_sudo")),
        },
    }


def add(config: HostConfig, plan: HostPlan, snap: Snapshot) -> None:
    """Record this host's plan for the run's report file, when one was asked for.

    The file is written once, when the run ends (``atexit``): rewriting every host's entry as
    each host planned cost O(hosts^2), 19 of a 256-host drift check's 24 s.
    """
    path = _path()
    if not path:
        return
    hosts = run_state(state, "report")
    if not hosts:
        order = [h.name for h in state.inventory]  # inventory order, for rollouts' batches
        atexit.register(_write, path, hosts, order)
    hosts[config.host] = entry(config, plan, snap)


def _write(path: str, hosts: dict, order: list[str]) -> None:
    # one json.dumps without indent: C's encoder, not json.dump's pure-Python chunks
    text = json.dumps({"hosts": hosts, "order": order}, sort_keys=True)
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)
