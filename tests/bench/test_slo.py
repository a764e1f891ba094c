"""SLO expressions and baselines: strict parsing, checking, ratios."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gpufleet.bench.slo import EXIT_SLO_MISSED, check_slos, compare_baselines, missed
from gpufleet.core.figures import FIGURES
from gpufleet.core.slo import Baseline, BenchExpectations, parse_baseline, parse_slo


@pytest.mark.parametrize(
    ("text", "metric", "level", "op", "threshold"),
    [
        ("decode_tps >= 50", "decode_tps", None, ">=", 50.0),
        ("ttft_p95 <= 1s", "ttft_p95", None, "<=", 1.0),
        ("ttft_p95<=250ms", "ttft_p95", None, "<=", 0.25),
        ("  e2e_p99@16 < 20 s ", "e2e_p99", 16, "<", 20.0),
        ("success_rate >= 99%", "success_rate", None, ">=", 0.99),
        ("success_rate > 0.5", "success_rate", None, ">", 0.5),
        ("rps@4 > 1.5e0", "rps", 4, ">", 1.5),
        ("failed <= 0", "failed", None, "<=", 0.0),
    ],
)
def test_parse_slo(text, metric, level, op, threshold):
    slo = parse_slo(text)
    assert (slo.metric, slo.level, slo.op) == (metric, level, op)
    assert slo.threshold == pytest.approx(threshold)
    assert slo.text == text.strip()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tfft_p95 <= 1s", "unknown figure tfft_p95 (did you mean ttft_p95?)"),
        ("gpu_temp <= 80", "unknown figure gpu_temp"),
        ("ttft_p95 less than 1s", "expected '<figure>[@<concurrency>] <op> <value>'"),
        ("ttft_p95 == 1s", "expected '<figure>"),
        ("ttft_p95 <= 1", "is a time; give a unit, s or ms"),
        ("ttft_p95 <= 5%", "% is not a time unit"),
        ("decode_tps >= 50ms", "takes a plain number in tok/s"),
        ("success_rate >= 150%", "must be within 0..1"),
        ("success_rate >= 99", "must be within 0..1"),
        ("success_rate >= 1s", "is a ratio"),
        ("rps@0 > 1", "at least 1"),
        ("ttft_p95 <= fast", "is not a number"),
    ],
)
def test_bad_slo_is_one_value_error_quoting_it(text, message):
    with pytest.raises(ValueError) as info:
        parse_slo(text)
    assert str(info.value).startswith(f"slo {text!r}: ")
    assert message in str(info.value)


def test_parse_slo_rejects_non_strings():
    with pytest.raises(ValueError, match="an SLO is a string"):
        parse_slo(5)  # type: ignore[arg-type]


LEVELS = {
    1: {"decode_tps": 80.0, "ttft_p95": 0.4, "success_rate": 1.0, "e2e_p99": None},
    4: {"decode_tps": 45.0, "ttft_p95": 1.0, "success_rate": 0.95, "e2e_p99": 3.0},
}


def results(*texts: str):
    return check_slos([parse_slo(t) for t in texts], LEVELS)


def test_unqualified_slo_holds_at_every_level():
    r = results("decode_tps >= 50")
    assert [(x.level, x.passed) for x in r] == [(1, True), (4, False)]
    assert r[1].value == 45.0
    assert r[1].line() == "MISS decode_tps >= 50 at c=4: measured 45.0 tok/s"
    assert missed(r)


def test_boundaries_and_qualified_levels():
    assert [x.passed for x in results("ttft_p95 <= 1s")] == [True, True]
    assert [x.passed for x in results("ttft_p95 < 1s")] == [True, False]
    assert [(x.level, x.passed) for x in results("success_rate@4 >= 95%")] == [(4, True)]
    assert not missed(results("ttft_p95@1 <= 500ms", "decode_tps@1 > 79.9"))


def test_no_data_and_unbenched_levels_are_misses():
    [unbenched] = results("rps@16 > 1")
    assert not unbenched.passed and unbenched.reason == "concurrency 16 was not benched"
    no_value = results("e2e_p99 <= 10s")
    assert [(x.level, x.passed) for x in no_value] == [(1, False), (4, True)]
    assert no_value[0].reason == "no value for e2e_p99"
    [nothing] = check_slos([parse_slo("rps > 1")], {})
    assert not nothing.passed and nothing.reason == "no level was benched"
    assert EXIT_SLO_MISSED == 3


def test_baselines_default_to_concurrency_one():
    b = parse_baseline("decode_tps", 84.1)
    assert b == Baseline(metric="decode_tps", level=1, value=84.1)
    assert parse_baseline("ttft_p95@4", "400ms") == Baseline(metric="ttft_p95", level=4, value=0.4)
    ratios = compare_baselines(
        [
            b,
            parse_baseline("ttft_p95@4", "500ms"),
            parse_baseline("rps@8", 2),
            parse_baseline("e2e_p99", "2s"),
        ],
        LEVELS,
    )
    assert ratios[0].ratio == pytest.approx(80.0 / 84.1)
    assert ratios[0].line() == "decode_tps at c=1: 80.0 tok/s vs baseline 84.1 tok/s (0.95x, worse)"
    assert ratios[1].ratio == pytest.approx(2.0)
    assert ratios[1].line().endswith("(2.00x, worse)")  # slower latency is worse
    assert ratios[2].ratio is None and ratios[2].line().startswith("rps at c=8: not benched")
    assert ratios[3].line().startswith("e2e_p99 at c=1: no value")
    faster = compare_baselines([parse_baseline("ttft_p95", "800ms")], LEVELS)[0]
    assert faster.line().endswith("(0.50x, better)")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("decode", 1, "unknown figure decode"),
        ("decode_tps@x", 1, "expected '<figure>'"),
        ("ttft_p95", 0.3, "is a time"),
        ("decode_tps", 0, "a baseline of 0"),
        ("decode_tps", True, "is not a number"),
    ],
)
def test_bad_baselines(key, value, message):
    with pytest.raises(ValueError, match=message):
        parse_baseline(key, value)


def test_expectations_model_validates_group_data():
    exp = BenchExpectations.model_validate(
        {"baseline": {"decode_tps": 84.1}, "slo": ["decode_tps >= 50", "ttft_p95 <= 1s"]}
    )
    assert [s.metric for s in exp.slos()] == ["decode_tps", "ttft_p95"]
    assert exp.baselines() == [Baseline(metric="decode_tps", level=1, value=84.1)]
    with pytest.raises(ValidationError, match="unknown figure ttft_p59"):
        BenchExpectations.model_validate({"slo": ["ttft_p59 <= 1s"]})
    with pytest.raises(ValidationError, match="is a time"):
        BenchExpectations.model_validate({"baseline": {"ttft_p95": 1}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        BenchExpectations.model_validate({"slos": []})
    assert BenchExpectations().slos() == [] and BenchExpectations().baselines() == []


def test_every_figure_is_documented_in_the_slo_table():
    import gpufleet.core.slo as slo

    doc = slo.__doc__ or ""
    families = {"ttft", "tpot", "itl", "e2e"}
    for name in FIGURES:
        family = name.split("_")[0]
        assert (family in families and f"``{family}_" in doc) or name in doc, name
