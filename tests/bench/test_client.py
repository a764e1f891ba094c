"""The load generator against the local stub and against hand-written SSE bodies."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import statistics
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from pydantic import SecretStr

from gpufleet.bench.client import (
    Client,
    Endpoint,
    LevelResult,
    LoadSettings,
    Progress,
    RequestRecord,
    _Breaker,
    run_level,
    run_sweep,
)
from gpufleet.bench.prompts import Prompt, PromptSampler, builtin_prompts
from gpufleet.bench.servermetrics import counters_from_text
from gpufleet.bench.stub import StubConfig, StubServer

PROMPTS = builtin_prompts()


def level(
    config: StubConfig,
    *,
    concurrency: int | None = 1,
    api_key: str | None = None,
    metrics: bool = False,
    **settings: Any,
) -> tuple[LevelResult, StubServer]:
    """Run one level against a fresh stub; returns the result and the stub (for its counts)."""
    settings.setdefault("warmup", 0)

    async def go() -> tuple[LevelResult, StubServer]:
        async with StubServer(config=config) as stub:
            endpoint = Endpoint(
                base_url=stub.url,
                model="m",
                api_key=SecretStr(api_key) if api_key else None,
                metrics_path="/metrics" if metrics else None,
            )
            async with Client(endpoint=endpoint, settings=LoadSettings(**settings)) as client:
                result = await run_level(
                    client, concurrency=concurrency, prompts=PROMPTS, scrape_interval_s=0.05
                )
            return result, stub

    return asyncio.run(go())


def words(prompt: Prompt) -> int:
    return sum(len(m["content"].split()) for m in prompt.messages)


def test_closed_loop_measures_every_request():
    result, stub = level(
        StubConfig(token_delay_s=0.002), concurrency=2, requests=6, warmup=1, max_tokens=5
    )
    records = result.records
    assert [r.index for r in records] == list(range(6))
    assert all(r.success and r.error_class is None for r in records)
    assert stub.received == 7  # the warm-up request went, but is not in the records
    expected = PromptSampler(PROMPTS, seed=0).take(6)
    assert [r.prompt for r in records] == [p.name for p in expected]
    for r, p in zip(records, expected, strict=True):
        assert r.completion_tokens == 5
        assert r.prompt_tokens == words(p)
        assert len(r.itl_s) == 4  # five text chunks, four gaps
        assert all(gap >= 0 for gap in r.itl_s)
        assert r.ttft_s is not None and r.latency_s is not None
        assert 0 < r.ttft_s <= r.latency_s
        assert r.latency_s >= r.ttft_s + sum(r.itl_s) - 1e-9
    # 2 ms per token on the median (a busy CPU may deliver two chunks in one read)
    assert statistics.median(g for r in records for g in r.itl_s) >= 0.0015
    assert stub.peak_running == 2
    assert result.duration_s > 0 and result.ended_at >= result.started_at


def test_ttft_waits_for_text_not_for_a_role_chunk():
    # The stub sends the role chunk at once, then "prefills" for 80 ms.
    result, _ = level(StubConfig(mode="role_first", first_token_delay_s=0.08), requests=2)
    for r in result.records:
        assert r.success
        assert r.ttft_s is not None and r.ttft_s >= 0.075


def test_no_usage_leaves_tokens_unknown():
    result, _ = level(StubConfig(mode="no_usage"), requests=2, max_tokens=4)
    assert all(r.success for r in result.records)
    assert {r.completion_tokens for r in result.records} == {None}
    assert all(len(r.itl_s) == 3 for r in result.records)


@pytest.mark.parametrize(
    ("config", "settings", "error_class", "text"),
    [
        (StubConfig(fail_every=1, fail_status=503), {}, "http_503", "HTTP 503"),
        (StubConfig(fail_every=1, fail_status=429), {}, "http_429", "overloaded"),
        (StubConfig(hang_s=2.0), {"timeout_s": 0.2}, "timeout", "within 0.2s"),
        (StubConfig(mode="drop", max_tokens_cap=8), {}, "connection", ""),
        (StubConfig(mode="garbage"), {}, "protocol", "not JSON"),
        (StubConfig(mode="error_event"), {}, "protocol", "engine failed"),
        (StubConfig(mode="empty"), {}, "protocol", "without any generated text"),
    ],
)
def test_failures_are_counted_by_class(config, settings, error_class, text):
    result, _ = level(config, requests=2, concurrency=2, **settings)
    assert [r.success for r in result.records] == [False, False]
    assert {r.error_class for r in result.records} == {error_class}
    assert all(text in (r.error or "") for r in result.records)
    assert all(r.ttft_s is None and r.latency_s is None for r in result.records)


def test_some_failures_mixed_with_successes():
    result, _ = level(StubConfig(fail_every=3), requests=9, concurrency=1)
    assert sum(not r.success for r in result.records) == 3
    assert [r.index for r in result.records if not r.success] == [2, 5, 8]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_server_counts_connection_failures():
    endpoint = Endpoint(
        base_url=f"http://127.0.0.1:{free_port()}", model="m", metrics_path="/metrics"
    )
    settings = LoadSettings(requests=5, warmup=2)
    levels = asyncio.run(
        run_sweep(endpoint=endpoint, settings=settings, levels=[1, 3], prompts=PROMPTS)
    )
    for result in levels:
        assert result.warmup_failures == 2
        assert len(result.records) == 5
        assert {r.error_class for r in result.records} == {"connection"}
        assert result.scrapes == ()


def test_api_key_is_sent_and_never_shown():
    key = "sk-live-abc123"
    good, _ = level(StubConfig(api_key=key), api_key=key, requests=2)
    assert all(r.success for r in good.records)
    # A wrong key: the stub's 401 body echoes the header it got, as careless servers do.
    wrong = "sk-wrong-xyz789"
    bad, _ = level(StubConfig(api_key=key), api_key=wrong, requests=2)
    assert {r.error_class for r in bad.records} == {"http_401"}
    shown = json.dumps([r.to_dict() for r in bad.records]) + repr(bad)
    assert wrong not in shown and "<secret>" in shown
    endpoint = Endpoint(base_url="http://127.0.0.1:1", model="m", api_key=SecretStr(wrong))
    client = Client(endpoint=endpoint, settings=LoadSettings())
    for text in (repr(endpoint), str(endpoint), repr(client)):
        assert wrong not in text


def test_open_loop_follows_seeded_poisson_arrivals():
    rate, n = 100.0, 12
    result, _ = level(StubConfig(), concurrency=None, rate=rate, requests=n, seed=5)
    rng = random.Random(5)
    due, planned = 0.0, []
    for _ in range(n):
        due += rng.expovariate(rate)
        planned.append(due)
    starts = [r.start_s for r in result.records]
    late = [start - plan for start, plan in zip(starts, planned, strict=True)]
    assert min(late) >= -0.002  # never before its time
    # on time on the median; a busy CPU may hold one back (arrivals keep to the schedule, so
    # one late start does not shift the rest)
    assert statistics.median(late) <= 0.01, late
    assert result.duration_s >= planned[-1]


def test_rate_inf_without_cap_sends_everything_at_once():
    result, stub = level(StubConfig(first_token_delay_s=0.1), concurrency=None, requests=5)
    assert all(r.success for r in result.records)
    assert max(r.start_s for r in result.records) < 0.05
    assert stub.peak_running == 5
    assert result.duration_s < 0.3  # together, not one after another (0.5 s)


def test_open_loop_with_cap_queues_beyond_it():
    result, stub = level(
        StubConfig(first_token_delay_s=0.05), concurrency=2, rate=1000.0, requests=6
    )
    assert stub.peak_running == 2
    assert max(r.queued_s for r in result.records) >= 0.04
    assert all(r.success for r in result.records)


def test_timed_run_stops_sending_at_the_deadline():
    result, _ = level(
        StubConfig(token_delay_s=0.01), concurrency=2, requests=None, duration_s=0.3, max_tokens=3
    )
    assert len(result.records) >= 4
    assert all(r.start_s < 0.3 for r in result.records)
    assert all(r.success for r in result.records)


def test_sweep_runs_levels_in_order_with_the_same_prompts():
    seen: list[Progress] = []

    async def go() -> list[LevelResult]:
        async with StubServer() as stub:
            endpoint = Endpoint(base_url=stub.url, model="m")
            return await run_sweep(
                endpoint=endpoint,
                settings=LoadSettings(requests=4, warmup=2),
                levels=[1, 3],
                prompts=PROMPTS,
                on_progress=seen.append,
            )

    levels = asyncio.run(go())
    assert [lv.concurrency for lv in levels] == [1, 3]
    assert [r.prompt for r in levels[0].records] == [r.prompt for r in levels[1].records]
    assert levels[0].ended_at <= levels[1].started_at
    # per level: two warm-up calls, then four measured ones counting up to the total
    assert len(seen) == 12
    first = seen[:6]
    assert [p.warmup for p in first] == [True, True, False, False, False, False]
    assert [p.done for p in first[2:]] == [1, 2, 3, 4]
    assert {p.total for p in first[2:]} == {4}
    assert {p.concurrency for p in seen[6:]} == {3}


def test_scrapes_give_server_counter_deltas():
    result, _ = level(
        StubConfig(token_delay_s=0.01),
        metrics=True,
        requests=4,
        max_tokens=6,
        concurrency=2,
        warmup=1,
    )
    assert len(result.scrapes) >= 3  # before, during, after
    counters = counters_from_text([(s.at, s.text) for s in result.scrapes])
    assert counters is not None and counters.engine == "llama.cpp"
    # the warm-up request ran before the first scrape, so only measured tokens count
    assert counters.generated_tokens == sum(r.completion_tokens or 0 for r in result.records)
    assert counters.running is not None and counters.running.peak >= 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"requests": 5, "duration_s": 1.0},
        {"requests": None},
        {"requests": 0},
        {"duration_s": -1.0, "requests": None},
        {"rate": 0.0},
        {"warmup": -1},
        {"max_tokens": 0},
        {"timeout_s": 0},
        {"extra_body": {"stream": False}},
    ],
)
def test_settings_are_checked(kwargs):
    with pytest.raises(ValueError):
        LoadSettings(**kwargs)


def test_unbounded_load_shapes_are_refused():
    async def go(concurrency: int | None) -> None:
        endpoint = Endpoint(base_url="http://127.0.0.1:1", model="m")
        settings = LoadSettings(requests=None, duration_s=1.0)
        async with Client(endpoint=endpoint, settings=settings) as client:
            await run_level(client, concurrency=concurrency, prompts=PROMPTS)

    with pytest.raises(ValueError, match="needs a concurrency cap"):
        asyncio.run(go(None))
    with pytest.raises(ValueError, match="at least 1"):
        asyncio.run(go(0))
    with pytest.raises(ValueError, match="http"):
        Endpoint(base_url="127.0.0.1:8000", model="m")


# --------------------------------------------------------------- raw SSE bodies


def raw_stream(body: bytes) -> RequestRecord:
    """One request against a server that answers with ``body`` as its event stream."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in body.split(b"|"):  # "|" marks separate writes
            await response.write(part)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def go() -> RequestRecord:
        return await with_app(handler, lambda client: client.chat(PROMPTS[0], index=0, t0=0.0))

    return asyncio.run(go())


