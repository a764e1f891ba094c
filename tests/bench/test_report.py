"""The JSON document and the table, CSV, PNG and comparison made from it."""

from __future__ import annotations

import asyncio
import copy
import csv
import datetime as dt
import io
import json
import struct
from pathlib import Path

import jsonschema
import pytest
from pydantic import SecretStr

from gpufleet.bench.client import (
    Endpoint,
    LevelResult,
    LoadSettings,
    RequestRecord,
    Scrape,
    run_sweep,
)
from gpufleet.bench.prompts import builtin_prompts
from gpufleet.bench.report import (
    SCHEMA,
    HostRun,
    ReportError,
    Target,
    build_document,
    changes,
    compare,
    csv_report,
    load_json,
    runs_of,
    text_report,
    write_json,
    write_png,
)
from gpufleet.bench.stub import StubConfig, StubServer
from gpufleet.core.figures import FIGURES
from gpufleet.core.gpu import parse_sampler_output
from gpufleet.core.slo import BenchExpectations
from gpufleet.fleet import documents

CREATED = dt.datetime(2025, 1, 1, 10, 0, tzinfo=dt.UTC)
TARGET = Target(
    host="spark-01", service="llama", kind="llama-server", model="gpt-oss-20b", port=8000
)
SETTINGS = LoadSettings(requests=4)


def record(i: int, ttft: float, latency: float, tokens: int = 11) -> RequestRecord:
    return RequestRecord(
        index=i,
        prompt=f"p{i}",
        start_s=i * 0.1,
        success=True,
        ttft_s=ttft,
        itl_s=((latency - ttft) / (tokens - 1),) * (tokens - 1),
        latency_s=latency,
        prompt_tokens=20,
        completion_tokens=tokens,
    )


def metrics_text(prompt: int, predicted: int) -> str:
    return (
        f"llamacpp:prompt_tokens_total {prompt}\nllamacpp:tokens_predicted_total {predicted}\n"
        "llamacpp:requests_processing 1\nllamacpp:requests_deferred 0\n"
    )


def level(concurrency: int, start: float, scale: float = 1.0, fail: bool = False) -> LevelResult:
    records = [record(i, 0.1 * scale, 1.1 * scale) for i in range(4)]
    if fail:
        records[3] = RequestRecord(
            index=3,
            prompt="p3",
            start_s=0.3,
            success=False,
            error_class="http_503",
            error="HTTP 503",
        )
    return LevelResult(
        concurrency=concurrency,
        rate=float("inf"),
        started_at=start,
        ended_at=start + 2.0,
        duration_s=2.0,
        records=tuple(records),
        scrapes=(
            Scrape(at=start, text=metrics_text(0, 0)),
            Scrape(at=start + 2.0, text=metrics_text(80, 44)),
        ),
    )


GPU_TEXT = "\n".join(
    [f"@SMI {100 + t}.0 0, {u}, [N/A], [N/A], 30.0" for t, u in enumerate([5, 60, 90, 95])]
    + [f"@MEM {100 + t}.0 8388608 4194304" for t in range(4)]
)


def doc(scale: float = 1.0, fail: bool = False, **run) -> dict:
    runs = [
        HostRun(
            target=TARGET,
            release="rel-1",
            levels=[level(1, 100.0, scale), level(4, 102.5, scale, fail)],
            gpu_samples=parse_sampler_output(GPU_TEXT),
            expectations=BenchExpectations(
                baseline={"decode_tps": 20}, slo=["ttft_p95 <= 150ms", "failed <= 0"]
            ),
            **run,
        )
    ]
    return build_document(
        settings=SETTINGS, levels=[1, 4], prompts="builtin", auth=True, runs=runs, created=CREATED
    )


