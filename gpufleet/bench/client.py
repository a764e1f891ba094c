"""
The load generator: streaming chat completions over one aiohttp connection pool.

Every request is ``POST {base_url}/v1/chat/completions`` with ``stream: true`` and
``stream_options: {"include_usage": true}``, timed the way ``vllm bench serve`` times it
(``vllm/benchmarks/lib/endpoint_request_func.py``), with one deliberate difference:

- **TTFT** is the time from sending the request to the first streamed chunk whose delta
  carries generated text (``content``, ``reasoning_content`` or ``reasoning`` non-empty, or
  ``tool_calls``). vLLM's client stops the clock at the first chunk with any ``choices``;
  servers that send a role-only chunk before prefill would make that look instant.
- **ITL** is the list of gaps between successive text chunks.
- **E2E latency** runs to the last chunk with ``choices`` (the trailing usage-only chunk
  carries no token, as in vLLM's client).
- **Tokens** come from the server's ``usage`` (``prompt_tokens``, ``completion_tokens``),
  never from counting chunks; a server that sends no usage leaves them ``None``.

Failures are records, never exceptions: ``http_<status>``, ``timeout``, ``connection``
(refused, reset, cut mid-stream) or ``protocol`` (bad JSON, an error event, no text at all).

Load shapes (``LoadSettings``): closed loop, ``concurrency`` workers each sending the next
request when its last one ends; open loop, Poisson arrivals at ``rate`` per second (``inf``
sends everything at once), capped at ``concurrency`` in flight when that is set. A run stops
after ``requests`` requests or after ``duration_s`` (requests in flight then still finish).
``warmup`` requests go first and are not counted.

The API key is held as a ``pydantic.SecretStr``: it is sent in the ``Authorization`` header
and removed from every error text a server could echo it in; no repr shows it.

.. code:: python

    endpoint = Endpoint(base_url="http://127.0.0.1:8000", model="gpt-oss-20b")
    levels = asyncio.run(run_sweep(endpoint=endpoint, levels=[1, 4],
                                   settings=LoadSettings(requests=40), prompts=builtin_prompts()))
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import SecretStr

from gpufleet.bench.prompts import Prompt, PromptSampler
from gpufleet.core.probes import CHAT_PATH

ERROR_CLASSES = ("timeout", "connection", "protocol")  # plus http_<status>
_TEXT_KEYS = ("content", "reasoning_content", "reasoning")
_ERROR_BODY_CHARS = 200


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """
    An OpenAI-compatible server to load.

    + base_url: scheme, host and port, e.g. ``http://127.0.0.1:8000`` (a forwarded port)
    + model: the ``model`` sent with each request (llama-server ignores it, vLLM checks it)
    + api_key: sent as ``Authorization: Bearer``; never shown
    + metrics_path: where the server's Prometheus counters are, or None where it has none
    """

    base_url: str
    model: str
    api_key: SecretStr | None = field(default=None, repr=False)
    metrics_path: str | None = None

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, not {self.base_url}")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))

    @property
    def chat_url(self) -> str:
        return self.base_url + CHAT_PATH

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_path is None else self.base_url + self.metrics_path


@dataclass(frozen=True, kw_only=True)
class LoadSettings:
    """
    How hard and how long to load one level; validated on creation.

    + rate: arrivals per second (Poisson); ``math.inf`` sends without pacing
    + requests: stop after this many counted requests (exclusive with ``duration_s``)
    + duration_s: stop sending after this many seconds
    + warmup: requests sent first at the same concurrency, not counted
    + max_tokens: completion limit per request (a prompt's own ``max_tokens`` wins)
    + timeout_s: whole-request limit; ``connect_timeout_s`` for the TCP connect alone
    + seed: fixes the prompt order and the arrival times
    + extra_body: merged into every request body (e.g. ``{"temperature": 0}``)
    + stop_after_connection_failures: a level sends nothing more once this many requests in a
      row found no connection (a dead target would otherwise take thousands a second), and
      the sweep stops there; None never stops
    """

    rate: float = math.inf
    requests: int | None = 50
    duration_s: float | None = None
    warmup: int = 2
    max_tokens: int = 128
    timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    seed: int = 0
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    stop_after_connection_failures: int | None = 20

    def __post_init__(self) -> None:
        stop = self.stop_after_connection_failures
        if stop is not None and stop < 1:
            raise ValueError(f"stop_after_connection_failures must be at least 1, not {stop}")
        if (self.requests is None) == (self.duration_s is None):
            raise ValueError("give exactly one of requests or duration_s")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be at least 1, not {self.requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be positive, not {self.duration_s}")
        if not self.rate > 0:
            raise ValueError(f"rate must be positive (or inf), not {self.rate}")
        if self.warmup < 0 or self.max_tokens < 1:
            raise ValueError("warmup must be >= 0 and max_tokens >= 1")
        if not (self.timeout_s > 0 and self.connect_timeout_s > 0):
            raise ValueError("timeouts must be positive")
        reserved = {"model", "messages", "stream", "stream_options"} & set(self.extra_body)
        if reserved:
            raise ValueError(f"extra_body may not set {', '.join(sorted(reserved))}")


@dataclass(frozen=True, kw_only=True)
class RequestRecord:
    """
    One request as measured; times in seconds.

    + index: order of sending within its level (0-based)
    + prompt: the prompt's name
    + start_s: when it was sent, from the level's start
    + queued_s: time it waited for a free slot (open loop with a concurrency cap)
    + ttft_s / itl_s / latency_s: see the module docstring; None when it failed
    + prompt_tokens / completion_tokens: from ``usage``; None when the server sent none
    + error_class: ``http_<status>``, ``timeout``, ``connection`` or ``protocol``; None on success
    + error: a short description, with the API key removed
    """

    index: int
    prompt: str
    start_s: float
    queued_s: float = 0.0
    success: bool
    ttft_s: float | None = None
    itl_s: tuple[float, ...] = ()
    latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error_class: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values (the report's per-request schema)."""
        return {
            "index": self.index,
            "prompt": self.prompt,
            "start_s": self.start_s,
            "queued_s": self.queued_s,
            "success": self.success,
            "ttft_s": self.ttft_s,
            "itl_s": list(self.itl_s),
            "latency_s": self.latency_s,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "error_class": self.error_class,
            "error": self.error,
        }


@dataclass(frozen=True, kw_only=True)
class Progress:
    """
    What a progress callback is told after each finished request.

    + concurrency / rate: the level running
    + warmup: True while warm-up requests run (they are not counted)
    + done / failed: finished requests so far in this phase, and how many of them failed
    + total: requests expected in this phase, None for a timed run
    + elapsed_s: seconds since the phase started
    """

    concurrency: int | None
    rate: float
    warmup: bool
    done: int
    failed: int
    total: int | None
    elapsed_s: float


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True, kw_only=True)
class Scrape:
    """The raw text of one ``/metrics`` answer and when it was taken (``time.time()``)."""

    at: float
    text: str


