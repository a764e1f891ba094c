"""Figures over request records, checked against numbers worked out by hand."""

from __future__ import annotations

import random

import numpy
import pytest

from gpufleet.bench.client import RequestRecord
from gpufleet.bench.metrics import (
    Distribution,
    figure_table,
    figures,
    format_value,
    percentile,
    summarize,
)
from gpufleet.core.figures import FIGURES


def ok(
    ttft: float,
    latency: float,
    tokens: int | None,
    prompt: int | None,
    itl: tuple[float, ...] = (),
    index: int = 0,
) -> RequestRecord:
    return RequestRecord(
        index=index,
        prompt="p",
        start_s=0.0,
        success=True,
        ttft_s=ttft,
        itl_s=itl,
        latency_s=latency,
        prompt_tokens=prompt,
        completion_tokens=tokens,
    )


def failed(error_class: str) -> RequestRecord:
    return RequestRecord(
        index=9, prompt="p", start_s=0.0, success=False, error_class=error_class, error="x"
    )


# A: 10 tokens, TPOT (1.0 - 0.1) / 9 = 0.1;  B: 5 tokens, TPOT (2.2 - 0.2) / 4 = 0.5;
# C: one token, so no TPOT.  Two failures.  Duration 4 s.
RECORDS = [
    ok(0.1, 1.0, 10, 20, (0.1,) * 9),
    ok(0.2, 2.2, 5, 30, (0.5,) * 4),
    ok(0.3, 0.3, 1, 10),
    failed("http_503"),
    failed("timeout"),
]


def test_percentile_interpolates_linearly():
    assert percentile([0.1, 0.2, 0.3], 50) == pytest.approx(0.2)
    assert percentile([0.1, 0.2, 0.3], 90) == pytest.approx(0.28)  # rank 1.8
    assert percentile([0.1, 0.2, 0.3], 99) == pytest.approx(0.298)  # rank 1.98
    assert percentile([5.0], 99) == 5.0
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_percentile_matches_numpy_default():
    rng = random.Random(4)
    for n in (1, 2, 7, 100, 1001):
        values = [rng.expovariate(3.0) for _ in range(n)]
        for q in (50, 90, 95, 99, 33.3):
            assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)))


def test_summary_counts_and_throughputs():
    s = summarize(RECORDS, duration_s=4.0)
    assert (s.requests, s.completed, s.failed) == (5, 3, 2)
    assert s.failures == {"http_503": 1, "timeout": 1}
    assert s.success_rate == pytest.approx(0.6)
    assert s.rps == pytest.approx(0.75)
    assert s.rpm == pytest.approx(45.0)
    assert s.output_tokens == 16 and s.prompt_tokens == 60
    assert s.output_tps == pytest.approx(4.0)
    assert s.prompt_tps == pytest.approx(15.0)
    assert s.total_tps == pytest.approx(19.0)
    # 10/1.0, 5/2.2, 1/0.3
    assert s.output_tps_per_request == pytest.approx((10 + 5 / 2.2 + 1 / 0.3) / 3)
    assert s.usage_missing == 0


def test_summary_latency_distributions():
    s = summarize(RECORDS, duration_s=4.0)
    assert s.ttft == Distribution(
        count=3,
        mean=pytest.approx(0.2),
        p50=pytest.approx(0.2),
        p90=pytest.approx(0.28),
        p95=pytest.approx(0.29),
        p99=pytest.approx(0.298),
    )
    # TPOT only for requests with more than one output token: 0.1 and 0.5
    assert s.tpot is not None and s.tpot.count == 2
    assert s.tpot.mean == pytest.approx(0.3)
    assert s.tpot.p90 == pytest.approx(0.46)
    assert s.decode_tps == pytest.approx(1 / 0.3)
    # ITL pools every gap: nine of 0.1 s and four of 0.5 s
    assert s.itl is not None and s.itl.count == 13
    assert s.itl.mean == pytest.approx(2.9 / 13)
    assert s.itl.p50 == pytest.approx(0.1)
    assert s.itl.p90 == pytest.approx(0.5)
    assert s.e2e is not None
    assert s.e2e.mean == pytest.approx(3.5 / 3)
    assert s.e2e.p50 == pytest.approx(1.0)
    assert s.e2e.p99 == pytest.approx(1.0 + 1.2 * 0.98)


def test_tokens_come_from_usage_and_missing_usage_is_counted():
    records = [ok(0.1, 1.1, None, None, (0.5, 0.5)), ok(0.1, 1.0, 11, 4, (0.09,) * 10)]
    s = summarize(records, duration_s=2.0)
    assert s.usage_missing == 1
    assert s.output_tokens == 11  # the request without usage adds no guessed count
    assert s.tpot is not None and s.tpot.count == 1
    assert s.tpot.mean == pytest.approx(0.09)
    assert s.ttft is not None and s.ttft.count == 2  # but its latency still counts


def test_no_successes_gives_none_not_zero():
    s = summarize([failed("connection"), failed("connection")], duration_s=1.0)
    assert s.success_rate == 0.0
    assert s.failures == {"connection": 2}
    assert s.ttft is s.tpot is s.itl is s.e2e is None
    assert s.decode_tps is None and s.output_tps_per_request is None
    f = figures(s)
    assert f["ttft_p99"] is None and f["e2e_mean"] is None
    assert f["failed"] == 2 and f["rps"] == 0.0


def test_empty_level_and_zero_duration():
    s = summarize([], duration_s=0.0)
    assert s.success_rate is None and s.rps is None and s.output_tps is None


def test_figures_cover_every_name_in_the_table():
    f = figures(summarize(RECORDS, duration_s=4.0))
    assert list(f) == list(FIGURES)
    assert f["ttft_p90"] == pytest.approx(0.28)
    assert f["success_rate"] == pytest.approx(0.6)
    table = figure_table()
    for name in FIGURES:
        assert f"`{name}`" in table


def test_format_value_units():
    assert format_value("ttft_p95", 0.1234) == "123.4 ms"
    assert format_value("duration_s", 59.84) == "59.8s"
    assert format_value("success_rate", 0.995) == "99.5%"
    assert format_value("decode_tps", 84.1) == "84.1 tok/s"
    assert format_value("rps", 2.5) == "2.50 req/s"
    assert format_value("failed", 3) == "3"
    assert format_value("ttft_p95", None) == "-"
