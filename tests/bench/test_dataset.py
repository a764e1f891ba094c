"""--dataset random: prompts cut to an exact token count with the server's tokenizer, the chat
template's tokens taken off, so every request's ``usage.prompt_tokens`` is ``input_len``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gpufleet.bench.client import Endpoint, LoadSettings, run_sweep
from gpufleet.bench.dataset import (
    DatasetError,
    RandomDataset,
    fit,
    random_prompts,
    server_prompts,
    words,
)
from gpufleet.bench.stub import StubConfig, StubServer


class Pieces:
    """A tokenizer fixture: every two characters a token (spaces too), ids in order of first
    sight, and ``template`` tokens of chat template."""

    def __init__(self, template: int = 5) -> None:
        self.template, self.calls = template, 0
        self.text: dict[int, str] = {}

    async def tokenize(self, text: str) -> list[int]:
        self.calls += 1
        out = []
        for i in range(0, len(text), 2):
            piece = text[i : i + 2]
            self.text.setdefault(len(self.text), piece)
            out.append(next(k for k, v in self.text.items() if v == piece))
        return out

    async def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(self.text[t] for t in tokens)

    async def template_tokens(self) -> int:
        return self.template


def test_words_are_the_same_for_a_seed_and_differ_between_seeds():
    assert words(3, 20) == words(3, 20)
    assert words(3, 20) != words(4, 20)
    assert all(w.isalpha() and 4 <= len(w) <= 6 for w in words(0, 200))


def test_a_text_is_cut_to_the_exact_count():
    tokenizer = Pieces()
    for length in (1, 7, 64, 301):
        text = asyncio.run(fit(tokenizer, 11, length))
        assert len(asyncio.run(tokenizer.tokenize(text))) == length


def test_prompts_leave_room_for_the_template_and_ask_for_output_len():
    spec = RandomDataset(input_len=40, output_len=16, count=3, seed=2)
    prompts = asyncio.run(random_prompts(Pieces(template=5), spec))
    assert [p.name for p in prompts] == [f"random:40-16-{i}" for i in range(3)]
    assert {p.max_tokens for p in prompts} == {16} and {p.size for p in prompts} == {"random"}
    counts = [len(asyncio.run(Pieces().tokenize(p.messages[0]["content"]))) for p in prompts]
    assert counts == [35, 35, 35]  # 40 less the template's 5
    assert len({p.messages[0]["content"] for p in prompts}) == 3
    assert prompts == asyncio.run(random_prompts(Pieces(template=5), spec))  # seeded
    assert spec.body == {"ignore_eos": True}


def test_a_template_as_long_as_the_input_is_refused():
    with pytest.raises(DatasetError, match="chat template alone is 5 tokens"):
        asyncio.run(random_prompts(Pieces(template=5), RandomDataset(input_len=5, output_len=1)))


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        RandomDataset(input_len=0, output_len=4)


def test_against_the_stub_every_request_counts_input_len_and_output_len():
    """The stub's tokenizer counts words and its template adds 3: through the HTTP tokenizer
    and the usage probe, every measured request reports exactly 24 in and 8 out."""
    spec = RandomDataset(input_len=24, output_len=8, count=4, seed=0)

    async def go():
        async with StubServer(config=StubConfig(template_tokens=3)) as stub:
            endpoint = Endpoint(base_url=stub.url, model="m")
            prompts = await server_prompts(endpoint, kind="llama-server", spec=spec)
            settings = LoadSettings(requests=6, warmup=1, extra_body=spec.body)
            return await run_sweep(endpoint=endpoint, settings=settings, levels=[2],
                                   prompts=prompts)  # fmt: skip

    [level] = asyncio.run(go())
    assert len(level.records) == 6 and all(r.success for r in level.records)
    assert {(r.prompt_tokens, r.completion_tokens) for r in level.records} == {(24, 8)}


def test_a_server_without_a_tokenizer_is_one_line():
    spec = RandomDataset(input_len=8, output_len=2)
    with pytest.raises(DatasetError, match="ollama serves none"):
        asyncio.run(server_prompts(Endpoint(base_url="http://127.0.0.1:9", model="m"),
                                   kind="ollama", spec=spec))  # fmt: skip
