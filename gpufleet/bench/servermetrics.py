"""
The server's own counters over a run: Prometheus text from llama-server and vLLM ``/metrics``.

``parse_prometheus`` reads the text exposition format (``# HELP``/``# TYPE`` lines, samples
``name{label="value",...} value [timestamp]``, ``NaN``/``+Inf``, escaped label values).
``server_counters`` compares the first and last scrape of a level: counters become deltas and
rates per wall-clock second, gauges their peak and mean over every scrape taken.

Metric names (gpu-facts.md section 6 for llama-server, which needs ``--metrics``; vLLM's use
the ``vllm:`` prefix and a ``model_name`` label, summed over labels here):

| figure | llama-server | vLLM |
|---|---|---|
| prompt tokens | ``llamacpp:prompt_tokens_total`` | ``vllm:prompt_tokens_total`` |
| generated tokens | ``llamacpp:tokens_predicted_total`` | ``vllm:generation_tokens_total`` |
| prompt / decode seconds | ``llamacpp:prompt_seconds_total``, ``..._predicted_seconds_total`` | - |
| requests running | ``llamacpp:requests_processing`` | ``vllm:num_requests_running`` |
| requests waiting | ``llamacpp:requests_deferred`` | ``vllm:num_requests_waiting`` |
| finished requests | - | ``vllm:request_success_total`` |
| mean TTFT / E2E | - | ``vllm:time_to_first_token_seconds``, ``vllm:e2e_request_latency_seconds`` |
| KV cache use | - | ``vllm:kv_cache_usage_perc`` (older: ``vllm:gpu_cache_usage_perc``) |

A counter lower after than before means the server restarted during the run: that delta is
None and the restart is reported.

.. code:: python

    before, after = parse_prometheus(text_before), parse_prometheus(text_after)
    counters = server_counters([(t0, before), (t1, after)])
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Engine = Literal["llama.cpp", "vllm"]


class MetricsParseError(ValueError):
    """Text that is not the Prometheus exposition format; the message names the line."""


@dataclass(frozen=True, kw_only=True)
class Metrics:
    """
    One scrape: every sample by name and labels, and each family's declared type.

    + samples: ``{name: {labels: value}}``, labels a sorted tuple of ``(key, value)``
    + types: ``{family: "counter" | "gauge" | "histogram" | ...}`` from ``# TYPE`` lines
    """

    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)

    def total(self, name: str) -> float | None:
        """The sum of a metric over all its label sets; None when absent."""
        series = self.samples.get(name)
        if not series:
            return None
        return math.fsum(series.values())

    def names(self) -> set[str]:
        return set(self.samples)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
_FLOATS = {"nan": math.nan, "+inf": math.inf, "inf": math.inf, "-inf": -math.inf}


def _labels(text: str, number: int) -> tuple[tuple[str, str], ...]:
    inner = text[1:-1].strip()
    labels = []
    pos = 0
    while pos < len(inner):
        m = _LABEL.match(inner, pos)
        if m is None:
            raise MetricsParseError(f"line {number}: bad labels {text!r}")
        value = m.group(2).replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        labels.append((m.group(1), value))
        pos = m.end()
    return tuple(sorted(labels))


def parse_prometheus(text: str) -> Metrics:
    """
    Parse Prometheus text exposition format.

    + text: a ``/metrics`` body

    Raises ``MetricsParseError`` naming the first line that is neither a comment nor a sample.
    """
    metrics = Metrics()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 4 and parts[1] == "TYPE":
                metrics.types[parts[2]] = parts[3].strip()
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise MetricsParseError(f"line {number}: not a metric sample: {line[:80]!r}")
        name, labels, value = m.group(1), m.group(2), m.group(3)
        try:
            number_value = _FLOATS[value.lower()] if value.lower() in _FLOATS else float(value)
        except ValueError:
            raise MetricsParseError(f"line {number}: bad value {value!r}") from None
        key = _labels(labels, number) if labels else ()
        metrics.samples.setdefault(name, {})[key] = number_value
    return metrics


@dataclass(frozen=True, kw_only=True)
class _Names:
    prompt_tokens: str
    generated_tokens: str
    running: str
    waiting: str
    prompt_seconds: str | None = None
    generated_seconds: str | None = None
    finished: str | None = None
    ttft: str | None = None
    e2e: str | None = None
    kv_cache: tuple[str, ...] = ()


ENGINES: dict[Engine, _Names] = {
    "llama.cpp": _Names(
        prompt_tokens="llamacpp:prompt_tokens_total",
        generated_tokens="llamacpp:tokens_predicted_total",
        running="llamacpp:requests_processing",
        waiting="llamacpp:requests_deferred",
        prompt_seconds="llamacpp:prompt_seconds_total",
        generated_seconds="llamacpp:tokens_predicted_seconds_total",
    ),
    "vllm": _Names(
        prompt_tokens="vllm:prompt_tokens_total",
        generated_tokens="vllm:generation_tokens_total",
        running="vllm:num_requests_running",
        waiting="vllm:num_requests_waiting",
        finished="vllm:request_success_total",
        ttft="vllm:time_to_first_token_seconds",
        e2e="vllm:e2e_request_latency_seconds",
        kv_cache=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
}


def detect_engine(metrics: Metrics) -> Engine | None:
    """``llama.cpp`` or ``vllm`` from the metric name prefixes; None for neither."""
    names = metrics.names()
    if any(n.startswith("llamacpp:") for n in names):
        return "llama.cpp"
    if any(n.startswith("vllm:") for n in names):
        return "vllm"
    return None


@dataclass(frozen=True, kw_only=True)
class Gauge:
    """A gauge over a run's scrapes: the last value, the peak and the mean."""

    last: float
    peak: float
    mean: float