def test_document_shape_and_figures():
    d = doc(fail=True)
    assert d["schema"] == SCHEMA and d["created"] == "2025-01-01T10:00:00Z"
    assert d["settings"] == {
        "levels": [1, 4],
        "rate": "inf",
        "requests": 4,
        "duration_s": None,
        "warmup": 2,
        "max_tokens": 128,
        "timeout_s": 300.0,
        "seed": 0,
        "body": {},
        "prompts": "builtin",
        "dataset": None,
        "auth": True,
    }
    assert [h["host"] for h in d["hosts"]] == ["spark-01"]
    [run] = d["hosts"][0]["runs"]
    assert run["target"] == {
        "host": "spark-01",
        "service": "llama",
        "kind": "llama-server",
        "model": "gpt-oss-20b",
        "port": 8000,
    }
    assert run["release"] == "rel-1" and run["error"] is None
    one, four = run["levels"]
    assert list(one["figures"]) == list(FIGURES)
    assert one["figures"]["ttft_p50"] == pytest.approx(0.1)
    assert one["figures"]["decode_tps"] == pytest.approx(10.0)  # TPOT 0.1 s
    assert four["failures"] == {"http_503": 1} and four["figures"]["failed"] == 1
    assert one["server"]["generated_tokens"] == 44 and one["server"]["engine"] == "llama.cpp"
    assert "requests" not in one
    # GPU: the whole run, and each level's window (100-102 and 102.5-104.5)
    assert run["gpu"]["gpus"][0]["util_mean_pct"] == pytest.approx(62.5)
    assert run["gpu"]["gpus"][0]["memory_source"] == "meminfo"
    assert [g["samples"] for g in one["gpu"]] == [3] and four["gpu"][0]["util_mean_pct"] == 95
    assert len(run["gpu"]["series"]) == 4
    # baselines at concurrency 1, SLOs at every level
    assert run["baseline"] == [
        {
            "metric": "decode_tps",
            "level": 1,
            "baseline": 20.0,
            "measured": pytest.approx(10.0),
            "ratio": pytest.approx(0.5),
        }
    ]
    assert [(s["slo"], s["level"], s["passed"]) for s in run["slo"]] == [
        ("ttft_p95 <= 150ms", 1, True),
        ("ttft_p95 <= 150ms", 4, True),
        ("failed <= 0", 1, True),
        ("failed <= 0", 4, False),
    ]
    assert run["slo_missed"] and d["slo_missed"]
    json.dumps(d, allow_nan=False)


def test_requests_only_when_asked_and_no_gpu_when_not_sampled():
    runs = [HostRun(target=TARGET, release=None, levels=[level(1, 0.0)])]
    d = build_document(
        settings=SETTINGS,
        levels=[1],
        prompts="p.jsonl",
        auth=False,
        runs=runs,
        save_requests=True,
        created=CREATED,
    )
    [lv] = d["hosts"][0]["runs"][0]["levels"]
    assert len(lv["requests"]) == 4 and lv["requests"][0]["prompt"] == "p0"
    assert lv["gpu"] is None and d["hosts"][0]["runs"][0]["gpu"] is None
    assert not d["slo_missed"]
    assert "GPU: not sampled" in text_report(d)


def test_target_that_could_not_be_benched():
    runs = [
        HostRun(
            target=TARGET,
            release=None,
            error="ssh: connection refused",
            expectations=BenchExpectations(slo=["rps > 1"]),
        )
    ]
    d = build_document(
        settings=SETTINGS, levels=[1], prompts="builtin", auth=False, runs=runs, created=CREATED
    )
    assert d["hosts"][0]["runs"][0]["levels"] == [] and d["slo_missed"]
    assert "not benched: ssh: connection refused" in text_report(d)


def test_non_finite_values_become_null():
    lv = level(1, 0.0)
    lv = LevelResult(
        **{
            **lv.__dict__,
            "scrapes": (
                Scrape(
                    at=0.0,
                    text="llamacpp:prompt_tokens_total 0\nllamacpp:tokens_predicted_total 0\n"
                    "llamacpp:requests_processing NaN\n",
                ),
                Scrape(
                    at=1.0,
                    text="llamacpp:prompt_tokens_total 1\nllamacpp:tokens_predicted_total 1\n"
                    "llamacpp:requests_processing NaN\n",
                ),
            ),
        }
    )
    d = build_document(
        settings=SETTINGS,
        levels=[1],
        prompts="builtin",
        auth=False,
        runs=[HostRun(target=TARGET, release=None, levels=[lv])],
        created=CREATED,
    )
    assert d["hosts"][0]["runs"][0]["levels"][0]["server"]["running"] == {
        "last": None,
        "peak": None,
        "mean": None,
    }
    json.dumps(d, allow_nan=False)


