"""Prometheus text from llama-server and vLLM, and counter deltas over a run."""

from __future__ import annotations

import math

import pytest

from gpufleet.bench.servermetrics import (
    Metrics,
    MetricsParseError,
    counters_from_text,
    detect_engine,
    known_names,
    parse_prometheus,
    server_counters,
)


def llama(
    prompt: int, prompt_s: float, predicted: int, predicted_s: float, processing: int, deferred: int
) -> str:
    """llama-server's /metrics layout (tools/server: HELP, TYPE, one sample per family)."""
    return f"""\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total {prompt}
# HELP llamacpp:prompt_seconds_total Prompt process time
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total {prompt_s}
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total {predicted}
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total {predicted_s}
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 42
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds nan
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing {processing}
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred {deferred}
"""


def vllm(
    prompt: int,
    generation: int,
    running: int,
    waiting: int,
    ttft_sum: float,
    ttft_count: int,
    finished_length: int,
    finished_stop: int,
) -> str:
    labels = 'engine="0",model_name="Qwen/Qwen3-32B-FP8"'
    return f"""\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{{labels}}} {running}.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{{labels}}} {waiting}.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{{labels}}} 0.25
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{{{labels}}} {prompt}.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{{{labels}}} {generation}.0
# TYPE vllm:request_success counter
vllm:request_success_total{{{labels},finished_reason="length"}} {finished_length}.0
vllm:request_success_total{{{labels},finished_reason="stop"}} {finished_stop}.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{{labels},le="0.1"}} 1.0
vllm:time_to_first_token_seconds_bucket{{{labels},le="+Inf"}} {ttft_count}.0
vllm:time_to_first_token_seconds_count{{{labels}}} {ttft_count}.0
vllm:time_to_first_token_seconds_sum{{{labels}}} {ttft_sum}
"""


def test_parse_labels_values_and_types():
    m = parse_prometheus(
        '# TYPE x counter\nx_total{a="1",b="q\\"uote\\\\d"} 3 1700000000000\n'
        "y NaN\nz +Inf\nw -Inf\nv 1.5e3\n"
    )
    assert m.samples["x_total"] == {(("a", "1"), ("b", 'q"uote\\d')): 3.0}
    assert math.isnan(m.samples["y"][()])
    assert m.total("z") == math.inf and m.total("w") == -math.inf
    assert m.total("v") == 1500.0
    assert m.types == {"x": "counter"}
    assert m.total("absent") is None


@pytest.mark.parametrize(
    ("text", "line"),
    [("ok 1\nnot a sample at all\n", 2), ("a{b=1} 2\n", 1), ("a one\n", 1)],
)
def test_bad_lines_name_their_number(text, line):
    with pytest.raises(MetricsParseError, match=f"line {line}:"):
        parse_prometheus(text)


def test_llama_server_deltas_and_rates():
    before = parse_prometheus(llama(100, 0.5, 1000, 20.0, 0, 0))
    during = parse_prometheus(llama(300, 1.0, 2000, 30.0, 4, 2))
    after = parse_prometheus(llama(500, 1.5, 3000, 40.0, 1, 0))
    c = server_counters([(10.0, before), (12.0, during), (20.0, after)])
    assert c is not None and c.engine == "llama.cpp"
    assert (c.scrapes, c.elapsed_s) == (3, 10.0)
    assert c.prompt_tokens == 400 and c.generated_tokens == 2000
    assert c.prompt_tps == pytest.approx(40.0)  # per wall-clock second
    assert c.generated_tps == pytest.approx(200.0)
    assert c.server_prompt_tps == pytest.approx(400 / 1.0)  # per busy second
    assert c.server_decode_tps == pytest.approx(2000 / 20.0)
    assert c.running is not None and (c.running.peak, c.running.last) == (4, 1)
    assert c.running.mean == pytest.approx(5 / 3)
    assert c.waiting is not None and c.waiting.peak == 2
    assert c.requests_finished is None and c.ttft_mean_s is None and c.kv_cache_usage is None
    assert not c.restarted


def test_vllm_deltas_sum_label_sets_and_histogram_means():
    before = parse_prometheus(vllm(10, 20, 0, 0, 1.0, 4, 3, 1))
    after = parse_prometheus(vllm(110, 420, 2, 5, 4.0, 10, 8, 2))
    c = server_counters([(0.0, before), (4.0, after)])
    assert c is not None and c.engine == "vllm"
    assert c.prompt_tokens == 100 and c.generated_tokens == 400
    assert c.generated_tps == pytest.approx(100.0)
    assert c.requests_finished == 6  # (8 + 2) - (3 + 1), over both finished_reason labels
    assert c.ttft_mean_s == pytest.approx(3.0 / 6)
    assert c.e2e_mean_s is None
    assert c.server_decode_tps is None
    assert c.running is not None and c.running.peak == 2
    assert c.waiting is not None and c.waiting.last == 5
    assert c.kv_cache_usage is not None and c.kv_cache_usage.peak == 0.25


def test_counter_going_back_means_a_restart():
    before = parse_prometheus(llama(500, 1.0, 3000, 10.0, 0, 0))
    after = parse_prometheus(llama(20, 0.1, 100, 1.0, 0, 0))
    c = server_counters([(0.0, before), (1.0, after)])
    assert c is not None and c.restarted
    assert c.prompt_tokens is None and c.generated_tokens is None and c.prompt_tps is None


def test_no_counters_without_two_scrapes_or_a_known_engine():
    one = parse_prometheus(llama(1, 1, 1, 1, 0, 0))
    assert server_counters([(0.0, one)]) is None
    other = parse_prometheus("go_goroutines 12\n")
    assert detect_engine(other) is None
    assert server_counters([(0.0, other), (1.0, other)]) is None
    assert detect_engine(Metrics()) is None


def test_counters_from_text_drops_unparsable_scrapes():
    texts = [
        (0.0, llama(0, 0, 0, 0, 0, 0)),
        (1.0, "<html>oops</html>"),
        (2.0, llama(10, 1, 50, 1, 0, 0)),
    ]
    c = counters_from_text(texts)
    assert c is not None and c.scrapes == 2 and c.generated_tokens == 50
    assert c.to_dict()["running"] == {"last": 0.0, "peak": 0.0, "mean": 0.0}


def test_known_names_follow_gpu_facts():
    assert known_names("llama.cpp")["prompt_tokens"] == "llamacpp:prompt_tokens_total"
    assert known_names("llama.cpp")["waiting"] == "llamacpp:requests_deferred"
    assert known_names("vllm")["generated_tokens"] == "vllm:generation_tokens_total"
    assert known_names("vllm")["running"] == "vllm:num_requests_running"
