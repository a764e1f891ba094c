"""``gpufleet bench``'s options: parsed and checked by ``BenchOptions`` before any work."""

import math

import click
import pytest

from gpufleet.cli import BenchOptions


def test_the_defaults_load_50_requests_per_level_at_concurrency_1_without_pacing():
    load = BenchOptions().load()
    assert load.levels == [1]
    assert load.settings.requests == 50 and load.settings.duration_s is None
    assert load.settings.rate == math.inf and load.prompts


def test_a_duration_replaces_the_request_count():
    load = BenchOptions(concurrency="1,4,16", duration="60s", rate="2.5").load()
    assert load.levels == [1, 4, 16]
    assert load.settings.requests is None and load.settings.duration_s == 60
    assert load.settings.rate == 2.5


@pytest.mark.parametrize(
    ("options", "hint"),
    [
        ({"concurrency": "0"}, "--concurrency"),
        ({"concurrency": "a,b"}, "--concurrency"),
        ({"extra_body": "{"}, "--body"),
        ({"extra_body": "[1]"}, "--body"),
    ],
)
def test_a_wrong_option_is_named(options, hint):
    with pytest.raises(click.BadParameter) as err:
        BenchOptions(**options).load()
    assert err.value.param_hint == hint


def test_a_missing_prompt_file_is_a_usage_error(tmp_path):
    with pytest.raises(click.UsageError, match="missing.jsonl"):
        BenchOptions(prompts_file=str(tmp_path / "missing.jsonl")).load()
