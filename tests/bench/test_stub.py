"""The stub server itself and the overhead search."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from gpufleet.bench.stub import (
    Latency,
    OverheadProbe,
    OverheadReport,
    StubConfig,
    StubServer,
    find_max_rate,
    measure_overhead,
)

LATENCY = Latency(ttft_p50_s=0.0003, ttft_p99_s=0.0008, e2e_p50_s=0.0004, e2e_p99_s=0.0009)


def probe_passing_up_to(limit: float, tried: list[float]):
    def probe(rate: float) -> OverheadProbe:
        tried.append(rate)
        return OverheadProbe(
            rate=rate,
            requests=10,
            failed=0,
            achieved_rps=rate,
            client=LATENCY,
            baseline=LATENCY,
            added_ttft_p99_s=0.0,
            added_e2e_p99_s=0.0,
            passed=rate <= limit,
        )

    return probe


def test_search_doubles_then_bisects():
    tried: list[float] = []
    best, probes = find_max_rate(
        probe_passing_up_to(300, tried), start_rate=50, max_rate=6400, bisect_steps=3
    )
    assert tried == [50, 100, 200, 400, 300, 350, 325]
    assert best == 300
    assert [p.rate for p in probes] == tried


def test_search_edges():
    tried: list[float] = []
    assert (
        find_max_rate(probe_passing_up_to(10, tried), start_rate=50, max_rate=800, bisect_steps=3)[
            0
        ]
        is None
    )
    assert tried == [50]
    tried.clear()
    best, _ = find_max_rate(
        probe_passing_up_to(1e9, tried), start_rate=50, max_rate=800, bisect_steps=3
    )
    assert best == 800 and tried == [50, 100, 200, 400, 800]


def test_latency_of_values():
    values = [0.001 * i for i in range(1, 101)]
    latency = Latency.of(values, values)
    assert latency is not None
    assert latency.ttft_p50_s == pytest.approx(0.0505)
    assert latency.e2e_p99_s == pytest.approx(0.09901)
    assert Latency.of([], values) is None


def test_report_lines():
    baseline = Latency(ttft_p50_s=0.0002, ttft_p99_s=0.0005, e2e_p50_s=0.0002, e2e_p99_s=0.0006)
    probe = OverheadProbe(
        rate=100,
        requests=400,
        failed=0,
        achieved_rps=99.0,
        client=LATENCY,
        baseline=baseline,
        added_ttft_p99_s=0.0003,
        added_e2e_p99_s=0.0003,
        passed=True,
    )
    report = OverheadReport(
        limit_s=0.001,
        tokens=16,
        duration_s=4,
        probes=(probe,),
        max_rate=100,
        load_before=(0.5, 0.4, 0.3),
        load_after=(1, 1, 1),
    )
    lines = report.lines()
    assert "added p99 < 1 ms" in lines[0]
    assert lines[1] == "load average before/after: 0.50 0.40 0.30 / 1.00 1.00 1.00"
    row = lines[3]
    assert " 0.800ms,  0.900ms" in row and " 0.500ms,  0.600ms" in row
    assert row.endswith("0.300ms  0.300ms  failed 0  ok")
    assert lines[-1] == "highest rate with < 1 ms added at p99: 100 requests/s"


def test_measure_overhead_runs_end_to_end():
    report = measure_overhead(duration_s=0.3, tokens=4, start_rate=40, max_rate=40, bisect_steps=0)
    [probe] = report.probes
    assert probe.rate == 40 and probe.requests > 0 and probe.failed == 0
    assert probe.client is not None and probe.baseline is not None
    assert probe.client.e2e_p99_s > 0 and probe.baseline.e2e_p99_s > 0
    assert probe.added_e2e_p99_s == pytest.approx(probe.client.e2e_p99_s - probe.baseline.e2e_p99_s)
    assert report.max_rate == (40 if probe.passed else None)


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read()


def test_stub_routes_and_non_streaming_answer():
    async def go() -> None:
        async with StubServer(config=StubConfig(max_tokens_cap=3)) as stub:
            loop = asyncio.get_running_loop()
            status, body = await loop.run_in_executor(None, get, stub.url + "/health")
            assert (status, json.loads(body)) == (200, {"status": "ok"})
            _, models = await loop.run_in_executor(None, get, stub.url + "/v1/models")
            assert json.loads(models)["data"][0]["id"] == "stub"

            def post() -> dict:
                req = urllib.request.Request(
                    stub.url + "/v1/chat/completions",
                    data=json.dumps(
                        {"messages": [{"role": "user", "content": "a b c"}], "max_tokens": 10}
                    ).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=5) as r:
                    return json.loads(r.read())

            answer = await loop.run_in_executor(None, post)
            assert answer["usage"] == {
                "prompt_tokens": 3,
                "completion_tokens": 3,
                "total_tokens": 6,
            }
            assert answer["choices"][0]["message"]["content"] == " tok0 tok1 tok2"
            _, metrics = await loop.run_in_executor(None, get, stub.url + "/metrics")
            assert b"llamacpp:tokens_predicted_total 3" in metrics

    asyncio.run(go())


def test_stub_config_hides_its_key_and_is_frozen():
    config = StubConfig(api_key="sk-stub-key-77")
    assert "sk-stub-key-77" not in repr(config)
    with pytest.raises(AttributeError):
        config.mode = "drop"  # type: ignore[misc]


def test_measure_overhead_scans_given_rates():
    report = measure_overhead(duration_s=0.2, tokens=2, rates=[30, 60])
    assert [p.rate for p in report.probes] == [30, 60]
    passing = [p.rate for p in report.probes if p.passed]
    assert report.max_rate == (max(passing) if passing else None)
