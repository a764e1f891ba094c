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
from gpufleet.fleet.drift import host_entries
from gpufleet.fleet.runner import Run

SCHEMA = "gpufleet.status/1"


def _gpus(snapshot) -> list[dict]:
    samples = gpu_mod.parse_sampler_output(list(snapshot.gpu_now))
    stats = {s.index: s for s in gpu_mod.summarize_gpu(samples)}
    rows = []
    for g in snapshot.identity.nvidia.gpus or [None]:
        index = g.index if g else 0
        stat = stats.get(index)
        unsupported = list(stat.unsupported) if stat else ["utilization", "memory", "power"]
        total = (stat.memory_total_mib if stat else None) or (g.memory_total_mib if g else None)
        rows.append({
            "index": index, "name": g.name if g else "?",
            "compute_cap": g.compute_cap if g else None,
            "util_pct": stat.util_mean_pct if stat else None,
            "memory_used_mib": stat.memory_used_peak_mib if stat else None,
            "memory_total_mib": total,
            "memory_source": stat.memory_source if stat else None,
            "power_w": stat.power_mean_w if stat else None,
            "unsupported": unsupported,
        })  # fmt: skip
    return rows


def status_document(run: Run) -> dict:
    hosts = []
    for entry in host_entries(run):
        report = run.report.hosts.get(entry["host"])
        row = {"host": entry["host"], "group": entry["group"], "status": entry["status"],
               "reason": entry["reason"], "release": entry["release"],
               "changes": len(entry["items"])}  # fmt: skip
        if report is not None and report.planned:
            row |= _host_now(report)
        hosts.append(row)
    return {"schema": SCHEMA, "hosts": hosts}


def _host_now(report) -> dict:
    snap = report.snapshot
    ident = snap.identity
    containers = snap.compose.containers
    services = []
    for name, svc in report.services.items():
        container = containers.get(name)
        services.append(
            {
                "name": name,
                **svc.model_dump(),
                "health": _health(snap.health.get(name)),
                "state": container.state if container else None,
                "uptime": container.status if container else None,
            }
        )
    return {
        "gpus": _gpus(snap),
        "driver": ident.nvidia.driver_version,
        "cuda": ident.nvidia.cuda_version,
        "l4t": ident.jetson.l4t if ident.jetson else None,
        "toolkit": ident.docker.toolkit_packages.get("nvidia-container-toolkit"),
        "services": services,
    }


def _health(probe) -> str | None:
    if probe is None:
        return None
    if probe.status == 200:
        return "ok"
    return f"HTTP {probe.status}" if probe.status else f"no answer ({probe.error})"


def _num(value, unit: str = "", digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def render_table(doc: dict) -> list[str]:
    lines = [f"{'host':<20} {'group':<8} {'state':<11} {'release':<13} {'driver/cuda':<17} "
             f"{'toolkit':<9} gpu"]  # fmt: skip
    for h in doc["hosts"]:
        if "gpus" not in h:
            lines.append(f"{h['host']:<20} {'-':<8} {h['status']:<11} {h['reason'] or ''}")
            continue
        gpus = "; ".join(
            f"{g['name']} {g['compute_cap'] or '?'} util {_num(g['util_pct'], '%')} "
            f"mem {_num(g['memory_used_mib'], ' MiB')}" for g in h["gpus"])  # fmt: skip
        stack = f"{h['driver'] or '-'}/{h['cuda'] or '-'}" + (
            f" L4T {h['l4t']}" if h["l4t"] else ""
        )
        state = h["status"] if h["status"] != "drift" else f"drift ({h['changes']})"
        release = (h["release"] or {}).get("current") or "none"
        lines.append(f"{h['host']:<20} {h['group']:<8} {state:<11} {release:<13} {stack:<17} "
                     f"{h['toolkit'] or '-':<9} {gpus}")  # fmt: skip
        for s in h["services"]:
            up = s["uptime"] or s["state"] or "absent"
            lines.append(f"    {s['name']:<10} {s['kind']:<13} :{s['port']:<6} "
                         f"{s['model'] or '-':<20} {s['health'] or '-':<22} {up}")  # fmt: skip
    return lines
