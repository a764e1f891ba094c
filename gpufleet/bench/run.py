"""``gpufleet bench``: every service the fleet serves, measured the same way each time.

Targets come from the inventory and group data (a ``--dry`` run's report: host, service, kind,
port, model, API key source, the release the host runs), never typed by hand. Each host is
reached over its SSH connection: a forwarded port per service, and the GPU sampler streaming
over the same connection while the load runs; ``--direct`` talks to the service's address on
the network instead.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from gpufleet.bench.client import Endpoint, LoadSettings, Progress, run_sweep
from gpufleet.bench.dataset import DatasetError, RandomDataset, server_prompts
from gpufleet.bench.prompts import Prompt
from gpufleet.bench.remote import Forward, Sampler, SshTarget, Unreachable
from gpufleet.bench.report import HostRun, Target
from gpufleet.core import gpu as gpu_mod
from gpufleet.core.slo import BenchExpectations
from gpufleet.fleet.runner import Run


@dataclass(frozen=True, kw_only=True)
class BenchTarget:
    """One service of one host, with everything needed to load it."""

    target: Target
    address: str  # where the service listens, as the host sees it
    model_name: str  # what requests send as ``model``
    metrics_path: str | None
    key_source: str | None  # "env:VAR" or "file:/path" on the control machine
    release: str | None
    ssh: SshTarget
    gpu_sources: tuple[str, ...]
    expectations: BenchExpectations | None = None
    bind: str = "0.0.0.0"  # the address its port is published on


def read_secret(source: str) -> SecretStr:
    """A secret from its source on the control machine; ValueError naming it if unset."""
    kind, _, ref = source.partition(":")
    if kind == "env":
        value = os.environ.get(ref)
    else:
        path = Path(ref).expanduser()
        value = path.read_text().strip() if path.is_file() else None
    if not value:
        raise ValueError(f"the API key's source {source} is empty or missing")
    return SecretStr(value)


def targets_from(run: Run, *, service: str | None = None) -> list[BenchTarget]:
    """The services to bench, from a ``--dry`` run's report, in inventory order."""
    out = []
    for name, entry in run.hosts.items():
        if entry.refusal:
            continue
        reach = SshTarget(name=name, **entry.ssh.model_dump())  # the same fields, by name
        sources = gpu_mod.default_sources(jetson=entry.jetson, unified_memory=entry.unified_memory)
        for svc_name, svc in entry.settings.items():
            if service and svc_name != service and svc["kind"] != service:
                continue
            kind = svc["kind"]
            if kind == "ollama" and not svc.get("models"):
                continue  # nothing pulled, nothing to chat with
            # vLLM names its model by the repository it loaded (the record holds it)
            model = entry.services[svc_name].model or svc_name
            request_model = svc.get("alias") or model
            serves_metrics = kind == "vllm" or (kind == "llama-server" and svc.get("metrics"))
            metrics = "/metrics" if serves_metrics else None
            key = svc.get("api_key_secret")
            bench = svc.get("bench")
            expectations = BenchExpectations.model_validate(bench) if bench else None
            port = int(svc["port"])
            out.append(
                BenchTarget(
                    target=Target(host=name, service=svc_name, kind=kind, model=model, port=port),
                    address=entry.services[svc_name].address,
                    model_name=request_model,
                    metrics_path=metrics,
                    key_source=entry.secret_sources.get(key) if key else None,
                    release=entry.release_id or entry.current,
                    ssh=reach,
                    gpu_sources=tuple(sources),
                    expectations=expectations,
                    bind=svc.get("bind") or "0.0.0.0",
                )
            )
    return out


def direct_refusal(t: BenchTarget) -> str | None:
    """Why ``--direct`` cannot bench ``t``: a service published on a loopback address is
    meant for its host alone (reached over SSH); from the network, the request would find
    nothing, or whatever else listens on that port of that name."""
    try:
        loopback = ipaddress.ip_address(t.bind).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return None
    return (
        f"{t.target.host}/{t.target.service} is published on {t.bind} only (bind): --direct "
        "cannot reach it; bench it without --direct (over SSH)"
    )


def bench_target(
    t: BenchTarget,
    *,
    settings: LoadSettings,
    levels: Sequence[int | None],
    prompts: Sequence[Prompt],
    direct: bool = False,
    sample_gpu: bool = True,
    on_progress: Callable[[Progress], None] | None = None,
    dataset: RandomDataset | None = None,
) -> HostRun:
    """Load one service at every level and return what was measured (never raises for a
    service that fails: its failures are counted; a host that cannot be reached, or a
    ``dataset`` its server cannot make, is an error).

    + dataset: random prompts of exact token lengths, made with this server's tokenizer
      (``prompts`` is then not used)
    """
    if direct and (why := direct_refusal(t)):
        return HostRun(target=t.target, release=t.release, error=why)
    try:
        key = read_secret(t.key_source) if t.key_source else None
    except ValueError as exc:
        return HostRun(target=t.target, release=t.release, error=str(exc))

    def measure(base: str):
        endpoint = Endpoint(
            base_url=base, model=t.model_name, api_key=key, metrics_path=t.metrics_path
        )

        async def sweep():
            chosen = prompts
            if dataset is not None:
                chosen = await server_prompts(endpoint, kind=t.target.kind, spec=dataset)
            load = {"settings": settings, "levels": levels, "prompts": chosen}
            fresh = dataset is not None  # random prompts are each sent once, as vLLM's are
            return await run_sweep(endpoint=endpoint, **load, on_progress=on_progress, fresh=fresh)

        return asyncio.run(sweep())

    seconds = (settings.duration_s or 0) * len(levels) + 600 if settings.duration_s else 3600
    sampler = Sampler(t.ssh, sources=t.gpu_sources, seconds=int(seconds)) if sample_gpu else None
    try:
        if direct:
            host = t.ssh.hostname if t.address == "127.0.0.1" else t.address
            results = measure(f"http://{host}:{t.target.port}")
        else:
            with Forward(t.ssh, t.address, t.target.port) as port:
                results = measure(f"http://127.0.0.1:{port}")
    except (Unreachable, DatasetError) as exc:
        if sampler:
            sampler.stop()
        why = str(exc)
        if isinstance(exc, Unreachable):
            why = f"cannot reach {t.ssh.hostname}:{t.ssh.port}: {exc}"
        return HostRun(target=t.target, release=t.release, error=why)
    samples = sampler.stop() if sampler else []
    return HostRun(
        target=t.target,
        release=t.release,
        levels=results,
        gpu_samples=samples,
        expectations=t.expectations,
    )
