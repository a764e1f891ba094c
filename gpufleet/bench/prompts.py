"""
Prompts for a bench run: built-in ones of mixed lengths, or a JSONL file; a seeded sampler.

The built-in set holds short questions, medium requests with a paragraph of context, and long
ones carrying a generated log or table, so prefill and decode both show in the figures. The
texts are fixed in this module (nothing random, nothing time-based): the same seed gives the
same request sequence on every machine.

A JSONL file has one object per line, either ``{"prompt": "..."}`` or
``{"messages": [{"role": "user", "content": "..."}, ...]}``, optionally with
``"max_tokens": N`` for that request. Blank lines are skipped; other keys are ignored.

.. code:: python

    sampler = PromptSampler(builtin_prompts(), seed=0)
    first_ten = sampler.take(10)
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Size = Literal["short", "medium", "long", "file", "random"]
ROLES = ("system", "user", "assistant", "tool", "developer")


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the line."""


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """
    One request's input: chat messages, a name for records, and an optional token limit.

    + name: ``builtin:short-3`` or ``<file>:<line>``, shown in per-request records
    + messages: the OpenAI chat ``messages`` list sent as is
    + size: ``short``/``medium``/``long`` for built-ins, ``file`` for loaded prompts,
      ``random`` for ``--dataset random``
    + max_tokens: this prompt's own limit, overriding the run's ``max_tokens``
    """

    name: str
    messages: tuple[dict[str, Any], ...]
    size: Size
    max_tokens: int | None = None

    @property
    def chars(self) -> int:
        """Characters of text content in the messages (a rough size, never a token count)."""
        return sum(len(m["content"]) for m in self.messages if isinstance(m.get("content"), str))


def _user(text: str) -> tuple[dict[str, Any], ...]:
    return ({"role": "user", "content": text},)


_SHORT = (
    "What is the capital of Australia? Answer in one sentence.",
    "Name three uses of a hash table.",
    "Explain in two sentences what a GPU does that a CPU does not.",
    "Translate 'the service is healthy' into French, German and Spanish.",
    "Write a haiku about a server room at night.",
    "What does HTTP status 503 mean?",
    "Give one reason to pin a package version.",
    "Is 2027 a prime number? Explain briefly.",
)

_MEDIUM_CONTEXT = (
    "A team runs language-model inference on three kinds of machines: small boards with "
    "shared memory, workstations with one large discrete GPU, and compact desktop systems with "
    "a unified memory pool of 128 GB. Each machine serves an OpenAI-compatible endpoint. "
    "Requests arrive in bursts during working hours and trickle in at night. The team measures "
    "time to first token, the time per output token, and how busy each GPU is. They found that "
    "one server left its GPU idle most of the time because it processed one request at a time, "
    "and that another ran out of memory when its context length was raised."
)

_MEDIUM = (
    f"{_MEDIUM_CONTEXT}\n\nList the three measurements the team takes and say what each one "
    "tells them about user experience.",
    f"{_MEDIUM_CONTEXT}\n\nSuggest two changes that would raise GPU utilisation on the server "
    "that processed one request at a time, and the risk each change carries.",
    f"{_MEDIUM_CONTEXT}\n\nWrite a short checklist, five items at most, the team should follow "
    "before raising a server's context length.",
    f"{_MEDIUM_CONTEXT}\n\nExplain why the night-time trickle and the daytime bursts might need "
    "different benchmark settings.",
)

_LEVELS = ("INFO", "INFO", "INFO", "WARN", "INFO", "ERROR", "INFO", "DEBUG")
_EVENTS = (
    "request served",
    "slot released",
    "cache hit for prompt prefix",
    "queue depth above threshold",
    "model weights mapped",
    "client closed connection early",
    "health probe answered",
    "batch of requests decoded",
)


def _service_log(lines: int) -> str:
    """A made-up service log: the same text every call (arithmetic, no randomness)."""
    rows = []
    for i in range(lines):
        second = (i * 7) % 60
        minute = (i * 7) // 60 % 60
        level = _LEVELS[i % len(_LEVELS)]
        event = _EVENTS[(i * 3) % len(_EVENTS)]
        rows.append(
            f"2025-01-01T10:{minute:02d}:{second:02d}Z {level} slot={i % 4} "
            f"latency_ms={(i * 37) % 900 + 12} {event}"
        )
    return "\n".join(rows)


def _table(rows: int) -> str:
    """A made-up CSV table of host measurements, the same text every call."""
    out = ["host,gpu,util_pct,mem_used_gib,tokens_per_s"]
    for i in range(rows):
        out.append(
            f"host-{i:03d},gpu{i % 2},{(i * 13) % 100},{(i * 29) % 120 + 0.5:.1f},"
            f"{(i * 17) % 300 + 10}"
        )
    return "\n".join(out)