def test_text_report_table():
    out = text_report(doc(fail=True))
    assert out.startswith(
        "spark-01 / llama (llama-server, gpt-oss-20b, port 8000), release rel-1\n"
    )
    lines = out.splitlines()
    header = next(x for x in lines if x.strip().startswith("conc"))
    assert "ttft p95" in header and "failures" in header
    row1 = next(x for x in lines if x.strip().startswith("1 "))
    assert "100.0ms" in row1 and row1.rstrip().endswith("none")
    row4 = next(x for x in lines if x.strip().startswith("4 "))
    assert "75.0%" in row4 and row4.rstrip().endswith("http_503 x1")
    assert "GPU 0: util mean 62%, peak 95%, idle 25% of samples" in out
    # per level: GPU busy inside each level's window (5, 60, 90 then 95)
    assert row1.split()[-3:-1] == ["52%", "33%"] and row4.split()[-4:-2] == ["95%", "0%"]
    assert "memory peak 4.0 GiB / 8.0 GiB (meminfo)" in out
    assert "baseline decode_tps at c=1: 10.0 tok/s vs baseline 20.0 tok/s (0.50x, worse)" in out
    assert "SLO MISS failed <= 0 at c=4: measured 1" in out
    assert "server (llama.cpp): prompt 80.0 tok" in out
    assert out.rstrip().endswith("SLO missed")


def test_unsupported_gpu_fields_are_words_not_zeros():
    runs = [
        HostRun(
            target=TARGET,
            release=None,
            levels=[level(1, 100.0)],
            gpu_samples=parse_sampler_output("@SMI 100.5 0, N/A, N/A, N/A, N/A\n"),
        )
    ]
    out = text_report(
        build_document(
            settings=SETTINGS, levels=[1], prompts="builtin", auth=False, runs=runs, created=CREATED
        )
    )
    assert (
        "GPU 0: util mean unsupported, peak unsupported, idle unsupported, "
        "memory unsupported, power unsupported"
    ) in out


def test_csv_report():
    rows = list(csv.DictReader(io.StringIO(csv_report(doc(fail=True)))))
    assert len(rows) == 2
    assert rows[0]["host"] == "spark-01" and rows[0]["concurrency"] == "1"
    assert rows[0]["rate"] == "inf" and rows[0]["release"] == "rel-1"
    assert float(rows[0]["ttft_p50"]) == pytest.approx(0.1)
    assert rows[1]["failures"] == "http_503=1"
    assert float(rows[1]["gpu_util_mean_pct"]) == 95.0
    assert rows[1]["tpot_p99"] != "" and set(FIGURES) <= set(rows[0])


def test_json_round_trip_and_schema_checks(tmp_path: Path):
    path = tmp_path / "bench.json"
    d = doc()
    write_json(d, path)
    assert load_json(path) == d
    (tmp_path / "other.json").write_text(json.dumps({**d, "schema": "gpufleet-bench/9"}))
    with pytest.raises(ReportError, match="is not 'gpufleet.bench/1'"):
        load_json(tmp_path / "other.json")
    (tmp_path / "junk.json").write_text("[1]")
    with pytest.raises(ReportError, match="no schema field"):
        load_json(tmp_path / "junk.json")
    with pytest.raises(ReportError, match="cannot read"):
        load_json(tmp_path / "missing.json")


def test_the_document_is_valid_against_its_published_schema():
    schema = json.loads((documents.SCHEMAS / "bench.json").read_text())
    jsonschema.validate(doc(fail=True), schema)
    runs = [HostRun(target=TARGET, release=None, levels=[level(1, 0.0)])]
    detailed = build_document(
        settings=SETTINGS, levels=[1], prompts="x", auth=False, runs=runs, save_requests=True,
        dataset={"name": "random", "input_len": 8, "output_len": 4},
    )  # fmt: skip
    jsonschema.validate(json.loads(json.dumps(detailed)), schema)