@dataclass(frozen=True, kw_only=True)
class LevelResult:
    """
    One measured level: its records and the clock around them.

    + concurrency: in-flight cap (None: uncapped open loop); rate: arrivals per second
    + started_at / ended_at: wall clock (``time.time()``), to match GPU samples
    + duration_s: first send to last completion, on the monotonic clock (vLLM's duration)
    + warmup_failures: warm-up requests that failed (a hint the server was not ready)
    + scrapes: ``/metrics`` answers taken before, during (once a second) and after the level
    + stopped: why the level stopped sending before its end (``LoadSettings``'
      ``stop_after_connection_failures``); None when it ran whole
    """

    concurrency: int | None
    rate: float
    started_at: float
    ended_at: float
    duration_s: float
    records: tuple[RequestRecord, ...]
    warmup_failures: int = 0
    scrapes: tuple[Scrape, ...] = ()
    stopped: str | None = None


def _redact(text: str, secret: SecretStr | None) -> str:
    if secret is not None and (value := secret.get_secret_value()):
        text = text.replace(value, "<secret>")
    return text


def _text_delta(choice: Any) -> bool:
    """Does a streamed choice carry generated text (or a tool call)?"""
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    if any(isinstance(delta.get(k), str) and delta[k] for k in _TEXT_KEYS):
        return True
    return bool(delta.get("tool_calls"))


class _Failure(Exception):
    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


_STALE_RETRIES = 3  # sends of one request on pooled connections found closed, at most