@dataclass(frozen=True, kw_only=True)
class ServerCounters:
    """
    What the server says happened during a level.

    + engine: which names were read; elapsed_s: time between first and last scrape
    + prompt_tokens / generated_tokens: counter deltas (None: absent, or a restart)
    + prompt_tps / generated_tps: those deltas per wall-clock second
    + server_prompt_tps / server_decode_tps: llama-server's own rates (tokens / busy seconds)
    + requests_finished: vLLM's finished requests; ttft_mean_s / e2e_mean_s: vLLM histograms
    + running / waiting / kv_cache_usage: gauges over the scrapes
    + restarted: a counter went backwards between the scrapes
    """

    engine: Engine
    scrapes: int
    elapsed_s: float
    prompt_tokens: float | None
    generated_tokens: float | None
    prompt_tps: float | None
    generated_tps: float | None
    server_prompt_tps: float | None
    server_decode_tps: float | None
    requests_finished: float | None
    ttft_mean_s: float | None
    e2e_mean_s: float | None
    running: Gauge | None
    waiting: Gauge | None
    kv_cache_usage: Gauge | None
    restarted: bool

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in self.__dict__.items():
            out[key] = value.__dict__ if isinstance(value, Gauge) else value
        return out


def _delta(before: Metrics, after: Metrics, name: str | None) -> tuple[float | None, bool]:
    """``(after - before, restarted)`` for a counter."""
    if name is None:
        return None, False
    a, b = before.total(name), after.total(name)
    if a is None or b is None:
        return None, False
    if b < a:
        return None, True
    return b - a, False


def _gauge(scrapes: Sequence[Metrics], names: Sequence[str]) -> Gauge | None:
    for name in names:
        values = [v for m in scrapes if (v := m.total(name)) is not None]
        if values:
            return Gauge(last=values[-1], peak=max(values), mean=math.fsum(values) / len(values))
    return None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def server_counters(scrapes: Sequence[tuple[float, Metrics]]) -> ServerCounters | None:
    """
    Deltas, rates and gauges over a level's scrapes.

    + scrapes: ``(time.time(), parsed)`` pairs in order; the first and the last give deltas

    Returns None with fewer than two scrapes or when neither engine's names are present.
    """
    if len(scrapes) < 2:
        return None
    (t0, first), (t1, last) = scrapes[0], scrapes[-1]
    engine = detect_engine(last)
    if engine is None:
        return None
    names = ENGINES[engine]
    elapsed = t1 - t0
    restarted = False

    def delta(name: str | None) -> float | None:
        nonlocal restarted
        value, went_back = _delta(first, last, name)
        restarted = restarted or went_back
        return value

    prompt, generated = delta(names.prompt_tokens), delta(names.generated_tokens)
    prompt_s, generated_s = delta(names.prompt_seconds), delta(names.generated_seconds)
    finished = delta(names.finished)
    ttft_sum = delta(names.ttft and f"{names.ttft}_sum")
    ttft_count = delta(names.ttft and f"{names.ttft}_count")
    e2e_sum = delta(names.e2e and f"{names.e2e}_sum")
    e2e_count = delta(names.e2e and f"{names.e2e}_count")
    parsed = [m for _, m in scrapes]
    return ServerCounters(
        engine=engine,
        scrapes=len(scrapes),
        elapsed_s=elapsed,
        prompt_tokens=prompt,
        generated_tokens=generated,
        prompt_tps=_ratio(prompt, elapsed),
        generated_tps=_ratio(generated, elapsed),
        server_prompt_tps=_ratio(prompt, prompt_s),
        server_decode_tps=_ratio(generated, generated_s),
        requests_finished=finished,
        ttft_mean_s=_ratio(ttft_sum, ttft_count),
        e2e_mean_s=_ratio(e2e_sum, e2e_count),
        running=_gauge(parsed, [names.running]),
        waiting=_gauge(parsed, [names.waiting]),
        kv_cache_usage=_gauge(parsed, names.kv_cache),
        restarted=restarted,
    )


def counters_from_text(scrapes: Sequence[tuple[float, str]]) -> ServerCounters | None:
    """``server_counters`` over raw ``(time, text)`` scrapes; unparsable ones are dropped."""
    parsed: list[tuple[float, Metrics]] = []
    for at, text in scrapes:
        try:
            parsed.append((at, parse_prometheus(text)))
        except MetricsParseError:
            continue
    return server_counters(parsed)


def known_names(engine: Engine) -> Mapping[str, str | tuple[str, ...] | None]:
    """The metric names read for one engine, by figure (for docs and the stand-ins' tests)."""
    return dict(ENGINES[engine].__dict__)