async def with_app(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    call: Callable[[Client], Awaitable[RequestRecord]],
) -> RequestRecord:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        endpoint = Endpoint(base_url=f"http://127.0.0.1:{port}", model="m")
        async with Client(endpoint=endpoint, settings=LoadSettings()) as client:
            return await call(client)
    finally:
        await runner.cleanup()


def event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def text(content: str, key: str = "content") -> bytes:
    return event({"choices": [{"index": 0, "delta": {key: content}}]})


def test_usage_not_chunks_gives_the_token_count():
    # Two text chunks, but the server says seven tokens (chunks may carry several tokens),
    # and puts usage in its final choices chunk, as some servers do.
    body = (
        text("a")
        + b"|"
        + text("bcd")
        + b"|"
        + event(
            {
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 7},
            }
        )
        + b"data: [DONE]\n\n"
    )
    r = raw_stream(body)
    assert r.success
    assert (r.prompt_tokens, r.completion_tokens) == (3, 7)
    assert len(r.itl_s) == 1


def test_sse_comments_crlf_multiline_data_and_reasoning():
    body = (
        b": keep-alive\r\n\r\n|"
        + text("thinking", key="reasoning_content")
        + b"|"
        + b'data:{"choices":[{"delta":{"content":"x"}}]}\r\n\r\n|'
        + b'data: {"choices":\ndata: [{"delta":{"content":"y"}}]}\n\n|'
        + b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":3}}'
    )
    r = raw_stream(body)  # the last event has no blank line after it: read at end of stream
    assert r.success, r.error
    assert r.completion_tokens == 3
    assert len(r.itl_s) == 2  # reasoning, x, y: three text chunks
    assert all(gap >= 0.008 for gap in r.itl_s)


