"""
Bench results as one versioned JSON document, and the table, CSV, PNG and comparison made from it.

``build_document`` turns measured levels into the document; every other output reads only the
document, so a table, a plot or a comparison made later from a saved file is the same as the
one printed at the end of the run.

The document, schema ``gpufleet.bench/1`` (times in seconds, rates per second, memory in MiB,
power in watts; ``null`` where there is no value; ``"inf"`` for an unpaced rate), in every
command's envelope (a ``schema`` tag, ``hosts`` a list sorted by host name, each with its
services' runs in the order benched); its JSON Schema is ``gpufleet/fleet/schemas/bench.json``
(``gpufleet.fleet.documents.BenchDocument``)::

    {
      "schema": "gpufleet.bench/1",
      "created": "2025-01-01T10:00:00Z",          # UTC, when the document was built
      "gpufleet": "0.1.0",                         # gpufleet version that measured
      "settings": {
        "levels": [1, 4],                          # concurrency per level (null: uncapped)
        "rate": "inf" | 2.5,                       # Poisson arrivals per second
        "requests": 40 | null, "duration_s": null | 60.0,
        "warmup": 2, "max_tokens": 128, "timeout_s": 300.0, "seed": 0,
        "body": {"ignore_eos": true},              # --body, merged into every request
        "prompts": "builtin" | "<file name>" | "random",
        "dataset": null | {"name": "random", "input_len": 1024, "output_len": 128},
        "auth": true                               # an API key was sent (never the key)
      },
      "slo_missed": false,                         # any run missed an SLO (bench exits 3)
      "hosts": [{"host": "spark-01", "runs": [{
        "target": {"host": "spark-01", "service": "llama", "kind": "llama-server",
                   "model": "gpt-oss-20b", "port": 8000},
        "release": "<release id the host ran>" | null,
        "error": null | "<why this target was not benched>",
        "levels": [{
          "concurrency": 1, "rate": "inf",
          "started_at": 1735725600.0, "ended_at": 1735725660.0,   # epoch seconds
          "duration_s": 59.8, "warmup_failures": 0,
          "prompt_tokens": 1234, "output_tokens": 5120, "usage_missing": 0,
          "figures": {"<name>": number | null, ...},   # every name in core.figures.FIGURES
          "failures": {"http_503": 2, "timeout": 1},   # failed requests per class
          "server": null | {"engine": "llama.cpp" | "vllm", "scrapes": 61, "elapsed_s": ...,
                            "prompt_tokens", "generated_tokens", "prompt_tps",
                            "generated_tps", "server_prompt_tps", "server_decode_tps",
                            "requests_finished", "ttft_mean_s", "e2e_mean_s",
                            "running": {"last", "peak", "mean"} | null, "waiting": ...,
                            "kv_cache_usage": ..., "restarted": false},
          "gpu": null | [<gpu stat>, ...],             # GPU figures inside this level's window
          "requests": [<record>, ...]                  # only with save_requests
        }],
        "gpu": null | {"gpus": [<gpu stat>, ...],      # over the whole run
                       "series": [{"t", "index", "util_pct", "memory_used_mib", "power_w"}]},
        "baseline": [{"metric", "level", "baseline", "measured", "ratio"}],
        "slo": [{"slo", "metric", "level", "value", "threshold", "passed", "reason"}],
        "slo_missed": false
      }]}]
    }

A ``<gpu stat>`` is ``{"index", "samples", "util_mean_pct", "util_peak_pct",
"idle_fraction", "memory_used_peak_mib", "memory_total_mib", "memory_source",
"power_mean_w", "power_peak_w", "power_source", "unsupported": ["power", ...]}``; a
``<record>`` is ``client.RequestRecord.to_dict()``. New fields may be added within version 1;
a field changing meaning or going away makes version 2.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from gpufleet.bench.client import LevelResult, LoadSettings
from gpufleet.bench.metrics import failures_text, figures, format_value, summarize
from gpufleet.bench.servermetrics import counters_from_text
from gpufleet.bench.slo import check_slos, compare_baselines, missed
from gpufleet.core import gpu as gpu_mod
from gpufleet.core.figures import FIGURES
from gpufleet.core.slo import BenchExpectations

SCHEMA = "gpufleet.bench/1"
OLD_SCHEMA = "gpufleet-bench/1"  # a flat "runs" list; still read, by --compare


class ReportError(ValueError):
    """A document that is not a gpufleet bench document of a version this code reads."""


@dataclass(frozen=True, kw_only=True)
class Target:
    """
    What was benched: a service on a host, as the inventory and group data name it.

    + host / service: inventory host name and service name in group data
    + kind: ``llama-server``, ``vllm`` or ``ollama``; model: the model served; port: its port
    """

    host: str
    service: str
    kind: str
    model: str
    port: int


@dataclass(frozen=True, kw_only=True)
class HostRun:
    """
    One target's measurements, ready for ``build_document``.

    + target: what was benched; release: the release id the host ran (from its plan)
    + levels: the measured levels, in order
    + gpu_samples: parsed sampler output for the whole run (empty: not sampled)
    + expectations: the service's baselines and SLOs, if group data has them
    + error: why the target could not be benched at all (then ``levels`` is empty)
    """

    target: Target
    release: str | None
    levels: Sequence[LevelResult] = ()
    gpu_samples: Sequence[gpu_mod.GpuSample] = ()
    expectations: BenchExpectations | None = None
    error: str | None = None


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (NaN from a server, no value)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _rate(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _version() -> str:
    try:
        return metadata.version("gpufleet")
    except metadata.PackageNotFoundError:
        return "unknown"


def _level_doc(
    level: LevelResult, samples: Sequence[gpu_mod.GpuSample], save_requests: bool
) -> dict[str, Any]:
    summary = summarize(level.records, duration_s=level.duration_s)
    counters = counters_from_text([(s.at, s.text) for s in level.scrapes])
    gpus = gpu_mod.summarize_gpu(samples, window=(level.started_at, level.ended_at))
    doc: dict[str, Any] = {
        "concurrency": level.concurrency,
        "rate": _rate(level.rate),
        "started_at": level.started_at,
        "ended_at": level.ended_at,
        "duration_s": level.duration_s,
        "warmup_failures": level.warmup_failures,
        "stopped": level.stopped,
        "prompt_tokens": summary.prompt_tokens,
        "output_tokens": summary.output_tokens,
        "usage_missing": summary.usage_missing,
        "figures": figures(summary),
        "failures": summary.failures,
        "server": None if counters is None else counters.to_dict(),
        "gpu": [g.to_dict() for g in gpus] if samples else None,
    }
    if save_requests:
        doc["requests"] = [r.to_dict() for r in level.records]
    return doc


def build_document(
    *,
    settings: LoadSettings,
    levels: Sequence[int | None],
    prompts: str,
    auth: bool,
    runs: Sequence[HostRun],
    save_requests: bool = False,
    created: dt.datetime | None = None,
    dataset: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """
    The JSON document (schema in the module docstring) for one bench invocation.

    + settings / levels / prompts: what was asked for (``prompts``: ``builtin`` or a file name)
    + auth: whether an API key was sent; the key itself is never an input here
    + runs: one per target, in the order benched
    + save_requests: include every request record
    + created: the document's time (default now, UTC)
    + dataset: ``{"name": "random", "input_len", "output_len"}`` with ``--dataset random``
    """
    created = created or dt.datetime.now(dt.UTC)
    run_docs = []
    for run in runs:
        level_docs = [_level_doc(lv, run.gpu_samples, save_requests) for lv in run.levels]
        by_level = {d["concurrency"]: d["figures"] for d in level_docs}
        exp = run.expectations or BenchExpectations()
        slo_results = check_slos(exp.slos(), by_level) if run.levels else []
        ratios = compare_baselines(exp.baselines(), by_level)
        gpu_doc = None
        if run.gpu_samples:
            gpu_doc = {
                "gpus": [g.to_dict() for g in gpu_mod.summarize_gpu(run.gpu_samples)],
                "series": gpu_mod.series(run.gpu_samples),
            }
        run_docs.append(
            {
                "target": dict(run.target.__dict__),
                "release": run.release,
                "error": run.error,
                "levels": level_docs,
                "gpu": gpu_doc,
                "baseline": [r.to_dict() for r in ratios],
                "slo": [r.to_dict() for r in slo_results],
                # a target with SLOs that could not be benched misses them
                "slo_missed": missed(slo_results) or bool(run.error and exp.slo),
            }
        )
    return _clean(
        {
            "schema": SCHEMA,
            "created": created.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "gpufleet": _version(),
            "settings": {
                "levels": list(levels),
                "rate": _rate(settings.rate),
                "requests": settings.requests,
                "duration_s": settings.duration_s,
                "warmup": settings.warmup,
                "max_tokens": settings.max_tokens,
                "timeout_s": settings.timeout_s,
                "seed": settings.seed,
                "body": dict(settings.extra_body),
                "prompts": prompts,
                "dataset": dict(dataset) if dataset else None,
                "auth": auth,
            },
            "slo_missed": any(r["slo_missed"] for r in run_docs),
            "hosts": _by_host(run_docs),
        }
    )


def _by_host(run_docs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    hosts: dict[str, list] = {}
    for run in run_docs:
        hosts.setdefault(run["target"]["host"], []).append(run)
    return [{"host": name, "runs": hosts[name]} for name in sorted(hosts)]


def runs_of(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every run of a checked document, host by host (sorted), each host's in bench order."""
    return [run for host in doc["hosts"] for run in host["runs"]]


