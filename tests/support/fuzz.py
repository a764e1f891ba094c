"""What the Hypothesis tests share: one settings profile, nasty strings, and a case clock.

Under ``CI=true`` the examples are derandomized (seeded from each test's name), so a CI run is
reproducible and a failure found there is found again locally with ``CI=true pytest ...``.
Nothing is written to an example database: a failing case is printed, shrunk, in full.
``GPUFLEET_FUZZ_SCALE=10`` runs ten times the cases, for a longer hunt by hand.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SCALE = float(os.environ.get("GPUFLEET_FUZZ_SCALE", "1"))


def fuzz(max_examples: int) -> settings:
    """Settings for one fuzz test: ``max_examples`` cases, no deadline (the case clock reports
    the slowest), reproducible under CI."""
    return settings(
        max_examples=max(1, round(max_examples * SCALE)),
        deadline=None,
        derandomize=IN_CI,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Pieces that break naive parsers and renderers: separators, quotes, shell and compose syntax,
# format placeholders, path tricks, control characters and look-alike line breaks.
NASTY = (
    "", " ", "\t", "\n", "\r\n", "\x00", "\x1b[31m", "\u2028", "\x85", "'", '"', "\\", "$", "$$",
    "${HOME}", "$(id)", "`id`", ";", "#", ":", "/", "//", "..", "../", "./", "{", "}", "{0}",
    "{os_id}", "{bogus}", "%s", "~", "~nobody/", "*", "?", "[", "@", "=", ",", "|", "&",
    "N/A", "[N/A]", "-", "é", "日本", "\ufeff", "0x1F", "1e9", "-1", "nan", "inf",
)  # fmt: skip
nasty_text = st.one_of(
    st.sampled_from(NASTY),
    st.text(max_size=12),
    st.lists(st.one_of(st.sampled_from(NASTY), st.text(max_size=4)), max_size=4).map("".join),
)


@dataclass
class CaseClock:
    """Counts the cases a test ran and keeps the slowest one's time."""

    name: str
    cases: int = 0
    slowest: float = 0.0
    total: float = 0.0

    @contextmanager
    def case(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.cases += 1
            self.total += elapsed
            self.slowest = max(self.slowest, elapsed)

    def line(self) -> str:
        return (
            f"{self.name}: {self.cases} cases in {self.total:.1f} s, "
            f"slowest {self.slowest * 1000:.1f} ms"
        )


class _Summary:
    """A plugin that prints the clocks' lines in pytest's terminal summary."""

    def __init__(self) -> None:
        self.clocks: list[CaseClock] = []

    def pytest_terminal_summary(self, terminalreporter) -> None:
        ran = [clock for clock in self.clocks if clock.cases]
        for clock in ran:
            terminalreporter.write_line(f"fuzz: {clock.line()}")
        if len(ran) > 1:
            slowest = max(ran, key=lambda clock: clock.slowest)
            terminalreporter.write_line(
                f"fuzz: {sum(c.cases for c in ran)} cases in all, the slowest "
                f"{slowest.slowest * 1000:.1f} ms ({slowest.name})"
            )


def report(request, clocks: list[CaseClock]) -> None:
    """Have each clock's line printed in pytest's summary (at every verbosity, also -q)."""
    plugins = request.config.pluginmanager
    summary = plugins.get_plugin("gpufleet-fuzz")
    if summary is None:
        summary = _Summary()
        plugins.register(summary, "gpufleet-fuzz")
    summary.clocks += clocks