def test_a_first_version_document_is_still_compared(tmp_path: Path):
    """``--compare`` reads a document saved before the envelope: its flat runs, by host."""
    new = doc()
    old = {k: v for k, v in copy.deepcopy(new).items() if k != "hosts"}
    old |= {"schema": "gpufleet-bench/1", "runs": runs_of(new)}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = load_json(tmp_path / "old.json")
    assert loaded["hosts"] == new["hosts"]
    assert "spark-01/llama c=1" in compare(loaded, new)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_png_plot(tmp_path: Path):
    path = tmp_path / "bench.png"
    write_png(doc(), path)
    assert png_size(path) == (1500, 800)
    empty = build_document(
        settings=SETTINGS,
        levels=[1],
        prompts="builtin",
        auth=False,
        runs=[HostRun(target=TARGET, release=None, error="down")],
        created=CREATED,
    )
    write_png(empty, tmp_path / "empty.png")  # no data at all still draws
    assert png_size(tmp_path / "empty.png") == (1500, 800)


def test_compare_per_figure_with_percentages():
    old, new = doc(scale=1.0), doc(scale=0.5)  # every latency halves
    out = compare(old, new)
    assert out.splitlines()[0] == "compare 2025-01-01T10:00:00Z -> 2025-01-01T10:00:00Z"
    assert "spark-01/llama c=1" in out and "spark-01/llama c=4" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("ttft_p50 "))
    assert "100.0 ms" in line and "50.0 ms" in line and "-50.0%" in line
    assert line.rstrip().endswith("better")
    decode = next(x for x in out.splitlines() if x.strip().startswith("decode_tps "))
    assert "+100.0%" in decode and decode.rstrip().endswith("better")
    found, _ = changes(old, new)
    same = [c for c in found if c.figure == "completed"]
    assert same and all(c.better is None and c.percent == 0 for c in same)


def test_compare_notes_levels_on_one_side():
    old = doc()
    new = copy.deepcopy(old)
    new["hosts"][0]["runs"][0]["levels"][1]["concurrency"] = 8
    out = compare(old, new)
    assert "spark-01/llama c=4: only in the old document" in out
    assert "spark-01/llama c=8: only in the new document" in out
    zero = copy.deepcopy(old)
    zero["hosts"][0]["runs"][0]["levels"][0]["figures"]["failed"] = 0
    worse = copy.deepcopy(old)
    worse["hosts"][0]["runs"][0]["levels"][0]["figures"]["failed"] = 2
    [c] = [c for c in changes(zero, worse)[0] if c.figure == "failed" and "c=1" in c.key]
    assert c.percent is None and c.better is False
    assert "n/a" in compare(zero, worse)


def test_secret_in_no_output(tmp_path: Path):
    key = "sk-bench-secret-42"

    async def go() -> list[LevelResult]:
        async with StubServer(config=StubConfig(api_key="other", fail_every=0)) as stub:
            endpoint = Endpoint(
                base_url=stub.url, model="m", api_key=SecretStr(key), metrics_path="/metrics"
            )
            return await run_sweep(
                endpoint=endpoint,
                settings=LoadSettings(requests=2, warmup=1),
                levels=[1],
                prompts=builtin_prompts(),
            )

    levels = asyncio.run(go())
    d = build_document(
        settings=SETTINGS,
        levels=[1],
        prompts="builtin",
        auth=True,
        runs=[HostRun(target=TARGET, release=None, levels=levels)],
        save_requests=True,
        created=CREATED,
    )
    assert d["hosts"][0]["runs"][0]["levels"][0]["failures"] == {"http_401": 2}
    write_json(d, tmp_path / "b.json")
    write_png(d, tmp_path / "b.png")
    outputs = [
        json.dumps(d),
        text_report(d),
        csv_report(d),
        compare(d, d),
        repr(levels),
        (tmp_path / "b.json").read_text(),
    ]
    for text in outputs:
        assert key not in text
    assert key.encode() not in (tmp_path / "b.png").read_bytes()
