"""
Baselines and SLOs checked against the figures bench measured.

The grammar (``Slo``, ``Baseline``, ``BenchExpectations``, the figures it names) lives in
``gpufleet.core.slo``, where the host-data schema validates it; this module checks parsed
SLOs and baselines against each benched level and words the outcome.

.. code:: python

    results = check_slos(expectations.slos(), {1: figures(summary)})
    if missed(results):
        raise SystemExit(EXIT_SLO_MISSED)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpufleet.bench.metrics import format_value
from gpufleet.core.figures import FIGURES
from gpufleet.core.slo import Baseline, Slo

EXIT_SLO_MISSED = 3
Levels = Mapping[int | None, Mapping[str, float | None]]


def _level_name(level: int | None) -> str:
    return "uncapped" if level is None else f"c={level}"


@dataclass(frozen=True, kw_only=True)
class SloResult:
    """One SLO at one level: the value measured and whether it held."""

    slo: Slo
    level: int | None
    value: float | None
    passed: bool
    reason: str

    def line(self) -> str:
        verdict = "PASS" if self.passed else "MISS"
        return f"{verdict} {self.slo.text} at {_level_name(self.level)}: {self.reason}"

    def to_dict(self) -> dict[str, object]:
        return {
            "slo": self.slo.text,
            "metric": self.slo.metric,
            "level": self.level,
            "value": self.value,
            "threshold": self.slo.threshold,
            "passed": self.passed,
            "reason": self.reason,
        }


def check_slos(slos: Sequence[Slo], levels: Levels) -> list[SloResult]:
    """
    Check SLOs against the figures of each level benched.

    + slos: parsed SLOs
    + levels: concurrency -> ``metrics.figures(...)`` of that level

    An SLO for a level not benched, or a figure with no value (every request failed), is
    missed: a gate that passes on no data proves nothing.
    """
    results = []
    for slo in slos:
        targets = [slo.level] if slo.level is not None else list(levels)
        if not targets:
            results.append(
                SloResult(
                    slo=slo, level=None, value=None, passed=False, reason="no level was benched"
                )
            )
        for level in targets:
            if level not in levels:
                results.append(
                    SloResult(
                        slo=slo,
                        level=level,
                        value=None,
                        passed=False,
                        reason=f"concurrency {level} was not benched",
                    )
                )
                continue
            value = levels[level].get(slo.metric)
            if value is None:
                results.append(
                    SloResult(
                        slo=slo,
                        level=level,
                        value=None,
                        passed=False,
                        reason=f"no value for {slo.metric}",
                    )
                )
                continue
            passed = slo.holds(value)
            shown = format_value(slo.metric, value)
            results.append(
                SloResult(
                    slo=slo, level=level, value=value, passed=passed, reason=f"measured {shown}"
                )
            )
    return results


def missed(results: Sequence[SloResult]) -> bool:
    """True when any SLO was missed (bench then exits ``EXIT_SLO_MISSED``)."""
    return any(not r.passed for r in results)


@dataclass(frozen=True, kw_only=True)
class BaselineRatio:
    """A measured figure against its baseline; ratio = measured / baseline."""

    baseline: Baseline
    measured: float | None
    ratio: float | None
    benched: bool = True

    def line(self) -> str:
        b = self.baseline
        head = f"{b.metric} at {_level_name(b.level)}"
        expected = format_value(b.metric, b.value)
        if self.ratio is None:
            why = "no value" if self.benched else "not benched"
            return f"{head}: {why} (baseline {expected})"
        better = (self.ratio >= 1) == FIGURES[b.metric].higher_is_better
        word = "better" if better else "worse"
        if self.ratio == 1:
            word = "equal"
        return (
            f"{head}: {format_value(b.metric, self.measured)} vs baseline {expected} "
            f"({self.ratio:.2f}x, {word})"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "metric": self.baseline.metric,
            "level": self.baseline.level,
            "baseline": self.baseline.value,
            "measured": self.measured,
            "ratio": self.ratio,
        }


def compare_baselines(baselines: Sequence[Baseline], levels: Levels) -> list[BaselineRatio]:
    """
    Each baseline against the figure measured at its level.

    + baselines: parsed baselines
    + levels: concurrency -> figures
    """
    out = []
    for b in baselines:
        benched = b.level in levels
        measured = levels[b.level].get(b.metric) if benched else None
        ratio = None if measured is None else measured / b.value
        out.append(BaselineRatio(baseline=b, measured=measured, ratio=ratio, benched=benched))
    return out
