"""
Random prompts of an exact token length, as ``vllm bench serve --dataset-name random`` makes.

``--dataset random --input-len 1024 --output-len 128`` is the figure everyone quotes: every
request carries a prompt of ``input_len`` tokens and asks for exactly ``output_len`` tokens
(``max_tokens`` with ``ignore_eos``, so the model cannot stop early). Tokens are the serving
model's own, counted two ways:

- the server's tokenizer (``/tokenize`` and ``/detokenize``, which llama-server and vLLM
  both serve) cuts a text of random words to the length wanted, as vLLM's client re-aligns
  its prompts to the server's tokenizer;
- the server's ``usage`` on one probe chat gives what the chat template adds around a
  message (role markers, BOS): that many fewer tokens go into each message, so
  ``usage.prompt_tokens`` of every request equals ``input_len``.

The words are drawn from a fixed syllable alphabet by a seeded generator: the same seed gives
the same texts on every machine (only their cut depends on the model's tokenizer).

.. code:: python

    spec = RandomDataset(input_len=256, output_len=64, count=50, seed=0)
    prompts = await random_prompts(ServerTokenizer(session, base_url, kind="llama-server"), spec)
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from gpufleet.bench.client import Endpoint
from gpufleet.bench.prompts import Prompt
from gpufleet.core.probes import CHAT_PATH

# llama-server: POST /tokenize {"content"} -> {"tokens"}; POST /detokenize {"tokens"} ->
# {"content"} (tools/server/README.md). vLLM: {"model", "prompt"} -> {"tokens", "count"};
# {"model", "tokens"} -> {"prompt"} (vllm/entrypoints/openai/protocol.py).
TOKENIZE_PATH = "/tokenize"
DETOKENIZE_PATH = "/detokenize"
_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")
_FIT_TRIES = 8  # cut, count again, adjust: a token at a cut can merge with its neighbour


class DatasetError(RuntimeError):
    """The server cannot make the prompts asked for; the message says what it lacks."""


@dataclass(frozen=True, kw_only=True)
class RandomDataset:
    """
    What ``--dataset random`` asks for.

    + input_len: prompt tokens per request, chat template included (as ``usage`` counts them)
    + output_len: completion tokens per request (``max_tokens``, ``ignore_eos``)
    + count: distinct prompts made (the sampler cycles through them)
    + seed: fixes the words
    """

    input_len: int
    output_len: int
    count: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1 or self.count < 1:
            raise ValueError("--input-len, --output-len and the prompt count must be at least 1")

    @property
    def body(self) -> dict[str, Any]:
        """What every request adds to its body: generation runs to ``output_len``."""
        return {"ignore_eos": True}


class Tokenizer(Protocol):
    async def tokenize(self, text: str) -> list[int]: ...

    async def detokenize(self, tokens: Sequence[int]) -> str: ...

    async def template_tokens(self) -> int: ...


def words(seed: int, count: int) -> list[str]:
    """``count`` made-up words (two or three syllables), the same for the same seed."""
    rng = random.Random(seed)
    return [
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))) for _ in range(count)
    ]


async def fit(tokenizer: Tokenizer, text_seed: int, length: int) -> str:
    """
    A text of exactly ``length`` tokens by ``tokenizer``, cut from random words.

    Raises ``DatasetError`` when no cut gives that count (a tokenizer that merges across
    every cut), naming the counts it reached.
    """
    pool = words(text_seed, max(16, length))
    tokens = await tokenizer.tokenize(" ".join(pool))
    while len(tokens) < length:  # short words can make fewer tokens than words
        pool += words(text_seed + len(pool), len(pool))
        tokens = await tokenizer.tokenize(" ".join(pool))
    want, seen = length, []
    for _ in range(_FIT_TRIES):
        text = await tokenizer.detokenize(tokens[: max(1, want)])
        got = len(await tokenizer.tokenize(text))
        seen.append(got)
        if got == length:
            return text
        want += length - got
    raise DatasetError(
        f"cannot cut a prompt to {length} tokens with the server's tokenizer "
        f"(reached {', '.join(map(str, seen))})"
    )


async def random_prompts(tokenizer: Tokenizer, spec: RandomDataset) -> list[Prompt]:
    """
    ``spec.count`` prompts whose chat requests count ``spec.input_len`` prompt tokens.

    Raises ``DatasetError`` when the chat template alone takes ``input_len`` tokens or more.
    """
    overhead = await tokenizer.template_tokens()
    content = spec.input_len - overhead
    if content < 1:
        raise DatasetError(
            f"--input-len {spec.input_len} leaves no room for a message: the chat template "
            f"alone is {overhead} tokens"
        )
    prompts = []
    for i in range(spec.count):
        text = await fit(tokenizer, spec.seed * 100_003 + i, content)
        prompts.append(
            Prompt(
                name=f"random:{spec.input_len}-{spec.output_len}-{i}",
                messages=({"role": "user", "content": text},),
                size="random",
                max_tokens=spec.output_len,
            )
        )
    return prompts


async def server_prompts(endpoint: Endpoint, *, kind: str, spec: RandomDataset) -> list[Prompt]:
    """``random_prompts`` with the tokenizer of the server at ``endpoint`` (its key sent)."""
    if kind not in ("llama-server", "vllm"):
        raise DatasetError(
            f"--dataset random needs the server's tokenizer: {kind} serves none "
            "(llama-server and vLLM do)"
        )
    headers = {}
    if endpoint.api_key is not None:
        headers["Authorization"] = f"Bearer {endpoint.api_key.get_secret_value()}"
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tokenizer = ServerTokenizer(
            session, endpoint.base_url, kind=kind, model=endpoint.model, headers=headers
        )
        return await random_prompts(tokenizer, spec)


class ServerTokenizer:
    """
    The serving model's tokenizer, asked over HTTP, and its chat template's size from ``usage``.

    + session: an open ``aiohttp.ClientSession``; headers: sent with each request (the key)
    + base_url: the server; kind: ``llama-server`` or ``vllm`` (their bodies differ)
    + model: the ``model`` vLLM checks (llama-server ignores it)
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        kind: str,
        model: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.session, self.base_url, self.kind, self.model = session, base_url, kind, model
        self.headers = headers or {}

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.base_url + path
        try:
            async with self.session.post(url, json=body, headers=self.headers) as response:
                if response.status != 200:
                    raise DatasetError(
                        f"{path} answered HTTP {response.status}: --dataset random needs the "
                        "server's tokenizer (llama-server and vLLM serve it; Ollama does not)"
                    )
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{path}: {type(exc).__name__}: {exc}") from None
        if not isinstance(answer, dict):
            raise DatasetError(f"{path} did not answer a JSON object")
        return answer

    async def tokenize(self, text: str) -> list[int]:
        if self.kind == "vllm":
            body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        else:
            body = {"content": text, "add_special": False}
        tokens = (await self._post(TOKENIZE_PATH, body)).get("tokens")
        if not isinstance(tokens, list):
            raise DatasetError(f"{TOKENIZE_PATH} gave no token list")
        return tokens

    async def detokenize(self, tokens: Sequence[int]) -> str:
        body: dict[str, Any] = {"tokens": list(tokens)}
        if self.kind == "vllm":
            body["model"] = self.model
        answer = await self._post(DETOKENIZE_PATH, body)
        text = answer.get("prompt" if self.kind == "vllm" else "content")
        if not isinstance(text, str):
            raise DatasetError(f"{DETOKENIZE_PATH} gave no text")
        return text

    async def template_tokens(self) -> int:
        """``usage.prompt_tokens`` of a one-token chat minus its message's own tokens."""
        message = "hello"
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": message}],
            "max_tokens": 1,
            "stream": False,
        }
        answer = await self._post(CHAT_PATH, body)
        usage = answer.get("usage") or {}
        total = usage.get("prompt_tokens")
        if not isinstance(total, int):
            raise DatasetError("the server's chat answer carries no usage.prompt_tokens")
        return total - len(await self.tokenize(message))
