"""--format vllm: measured records in, ``vllm bench serve``'s result object out."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from gpufleet.bench.client import LevelResult, RequestRecord
from gpufleet.bench.report import HostRun, Target
from gpufleet.bench.vllmformat import jsonl, level_result, results

TARGET = Target(host="spark-01", service="llama", kind="llama-server", model="m20b", port=8000)
CREATED = dt.datetime(2025, 1, 2, 3, 4, 5)


def _ok(index: int, start: float, ttft: float, itl: tuple[float, ...], tokens: int):
    return RequestRecord(index=index, prompt=f"p{index}", start_s=start, success=True,
                         ttft_s=ttft, itl_s=itl, latency_s=ttft + sum(itl),
                         prompt_tokens=100, completion_tokens=tokens)  # fmt: skip


LEVEL = LevelResult(
    concurrency=2,
    rate=float("inf"),
    started_at=1.0,
    ended_at=3.0,
    duration_s=2.0,
    records=(
        _ok(0, 0.0, 0.100, (0.02, 0.02, 0.02), 4),  # latency 0.16, tpot 0.02
        _ok(1, 0.0, 0.300, (0.04, 0.04, 0.04), 4),  # latency 0.42, tpot 0.04
        RequestRecord(
            index=2,
            prompt="p2",
            start_s=0.5,
            success=False,
            error_class="http_503",
            error="HTTP 503",
        ),  # fmt: skip
    ),
)
RUN = HostRun(target=TARGET, release="abc123def456", levels=[LEVEL])


def test_the_result_has_vllms_keys_units_and_values():
    r = level_result(run=RUN, level=LEVEL, model="gpt-oss-20b", created=CREATED)
    assert r["date"] == "20250102-030405" and r["backend"] == "openai-chat"
    assert r["label"] == "spark-01/llama" and r["model_id"] == "gpt-oss-20b"
    assert (r["request_rate"], r["burstiness"], r["max_concurrency"]) == ("inf", 1.0, 2)
    assert (r["completed"], r["failed"], r["num_prompts"]) == (2, 1, 3)
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (200, 8)
    assert r["duration"] == 2.0 and r["request_throughput"] == pytest.approx(1.0)
    assert r["output_throughput"] == pytest.approx(4.0)
    assert r["total_token_throughput"] == pytest.approx(104.0)
    assert r["mean_ttft_ms"] == pytest.approx(200.0) and r["median_ttft_ms"] == pytest.approx(200)
    assert r["std_ttft_ms"] == pytest.approx(100.0)  # numpy's population std
    assert r["p99_ttft_ms"] == pytest.approx(298.0)
    assert r["mean_tpot_ms"] == pytest.approx(30.0) and r["mean_itl_ms"] == pytest.approx(30.0)
    assert r["median_e2el_ms"] == pytest.approx(290.0)
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for p in (50, 90, 95, 99):
            assert f"p{p}_{metric}_ms" in r
    assert r["max_concurrent_requests"] == 2
    assert r["request_goodput"] is None and "ttfts" not in r  # lists only when detailed


def test_detailed_lists_per_request_and_zero_where_vllm_writes_zero():
    r = level_result(run=RUN, level=LEVEL, model="m", created=CREATED, detailed=True)
    assert r["input_lens"] == [100, 100, 0] and r["output_lens"] == [4, 4, 0]
    assert r["itls"][0] == pytest.approx([0.02] * 3) and r["errors"] == ["", "", "HTTP 503"]
    empty = LevelResult(concurrency=1, rate=2.0, started_at=0, ended_at=1, duration_s=1.0,
                        records=LEVEL.records[2:])  # fmt: skip
    e = level_result(run=RUN, level=empty, model="m", created=CREATED)
    assert e["mean_ttft_ms"] == 0.0 and e["request_rate"] == 2.0 and e["completed"] == 0


def test_several_levels_are_one_json_object_a_line():
    other = HostRun(target=TARGET, release=None, error="unreachable")  # no levels, no line
    items = results([RUN, other], models={("spark-01", "llama"): "gpt-oss-20b"}, created=CREATED)
    text = jsonl(items * 2)
    lines = text.splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["model_id"] == "gpt-oss-20b"
