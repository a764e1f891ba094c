"""The tiny GGUF models and the Hugging Face tree layout the sandbox mirror serves."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import pytest

from gpufleet.sandbox.models import (
    N_CTX,
    N_VOCAB,
    SANDBOX_REPOS,
    RepoSpec,
    build_hf_tree,
    git_blob_sha1,
    write_tiny_llama,
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def field(reader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    (path,) = write_tiny_llama(tmp_path_factory.mktemp("m") / "tiny.gguf", seed=1, name="tiny")
    return path


def test_deterministic(model: Path, tmp_path: Path) -> None:
    (again,) = write_tiny_llama(tmp_path / "tiny.gguf", seed=1, name="tiny")
    (other,) = write_tiny_llama(tmp_path / "other.gguf", seed=2, name="tiny")
    assert sha256(again) == sha256(model)
    assert sha256(other) != sha256(model)


def test_small(model: Path) -> None:
    assert model.stat().st_size < 512 * 1024


def test_metadata(model: Path) -> None:
    reader = gguf.GGUFReader(model)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.name") == "tiny"
    assert field(reader, "llama.block_count") == 2
    assert field(reader, "llama.embedding_length") == 64
    assert field(reader, "llama.attention.head_count") == 4
    assert field(reader, "llama.context_length") == N_CTX == 16384
    assert field(reader, "tokenizer.ggml.model") == "llama"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == N_VOCAB == 260
    assert tokens[1:3] == ["<s>", "</s>"] and "<0x0A>" in tokens
    assert "im_start" in field(reader, "tokenizer.chat_template")
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.ffn_down.weight"} <= names
    assert "split.count" not in reader.fields


def test_split(tmp_path: Path) -> None:
    paths = write_tiny_llama(tmp_path / "s.gguf", seed=2, name="s", split_parts=3)
    assert [p.name for p in paths] == [f"s-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert not (tmp_path / "s.gguf").exists()
    (single,) = write_tiny_llama(tmp_path / "one.gguf", seed=2, name="s")
    total = 0
    for no, path in enumerate(paths):
        reader = gguf.GGUFReader(path)
        assert field(reader, "split.no") == no
        assert field(reader, "split.count") == 3
        assert field(reader, "split.tensors.count") == len(gguf.GGUFReader(single).tensors)
        total += len(reader.tensors)
    assert total == len(gguf.GGUFReader(single).tensors)
    assert field(gguf.GGUFReader(paths[0]), "general.architecture") == "llama"


def test_split_refuses_impossible_counts(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_tiny_llama(tmp_path / "s.gguf", seed=2, name="s", split_parts=100)


def test_build_hf_tree(tmp_path: Path) -> None:
    result = build_hf_tree(tmp_path, SANDBOX_REPOS)
    assert set(result) == {r.repo_id for r in SANDBOX_REPOS}
    split = result["gpufleet-sandbox/tiny-llama-split-GGUF"]
    assert sorted(p for p in split["files"] if p.endswith(".gguf")) == [
        f"Q8_0/tiny-llama-split-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)
    ]
    assert result["gpufleet-sandbox/tiny-gated-GGUF"]["gated"] is True
    specs = {spec.repo_id: spec for spec in SANDBOX_REPOS}
    for repo_id, info in result.items():
        spec = specs[repo_id]
        assert info["library"] == ("transformers" if spec.format == "safetensors" else "gguf")
        base = tmp_path / repo_id
        assert json.loads((base / "repo.json").read_text()) == info
        assert len(info["sha"]) == 40
        corrupt = repo_id == "gpufleet-sandbox/tiny-corrupt-GGUF"
        for path, meta in info["files"].items():
            data = (base / "files" / path).read_bytes()
            # the corrupt repo lists the true sha256 of bytes it does not serve
            served_matches = meta["sha256"] == hashlib.sha256(data).hexdigest()
            assert served_matches is not (corrupt and path.endswith(".gguf")), (repo_id, path)
            assert meta["size"] == len(data)
            assert meta["lfs"] == path.endswith((".gguf", ".safetensors"))
            if not meta["lfs"]:
                assert meta["blob"] == git_blob_sha1(data)
        assert {"README.md", ".gitattributes"} <= set(info["files"])
        assert set(spec.model_files()) <= set(info["files"])
    # same specs, same commits and bytes
    assert build_hf_tree(tmp_path / "again", SANDBOX_REPOS) == result


def test_git_blob_sha1() -> None:
    # `printf 'hello\n' | git hash-object --stdin`
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_repo_spec_model_files() -> None:
    spec = RepoSpec("o/n", "Q/m-Q8_0.gguf", seed=1, split_parts=2)
    assert spec.model_files() == ["Q/m-Q8_0-00001-of-00002.gguf", "Q/m-Q8_0-00002-of-00002.gguf"]
