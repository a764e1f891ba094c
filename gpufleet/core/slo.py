"""
The grammar of a service's baselines and SLOs in group data, validated by the schema.

A service's ``bench`` value in group data (``BenchExpectations``, pydantic):

.. code:: python

    "bench": {
        "baseline": {"decode_tps": 84.1, "ttft_p95@4": "400ms"},
        "slo": ["decode_tps >= 50", "ttft_p95 <= 1s", "success_rate >= 99%", "e2e_p99@16 < 20s"],
    }

- An SLO is ``<figure>[@<concurrency>] <op> <value>[<unit>]`` with ``op`` one of ``<``,
  ``<=``, ``>``, ``>=``. Without ``@N`` it must hold at every level benched; with ``@N`` at
  concurrency N only (missed if N was not benched). A missed SLO makes bench exit 3
  (``gpufleet.bench.slo.EXIT_SLO_MISSED``) so a rollout can gate on it.
- A baseline is ``<figure>[@<concurrency>]: value``; without ``@N`` it is compared at
  concurrency 1, the condition published figures are measured in (gpu-facts.md section 9).
  Bench prints the measured value, the baseline and their ratio (``gpufleet.bench.slo``).
- Units: time figures need ``s`` or ``ms``; ``success_rate`` takes ``%`` or a fraction 0..1;
  every other figure takes a plain number in its unit. Anything else is a ``ValueError`` that
  quotes the expression.

The figures (names from ``gpufleet.core.figures.FIGURES``; times are per request):

| figure | unit | meaning |
|---|---|---|
| ``ttft_{mean,p50,p90,p95,p99}`` | s | time to first token |
| ``tpot_{mean,p50,p90,p95,p99}`` | s | time per output token after the first |
| ``itl_{mean,p50,p90,p95,p99}`` | s | gap between streamed chunks |
| ``e2e_{mean,p50,p90,p95,p99}`` | s | end-to-end latency |
| ``decode_tps`` | tok/s | one stream's decode speed, 1 / mean TPOT (llama-bench ``tg``) |
| ``output_tps_per_request`` | tok/s | mean of output tokens / E2E per request |
| ``output_tps`` / ``prompt_tps`` / ``total_tps`` | tok/s | all requests together |
| ``rps`` / ``rpm`` | req/s, req/min | successful requests |
| ``success_rate`` | ratio | successful / sent |
| ``failed`` / ``completed`` | count | requests |
| ``duration_s`` | s | first send to last completion |
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import Field, field_validator

from gpufleet.core.figures import FIGURES
from gpufleet.core.model import FrozenModel

BASELINE_LEVEL = 1

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_EXPR = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_]*)(?:@(?P<level>\d+))?\s*"
    r"(?P<op><=|>=|<|>)\s*(?P<value>.+?)\s*$"
)
_KEY = re.compile(r"^(?P<metric>[A-Za-z_][A-Za-z0-9_]*)(?:@(?P<level>\d+))?$")
_VALUE = re.compile(r"^(?P<number>[0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*(?P<unit>ms|s|%)?$")
_EXAMPLE = 'e.g. "ttft_p95 <= 1s" or "decode_tps@1 >= 50"'


def _metric(name: str, where: str) -> str:
    if name in FIGURES:
        return name
    close = difflib.get_close_matches(name, FIGURES, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ValueError(f"{where}: unknown figure {name}{hint}")


def _level(text: str | None, where: str) -> int | None:
    if text is None:
        return None
    level = int(text)
    if level < 1:
        raise ValueError(f"{where}: concurrency after @ must be at least 1")
    return level


def parse_value(metric: str, text: str | float | int, *, where: str) -> float:
    """
    A threshold or baseline in the figure's own unit (seconds, a fraction, tok/s ...).

    + metric: a name from ``FIGURES``
    + text: ``"1s"``, ``"250ms"``, ``"99%"``, ``"0.99"``, ``84.1``
    + where: the expression, quoted in errors
    """
    unit_kind = FIGURES[metric].unit
    if isinstance(text, bool):
        raise ValueError(f"{where}: {text!r} is not a number")
    if isinstance(text, int | float):
        number, unit = float(text), None
    else:
        m = _VALUE.match(text.strip())
        if m is None:
            raise ValueError(f"{where}: {text!r} is not a number with an optional unit")
        number, unit = float(m.group("number")), m.group("unit")
    if unit_kind == "s":
        if unit is None:
            raise ValueError(f"{where}: {metric} is a time; give a unit, s or ms (e.g. 1s)")
        if unit == "%":
            raise ValueError(f"{where}: {metric} is a time; % is not a time unit")
        return number / 1000 if unit == "ms" else number
    if unit_kind == "ratio":
        if unit == "%":
            number /= 100
        elif unit is not None:
            raise ValueError(f"{where}: {metric} is a ratio; give a fraction or a percentage")
        if not 0 <= number <= 1:
            raise ValueError(f"{where}: {metric} must be within 0..1 (or 0%..100%)")
        return number
    if unit is not None:
        raise ValueError(f"{where}: {metric} takes a plain number in {unit_kind}, without {unit!r}")
    return number


@dataclass(frozen=True, kw_only=True)
class Slo:
    """
    One parsed SLO.

    + text: the expression as written
    + metric: a name from ``FIGURES``; level: the concurrency it applies to, None for every level
    + op: ``<``, ``<=``, ``>`` or ``>=``; threshold: in the figure's unit
    """

    text: str
    metric: str
    level: int | None
    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)


def parse_slo(text: str) -> Slo:
    """
    Parse one SLO expression strictly.

    + text: ``<figure>[@<concurrency>] <op> <value>[unit]``

    Raises ``ValueError`` quoting the expression: malformed, unknown figure, wrong unit.
    """
    where = f"slo {text!r}"
    if not isinstance(text, str):
        raise ValueError(f"{where}: an SLO is a string, {_EXAMPLE}")
    m = _EXPR.match(text)
    if m is None:
        raise ValueError(f"{where}: expected '<figure>[@<concurrency>] <op> <value>', {_EXAMPLE}")
    metric = _metric(m.group("metric"), where)
    return Slo(
        text=text.strip(),
        metric=metric,
        level=_level(m.group("level"), where),
        op=m.group("op"),
        threshold=parse_value(metric, m.group("value"), where=where),
    )


@dataclass(frozen=True, kw_only=True)
class Baseline:
    """An expected figure: ``metric`` at concurrency ``level`` is ``value`` (its unit)."""

    metric: str
    level: int
    value: float


def parse_baseline(key: str, value: str | float | int) -> Baseline:
    """
    Parse one baseline entry.

    + key: ``<figure>`` or ``<figure>@<concurrency>``
    + value: a number, or a string with a unit for times and ratios
    """
    where = f"baseline {key!r}"
    m = _KEY.match(key.strip())
    if m is None:
        raise ValueError(f"{where}: expected '<figure>' or '<figure>@<concurrency>'")
    metric = _metric(m.group("metric"), where)
    level = _level(m.group("level"), where)
    number = parse_value(metric, value, where=where)
    if number == 0:
        raise ValueError(f"{where}: a baseline of 0 gives no ratio")
    return Baseline(metric=metric, level=BASELINE_LEVEL if level is None else level, value=number)


class BenchExpectations(FrozenModel):
    """
    A service's expected figures and SLOs: the ``bench`` part of its group data.

    .. code:: python

        BenchExpectations(baseline={"decode_tps": 84.1}, slo=["ttft_p95 <= 1s"])
    """

    baseline: dict[str, float | str] = Field(
        default_factory=dict,
        description="Expected figures, e.g. {'decode_tps': 84.1} (compared at concurrency 1 "
        "unless the key says '@N'); times as '400ms'.",
    )
    slo: list[str] = Field(
        default_factory=list,
        description="SLOs such as 'ttft_p95 <= 1s'; bench exits 3 when one is missed.",
    )

    @field_validator("baseline")
    @classmethod
    def _baseline(cls, value: dict[str, float | str]) -> dict[str, float | str]:
        for key, number in value.items():
            parse_baseline(key, number)
        return value

    @field_validator("slo")
    @classmethod
    def _slo(cls, value: list[str]) -> list[str]:
        for text in value:
            parse_slo(text)
        return value

    def slos(self) -> list[Slo]:
        return [parse_slo(text) for text in self.slo]

    def baselines(self) -> list[Baseline]:
        return [parse_baseline(key, value) for key, value in self.baseline.items()]
