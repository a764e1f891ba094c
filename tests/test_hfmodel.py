"""The tiny Llama in the Transformers layout that the sandbox's real vLLM serves."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer

from gpufleet.sandbox import hfmodel
from gpufleet.sandbox.hfmodel import (
    FILES,
    HEAD_DIM,
    IM_END_ID,
    IM_START_ID,
    N_VOCAB,
    bfloat16_bytes,
    model_files,
    safetensors_bytes,
    write_tiny_hf_llama,
)


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return model_files(seed=6)


def read_safetensors(data: bytes) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes), by the format's definition."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__")
    body = data[8 + length :]
    return {
        name: (meta["dtype"], meta["shape"], body[slice(*meta["data_offsets"])])
        for name, meta in header.items()
    }


def test_same_seed_same_bytes(files: dict[str, bytes], tmp_path: Path) -> None:
    written = write_tiny_hf_llama(tmp_path, seed=6)
    assert [p.name for p in written] == list(FILES) == list(files)
    assert {p.name: p.read_bytes() for p in written} == files
    other = model_files(seed=7)
    assert other["model.safetensors"] != files["model.safetensors"]
    # only the weights depend on the seed
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in files.items() if k != "model.safetensors"
    }


def test_small(files: dict[str, bytes]) -> None:
    assert sum(map(len, files.values())) < 512 * 1024


def test_config_is_a_shape_vllm_serves_on_cpu(files: dict[str, bytes]) -> None:
    config = json.loads(files["config.json"])
    assert config["architectures"] == ["LlamaForCausalLM"]
    # head_dim 16 answers /health and fails every request on vLLM's CPU kernels
    assert config["head_dim"] == HEAD_DIM == 32
    assert config["hidden_size"] == config["num_attention_heads"] * HEAD_DIM
    # room for the seed's --max-model-len 32000
    assert config["max_position_embeddings"] >= 32000
    assert config["vocab_size"] == N_VOCAB
    generation = json.loads(files["generation_config.json"])
    assert IM_END_ID in generation["eos_token_id"]


def test_weights_are_every_tensor_llama_loads(files: dict[str, bytes]) -> None:
    config = json.loads(files["config.json"])
    tensors = read_safetensors(files["model.safetensors"])
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * HEAD_DIM
    assert tensors["model.embed_tokens.weight"][1] == [vocab, hidden]
    assert tensors["lm_head.weight"][1] == [vocab, hidden]
    assert tensors["model.layers.1.self_attn.k_proj.weight"][1] == [kv, hidden]
    layers = {name.split(".")[2] for name in tensors if name.startswith("model.layers.")}
    assert len(layers) == config["num_hidden_layers"]
    assert len(tensors) == 3 + 9 * config["num_hidden_layers"]
    for dtype, shape, raw in tensors.values():
        assert dtype == "BF16" and len(raw) == 2 * int(np.prod(shape))
    # norms are ones; weights are small
    norm = np.frombuffer(tensors["model.norm.weight"][2], dtype="<u2")
    assert (norm == 0x3F80).all()


def test_bfloat16_rounds_to_nearest_even() -> None:
    values = np.array([1.0, -2.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.1415927], dtype=np.float32)
    got = np.frombuffer(bfloat16_bytes(values), dtype="<u2")
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to the even one, 1.0;
    # 1 + 3*2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to the even one, 1 + 2^-6
    assert [hex(v) for v in got] == ["0x3f80", "0xc000", "0x3f80", "0x3f82", "0x4049"]


def test_safetensors_layout_is_aligned_and_ordered() -> None:
    data = safetensors_bytes({"b": np.ones((2, 3), np.float32), "a": np.zeros(4, np.float32)})
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0
    header = json.loads(data[8 : 8 + length])
    assert header["a"]["data_offsets"] == [0, 8] and header["b"]["data_offsets"] == [8, 20]
    assert len(data) == 8 + length + 20


def test_tokenizer_is_byte_level_with_chatml_markers(files: dict[str, bytes]) -> None:
    tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
    assert tokenizer.get_vocab_size() == N_VOCAB
    text = "héllo\n<|im_start|>wörld<|im_end|>"
    ids = tokenizer.encode(text).ids
    assert IM_START_ID in ids and IM_END_ID in ids
    assert len(ids) == len("héllo\nwörld".encode()) + 2  # one token per byte
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert max(ids) < N_VOCAB


def test_chat_template_renders_chatml(files: dict[str, bytes]) -> None:
    config = json.loads(files["tokenizer_config.json"])
    assert config["eos_token"] == "<|im_end|>"
    template = jinja2.Environment().from_string(config["chat_template"])
    prompt = template.render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert config["added_tokens_decoder"][str(IM_END_ID)]["content"] == "<|im_end|>"


def test_byte_table_is_gpt2s() -> None:
    chars = hfmodel._byte_chars()
    assert len(set(chars)) == 256
    assert chars[ord("A")] == "A" and chars[ord(" ")] == "\u0120" and chars[10] == "\u010a"


def test_published_hashes_are_stable(files: dict[str, bytes]) -> None:
    # the weights depend on numpy's generator only: pin them, so a change is seen
    digest = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert digest == "82fe574118845f3e75094ba33a5de57c92051eaefbfe08f4bcea1f027d5611ea"
