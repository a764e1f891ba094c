"""Built-in prompts, the seeded sampler and JSONL prompt files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from gpufleet.bench.prompts import PromptFileError, PromptSampler, builtin_prompts, load_jsonl


def test_builtin_prompts_are_mixed_lengths_and_stable():
    prompts = builtin_prompts()
    sizes = Counter(p.size for p in prompts)
    assert sizes == {"short": 8, "medium": 4, "long": 3}
    by_size = {size: [p.chars for p in prompts if p.size == size] for size in sizes}
    # every long prompt is longer than every medium one, which is longer than every short one
    assert max(by_size["short"]) < min(by_size["medium"])
    assert max(by_size["medium"]) < min(by_size["long"])
    assert min(by_size["long"]) > 4000
    assert builtin_prompts() == prompts  # no randomness, no clock
    assert len({p.name for p in prompts}) == len(prompts)
    assert all(p.messages[0]["role"] == "user" for p in prompts)


def test_same_seed_same_sequence_other_seed_other_order():
    prompts = builtin_prompts()
    a = [p.name for p in PromptSampler(prompts, seed=7).take(40)]
    b = [p.name for p in PromptSampler(prompts, seed=7).take(40)]
    c = [p.name for p in PromptSampler(prompts, seed=8).take(40)]
    assert a == b
    assert a != c


def test_each_pass_uses_every_prompt_once():
    prompts = builtin_prompts()
    names = [p.name for p in PromptSampler(prompts, seed=3).take(len(prompts) * 3)]
    for start in range(0, len(names), len(prompts)):
        assert sorted(names[start : start + len(prompts)]) == sorted(p.name for p in prompts)
    # a shuffle, not the declared order
    assert names[: len(prompts)] != [p.name for p in prompts]


def test_sampler_needs_prompts():
    with pytest.raises(ValueError, match="no prompts"):
        PromptSampler([], seed=0)


def test_load_jsonl_prompt_and_messages(tmp_path: Path):
    path = tmp_path / "p.jsonl"
    lines = [
        json.dumps({"prompt": "hello there"}),
        "",
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                ],
                "max_tokens": 9,
            }
        ),
        json.dumps({"prompt": "with extra", "completion": "ignored"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    prompts = load_jsonl(path)
    assert [p.name for p in prompts] == ["p.jsonl:1", "p.jsonl:3", "p.jsonl:4"]
    assert prompts[0].messages == ({"role": "user", "content": "hello there"},)
    assert [m["role"] for m in prompts[1].messages] == ["system", "user"]
    assert prompts[1].max_tokens == 9
    assert prompts[0].max_tokens is None
    assert {p.size for p in prompts} == {"file"}


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"text": "x"}', 'exactly one of "prompt" or "messages"'),
        ('{"prompt": "x", "messages": []}', 'exactly one of "prompt" or "messages"'),
        ('{"prompt": "  "}', '"prompt" must be a non-empty string'),
        ('{"prompt": 5}', '"prompt" must be a non-empty string'),
        ('{"messages": []}', '"messages" must be a non-empty list'),
        ('{"messages": ["hi"]}', '"messages"[0] must be an object'),
        ('{"messages": [{"role": "robot", "content": "x"}]}', '"messages"[0].role must be'),
        ('{"messages": [{"role": "user"}]}', '"messages"[0].content must be'),
        ('{"prompt": "x", "max_tokens": 0}', '"max_tokens" must be a positive integer'),
        ('{"prompt": "x", "max_tokens": true}', '"max_tokens" must be a positive integer'),
    ],
)
def test_load_jsonl_bad_line_names_file_and_line(tmp_path: Path, line: str, why: str):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + line + "\n")
    with pytest.raises(PromptFileError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert why in message


def test_load_jsonl_empty_and_missing(tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(PromptFileError, match="no prompts"):
        load_jsonl(empty)
    with pytest.raises(PromptFileError, match="cannot read prompts"):
        load_jsonl(tmp_path / "missing.jsonl")
