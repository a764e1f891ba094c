"""
A local OpenAI-compatible server that answers at once, and the client-overhead measurement.

``StubServer`` (aiohttp) streams ``/v1/chat/completions`` the way llama-server and vLLM do:
a role chunk, one chunk per token, a finish chunk, a usage-only chunk when asked, ``[DONE]``.
With no delays it does no work, so whatever latency a client measures against it is the
client's own cost plus loopback: ``measure_overhead`` finds the highest Poisson request rate
at which that stays under 1 ms at p99 (TTFT and E2E) with no failures.

``StubConfig`` also makes the faults the client must count rather than crash on: an HTTP
status every N requests, a wrong API key (answered with a body that echoes the header, as a
careless server might), a cut connection, a non-JSON event, an error event, a stream with no
text, no ``usage``, a hang.

Run it alone, or measure::

    python -m gpufleet.bench.stub serve --port 8099
    python -m gpufleet.bench.stub overhead --duration 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from aiohttp import web

from gpufleet.core.known import HEALTH_PATHS
from gpufleet.core.probes import CHAT_PATH

Mode = Literal["ok", "role_first", "no_usage", "drop", "garbage", "error_event", "empty"]


@dataclass(frozen=True, kw_only=True)
class StubConfig:
    """
    How the stub answers.

    + mode: ``ok``; ``role_first`` (a role-only chunk, then ``first_token_delay_s``); ``no_usage``;
      ``drop`` (cut the connection after two tokens); ``garbage`` (a non-JSON event);
      ``error_event`` (``data: {"error": ...}``); ``empty`` (finish without any text)
    + max_tokens_cap: tokens per answer at most (the request's ``max_tokens`` otherwise)
    + first_token_delay_s / token_delay_s: simulated prefill and decode time
    + fail_every / fail_status: answer every Nth request with this HTTP status
    + api_key: require ``Authorization: Bearer <api_key>``
    + hang_s: wait this long before answering
    + template_tokens: what a chat template adds to each request's prompt tokens; the stub's
      ``/tokenize`` and ``/detokenize`` (llama-server's bodies, or vLLM's) count words
    """

    mode: Mode = "ok"
    max_tokens_cap: int = 64
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    fail_every: int = 0
    fail_status: int = 503
    api_key: str | None = field(default=None, repr=False)
    hang_s: float = 0.0
    template_tokens: int = 0


class _WordTokenizer:
    """A tokenizer of whitespace-separated words, ids given in order of first sight."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            if word not in self.ids:
                self.ids[word] = len(self.words)
                self.words.append(word)
            out.append(self.ids[word])
        return out

    def decode(self, tokens: list[int]) -> str:
        return " ".join(self.words[t] for t in tokens)


def _words(messages: Any) -> int:
    count = 0
    for m in messages if isinstance(messages, list) else []:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            count += len(m["content"].split())
    return count


class StubServer:
    """
    The stub on ``127.0.0.1``; ``async with StubServer() as stub: stub.url``.

    + config: a ``StubConfig``; may be replaced between requests (``stub.config = ...``)
    + port: 0 picks a free port
    """

    def __init__(self, *, config: StubConfig | None = None, port: int = 0) -> None:
        self.config = config or StubConfig()
        self.port = port
        self.received = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.running = 0
        self.peak_running = 0
        self._runner: web.AppRunner | None = None
        self.tokenizer = _WordTokenizer()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(CHAT_PATH, self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get(HEALTH_PATHS["llama-server"], self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        return app

    async def __aenter__(self) -> StubServer:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        text = body.get("content", body.get("prompt", ""))
        tokens = self.tokenizer.encode(text)
        return web.json_response({"tokens": tokens, "count": len(tokens)})

    async def _detokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        text = self.tokenizer.decode(body.get("tokens", []))
        return web.json_response({"content": text, "prompt": text})

    async def _metrics(self, request: web.Request) -> web.Response:
        lines = [
            "# TYPE llamacpp:prompt_tokens_total counter",
            f"llamacpp:prompt_tokens_total {self.prompt_tokens}",
            "# TYPE llamacpp:tokens_predicted_total counter",
            f"llamacpp:tokens_predicted_total {self.generated_tokens}",
            "# TYPE llamacpp:requests_processing gauge",
            f"llamacpp:requests_processing {self.running}",
            "# TYPE llamacpp:requests_deferred gauge",
            "llamacpp:requests_deferred 0",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        self.received += 1
        number = self.received
        if cfg.api_key is not None:
            presented = request.headers.get("Authorization", "")
            if presented != f"Bearer {cfg.api_key}":
                return web.json_response(
                    {"error": {"message": f"invalid credentials {presented!r}"}}, status=401
                )
        if cfg.fail_every and number % cfg.fail_every == 0:
            return web.json_response({"error": {"message": "overloaded"}}, status=cfg.fail_status)
        body = await request.json()
        if cfg.hang_s:
            await asyncio.sleep(cfg.hang_s)
        prompt_tokens = _words(body.get("messages")) + cfg.template_tokens
        wanted = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        tokens = 0 if cfg.mode == "empty" else max(1, min(int(wanted), cfg.max_tokens_cap))
        self.prompt_tokens += prompt_tokens
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            if not body.get("stream"):
                self.generated_tokens += tokens
                return web.json_response(self._completion(body, prompt_tokens, tokens))
            return await self._stream(request, body, prompt_tokens, tokens)
        finally:
            self.running -= 1

    def _completion(self, body: dict, prompt_tokens: int, tokens: int) -> dict[str, Any]:
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "model": body.get("model", "stub"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "length",
                    "message": {
                        "role": "assistant",
                        "content": "".join(f" tok{i}" for i in range(tokens)),
                    },
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": tokens,
                "total_tokens": prompt_tokens + tokens,
            },
        }

    async def _stream(
        self, request: web.Request, body: dict, prompt_tokens: int, tokens: int
    ) -> web.StreamResponse:
        cfg = self.config
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        model = body.get("model", "stub")

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            event = {
                "id": "chatcmpl-stub",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(event).encode() + b"\n\n"

        events = [chunk({"role": "assistant", "content": ""})]
        if cfg.mode == "role_first":
            await response.write(events.pop())
        if cfg.first_token_delay_s:
            await asyncio.sleep(cfg.first_token_delay_s)
        for i in range(tokens):
            if cfg.mode == "drop" and i == 2:
                await response.write(b"".join(events))
                assert request.transport is not None
                request.transport.close()
                return response
            if cfg.mode == "garbage" and i == 1:
                events.append(b"data: {not json\n\n")
            if cfg.mode == "error_event" and i == 1:
                events.append(b'data: {"error": {"message": "engine failed"}}\n\n')
                break
            events.append(chunk({"content": f" tok{i}"}))
            self.generated_tokens += 1
            if cfg.token_delay_s:
                await response.write(b"".join(events))
                events.clear()
                await asyncio.sleep(cfg.token_delay_s)
        events.append(chunk({}, finish="length"))
        if cfg.mode != "no_usage" and (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": tokens,
                "total_tokens": prompt_tokens + tokens,
            }
            event = {
                "id": "chatcmpl-stub",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [],
                "usage": usage,
            }
            events.append(b"data: " + json.dumps(event).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        await response.write(b"".join(events))  # no delays: everything in one write
        await response.write_eof()
        return response


# --------------------------------------------------------------------------- overhead


@dataclass(frozen=True, kw_only=True)
class Latency:
    """p50 and p99 of TTFT and E2E over one probe, in seconds."""

    ttft_p50_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float

    @classmethod
    def of(cls, ttfts: list[float], e2es: list[float]) -> Latency | None:
        from gpufleet.bench.metrics import percentile

        if not ttfts or not e2es:
            return None
        return cls(
            ttft_p50_s=percentile(ttfts, 50),
            ttft_p99_s=percentile(ttfts, 99),
            e2e_p50_s=percentile(e2es, 50),
            e2e_p99_s=percentile(e2es, 99),
        )


@dataclass(frozen=True, kw_only=True)
class OverheadProbe:
    """
    One rate tried against the stub, by the bench client and by a bare socket.

    + rate: Poisson arrivals per second asked for; achieved_rps: the client's successful
      requests per second
    + client: what the bench client measured; baseline: a blocking socket sending the same
      bytes at the same arrival times (no HTTP library, no event loop), the floor this
      machine's loopback, scheduler and the stub's own HTTP handling set
    + added_ttft_p99_s / added_e2e_p99_s: client p99 minus baseline p99
    + passed: no failures, both added p99s under the limit, at least 90% of the rate achieved
    """

    rate: float
    requests: int
    failed: int
    achieved_rps: float
    client: Latency | None
    baseline: Latency | None
    added_ttft_p99_s: float | None
    added_e2e_p99_s: float | None
    passed: bool


@dataclass(frozen=True, kw_only=True)
class OverheadReport:
    """The probes tried, in order, and the highest passing rate (None: even the first failed)."""

    limit_s: float
    tokens: int
    duration_s: float
    probes: tuple[OverheadProbe, ...]
    max_rate: float | None
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]

    def lines(self) -> list[str]:
        out = [
            f"client overhead against a zero-work stub: {self.tokens} tokens per answer, "
            f"{self.duration_s:g}s per rate, pass: added p99 < {self.limit_s * 1000:g} ms",
            "load average before/after: "
            + " / ".join(
                " ".join(f"{x:.2f}" for x in la) for la in (self.load_before, self.load_after)
            ),
            "      rate  achieved | client ttft p50/p99, e2e p99 | bare socket ttft p50/p99, "
            "e2e p99 | added p99 ttft/e2e",
        ]
        for p in self.probes:
            c, b = p.client, p.baseline
            out.append(
                f"  {p.rate:8.1f} {p.achieved_rps:8.1f}/s | "
                f"{_ms(c and c.ttft_p50_s)} {_ms(c and c.ttft_p99_s)}, {_ms(c and c.e2e_p99_s)} | "
                f"{_ms(b and b.ttft_p50_s)} {_ms(b and b.ttft_p99_s)}, {_ms(b and b.e2e_p99_s)} | "
                f"{_ms(p.added_ttft_p99_s)} {_ms(p.added_e2e_p99_s)}  failed {p.failed}  "
                f"{'ok' if p.passed else 'over'}"
            )
        best = "none" if self.max_rate is None else f"{self.max_rate:.0f} requests/s"
        out.append(f"highest rate with < {self.limit_s * 1000:g} ms added at p99: {best}")
        return out


def _ms(value: float | None) -> str:
    return "    -   " if value is None else f"{value * 1000:6.3f}ms"


def find_max_rate(
    probe: Callable[[float], OverheadProbe],
    *,
    start_rate: float,
    max_rate: float,
    bisect_steps: int,
) -> tuple[float | None, list[OverheadProbe]]:
    """
    The highest passing rate: double from ``start_rate`` until a probe fails or ``max_rate``,
    then bisect between the last pass and the first failure ``bisect_steps`` times.

    + probe: runs one rate and says whether it passed
    """
    probes: list[OverheadProbe] = []
    good: float | None = None
    bad: float | None = None
    rate = start_rate
    while rate <= max_rate:
        result = probe(rate)
        probes.append(result)
        if not result.passed:
            bad = rate
            break
        good = rate
        rate *= 2
    if good is None or bad is None:
        return good, probes
    for _ in range(bisect_steps):
        middle = (good + bad) / 2
        result = probe(middle)
        probes.append(result)
        if result.passed:
            good = middle
        else:
            bad = middle
    return good, probes


def _request_bytes(prompt_messages: tuple[dict[str, Any], ...], tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": "stub",
            "messages": list(prompt_messages),
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _baseline_probe(
    port: int, rate: float, *, duration_s: float, tokens: int, seed: int, warmup: int = 20
) -> Latency | None:
    """The same requests from a blocking socket, one at a time, at the same arrival times."""
    from gpufleet.bench.prompts import builtin_prompts

    requests = [_request_bytes(p.messages, tokens) for p in builtin_prompts()[:8]]
    ttfts: list[float] = []
    e2es: list[float] = []
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def one(request: bytes) -> tuple[float, float]:
            start = time.perf_counter()
            conn.sendall(request)
            buffer, first = b"", None
            while not buffer.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of the reply
                data = conn.recv(65536)
                if not data:
                    raise ConnectionError("the stub closed the connection")
                buffer += data
                if first is None and b'"content": " tok' in buffer:
                    first = time.perf_counter()
            return (first or time.perf_counter()) - start, time.perf_counter() - start

        for i in range(warmup):
            one(requests[i % len(requests)])
        rng = random.Random(seed)
        due = time.perf_counter()
        deadline = due + duration_s
        index = 0
        while True:
            due += rng.expovariate(rate)
            if due >= deadline:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            ttft, e2e = one(requests[index % len(requests)])
            ttfts.append(ttft)
            e2es.append(e2e)
            index += 1
    return Latency.of(ttfts, e2es)


async def _client_probe(url: str, rate: float, *, duration_s: float, tokens: int, seed: int):
    from gpufleet.bench.client import Client, Endpoint, LoadSettings, run_level
    from gpufleet.bench.metrics import summarize
    from gpufleet.bench.prompts import builtin_prompts

    settings = LoadSettings(
        rate=rate, requests=None, duration_s=duration_s, warmup=20, max_tokens=tokens, seed=seed
    )
    async with Client(endpoint=Endpoint(base_url=url, model="stub"), settings=settings) as client:
        level = await run_level(client, concurrency=None, prompts=builtin_prompts()[:8])
    ok = [r for r in level.records if r.success]
    latency = Latency.of(
        [r.ttft_s for r in ok if r.ttft_s is not None],
        [r.latency_s for r in ok if r.latency_s is not None],
    )
    return summarize(level.records, duration_s=level.duration_s), latency


def probe_rate(
    url: str, rate: float, *, duration_s: float, tokens: int, limit_s: float, seed: int = 1
) -> OverheadProbe:
    """
    Load the stub at ``rate`` with the bare socket, then with the bench client, and compare.

    + url: the stub (``http://127.0.0.1:<port>``)
    + rate / duration_s / tokens / seed: the Poisson load, the same for both
    + limit_s: the most the client may add at p99
    """
    port = int(url.rsplit(":", 1)[1])
    baseline = _baseline_probe(port, rate, duration_s=duration_s, tokens=tokens, seed=seed)
    summary, client = asyncio.run(
        _client_probe(url, rate, duration_s=duration_s, tokens=tokens, seed=seed)
    )
    added_ttft = added_e2e = None
    if client is not None and baseline is not None:
        added_ttft = client.ttft_p99_s - baseline.ttft_p99_s
        added_e2e = client.e2e_p99_s - baseline.e2e_p99_s
    achieved = summary.rps or 0.0
    passed = (
        summary.failed == 0
        and added_ttft is not None
        and added_e2e is not None
        and added_ttft < limit_s
        and added_e2e < limit_s
        and achieved >= 0.9 * rate
    )
    return OverheadProbe(
        rate=rate,
        requests=summary.requests,
        failed=summary.failed,
        achieved_rps=achieved,
        client=client,
        baseline=baseline,
        added_ttft_p99_s=added_ttft,
        added_e2e_p99_s=added_e2e,
        passed=passed,
    )


def measure_overhead(
    *,
    duration_s: float = 4.0,
    tokens: int = 16,
    limit_s: float = 0.001,
    start_rate: float = 50.0,
    max_rate: float = 6400.0,
    bisect_steps: int = 3,
    rates: Sequence[float] | None = None,
) -> OverheadReport:
    """
    Find the highest request rate at which the bench client adds < ``limit_s`` at p99.

    The stub runs in its own process (as a real server would). At each rate a bare blocking
    socket sends the same requests at the same seeded arrival times first; what the client
    measures above that floor is the client's own cost.

    + duration_s: seconds of Poisson load per rate and per client
    + tokens: tokens streamed per answer
    + limit_s: the bound on added p99 TTFT and E2E
    + start_rate / max_rate / bisect_steps: the search (``find_max_rate``)
    + rates: probe exactly these rates instead of searching (the added latency need not grow
      with the rate: at low rates every request meets cold caches)
    """
    load_before = os.getloadavg()
    server = subprocess.Popen(
        [sys.executable, "-m", "gpufleet.bench.stub", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the stub did not start: {line!r}")
        url = line.split()[-1]

        def probe(rate: float) -> OverheadProbe:
            return probe_rate(url, rate, duration_s=duration_s, tokens=tokens, limit_s=limit_s)

        if rates:
            probes = [probe(rate) for rate in rates]
            best = max((p.rate for p in probes if p.passed), default=None)
        else:
            best, probes = find_max_rate(
                probe, start_rate=start_rate, max_rate=max_rate, bisect_steps=bisect_steps
            )
    finally:
        server.terminate()
        server.wait(timeout=10)
    return OverheadReport(
        limit_s=limit_s,
        tokens=tokens,
        duration_s=duration_s,
        probes=tuple(probes),
        max_rate=best,
        load_before=load_before,
        load_after=os.getloadavg(),
    )


async def _serve(port: int, config: StubConfig) -> None:
    async with StubServer(config=config, port=port) as stub:
        print(f"listening on {stub.url}", flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpufleet.bench.stub")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the stub until interrupted")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--token-delay", type=float, default=0.0)
    serve.add_argument("--first-token-delay", type=float, default=0.0)
    serve.add_argument("--template-tokens", type=int, default=0)
    overhead = commands.add_parser("overhead", help="measure the client's own overhead")
    overhead.add_argument("--duration", type=float, default=4.0)
    overhead.add_argument("--tokens", type=int, default=16)
    overhead.add_argument("--start-rate", type=float, default=50.0)
    overhead.add_argument("--limit-ms", type=float, default=1.0)
    overhead.add_argument("--rates", help="comma-separated rates to probe instead of searching")
    overhead.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.command == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            config = replace(
                StubConfig(),
                token_delay_s=args.token_delay,
                first_token_delay_s=args.first_token_delay,
                template_tokens=args.template_tokens,
            )
            asyncio.run(_serve(args.port, config))
        return 0
    started = time.monotonic()
    report = measure_overhead(
        duration_s=args.duration,
        tokens=args.tokens,
        start_rate=args.start_rate,
        limit_s=args.limit_ms / 1000,
        rates=[float(r) for r in args.rates.split(",")] if args.rates else None,
    )
    if args.json:
        print(json.dumps(asdict(report), indent=2, default=lambda v: None if v == math.inf else v))
    else:
        print("\n".join(report.lines()))
        print(f"(search took {time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
