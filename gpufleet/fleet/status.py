"""``gpufleet status``: every host, service, release and GPU, as they are now.

Read in the same one round trip per host as a drift check (plus a one-second GPU sample), and
described by one schema for all three hardware classes, ``gpufleet.status/1``::

    {"schema": "gpufleet.status/1", "hosts": [{
        "host": "spark-01", "group": "spark", "status": "in-sync",   # as gpufleet drift says
        "reason": null,
        "gpus": [{"index": 0, "name": "NVIDIA GB10", "compute_cap": "12.1",
                  "util_pct": 3, "memory_used_mib": 8890, "memory_total_mib": 124610,
                  "memory_source": "meminfo", "power_w": 3.0, "unsupported": []}],
        "driver": "580.95.05", "cuda": "13.0", "l4t": null, "toolkit": "1.18.0-1",
        "services": [{"name": "llama", "kind": "llama-server", "port": 8000,
                      "model": "gpt-oss-20b", "image": "gpufleet/llama.cpp:spark",
                      "health": "ok" | "HTTP 503" | "no answer (timeout)" | null,
                      "state": "running", "uptime": "Up 2 hours (healthy)"}],
        "release": {"current": "3f9c2a1b7d0e", "declared": "3f9c2a1b7d0e"},
        "changes": 0}]}

A value a host cannot give is null and named in ``unsupported``, never shown as zero.
"""

from __future__ import annotations

from gpufleet.core import gpu as gpu_mod
from gpufleet.fleet.documents import GpuNow, ServiceNow, StatusDocument, StatusHost
from gpufleet.fleet.drift import host_entries
from gpufleet.fleet.runner import Run

SCHEMA = "gpufleet.status/1"
_NO_SAMPLE = ["utilization", "memory", "power"]


def _gpu(g, stat) -> GpuNow:
    """One GPU: its identity (``g``, None when nvidia-smi named none) and its sample."""
    total = (stat.memory_total_mib if stat else None) or (g.memory_total_mib if g else None)
    return GpuNow(
        index=g.index if g else 0,
        name=g.name if g else "?",
        compute_cap=g.compute_cap if g else None,
        util_pct=stat.util_mean_pct if stat else None,
        memory_used_mib=stat.memory_used_peak_mib if stat else None,
        memory_total_mib=total,
        memory_source=stat.memory_source if stat else None,
        power_w=stat.power_mean_w if stat else None,
        unsupported=list(stat.unsupported) if stat else list(_NO_SAMPLE),
    )


def _gpus(snapshot) -> list[GpuNow]:
    samples = gpu_mod.parse_sampler_output(list(snapshot.gpu_now))
    stats = {s.index: s for s in gpu_mod.summarize_gpu(samples)}
    gpus = snapshot.identity.nvidia.gpus or [None]
    return [_gpu(g, stats.get(g.index if g else 0)) for g in gpus]


def status_document(run: Run) -> StatusDocument:
    hosts = []
    for entry in host_entries(run):
        report = run.report.hosts.get(entry.host)
        now = _host_now(report) if report is not None and report.planned else {}
        row = StatusHost(
            host=entry.host,
            group=entry.group,
            status=entry.status,
            reason=entry.reason,
            release=entry.release,
            changes=len(entry.items),
            **now,
        )
        hosts.append(row)
    return StatusDocument(hosts=hosts)


def exit_code(doc: StatusDocument, run: Run) -> int:
    """1 when the run failed or a host was refused or unreachable; drift is not an error."""
    failed = any(h.status in ("refused", "unreachable") for h in doc.hosts)
    return 1 if run.fatal or failed else 0


def _service(name, svc, snap) -> ServiceNow:
    container = snap.compose.containers.get(name)
    return ServiceNow(
        name=name,
        **svc.model_dump(),
        health=_health(snap.health.get(name)),
        state=container.state if container else None,
        uptime=container.status if container else None,
    )


def _host_now(report) -> dict:
    snap = report.snapshot
    ident = snap.identity
    return {
        "gpus": _gpus(snap),
        "driver": ident.nvidia.driver_version,
        "cuda": ident.nvidia.cuda_version,
        "l4t": ident.jetson.l4t if ident.jetson else None,
        "toolkit": ident.docker.toolkit_packages.get("nvidia-container-toolkit"),
        "services": [_service(n, s, snap) for n, s in report.services.items()],
    }


def _health(probe) -> str | None:
    if probe is None:
        return None
    if probe.status == 200:
        return "ok"
    return f"HTTP {probe.status}" if probe.status else f"no answer ({probe.error})"


def _num(value, unit: str = "", digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def _gpu_cell(g: GpuNow) -> str:
    util = _num(g.util_pct, "%")
    mem = _num(g.memory_used_mib, " MiB")
    return f"{g.name} {g.compute_cap or '?'} util {util} mem {mem}"


def _host_row(h: StatusHost) -> str:
    stack = f"{h.driver or '-'}/{h.cuda or '-'}" + (f" L4T {h.l4t}" if h.l4t else "")
    state = h.status if h.status != "drift" else f"drift ({h.changes})"
    release = (h.release.current if h.release else None) or "none"
    gpus = "; ".join(_gpu_cell(g) for g in h.gpus)
    cells = f"{h.host:<20} {h.group:<8} {state:<11} {release:<13} {stack:<17}"
    return f"{cells} {h.toolkit or '-':<9} {gpus}"


def _service_row(s: ServiceNow) -> str:
    up = s.uptime or s.state or "absent"
    model = s.model or "-"
    return f"    {s.name:<10} {s.kind:<13} :{s.port:<6} {model:<20} {s.health or '-':<22} {up}"


HEADER = (
    f"{'host':<20} {'group':<8} {'state':<11} {'release':<13} {'driver/cuda':<17} "
    f"{'toolkit':<9} gpu"
)


def render_table(doc: StatusDocument) -> list[str]:
    lines = [HEADER]
    for h in doc.hosts:
        if h.gpus is None:
            lines.append(f"{h.host:<20} {'-':<8} {h.status:<11} {h.reason or ''}")
            continue
        lines.append(_host_row(h))
        lines += [_service_row(s) for s in h.services or []]
    return lines