def test_role_and_empty_chunks_do_not_start_the_clock_but_end_it():
    body = (
        event({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
        + b"|"
        + text("a")
        + b"|"
        + event({"choices": [{"delta": {}, "finish_reason": "stop"}]})
        + b"|"
        + event({"choices": [], "usage": {"completion_tokens": 1}})
    )
    r = raw_stream(body)
    assert r.success
    assert r.ttft_s is not None and r.latency_s is not None
    assert r.ttft_s >= 0.009  # not the role chunk's time
    # E2E ends at the finish chunk (a choices chunk), not at the usage-only one after it
    assert 0.009 <= r.latency_s - r.ttft_s < 0.02 + 0.01


def test_a_non_object_event_is_a_protocol_failure():
    r = raw_stream(b"data: 5\n\n")
    assert (r.success, r.error_class) == (False, "protocol")


def test_http_error_body_is_shortened_to_one_line():
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="line one\nline two " + "x" * 5000)

    r = asyncio.run(with_app(handler, lambda c: c.chat(PROMPTS[0], index=0, t0=0.0)))
    assert r.error_class == "http_500"
    assert r.error is not None and "\n" not in r.error and len(r.error) < 300
    assert "line one line two" in r.error


def test_request_body_asks_for_streamed_usage():
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.update(await request.json())
        seen["auth"] = request.headers.get("Authorization")
        return web.Response(status=500)

    prompt = Prompt(
        name="x", messages=({"role": "user", "content": "hi"},), size="file", max_tokens=7
    )

    async def go() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        settings = LoadSettings(extra_body={"temperature": 0})
        endpoint = Endpoint(base_url=f"http://127.0.0.1:{port}/", model="qwen")
        async with Client(endpoint=endpoint, settings=settings) as client:
            await client.chat(prompt, index=0, t0=0.0)
        await runner.cleanup()

    asyncio.run(go())
    assert seen == {
        "temperature": 0,
        "model": "qwen",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
        "auth": None,
    }


def test_rate_is_recorded():
    result, _ = level(StubConfig(), requests=1)
    assert math.isinf(result.rate)


# ------------------------------------------- servers that close kept-alive connections


def raw_http(answer: bool, parallel: int = 1) -> tuple[list[RequestRecord], int]:
    """Five requests in a row against a raw server that says keep-alive and then closes the
    connection after each answer, as llama-server does after a stream (``answer=False``: it
    closes every connection without answering). Returns the records and connections seen."""
    connections = 0
    sse = text("hi") + event({"choices": [], "usage": {"prompt_tokens": 3,
                                                        "completion_tokens": 1}})  # fmt: skip

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))  # fmt: skip
        await reader.readexactly(length)
        if answer:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Keep-Alive: timeout=5, max=100\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + f"{len(sse):x}\r\n".encode() + sse + b"\r\n0\r\n\r\n")  # fmt: skip
            await writer.drain()
            await asyncio.sleep(0.01)  # the close lands after the client pooled the connection
        writer.close()

    async def go() -> list[RequestRecord]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        endpoint = Endpoint(base_url=f"http://127.0.0.1:{port}", model="m")
        async with server, Client(endpoint=endpoint, settings=LoadSettings()) as client:
            records = []
            for i in range(0, 5 * parallel, parallel):  # rounds of `parallel` at once
                records += await asyncio.gather(*(client.chat(PROMPTS[0], index=i + j, t0=0.0)
                                                  for j in range(parallel)))  # fmt: skip
            return records

    records = asyncio.run(go())
    return records, connections


