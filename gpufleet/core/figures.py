"""
The bench figures: every flat figure's name, unit and direction, defined once.

The host-data schema checks a service's SLOs and baselines against these names
(``gpufleet.core.slo``); bench computes them (``gpufleet.bench.metrics.figures``) and
its JSON report, CSV and ``compare`` print them. Definitions follow ``vllm bench serve``
(see ``gpufleet.bench.metrics``).

.. code:: python

    FIGURES["ttft_p95"].unit  # "s"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PERCENTILES = (50, 90, 95, 99)
Unit = Literal["s", "tok/s", "req/s", "req/min", "ratio", "count"]


@dataclass(frozen=True, kw_only=True)
class Figure:
    """
    One flat figure's definition.

    + unit: ``s`` for times (seconds), rates per second or minute, ``ratio`` 0..1, ``count``
    + higher_is_better: the direction ``compare`` and baselines call "better"
    + description: one line for the documentation table and the CSV header
    """

    name: str
    unit: Unit
    higher_is_better: bool
    description: str


def _latency_figures() -> list[Figure]:
    out = []
    what = {
        "ttft": "time to first token",
        "tpot": "time per output token after the first",
        "itl": "inter-token latency (gap between streamed chunks)",
        "e2e": "end-to-end request latency",
    }
    for family, text in what.items():
        out.append(
            Figure(
                name=f"{family}_mean", unit="s", higher_is_better=False, description=f"mean {text}"
            )
        )
        for p in PERCENTILES:
            label = "median" if p == 50 else f"p{p}"
            out.append(
                Figure(
                    name=f"{family}_p{p}",
                    unit="s",
                    higher_is_better=False,
                    description=f"{label} {text}",
                )
            )
    return out


FIGURES: dict[str, Figure] = {
    f.name: f
    for f in [
        *_latency_figures(),
        Figure(
            name="rps",
            unit="req/s",
            higher_is_better=True,
            description="successful requests per second",
        ),
        Figure(
            name="rpm",
            unit="req/min",
            higher_is_better=True,
            description="successful requests per minute",
        ),
        Figure(
            name="output_tps",
            unit="tok/s",
            higher_is_better=True,
            description="output tokens per second, all requests together",
        ),
        Figure(
            name="prompt_tps",
            unit="tok/s",
            higher_is_better=True,
            description="prompt tokens per second, all requests together",
        ),
        Figure(
            name="total_tps",
            unit="tok/s",
            higher_is_better=True,
            description="prompt plus output tokens per second",
        ),
        Figure(
            name="output_tps_per_request",
            unit="tok/s",
            higher_is_better=True,
            description="mean over requests of output tokens / E2E latency",
        ),
        Figure(
            name="decode_tps",
            unit="tok/s",
            higher_is_better=True,
            description="one stream's decode speed, 1 / mean TPOT (batch-1 figures)",
        ),
        Figure(
            name="success_rate",
            unit="ratio",
            higher_is_better=True,
            description="successful requests / requests sent",
        ),
        Figure(name="failed", unit="count", higher_is_better=False, description="failed requests"),
        Figure(
            name="completed", unit="count", higher_is_better=True, description="successful requests"
        ),
        Figure(
            name="duration_s",
            unit="s",
            higher_is_better=False,
            description="first send to last completion",
        ),
    ]
}