def check_document(doc: Any) -> dict[str, Any]:
    """``doc`` if it is a document this code reads, else ``ReportError`` saying why."""
    if not isinstance(doc, dict) or "schema" not in doc:
        raise ReportError("not a gpufleet bench document (no schema field)")
    if doc["schema"] == OLD_SCHEMA and isinstance(doc.get("runs"), list):
        # the first version's flat runs, grouped as the envelope groups them
        doc = {**{k: v for k, v in doc.items() if k != "runs"}, "hosts": _by_host(doc["runs"])}
    if doc["schema"] not in (SCHEMA, OLD_SCHEMA):
        raise ReportError(f"schema {doc['schema']!r} is not {SCHEMA!r}")
    hosts = doc.get("hosts")
    if not isinstance(hosts, list) or not all(
        isinstance(h, dict) and isinstance(h.get("runs"), list) for h in hosts
    ):
        raise ReportError("document has no hosts list with runs")
    return doc


def write_json(doc: Mapping[str, Any], path: str | Path) -> None:
    """Write the document, indented and key-ordered as built."""
    Path(path).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def load_json(path: str | Path) -> dict[str, Any]:
    """Read and check a saved document (``ReportError`` for a bad one)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: cannot read a bench document ({exc})") from None
    try:
        return check_document(doc)
    except ReportError as exc:
        raise ReportError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------- text


def _level_label(level: Mapping[str, Any]) -> str:
    c = level["concurrency"]
    rate = level["rate"]
    head = "-" if c is None else str(c)
    return head if rate == "inf" else f"{head}@{rate:g}/s"


def _title(run: Mapping[str, Any]) -> str:
    t = run["target"]
    release = run["release"] or "unknown"
    return (
        f"{t['host']} / {t['service']} ({t['kind']}, {t['model']}, port {t['port']}), "
        f"release {release}"
    )


_COLUMNS = (
    ("reqs", None),
    ("ok", "success_rate"),
    ("req/s", "rps"),
    ("out tok/s", "output_tps"),
    ("decode tok/s", "decode_tps"),
    ("ttft p50", "ttft_p50"),
    ("ttft p95", "ttft_p95"),
    ("ttft p99", "ttft_p99"),
    ("tpot p50", "tpot_p50"),
    ("tpot p99", "tpot_p99"),
    ("itl p99", "itl_p99"),
    ("e2e p50", "e2e_p50"),
    ("e2e p99", "e2e_p99"),
)


def _short(name: str, value: float | None) -> str:
    """A table cell: no unit words (the header says), ms for times."""
    if value is None:
        return "-"
    unit = FIGURES[name].unit
    if unit == "s":
        return f"{value * 1000:.1f}ms"
    if unit == "ratio":
        return f"{value * 100:.1f}%"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _gpu_line(stat: Mapping[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "unsupported" if v is None else f"{v:.0f}%"

    parts = [
        f"GPU {stat['index']}: util mean {pct(stat['util_mean_pct'])}",
        f"peak {pct(stat['util_peak_pct'])}",
    ]
    idle = stat["idle_fraction"]
    parts.append("idle unsupported" if idle is None else f"idle {idle * 100:.0f}% of samples")
    used = stat["memory_used_peak_mib"]
    if used is None:
        parts.append("memory unsupported")
    else:
        total = stat["memory_total_mib"]
        of = "" if total is None else f" / {total / 1024:.1f} GiB"
        parts.append(f"memory peak {used / 1024:.1f} GiB{of} ({stat['memory_source']})")
    power = stat["power_mean_w"]
    parts.append(
        "power unsupported"
        if power is None
        else f"power mean {power:.1f} W peak {stat['power_peak_w']:.1f} W"
    )
    return ", ".join(parts) + f" [{stat['samples']} samples]"


def _server_line(server: Mapping[str, Any]) -> str:
    def num(v: float | None, unit: str = "") -> str:
        return "-" if v is None else f"{v:.1f}{unit}"

    parts = [
        f"server ({server['engine']}): prompt {num(server['prompt_tokens'])} tok "
        f"({num(server['prompt_tps'])} tok/s)",
        f"generated {num(server['generated_tokens'])} tok ({num(server['generated_tps'])} tok/s)",
    ]
    if server.get("server_decode_tps") is not None:
        parts.append(f"decode {num(server['server_decode_tps'])} tok/s busy")
    for key in ("running", "waiting"):
        if server.get(key):
            parts.append(f"{key} peak {server[key]['peak']:.0f}")
    if server.get("ttft_mean_s") is not None:
        parts.append(f"ttft mean {server['ttft_mean_s'] * 1000:.1f} ms")
    if server.get("restarted"):
        parts.append("RESTARTED during the level")
    return ", ".join(parts)


def text_report(doc: Mapping[str, Any]) -> str:
    """A table per target with a row per level, then GPU, server, baseline and SLO lines."""
    doc = check_document(doc)
    out: list[str] = []
    for run in runs_of(doc):
        out.append(_title(run))
        if run["error"]:
            out.append(f"  not benched: {run['error']}")
        if run["levels"]:
            gpu = any(level["gpu"] for level in run["levels"])
            header = ["conc"] + [name for name, _ in _COLUMNS]
            header += ["gpu util", "gpu idle"] if gpu else []
            header.append("failures")
            rows = []
            for level in run["levels"]:
                f = level["figures"]
                cells = [_level_label(level), str(int(f["completed"] + f["failed"]))]
                cells += [_short(key, f[key]) for _, key in _COLUMNS[1:]]
                if gpu:
                    util, _, idle, _, _ = _gpu_columns(level["gpu"])
                    cells.append("unsupported" if util is None else f"{util:.0f}%")
                    cells.append("unsupported" if idle is None else f"{idle * 100:.0f}%")
                cells.append(failures_text(level["failures"]))
                rows.append(cells)
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
            for cells in [header, *rows]:
                out.append("  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
            for level in run["levels"]:
                if level["server"]:
                    out.append(f"  c={_level_label(level)} {_server_line(level['server'])}")
                if level["warmup_failures"]:
                    out.append(
                        f"  c={_level_label(level)} warm-up failures: {level['warmup_failures']}"
                    )
                if level.get("stopped"):  # a document from before the field has none
                    out.append(f"  c={_level_label(level)} {level['stopped']}")
        if run["gpu"]:
            out.extend("  " + _gpu_line(stat) for stat in run["gpu"]["gpus"])
        else:
            out.append("  GPU: not sampled")
        for b in run["baseline"]:
            out.append("  baseline " + _baseline_line(b))
        for s in run["slo"]:
            verdict = "PASS" if s["passed"] else "MISS"
            level = "uncapped" if s["level"] is None else f"c={s['level']}"
            out.append(f"  SLO {verdict} {s['slo']} at {level}: {s['reason']}")
        out.append("")
    if doc["slo_missed"]:
        out.append("SLO missed")
    return "\n".join(out).rstrip() + "\n"


def _baseline_line(b: Mapping[str, Any]) -> str:
    head = f"{b['metric']} at c={b['level']}"
    expected = format_value(b["metric"], b["baseline"])
    if b["ratio"] is None:
        return f"{head}: no value (baseline {expected})"
    better = (b["ratio"] >= 1) == FIGURES[b["metric"]].higher_is_better
    return (
        f"{head}: {format_value(b['metric'], b['measured'])} vs baseline {expected} "
        f"({b['ratio']:.2f}x, {'better' if better else 'worse'})"
    )


# --------------------------------------------------------------------------- CSV

CSV_TARGET = ("host", "service", "kind", "model", "port", "release", "concurrency", "rate")
CSV_GPU = (
    "gpu_util_mean_pct",
    "gpu_util_peak_pct",
    "gpu_idle_fraction",
    "gpu_memory_used_peak_mib",
    "gpu_power_mean_w",
)


def _gpu_columns(stats: Sequence[Mapping[str, Any]] | None) -> list[float | None]:
    """All GPUs of a level in one row: mean of means, max of peaks, sums of memory and power."""
    if not stats:
        return [None] * len(CSV_GPU)

    def values(key: str) -> list[float]:
        return [s[key] for s in stats if s[key] is not None]

    utils, peaks, idle = values("util_mean_pct"), values("util_peak_pct"), values("idle_fraction")
    memory, power = values("memory_used_peak_mib"), values("power_mean_w")
    return [
        sum(utils) / len(utils) if utils else None,
        max(peaks) if peaks else None,
        sum(idle) / len(idle) if idle else None,
        sum(memory) if memory else None,
        sum(power) if power else None,
    ]


def csv_report(doc: Mapping[str, Any]) -> str:
    """
    One CSV row per target and level: target columns, every figure (SI units), failures as
    ``class=count;...``, then GPU columns (several GPUs folded into one row).
    """
    doc = check_document(doc)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*CSV_TARGET, *FIGURES, "failures", *CSV_GPU])
    for run in runs_of(doc):
        t = run["target"]
        for level in run["levels"]:
            failures = ";".join(f"{k}={v}" for k, v in level["failures"].items())
            row = [
                t["host"],
                t["service"],
                t["kind"],
                t["model"],
                t["port"],
                run["release"] or "",
                "" if level["concurrency"] is None else level["concurrency"],
                level["rate"],
            ]
            row += [
                "" if level["figures"][name] is None else level["figures"][name] for name in FIGURES
            ]
            row.append(failures)
            row += ["" if v is None else v for v in _gpu_columns(level["gpu"])]
            writer.writerow(row)
    return buffer.getvalue()


# --------------------------------------------------------------------------- PNG


def write_png(doc: Mapping[str, Any], path: str | Path) -> None:
    """
    A PNG: TTFT, TPOT and E2E percentiles against concurrency (a line per target, p50 solid,
    p99 dashed), and GPU utilisation over time per target and GPU.

    Uses matplotlib's Agg canvas directly (no pyplot, no display), imported only here.
    """
    runs = runs_of(check_document(doc))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1])
    names = {"ttft": "TTFT", "tpot": "TPOT", "e2e": "E2E latency"}
    ticks = sorted({lv["concurrency"] for run in runs for lv in run["levels"]} - {None})
    for column, (family, title) in enumerate(names.items()):
        ax = fig.add_subplot(grid[0, column])
        plotted = False
        for i, run in enumerate(runs):
            levels = [lv for lv in run["levels"] if lv["concurrency"] is not None]
            label = f"{run['target']['host']}/{run['target']['service']}"
            for p, style in (("p50", "-"), ("p99", "--")):
                points = [(lv["concurrency"], lv["figures"][f"{family}_{p}"]) for lv in levels]
                points = [(c, v * 1000) for c, v in points if v is not None]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, style, marker="o", color=f"C{i % 10}", label=f"{label} {p}")
                    plotted = True
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel("concurrency")
        if plotted:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.legend(fontsize="x-small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax = fig.add_subplot(grid[1, :])
    plotted = False
    for i, run in enumerate(runs):
        if not run["gpu"]:
            continue
        rows = run["gpu"]["series"]
        label = f"{run['target']['host']}/{run['target']['service']}"
        for index in sorted({r["index"] for r in rows}):
            points = [
                (r["t"], r["util_pct"])
                for r in rows
                if r["index"] == index and r["util_pct"] is not None
            ]
            if not points:
                continue
            t0 = points[0][0]
            ax.plot(
                [t - t0 for t, _ in points],
                [u for _, u in points],
                color=f"C{i % 10}",
                label=f"{label} GPU {index}",
            )
            plotted = True
            if index != min(r["index"] for r in rows):
                continue
            for lv in run["levels"]:  # where each level ran, on the samples' clock
                x = lv["started_at"] - t0
                ax.axvline(x, color=f"C{i % 10}", linestyle=":", linewidth=0.8)
                ax.text(x, 98, f" c={_level_label(lv)}", fontsize="x-small", va="top")
    ax.set_title("GPU utilisation (%)")
    ax.set_xlabel("seconds since sampling started")
    ax.set_ylim(0, 105)  # a busy GPU at 100% stays visible above the frame
    if plotted:
        ax.legend(fontsize="x-small")
    else:
        ax.text(
            0.5, 0.5, "no GPU utilisation samples", ha="center", va="center", transform=ax.transAxes
        )
    fig.suptitle(f"gpufleet bench {doc['created']}")
    fig.tight_layout()
    fig.savefig(str(path), format="png")


# --------------------------------------------------------------------------- compare


@dataclass(frozen=True, kw_only=True)
class Change:
    """One figure of one target and level in two documents."""

    key: str
    figure: str
    old: float
    new: float
    percent: float | None = field(default=None)

    @property
    def better(self) -> bool | None:
        if self.new == self.old:
            return None
        return (self.new > self.old) == FIGURES[self.figure].higher_is_better


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[Change], list[str]]:
    """
    Every figure present in both documents, per target and level, and what only one has.

    + old / new: checked documents

    Returns ``(changes, notes)``; ``percent`` is None where the old value is 0.
    """
    old, new = check_document(old), check_document(new)

    def index(doc: Mapping[str, Any]) -> dict[str, Mapping[str, float | None]]:
        out = {}
        for run in runs_of(doc):
            t = run["target"]
            for level in run["levels"]:
                out[f"{t['host']}/{t['service']} c={_level_label(level)}"] = level["figures"]
        return out

    a, b = index(old), index(new)
    found: list[Change] = []
    for key in [k for k in a if k in b]:
        for name in FIGURES:
            x, y = a[key].get(name), b[key].get(name)
            if x is None or y is None:
                continue
            percent = None if x == 0 else (y - x) / abs(x) * 100
            found.append(Change(key=key, figure=name, old=x, new=y, percent=percent))
    notes = [f"{k}: only in the old document" for k in a if k not in b]
    notes += [f"{k}: only in the new document" for k in b if k not in a]
    return found, notes


def compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """
    The change per figure from ``old`` to ``new``: values, percentage, better or worse.

    + old / new: documents (``load_json``)
    """
    found, notes = changes(old, new)
    out: list[str] = [f"compare {old['created']} -> {new['created']}"]
    current = None
    for c in found:
        if c.key != current:
            out.append(c.key)
            current = c.key
        pct = "n/a" if c.percent is None else f"{c.percent:+.1f}%"
        verdict = {None: "same", True: "better", False: "worse"}[c.better]
        out.append(
            f"  {c.figure:<24} {format_value(c.figure, c.old):>14} -> "
            f"{format_value(c.figure, c.new):>14}  {pct:>8}  {verdict}"
        )
    out.extend(notes)
    return "\n".join(out) + "\n"