def test_a_connection_closed_after_an_answer_is_not_a_failure():
    records, connections = raw_http(answer=True)
    assert [r.success for r in records] == [True] * 5, [r.error for r in records]
    assert connections == 5
    assert all(r.completion_tokens == 1 for r in records)


def test_several_pooled_connections_closed_at_once_are_not_failures():
    # four at a time: the pool holds four closed connections when the next round starts
    records, connections = raw_http(answer=True, parallel=4)
    assert [r.success for r in records] == [True] * 20, [r.error for r in records]
    assert connections == 20


def test_a_server_that_never_answers_fails_each_request_after_a_bounded_retry():
    records, connections = raw_http(answer=False)
    assert [r.error_class for r in records] == ["connection"] * 5
    assert connections == 20  # each request sent four times, never more


def _dead_sweep(levels: list[int | None], **kwargs: Any) -> list[LevelResult]:
    endpoint = Endpoint(base_url=f"http://127.0.0.1:{free_port()}", model="m")
    settings = LoadSettings(**kwargs)
    sweep = run_sweep(endpoint=endpoint, settings=settings, levels=levels, prompts=PROMPTS)
    return asyncio.run(sweep)


def test_a_dead_target_stops_the_level_and_the_sweep_after_n_connection_failures():
    results = _dead_sweep([4, 16], requests=500, warmup=0, stop_after_connection_failures=6)
    (only,) = results  # the 16 level is not run against a target known dead
    # the in-flight requests finish after the sixth failure; nothing more is sent
    assert 6 <= len(only.records) < 6 + 4
    assert (
        only.stopped == f"stopped after {len(only.records)} requests in a row found no connection"
    )