_LONG = (
    "Here is a service log.\n\n"
    + _service_log(120)
    + "\n\nSummarise what happened: count the errors and warnings, name the slot with the "
    "highest latency, and say whether the service looks healthy.",
    "Here is a table of measurements.\n\n"
    + _table(150)
    + "\n\nWhich hosts look underused, which look overloaded, and what would you check first?",
    "Here is a service log.\n\n"
    + _service_log(60)
    + "\n\nAnd here is a table of measurements.\n\n"
    + _table(60)
    + "\n\nDo the log and the table tell a consistent story? Explain in a few sentences.",
)


def builtin_prompts() -> list[Prompt]:
    """
    The built-in prompts: eight short, four medium and three long, in a fixed order.

    The long ones are several thousand characters (a few thousand tokens), the short ones a
    dozen words; every call returns equal prompts.
    """
    prompts: list[Prompt] = []
    for size, texts in (("short", _SHORT), ("medium", _MEDIUM), ("long", _LONG)):
        for i, text in enumerate(texts):
            prompts.append(Prompt(name=f"builtin:{size}-{i}", messages=_user(text), size=size))
    return prompts


def _check_messages(value: Any) -> str | None:
    """Why ``value`` is not a usable chat ``messages`` list, or None when it is."""
    if not isinstance(value, list) or not value:
        return '"messages" must be a non-empty list'
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f'"messages"[{i}] must be an object'
        role = message.get("role")
        if role not in ROLES:
            return f'"messages"[{i}].role must be one of {", ".join(ROLES)}, not {role!r}'
        content = message.get("content")
        if not isinstance(content, str | list):
            return f'"messages"[{i}].content must be a string or a list of parts'
    return None


def _parse_line(text: str) -> tuple[tuple[dict[str, Any], ...], int | None]:
    """Messages and max_tokens from one JSONL line; raises ValueError with the reason."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(item, dict):
        raise ValueError(f"expected a JSON object, got {type(item).__name__}")
    has_prompt, has_messages = "prompt" in item, "messages" in item
    if has_prompt == has_messages:
        raise ValueError('needs exactly one of "prompt" or "messages"')
    if has_prompt:
        if not isinstance(item["prompt"], str) or not item["prompt"].strip():
            raise ValueError('"prompt" must be a non-empty string')
        messages = _user(item["prompt"])
    else:
        if why := _check_messages(item["messages"]):
            raise ValueError(why)
        messages = tuple(item["messages"])
    max_tokens = item.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise ValueError('"max_tokens" must be a positive integer')
    return messages, max_tokens


def load_jsonl(path: str | Path) -> list[Prompt]:
    """
    Read prompts from a JSONL file, one request per line.

    + path: the file; each non-blank line ``{"prompt": "..."}`` or ``{"messages": [...]}``

    Raises ``PromptFileError`` naming the file and line of the first bad line, or saying the
    file holds no prompts; a missing file raises it too.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read prompts ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise PromptFileError(f"{path}: not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages, max_tokens = _parse_line(line)
        except ValueError as exc:
            raise PromptFileError(f"{path}:{number}: {exc}") from None
        prompts.append(
            Prompt(
                name=f"{path.name}:{number}", messages=messages, size="file", max_tokens=max_tokens
            )
        )
    if not prompts:
        raise PromptFileError(f"{path}: no prompts (every line is blank)")
    return prompts


class PromptSampler:
    """
    An endless, seeded sequence of prompts: each pass is a fresh shuffle of the whole set.

    Every prompt appears once per pass, so the mix of lengths is exact over each pass rather
    than left to chance; the seed alone fixes the order.

    + prompts: the set to draw from (built-in or loaded), at least one
    + seed: the same seed gives the same sequence
    """

    def __init__(self, prompts: Sequence[Prompt], *, seed: int) -> None:
        if not prompts:
            raise ValueError("no prompts to sample from")
        self._prompts = tuple(prompts)
        self._rng = random.Random(seed)
        self._order: list[Prompt] = []

    def __iter__(self) -> Iterator[Prompt]:
        return self

    def __next__(self) -> Prompt:
        if not self._order:
            self._order = list(self._prompts)
            self._rng.shuffle(self._order)
            self._order.reverse()  # pop() from the end keeps the shuffled order
        return self._order.pop()

    def take(self, count: int) -> list[Prompt]:
        """The next ``count`` prompts of the sequence."""
        return [next(self) for _ in range(count)]
