"""The metrics a converge leaves on a host, for node_exporter's textfile collector.

Rendered with ``prometheus_client`` (a registry of its own, ``generate_latest``), never by
string formatting, from the host's validated config, its snapshot and its plan::

    gpufleet_release_info{release="3f9c2a1b7d0e",version="0.1.0",driver="580.95.05",
                          toolkit="1.18.0-1",cuda="13.0"} 1
    gpufleet_last_converge_timestamp_seconds 1.7e+09
    gpufleet_drift_changes 0
    gpufleet_service_healthy{service="llama",kind="llama-server"} 1
    gpufleet_model_verified{model="gpt-oss-20b",file="gpt-oss-20b-Q4_K_M.gguf"} 1
    gpufleet_gpu_utilization_percent{gpu="0",source="tegrastats"} 12     # no GPU exporter
    gpufleet_gpu_memory_used_bytes{gpu="0",source="meminfo"} 9.3e+09

Two views of one host. ``applied=False`` is the host as the converge found it (its plan's
changes not yet applied: drift is their number, health what the probes said); ``applied=True``
is the host as a converge that reached its end leaves it (drift 0, a recreated service healthy
because its gate passed, a fetched model verified because fetch-model checked it). A converge
writes the first before it changes anything and the second at its end, so a converge that
fails half way leaves the first in place and the alerts see it.

The body is deterministic: the timestamp (``converged_at``) is the only value that depends on
time. A converge with nothing to change does not write it at all while the file is there
(``deploys/metrics.py``): the host is as the last converge left it, and so is the file.
Label values are names, versions and hashes from the release manifest; never a secret.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from gpufleet.core import gpu as gpu_mod
from gpufleet.core.hubcache import CachedFile
from gpufleet.core.schema import HostConfig
from gpufleet.core.snapshot import Snapshot
from gpufleet.plan.models import unverified_reason
from gpufleet.plan.types import HostPlan

TIMESTAMP = "gpufleet_last_converge_timestamp_seconds"
MIB = 1024**2


def converged_at_of(lines: Iterable[str]) -> float | None:
    """The last converge time a textfile holds (its lines, or the one line that matters), read
    with ``prometheus_client``'s parser; None when it holds none or does not parse."""
    from prometheus_client.parser import text_string_to_metric_families

    text = "".join(f"{line}\n" for line in lines)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == TIMESTAMP:
                    return float(sample.value)
    except ValueError:
        return None
    return None


def has_gpu_exporter(config: HostConfig) -> bool:
    """Whether something else exports this host's GPU figures (dcgm-exporter)."""
    return config.monitor.dcgm_exporter


def gpu_figures(lines: Iterable[str]) -> list[gpu_mod.GpuStat]:
    """Per-GPU figures from sampler lines (``Snapshot.gpu_now``): nvidia-smi rows, tegrastats
    on Jetson, /proc/meminfo for GB10's unified memory (``gpufleet.core.gpu``'s parsers)."""
    return gpu_mod.summarize_gpu(gpu_mod.parse_sampler_output(list(lines)))


def render(
    config: HostConfig,
    plan: HostPlan,
    snap: Snapshot,
    *,
    converged_at: float,
    applied: bool,
) -> str:
    """The textfile's body.

    + config: the host's validated config (services, models dir, GPU exporter setting)
    + plan: its plan (release, changes, what it recreates and fetches)
    + snap: its snapshot (health probes, model files, a GPU sample when one was read)
    + converged_at: epoch seconds for ``gpufleet_last_converge_timestamp_seconds``
    + applied: the host as the converge leaves it (True), or as it found it (False)
    """
    registry = CollectorRegistry(auto_describe=True)
    release = plan.release
    if release is not None:
        info = Gauge(
            "gpufleet_release_info",
            "The release the host runs (gpufleet's release id, versions it was made with)",
            ["release", "version", "driver", "toolkit", "cuda"],
            registry=registry,
        )
        cuda = release.cuda or (snap.identity.jetson.cuda if snap.identity.jetson else None)
        info.labels(
            release=release.id,
            version=release.gpufleet,
            driver=release.driver or "",
            toolkit=release.toolkit,
            cuda=cuda or "",
        ).set(1)
    stamp = Gauge(TIMESTAMP, "When a converge last changed this host (epoch s)", registry=registry)
    stamp.set(converged_at)
    drift = Gauge(
        "gpufleet_drift_changes", "Changes the host needs to be as declared", registry=registry
    )
    drift.set(0 if applied else len(plan.changes))
    healthy = Gauge(
        "gpufleet_service_healthy",
        "1 when the service answered its health endpoint",
        ["service", "kind"],
        registry=registry,
    )
    recreated = set(plan.recreated)
    for name, svc in config.enabled_services.items():
        probe = snap.health.get(name)
        ok = bool(probe and probe.ok) or (applied and name in recreated)
        healthy.labels(service=name, kind=svc.kind).set(int(ok))
    verified = Gauge(
        "gpufleet_model_verified",
        "1 when the model file's size and hash (sha256, or git blob sha1) were checked against "
        "the Hub",
        ["model", "file"],
        registry=registry,
    )
    placed = set(plan.fetches) | set(plan.moves)
    for svc in release.services.values() if release else ():
        for f in svc.model_files:
            blob = CachedFile(config.layout.hf_home, f.repo, f.commit, f.path, f.etag, f.size)
            ok = unverified_reason(snap.models.files.get(blob.blob), etag=f.etag, size=f.size)
            good = ok is None or (applied and blob.blob in placed)
            verified.labels(model=svc.model or "", file=f.path).set(int(good))
    if not has_gpu_exporter(config):
        _gpu(registry, gpu_figures(snap.gpu_now))
    return generate_latest(registry).decode()


def _gpu(registry: CollectorRegistry, stats: list[gpu_mod.GpuStat]) -> None:
    if not stats:
        return
    labels = ["gpu", "source"]
    util = Gauge("gpufleet_gpu_utilization_percent", "GPU use", labels, registry=registry)
    used = Gauge("gpufleet_gpu_memory_used_bytes", "GPU memory used", labels, registry=registry)
    total = Gauge("gpufleet_gpu_memory_total_bytes", "GPU memory", labels, registry=registry)
    for s in stats:
        if s.util_mean_pct is not None:
            source = "tegrastats" if s.memory_source == "tegrastats" else "nvidia-smi"
            util.labels(gpu=str(s.index), source=source).set(s.util_mean_pct)
        if s.memory_used_peak_mib is not None and s.memory_source:
            used.labels(gpu=str(s.index), source=s.memory_source).set(s.memory_used_peak_mib * MIB)
        if s.memory_total_mib is not None and s.memory_source:
            total.labels(gpu=str(s.index), source=s.memory_source).set(s.memory_total_mib * MIB)