def test_a_dead_target_under_an_open_loop_stops_too():
    settings = {"requests": 300, "rate": math.inf, "warmup": 0}
    (only,) = _dead_sweep([None], **settings, stop_after_connection_failures=5)
    assert len(only.records) < 300 and only.stopped


def test_warm_up_failures_count_towards_the_stop():
    (only,) = _dead_sweep([1], requests=50, warmup=3, stop_after_connection_failures=3)
    assert only.warmup_failures == 3 and only.records == () and only.stopped


def test_failures_below_the_limit_do_not_stop_a_level():
    results = _dead_sweep([1, 2], requests=5, warmup=0, stop_after_connection_failures=6)
    assert [len(r.records) for r in results] == [5, 5]
    assert [r.stopped for r in results] == [None, None]


def test_a_success_or_another_failure_resets_the_count():
    def record(error_class: str | None) -> RequestRecord:
        success = error_class is None
        return RequestRecord(
            index=0, prompt="p", start_s=0.0, success=success, error_class=error_class
        )

    breaker = _Breaker(3)
    for error_class in ["connection", "connection", None, "connection", "timeout", "connection"]:
        breaker.record(record(error_class))
    assert not breaker.open and breaker.why is None
    breaker.record(record("connection"))
    breaker.record(record("connection"))
    assert breaker.open and breaker.why == "stopped after 3 requests in a row found no connection"


def test_the_stop_setting_is_checked():
    with pytest.raises(ValueError, match="stop_after_connection_failures"):
        LoadSettings(stop_after_connection_failures=0)


def test_a_fresh_sweep_never_sends_a_prompt_twice(monkeypatch):
    """--dataset random: every level and its warm-up its own prompts (a server's prompt cache
    would answer a repeated one without prefill, and its TTFT would be no prefill at all)."""
    prompts = [
        Prompt(name=f"random:{i}", messages=({"role": "user", "content": f"w{i}"},), size="random")
        for i in range(18)
    ]
    sent: list[str] = []
    real = Client._body

    def body(self, prompt):
        sent.append(prompt.name)
        return real(self, prompt)

    monkeypatch.setattr(Client, "_body", body)

    async def go(fresh: bool) -> list[LevelResult]:
        async with StubServer() as stub:
            endpoint = Endpoint(base_url=stub.url, model="m")
            settings = LoadSettings(requests=4, warmup=2)
            return await run_sweep(
                endpoint=endpoint, settings=settings, levels=[1, 3, 2], prompts=prompts, fresh=fresh
            )

    levels = asyncio.run(go(fresh=True))
    assert len(sent) == 18 and len(set(sent)) == 18  # 3 levels x (2 warm-up + 4 measured)
    assert [len(lv.records) for lv in levels] == [4, 4, 4]
    # its twin, a sweep of a fixed set: every level sends the same prompts again
    sent.clear()
    asyncio.run(go(fresh=False))
    assert len(set(sent)) < len(sent)


def test_fresh_shares_are_disjoint_slices_or_the_whole_set_when_too_few():
    from gpufleet.bench.client import fresh_shares

    prompts = list(range(12))
    assert fresh_shares(prompts, 2, 2) == [([0, 1], [2, 3, 4, 5]), ([6, 7], [8, 9, 10, 11])]
    assert fresh_shares(prompts, 2, 0) == [(None, prompts[:6]), (None, prompts[6:])]
    assert fresh_shares(prompts[:3], 2, 2) == [(None, prompts[:3])] * 2
