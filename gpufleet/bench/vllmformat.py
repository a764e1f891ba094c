"""
Bench results under ``vllm bench serve``'s result keys and units (``--format vllm``).

One result per target and level, each the object ``vllm bench serve --save-result`` writes
(``vllm/benchmarks/serve.py``, ``benchmark`` and ``main``): ``date`` (``%Y%m%d-%H%M%S``),
``backend``/``endpoint_type`` (``openai-chat``), ``label``, ``model_id``, ``num_prompts``,
``request_rate`` (``"inf"`` or a number), ``burstiness`` (1.0: Poisson), ``max_concurrency``;
``duration`` (s), ``completed``, ``failed``, ``total_input_tokens``, ``total_output_tokens``,
``request_throughput`` (req/s), ``request_goodput`` (None: no goodput asked),
``output_throughput`` and ``total_token_throughput`` (tok/s), ``max_output_tokens_per_s``,
``max_concurrent_requests``; then for ``ttft``, ``tpot``, ``itl`` and ``e2el``:
``mean_<m>_ms``, ``median_<m>_ms``, ``std_<m>_ms`` and ``p<P>_<m>_ms`` for P in 50, 90, 95,
99 (vLLM's ``--metric-percentiles 50,90,95,99 --percentile-metrics ttft,tpot,itl,e2el``).
Per-request lists (``input_lens``, ``output_lens``, ``ttfts``, ``itls``, ``latencies``,
``start_times``, ``errors``) only with ``--save-requests`` (vLLM's ``--save-detailed``).

The figures are the ones ``metrics`` computes (the same definitions); vLLM writes 0 where a
figure has no value (``np.mean([] or 0)``), and so does this shape, unlike gpufleet's own.
Several results are written one JSON object per line, as ``vllm bench serve
--append-result`` appends them; ``host`` and ``service`` say which target each is.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from typing import Any

from gpufleet.bench.client import LevelResult
from gpufleet.bench.metrics import PERCENTILES, percentile, summarize
from gpufleet.bench.report import HostRun

FAMILIES = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2el": "e2e"}  # vLLM -> ours


def _ms_stats(name: str, values: Sequence[float]) -> dict[str, float]:
    """vLLM's mean/median/std/percentiles of one metric, in ms (numpy's population std)."""
    values = list(values) or [0.0]
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    out = {
        f"mean_{name}_ms": mean * 1000,
        f"median_{name}_ms": percentile(values, 50) * 1000,
        f"std_{name}_ms": std * 1000,
    }
    out |= {f"p{p}_{name}_ms": percentile(values, p) * 1000 for p in PERCENTILES}
    return out


def _peaks(level: LevelResult) -> tuple[float, int]:
    """vLLM's ``max_output_tokens_per_s`` (tokens per whole second of the run, each request's
    tokens spread over its streamed chunks) and ``max_concurrent_requests``."""
    per_second: dict[int, float] = {}
    edges: list[tuple[float, int]] = []
    for r in level.records:
        if not r.success or r.ttft_s is None or r.latency_s is None:
            continue
        edges += [(r.start_s, 1), (r.start_s + r.latency_s, -1)]
        times = [r.start_s + r.ttft_s]
        for gap in r.itl_s:
            times.append(times[-1] + gap)
        share = (r.completion_tokens or len(times)) / len(times)
        for t in times:
            per_second[int(t)] = per_second.get(int(t), 0.0) + share
    running = peak = 0
    for _, step in sorted(edges):
        running += step
        peak = max(peak, running)
    return max(per_second.values(), default=0.0), peak


def level_result(
    *,
    run: HostRun,
    level: LevelResult,
    model: str,
    detailed: bool = False,
    created: dt.datetime | None = None,
) -> dict[str, Any]:
    """One level of one target as ``vllm bench serve`` would have saved it."""
    created = created or dt.datetime.now()
    summary = summarize(level.records, duration_s=level.duration_s)
    ok = [r for r in level.records if r.success]
    tpots = [
        (r.latency_s - r.ttft_s) / (r.completion_tokens - 1)
        for r in ok
        if r.completion_tokens and r.completion_tokens > 1 and r.ttft_s is not None
        if r.latency_s is not None
    ]
    values = {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": tpots,
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2el": [r.latency_s for r in ok if r.latency_s is not None],
    }
    peak_tps, peak_running = _peaks(level)
    target = run.target
    result: dict[str, Any] = {
        "date": created.strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat",
        "backend": "openai-chat",
        "label": f"{target.host}/{target.service}",
        "model_id": model,
        "tokenizer_id": None,  # the server's own (usage), never a local copy
        "num_prompts": len(level.records),
        "request_rate": "inf" if math.isinf(level.rate) else level.rate,
        "burstiness": 1.0,
        "max_concurrency": level.concurrency,
        "host": target.host,
        "service": target.service,
        "release": run.release,
        "duration": level.duration_s,
        "completed": summary.completed,
        "failed": summary.failed,
        "total_input_tokens": summary.prompt_tokens,
        "total_output_tokens": summary.output_tokens,
        "request_throughput": summary.rps or 0.0,
        "request_goodput": None,
        "output_throughput": summary.output_tps or 0.0,
        "total_token_throughput": summary.total_tps or 0.0,
        "max_output_tokens_per_s": peak_tps,
        "max_concurrent_requests": peak_running,
    }
    if detailed:
        records = level.records
        result |= {
            "input_lens": [r.prompt_tokens or 0 for r in records],
            "output_lens": [r.completion_tokens or 0 for r in records],
            "ttfts": [r.ttft_s or 0.0 for r in records],
            "itls": [list(r.itl_s) for r in records],
            "latencies": [r.latency_s or 0.0 for r in records],
            "start_times": [r.start_s for r in records],
            "errors": [r.error or "" for r in records],
        }
    for name in FAMILIES:
        result |= _ms_stats(name, values[name])
    return result


def results(
    runs: Sequence[HostRun],
    *,
    models: dict[tuple[str, str], str],
    detailed: bool = False,
    created: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """Every target's every level, in the order benched (a target not benched has none).

    + models: (host, service) -> the ``model`` its requests sent
    """
    out = []
    for run in runs:
        model = models.get((run.target.host, run.target.service), run.target.model)
        for level in run.levels:
            out.append(
                level_result(
                    run=run,
                    level=level,
                    model=model,
                    detailed=detailed,
                    created=created,
                )
            )
    return out


def jsonl(items: Sequence[dict[str, Any]]) -> str:
    """One JSON object per line (``--append-result``'s file); NaN never written."""
    return "".join(json.dumps(item, allow_nan=False) + "\n" for item in items)
