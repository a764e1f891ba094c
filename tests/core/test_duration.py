"""The one duration parser: what rollout's --lock-wait/--lease-ttl and a service's
start_period are read with."""

from __future__ import annotations

import pytest

from gpufleet.core.duration import parse_duration
from gpufleet.fleet import rollout
from gpufleet.fleet.runner import UsageError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), (" 5m ", 300), ("1h", 3600), ("1.5m", 90), ("2 h", 7200)],
)
def test_durations_in_seconds(text, seconds):
    assert parse_duration(text) == seconds
    assert rollout.parse_duration(text) == seconds  # the copy rollout.py keeps, until it imports


@pytest.mark.parametrize("text", ["", "5d", "m", "-1s", "1e3s", "five minutes"])
def test_anything_else_is_refused_with_the_callers_error(text):
    with pytest.raises(ValueError, match="is not a duration like 30s, 5m or 1h"):
        parse_duration(text)
    with pytest.raises(UsageError, match="is not a duration like 30s, 5m or 1h"):
        parse_duration(text, error=UsageError)
    with pytest.raises(UsageError, match="is not a duration like 30s, 5m or 1h"):
        rollout.parse_duration(text)


def test_a_start_period_reads_as_plan_host_reads_it():
    from gpufleet.plan.services import _seconds

    for period in ("30s", "10m", "2h"):
        assert int(parse_duration(period)) == _seconds(period)
