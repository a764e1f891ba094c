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


def test_random_dataset_sets_its_lengths_and_ignore_eos_which_body_may_override():
    load = BenchOptions(dataset="random", input_len=1024, output_len=128, requests=40).load()
    # 40 measured and 2 warm-up prompts for its one level: none sent twice
    assert (load.dataset.input_len, load.dataset.output_len, load.dataset.count) == (1024, 128, 42)
    two = BenchOptions(dataset="random", input_len=8, output_len=2, requests=40, concurrency="1,4")
    assert two.load().dataset.count == 84
    assert load.settings.extra_body == {"ignore_eos": True} and load.prompts == []
    assert load.dataset_doc() == {"name": "random", "input_len": 1024, "output_len": 128}
    mine = BenchOptions(
        dataset="random", input_len=8, output_len=2, extra_body='{"ignore_eos":false}'
    )
    assert mine.load().settings.extra_body == {"ignore_eos": False}
    assert BenchOptions().load().dataset is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dataset": "random", "output_len": 4}, "--input-len"),
        ({"dataset": "random", "input_len": 4, "output_len": 0}, "--output-len"),
        ({"input_len": 4}, "--input-len is for --dataset random"),
        ({"dataset": "random", "input_len": 4, "output_len": 4, "prompts_file": "p.jsonl"},
         "choose one"),
    ],
)  # fmt: skip
def test_random_dataset_usage_errors(options, message):
    with pytest.raises(click.UsageError) as err:
        BenchOptions(**options).load()
    assert message in err.value.format_message()
