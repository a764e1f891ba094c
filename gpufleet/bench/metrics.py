"""
Figures over request records, defined as ``vllm bench serve`` defines them.

Following ``calculate_metrics`` in ``vllm/benchmarks/serve.py``:

- Latency figures use successful requests only. TTFT and E2E have one value per request;
  ITL pools every gap of every request; TPOT is ``(latency - ttft) / (output_tokens - 1)`` for
  requests with more than one output token.
- Percentiles interpolate linearly between closest ranks (``numpy.percentile``'s default).
- Throughputs divide by the level's duration (first send to last completion): requests per
  second and per minute, output tokens per second (vLLM's "output token throughput"), prompt
  tokens per second, and their sum. Token totals count successful requests, from ``usage``.

Two figures vLLM does not print: ``output_tps_per_request``, the mean over requests of
``completion_tokens / latency``; and ``decode_tps``, ``1 / mean TPOT``, one stream's decode
speed once its first token is out, the figure llama-bench's ``tg`` and published batch-1
numbers report. Where no request gives a value, a figure is ``None``, never zero.

``FIGURES`` (``gpufleet.core.figures``) names every flat figure once, with its unit and
direction; the SLO parser, the JSON report, the CSV and ``compare`` all use these names.

.. code:: python

    summary = summarize(level.records, duration_s=level.duration_s)
    figures(summary)["ttft_p95"]  # seconds
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpufleet.core.figures import FIGURES, PERCENTILES

if TYPE_CHECKING:  # the client brings aiohttp; summarizing records needs none of it
    from gpufleet.bench.client import RequestRecord


def percentile(values: Sequence[float], q: float) -> float:
    """
    The ``q``-th percentile with linear interpolation between closest ranks.

    + values: at least one value, any order
    + q: 0 to 100

    Equals ``numpy.percentile(values, q)`` (method "linear").
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, kw_only=True)
class Distribution:
    """Mean and percentiles of one latency, in seconds, over ``count`` values."""

    count: int
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution | None:
        """The distribution of ``values``; None when there are none."""
        if not values:
            return None
        return cls(
            count=len(values),
            mean=math.fsum(values) / len(values),
            **{f"p{p}": percentile(values, p) for p in PERCENTILES},
        )


@dataclass(frozen=True, kw_only=True)
class Summary:
    """
    Everything ``summarize`` computes for one level.

    + requests / completed / failed: sent, succeeded, failed
    + failures: failed requests per class (``http_503``, ``timeout``, ...)
    + usage_missing: successful requests whose server sent no ``usage``
    + ttft / tpot / itl / e2e: distributions in seconds, None without values
    """

    requests: int
    completed: int
    failed: int
    failures: dict[str, int]
    usage_missing: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    success_rate: float | None
    rps: float | None
    rpm: float | None
    output_tps: float | None
    prompt_tps: float | None
    total_tps: float | None
    output_tps_per_request: float | None
    decode_tps: float | None
    ttft: Distribution | None
    tpot: Distribution | None
    itl: Distribution | None
    e2e: Distribution | None


def summarize(records: Iterable[RequestRecord], *, duration_s: float) -> Summary:
    """
    Aggregate one level's records.

    + records: every counted request of the level (warm-up excluded)
    + duration_s: the level's duration; throughputs are None when it is not positive
    """
    records = list(records)
    ok = [r for r in records if r.success]
    failures = dict(
        sorted(Counter(r.error_class or "unknown" for r in records if not r.success).items())
    )
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2es = [r.latency_s for r in ok if r.latency_s is not None]
    itls = [gap for r in ok for gap in r.itl_s]
    tpots = []
    per_request = []
    for r in ok:
        n = r.completion_tokens
        if n is None or r.latency_s is None:
            continue
        if n > 1 and r.ttft_s is not None:
            tpots.append((r.latency_s - r.ttft_s) / (n - 1))
        if r.latency_s > 0:
            per_request.append(n / r.latency_s)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.completion_tokens or 0 for r in ok)

    def per_second(amount: float) -> float | None:
        return amount / duration_s if duration_s > 0 else None

    tpot = Distribution.of(tpots)
    rps = per_second(len(ok))
    return Summary(
        requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        failures=failures,
        usage_missing=sum(r.completion_tokens is None for r in ok),
        duration_s=duration_s,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        success_rate=len(ok) / len(records) if records else None,
        rps=rps,
        rpm=None if rps is None else rps * 60,
        output_tps=per_second(output_tokens),
        prompt_tps=per_second(prompt_tokens),
        total_tps=per_second(prompt_tokens + output_tokens),
        output_tps_per_request=math.fsum(per_request) / len(per_request) if per_request else None,
        decode_tps=1 / tpot.mean if tpot is not None and tpot.mean > 0 else None,
        ttft=Distribution.of(ttfts),
        tpot=tpot,
        itl=Distribution.of(itls),
        e2e=Distribution.of(e2es),
    )


def figures(summary: Summary) -> dict[str, float | None]:
    """Every name in ``FIGURES`` with its value for one level (None: no data)."""
    out: dict[str, float | None] = {}
    for family in ("ttft", "tpot", "itl", "e2e"):
        dist: Distribution | None = getattr(summary, family)
        out[f"{family}_mean"] = None if dist is None else dist.mean
        for p in PERCENTILES:
            out[f"{family}_p{p}"] = None if dist is None else getattr(dist, f"p{p}")
    for name in (
        "rps",
        "rpm",
        "output_tps",
        "prompt_tps",
        "total_tps",
        "output_tps_per_request",
        "decode_tps",
        "success_rate",
    ):
        out[name] = getattr(summary, name)
    out["failed"] = summary.failed
    out["completed"] = summary.completed
    out["duration_s"] = summary.duration_s
    assert out.keys() == FIGURES.keys()
    return out


def format_value(name: str, value: float | None) -> str:
    """A figure for people: times in ms, rates with one decimal, ratios in percent."""
    if value is None:
        return "-"
    unit = FIGURES[name].unit
    if unit == "s":
        return f"{value:.1f}s" if name == "duration_s" else f"{value * 1000:.1f} ms"
    if unit == "ratio":
        return f"{value * 100:.1f}%"
    if unit == "count":
        return f"{value:.0f}"
    return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"


def figure_table() -> str:
    """The documentation table of every figure (name, unit, direction, meaning)."""
    rows = ["| figure | unit | better | meaning |", "|---|---|---|---|"]
    for f in FIGURES.values():
        rows.append(
            f"| `{f.name}` | {f.unit} | {'higher' if f.higher_is_better else 'lower'} "
            f"| {f.description} |"
        )
    return "\n".join(rows)


def failures_text(failures: Mapping[str, int]) -> str:
    """``http_503 x2, timeout x1``, or ``none``."""
    return ", ".join(f"{k} x{v}" for k, v in failures.items()) or "none"