class _Stale(Exception):
    """The request failed on a pooled connection before any answer: safe to send again."""


class Client:
    """
    One connection pool to one endpoint; use as ``async with Client(...) as client``.

    + endpoint: where to send
    + settings: timeouts, ``max_tokens`` and ``extra_body`` come from here
    """

    def __init__(self, *, endpoint: Endpoint, settings: LoadSettings) -> None:
        self.endpoint = endpoint
        self.settings = settings
        self._headers = {"Content-Type": "application/json"}
        if endpoint.api_key is not None:
            self._headers["Authorization"] = f"Bearer {endpoint.api_key.get_secret_value()}"
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"Client(endpoint={self.endpoint!r})"

    async def __aenter__(self) -> Client:
        timeout = aiohttp.ClientTimeout(
            total=self.settings.timeout_s, sock_connect=self.settings.connect_timeout_s
        )
        # limit=0: the load shape caps concurrency, not the pool; connections are kept alive.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, raise_for_status=False
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use the client as `async with Client(...)`")
        return self._session

    def _body(self, prompt: Prompt) -> dict[str, Any]:
        return {
            **self.settings.extra_body,
            "model": self.endpoint.model,
            "messages": list(prompt.messages),
            "max_tokens": prompt.max_tokens or self.settings.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def chat(
        self, prompt: Prompt, *, index: int, t0: float, queued_s: float = 0.0
    ) -> RequestRecord:
        """
        Send one streaming request and measure it; never raises for a server's fault.

        + prompt: what to send
        + index: the record's index
        + t0: the level's start on ``time.perf_counter()``, for ``start_s``
        + queued_s: time already spent waiting for a slot, kept in the record
        """
        start = time.perf_counter()
        base = {"index": index, "prompt": prompt.name, "start_s": start - t0, "queued_s": queued_s}
        try:
            for attempt in range(_STALE_RETRIES + 1):
                try:
                    measured = await self._stream(prompt, start, retry=attempt < _STALE_RETRIES)
                    break
                except _Stale:
                    # The pooled connection was closed by the server after its last answer
                    # (llama-server closes after every stream while saying keep-alive): nothing
                    # was sent or answered, so send again (the pool drops the dead one; at
                    # several at once the next pooled one may be dead too) and time that one.
                    start = time.perf_counter()
                    base["start_s"] = start - t0
        except _Failure as exc:
            message = _redact(str(exc), self.endpoint.api_key)
            return RequestRecord(**base, success=False, error_class=exc.error_class, error=message)
        return RequestRecord(**base, success=True, **measured)

    async def _stream(self, prompt: Prompt, start: float, *, retry: bool = True) -> dict[str, Any]:
        answered = False
        try:
            async with self.session.post(
                self.endpoint.chat_url, json=self._body(prompt), headers=self._headers
            ) as response:
                answered = True
                if response.status != 200:
                    body = await response.content.read(2048)
                    snippet = " ".join(body.decode("utf-8", "replace").split())
                    raise _Failure(
                        f"http_{response.status}",
                        f"HTTP {response.status} {response.reason or ''}: "
                        f"{snippet[:_ERROR_BODY_CHARS]}".rstrip(": "),
                    )
                return await self._read_events(response, start)
        except _Failure:
            raise
        except aiohttp.ConnectionTimeoutError:
            raise _Failure(
                "connection", f"no connection within {self.settings.connect_timeout_s}s"
            ) from None
        except TimeoutError:
            raise _Failure(
                "timeout", f"no complete answer within {self.settings.timeout_s}s"
            ) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if retry and not answered and not isinstance(exc, aiohttp.ClientConnectorError):
                raise _Stale() from None
            raise _Failure("connection", f"{type(exc).__name__}: {exc}") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            raise _Failure("connection", f"{type(exc).__name__}: {exc}") from None
        except aiohttp.ClientResponseError as exc:
            raise _Failure("protocol", f"{type(exc).__name__}: {exc.message}") from None
        except ValueError as exc:  # aiohttp reports some malformed responses as ValueError
            raise _Failure("protocol", f"{type(exc).__name__}: {exc}") from None

    async def _read_events(self, response: aiohttp.ClientResponse, start: float) -> dict[str, Any]:
        ttft: float | None = None
        last_text = last_choice = start
        itl: list[float] = []
        usage: dict[str, Any] | None = None
        data_lines: list[str] = []

        def dispatch(now: float) -> None:
            nonlocal ttft, last_text, last_choice, usage
            payload = "\n".join(data_lines)
            data_lines.clear()
            if payload == "[DONE]" or not payload:
                return
            try:
                event = json.loads(payload)
            except json.JSONDecodeError:
                raise _Failure("protocol", f"stream event is not JSON: {payload[:80]}") from None
            if not isinstance(event, dict):
                raise _Failure("protocol", "stream event is not a JSON object")
            if "error" in event:
                raise _Failure("protocol", f"error event in stream: {str(event['error'])[:160]}")
            if isinstance(event.get("usage"), dict):
                usage = event["usage"]
            choices = event.get("choices")
            if not choices or not isinstance(choices, list):
                return
            if _text_delta(choices[0]):
                if ttft is None:
                    ttft = now - start
                else:
                    itl.append(now - last_text)
                last_text = now
            last_choice = now

        def feed(line: str, now: float) -> None:
            if not line:
                if data_lines:
                    dispatch(now)
                return
            if line.startswith(":"):
                return  # SSE comment, used as a keep-alive ping
            field_name, _, value = line.partition(":")
            if field_name == "data":
                data_lines.append(value[1:] if value.startswith(" ") else value)

        # Whole reads, split here: one await per network read rather than one per line.
        pending = b""
        async for data in response.content.iter_any():
            now = time.perf_counter()
            *lines, pending = (pending + data).split(b"\n")
            for raw in lines:
                feed(raw.decode("utf-8", "replace").rstrip("\r"), now)
        now = time.perf_counter()
        if pending:
            feed(pending.decode("utf-8", "replace").rstrip("\r"), now)
        if data_lines:
            dispatch(now)
        if ttft is None:
            raise _Failure("protocol", "the stream ended without any generated text")
        return {
            "ttft_s": ttft,
            "itl_s": tuple(itl),
            "latency_s": last_choice - start,
            "prompt_tokens": _count(usage, "prompt_tokens"),
            "completion_tokens": _count(usage, "completion_tokens"),
        }

    async def get_text(self, url: str, *, timeout_s: float = 5.0) -> str | None:
        """GET a text resource (``/metrics``) with the same auth; None when it fails."""
        try:
            async with self.session.get(
                url, headers=self._headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                if response.status != 200:
                    return None
                return await response.text()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None


def _count(usage: dict[str, Any] | None, key: str) -> int | None:
    value = None if usage is None else usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Breaker:
    """Counts connection failures in a row across a level (warm-up included); once ``limit``
    is reached, the level sends nothing more."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.in_a_row = limit, 0
        self.open = False

    def record(self, record: RequestRecord) -> None:
        self.in_a_row = self.in_a_row + 1 if record.error_class == "connection" else 0
        if self.limit is not None and self.in_a_row >= self.limit:
            self.open = True

    @property
    def why(self) -> str | None:
        if not self.open:
            return None
        return f"stopped after {self.in_a_row} requests in a row found no connection"


class _Counter:
    """Progress bookkeeping for one phase (warm-up or measured)."""

    def __init__(
        self,
        *,
        concurrency: int | None,
        rate: float,
        warmup: bool,
        total: int | None,
        callback: ProgressCallback | None,
        breaker: _Breaker | None = None,
    ) -> None:
        self.concurrency, self.rate, self.warmup, self.total = concurrency, rate, warmup, total
        self.callback = callback
        self.breaker = breaker or _Breaker(None)
        self.started = time.perf_counter()
        self.done = self.failed = 0

    def finished(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += not record.success
        self.breaker.record(record)
        if self.callback is not None:
            self.callback(
                Progress(
                    concurrency=self.concurrency,
                    rate=self.rate,
                    warmup=self.warmup,
                    done=self.done,
                    failed=self.failed,
                    total=self.total,
                    elapsed_s=time.perf_counter() - self.started,
                )
            )


async def _closed_loop(
    client: Client,
    sampler: PromptSampler,
    *,
    workers: int,
    count: int | None,
    deadline: float | None,
    t0: float,
    counter: _Counter,
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while True:
            if count is not None and issued >= count:
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            if counter.breaker.open:
                return
            index, issued = issued, issued + 1
            record = await client.chat(next(sampler), index=index, t0=t0)
            records.append(record)
            counter.finished(record)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return records


async def _open_loop(
    client: Client,
    sampler: PromptSampler,
    *,
    rate: float,
    cap: int | None,
    count: int | None,
    deadline: float | None,
    seed: int,
    t0: float,
    counter: _Counter,
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    slots = asyncio.Semaphore(cap) if cap is not None else None
    rng = random.Random(seed)
    tasks: list[asyncio.Task[None]] = []

    async def send(prompt: Prompt, index: int) -> None:
        arrived = time.perf_counter()
        if slots is None:
            record = await client.chat(prompt, index=index, t0=t0)
        else:
            async with slots:
                if counter.breaker.open:  # queued behind the cap while the target died
                    return
                queued = time.perf_counter() - arrived
                record = await client.chat(prompt, index=index, t0=t0, queued_s=queued)
        records.append(record)
        counter.finished(record)

    due = t0
    index = 0
    while (count is None or index < count) and not counter.breaker.open:
        if math.isfinite(rate):
            due += rng.expovariate(rate)
            if deadline is not None and due >= deadline:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        elif deadline is not None and time.perf_counter() >= deadline:
            break
        tasks.append(asyncio.create_task(send(next(sampler), index)))
        index += 1
        if not math.isfinite(rate):
            await asyncio.sleep(0)  # let the sends start while the rest are queued
    await asyncio.gather(*tasks)
    return records


async def _warm_up(
    client: Client, prompts: Sequence[Prompt], concurrency: int | None, counter: _Counter
) -> list[RequestRecord]:
    """The warm-up requests, closed loop, from other prompts than the measured ones."""
    settings = client.settings
    warm = PromptSampler(prompts, seed=settings.seed + 1)  # not the measured prompts
    return await _closed_loop(
        client,
        warm,
        workers=min(concurrency or settings.warmup, settings.warmup),
        count=settings.warmup,
        deadline=None,
        t0=time.perf_counter(),
        counter=counter,
    )


async def _measure(
    client: Client,
    sampler: PromptSampler,
    concurrency: int | None,
    *,
    t0: float,
    counter: _Counter,
) -> list[RequestRecord]:
    """The measured requests: a closed loop of ``concurrency`` workers at rate inf, else an
    open loop at the settings' rate (capped by ``concurrency`` when given)."""
    settings = client.settings
    deadline = None if settings.duration_s is None else t0 + settings.duration_s
    if concurrency is not None and math.isinf(settings.rate):
        return await _closed_loop(
            client,
            sampler,
            workers=concurrency,
            count=settings.requests,
            deadline=deadline,
            t0=t0,
            counter=counter,
        )
    return await _open_loop(
        client,
        sampler,
        rate=settings.rate,
        cap=concurrency,
        count=settings.requests,
        deadline=deadline,
        seed=settings.seed,
        t0=t0,
        counter=counter,
    )


class _Scraper:
    """The server's ``/metrics`` read every ``every_s`` while a level runs (nothing where the
    endpoint has no metrics)."""

    def __init__(self, client: Client, *, every_s: float) -> None:
        self.client, self.every_s = client, every_s
        self.url = client.endpoint.metrics_url
        self.scrapes: list[Scrape] = []
        self._task: asyncio.Task | None = None

    async def once(self) -> None:
        if self.url is not None:
            text = await self.client.get_text(self.url)
            if text is not None:
                self.scrapes.append(Scrape(at=time.time(), text=text))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            await self.once()

    def start(self) -> None:
        if self.url is not None:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def run_level(
    client: Client,
    *,
    concurrency: int | None,
    prompts: Sequence[Prompt],
    on_progress: ProgressCallback | None = None,
    scrape_interval_s: float = 1.0,
    warm_prompts: Sequence[Prompt] | None = None,
) -> LevelResult:
    """
    Warm up, then measure one level with the client's settings.

    + client: an open ``Client`` (its settings give rate, count or duration, seed)
    + concurrency: requests in flight at most; None only for an open loop (finite rate, or
      inf with a request count: all at once)
    + prompts: the set to sample from; the seed gives the same order at every level
    + on_progress: called after each finished request, warm-up included (``warmup=True``)
    + scrape_interval_s: how often to read the server's ``/metrics`` while the level runs
    + warm_prompts: the warm-up's own prompts (default: drawn from ``prompts``)

    Raises ``ValueError`` only for a load shape with no bound (no cap, no rate, a duration).
    """
    settings = client.settings
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    if concurrency is None and math.isinf(settings.rate) and settings.duration_s is not None:
        raise ValueError("a timed run at rate inf needs a concurrency cap")

    breaker = _Breaker(settings.stop_after_connection_failures)

    def counter(*, warmup: bool, total: int | None) -> _Counter:
        return _Counter(
            concurrency=concurrency,
            rate=settings.rate,
            warmup=warmup,
            total=total,
            callback=on_progress,
            breaker=breaker,
        )

    warmup_failures = 0
    if settings.warmup:
        warm = warm_prompts or prompts
        warmed = await _warm_up(
            client, warm, concurrency, counter(warmup=True, total=settings.warmup)
        )
        warmup_failures = sum(not r.success for r in warmed)

    sampler = PromptSampler(prompts, seed=settings.seed)
    scraper = _Scraper(client, every_s=scrape_interval_s)
    await scraper.once()
    scraper.start()
    started_at = time.time()
    t0 = time.perf_counter()
    measured = counter(warmup=False, total=settings.requests)
    try:
        records = await _measure(client, sampler, concurrency, t0=t0, counter=measured)
    finally:
        await scraper.stop()
    duration = time.perf_counter() - t0
    ended_at = time.time()
    await scraper.once()
    scrapes = scraper.scrapes
    return LevelResult(
        concurrency=concurrency,
        rate=settings.rate,
        started_at=started_at,
        ended_at=ended_at,
        duration_s=duration,
        records=tuple(sorted(records, key=lambda r: r.index)),
        warmup_failures=warmup_failures,
        scrapes=tuple(scrapes),
        stopped=breaker.why,
    )


def fresh_shares(
    prompts: Sequence[Prompt], levels: int, warmup: int
) -> list[tuple[Sequence[Prompt] | None, Sequence[Prompt]]]:
    """Each level's (warm-up prompts, measured prompts): disjoint slices of ``prompts``, in
    order. A set too small to share leaves every level all of it (the caller made it large
    enough: ``(requests + warmup) * levels``)."""
    per = len(prompts) // max(levels, 1)
    if per <= warmup:
        return [(None, prompts)] * levels
    out = []
    for i in range(levels):
        share = prompts[i * per : (i + 1) * per]
        out.append((share[:warmup] or None, share[warmup:]))
    return out


async def run_sweep(
    *,
    endpoint: Endpoint,
    settings: LoadSettings,
    levels: Sequence[int | None],
    prompts: Sequence[Prompt],
    on_progress: ProgressCallback | None = None,
    scrape_interval_s: float = 1.0,
    fresh: bool = False,
) -> list[LevelResult]:
    """
    Measure several concurrency levels one after another over one connection pool.

    + endpoint: the server
    + settings: the load shape every level shares
    + levels: concurrency per level, e.g. ``[1, 4, 16]`` (None: an uncapped open loop)
    + prompts: the set to sample from (the same sequence at each level)
    + on_progress: called after every finished request
    + scrape_interval_s: how often to read the server's ``/metrics`` during a level
    + fresh: no prompt sent twice (``--dataset random``): each level, and its warm-up, takes
      its own share of ``prompts``, so a server's prompt cache never answers for the model
    """
    if not levels:
        raise ValueError("no levels to run")
    results = []
    shares = fresh_shares(prompts, len(levels), settings.warmup) if fresh else None
    async with Client(endpoint=endpoint, settings=settings) as client:
        for i, concurrency in enumerate(levels):
            warm, measured = shares[i] if shares else (None, prompts)
            results.append(
                await run_level(
                    client,
                    concurrency=concurrency,
                    prompts=measured,
                    warm_prompts=warm,
                    on_progress=on_progress,
                    scrape_interval_s=scrape_interval_s,
                )
            )
            if results[-1].stopped:  # the next level would find the same dead target
                break
    return results
