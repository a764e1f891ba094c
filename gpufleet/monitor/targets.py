"""Prometheus scrape targets from the inventory: one per service that serves ``/metrics``.

``targets(hosts, reports)`` gives the ``file_sd`` document Prometheus reads with
``file_sd_configs`` (reloaded on change, no restart)::

    [{"targets": ["spark-01.lab.example:8000"],
      "labels": {"host": "spark-01", "group": "spark", "service": "llama",
                 "kind": "llama-server", "model": "gpt-oss-20b", "gpu": "sm_121",
                 "release": "3f9c2a1b7d0e", "__metrics_path__": "/metrics",
                 "__gpufleet_auth": "LLAMA_API_KEY"}}, ...]

``release`` comes from a ``gpufleet status --json``/``drift --json`` document when one is
given, else it is left out (a target's label cannot follow a rollout by itself; the textfile's
``gpufleet_release_info`` always does). ``gpu`` is the GPU's name from that document, else the
group's declared architecture (``sm_121``).

A keyed service (``api_key_secret``) is scraped with ``authorization: credentials_file`` by a
job of its own: ``__gpufleet_auth`` names the secret (its name, never its value), a job per
secret keeps only its targets, and the value stays in the file the secret's source names.

Left out, with the reason returned: Ollama (it serves no ``/metrics``) and services published
on 127.0.0.1 only (nothing off the host can scrape them).
"""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.core.cuda import cuda_arch_for_compute_cap
from gpufleet.core.schema import LlamaServer, Ollama, Vllm
from gpufleet.monitor.fleet import FleetHost

JOB = "gpufleet"
AUTH_LABEL = "__gpufleet_auth"
CREDENTIALS_DIR = "/etc/prometheus/secrets"


@dataclass(frozen=True)
class Skipped:
    host: str
    service: str
    why: str


def gpu_label(host: FleetHost, report: dict | None) -> str:
    """The GPU's name as the host reported it, else its group's declared ``sm_`` arch."""
    if report and report.get("gpu"):
        return str(report["gpu"])
    caps = host.config.gpu.compute_caps
    return f"sm_{cuda_arch_for_compute_cap(caps[0])}" if caps else "unknown"


def _address(host: FleetHost, bind: str, port: int) -> str:
    address = host.address if bind in ("0.0.0.0", "::") else bind
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def targets(
    hosts: list[FleetHost], reports: dict[str, dict] | None = None
) -> tuple[list[dict], list[Skipped]]:
    """The file_sd groups, one per scrapeable service (and exporter), and what was left out.

    + hosts: the fleet (``gpufleet.monitor.fleet.load``)
    + reports: host -> ``{"release", "gpu"}`` from ``fleet.releases_from_report``
    """
    reports = reports or {}
    groups: list[dict] = []
    skipped: list[Skipped] = []
    for host in sorted(hosts, key=lambda h: h.config.host):
        config, report = host.config, reports.get(host.config.host)
        base = {"host": config.host, "group": config.group}
        gpu = gpu_label(host, report)
        release = (report or {}).get("release")
        for name, svc in config.enabled_services.items():
            if isinstance(svc, Ollama):
                skipped.append(Skipped(config.host, name, "Ollama serves no /metrics"))
                continue
            if svc.bind in ("127.0.0.1", "::1"):
                why = f"published on {svc.bind} only: scrape it on the host"
                skipped.append(Skipped(config.host, name, why))
                continue
            model = svc.model if isinstance(svc, LlamaServer | Vllm) else None
            if isinstance(svc, Vllm) and model in config.models:
                model = config.models[model].repo  # what vLLM names the model it loaded
            labels = base | {"service": name, "kind": svc.kind, "model": model, "gpu": gpu}
            if release:
                labels["release"] = release
            labels["__metrics_path__"] = "/metrics"
            key = svc.api_key_secret if isinstance(svc, LlamaServer | Vllm) else None
            labels[AUTH_LABEL] = key or ""
            groups.append({"targets": [_address(host, svc.bind, svc.port)], "labels": labels})
        mon = config.monitor
        # exporters: no service/kind/release/gpu labels, which their own series carry
        # (the textfile's gpufleet_service_healthy{service,kind}, dcgm's gpu)
        if mon.node_exporter:
            # memory="unified": the host's memory is its GPU's (GB10, Jetson); the alert on GPU
            # memory reads MemAvailable/MemTotal there
            memory = "unified" if config.gpu.unified_memory else "dedicated"
            labels = base | {"exporter": "node", "gpu": gpu, "memory": memory, AUTH_LABEL: ""}
            target = _address(host, "0.0.0.0", mon.node_exporter_port)
            groups.append({"targets": [target], "labels": labels})
        if mon.dcgm_exporter:
            labels = base | {"exporter": "dcgm", AUTH_LABEL: ""}
            groups.append({"targets": [_address(host, "0.0.0.0", mon.dcgm_port)], "labels": labels})
    return groups, skipped


def credential_sources(hosts: list[FleetHost]) -> dict[str, str]:
    """Secret name -> its source (``file:/path`` or ``env:VAR``) for every keyed target.

    Raises ValueError when two hosts give one name two sources: one job cannot hold both.
    """
    sources: dict[str, str] = {}
    for host in hosts:
        for svc in host.config.enabled_services.values():
            key = getattr(svc, "api_key_secret", None)
            if not key or isinstance(svc, Ollama) or svc.bind in ("127.0.0.1", "::1"):
                continue
            source = host.config.secrets[key]
            if sources.setdefault(key, source) != source:
                raise ValueError(
                    f"{host.config.group}/{host.config.host}/secrets/{key}: {source!r} differs "
                    f"from {sources[key]!r} on another host; one scrape job reads one file"
                )
    return sources


def scrape_configs(
    secrets: list[str],
    *,
    file_sd: str | None = None,
    static: list[dict] | None = None,
    credentials_dir: str = CREDENTIALS_DIR,
    interval: str = "15s",
) -> list[dict]:
    """The ``scrape_configs`` entries: an open job and one job per secret.

    + secrets: the secrets' names (``credential_sources``)
    + file_sd: the file_sd JSON's path, as Prometheus sees it; or
    + static: the target groups themselves (``static_configs``)
    + credentials_dir: where each secret's file is, as Prometheus sees it (``<dir>/<NAME>``)
    """
    jobs = []
    for key in ["", *sorted(secrets)]:
        name = f"{JOB}-{key.lower()}" if key else JOB
        job: dict = {"job_name": name, "scrape_interval": interval}
        if key:
            job["authorization"] = {"credentials_file": f"{credentials_dir}/{key}"}
        if file_sd is not None:
            job["file_sd_configs"] = [{"files": [file_sd]}]
        else:
            job["static_configs"] = [
                {"targets": g["targets"], "labels": g["labels"]}
                for g in static or []
                if g["labels"].get(AUTH_LABEL, "") == key
            ]
        # each job keeps its own targets; host/service labels stay as they are
        job["relabel_configs"] = [
            {"source_labels": [AUTH_LABEL], "regex": key, "action": "keep"},
        ]
        jobs.append(job)
    return jobs
