"""
A tiny random-weight Llama in the Transformers layout, for a real vLLM in the sandbox.

The files a Hub repository of a chat model holds, and only those vLLM reads: ``config.json``,
``generation_config.json``, ``model.safetensors`` (bfloat16), ``tokenizer.json`` (byte-level
BPE built with ``tokenizers``) and ``tokenizer_config.json`` (ChatML template). Every byte
follows from the seed (and the ``tokenizers`` version for ``tokenizer.json``), so the files'
sha256 and git blob ids are stable. It answers with noise, through every endpoint.

The shape is what vLLM's CPU kernels take: head_dim 32 (16 answers ``/health`` and fails every
request), and a context of 32768 so the seed's ``--max-model-len 32000`` is accepted.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# ChatML, shared with the sandbox's GGUFs; its markers tokenize as plain bytes (no room for them
# in a 260-token vocab).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

N_LAYER = 2
HIDDEN = 64
N_HEAD = 2
N_HEAD_KV = 1
HEAD_DIM = HIDDEN // N_HEAD
N_FF = 128
N_CTX = 32768
# One token per byte (ids 0-255 are the bytes), then the ChatML markers as special tokens.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
N_VOCAB = 256 + len(SPECIAL_TOKENS)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 256, 257, 258

FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": N_FF,
        "num_hidden_layers": N_LAYER,
        "num_attention_heads": N_HEAD,
        "num_key_value_heads": N_HEAD_KV,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": N_CTX,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": N_VOCAB,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "torch_dtype": "bfloat16",
    }


def _tensors(seed: int) -> dict[str, np.ndarray]:
    """float32 weights under the names ``LlamaForCausalLM`` loads."""
    rng = np.random.default_rng(seed)

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    out = {"model.embed_tokens.weight": weight(N_VOCAB, HIDDEN)}
    for i in range(N_LAYER):
        layer = f"model.layers.{i}"
        out |= {
            f"{layer}.input_layernorm.weight": np.ones(HIDDEN, dtype=np.float32),
            f"{layer}.self_attn.q_proj.weight": weight(N_HEAD * HEAD_DIM, HIDDEN),
            f"{layer}.self_attn.k_proj.weight": weight(N_HEAD_KV * HEAD_DIM, HIDDEN),
            f"{layer}.self_attn.v_proj.weight": weight(N_HEAD_KV * HEAD_DIM, HIDDEN),
            f"{layer}.self_attn.o_proj.weight": weight(HIDDEN, N_HEAD * HEAD_DIM),
            f"{layer}.post_attention_layernorm.weight": np.ones(HIDDEN, dtype=np.float32),
            f"{layer}.mlp.gate_proj.weight": weight(N_FF, HIDDEN),
            f"{layer}.mlp.up_proj.weight": weight(N_FF, HIDDEN),
            f"{layer}.mlp.down_proj.weight": weight(HIDDEN, N_FF),
        }
    out["model.norm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    out["lm_head.weight"] = weight(N_VOCAB, HIDDEN)
    return out


def bfloat16_bytes(array: np.ndarray) -> bytes:
    """float32 values as little-endian bfloat16, rounded to nearest even (numpy has no bf16)."""
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """A safetensors file of bfloat16 tensors: u64 header length, JSON header, data.

    Tensors are laid out in name order and the header is padded with spaces to 8 bytes, as the
    format's own writer does; the header's keys are sorted, so equal tensors give equal bytes.
    """
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        data = bfloat16_bytes(tensors[name])
        header[name] = {
            "dtype": "BF16",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-unicode table, by byte value: what a byte-level BPE vocabulary holds."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tokenizer_json() -> bytes:
    """A byte-level BPE tokenizer (no merges: one token per byte) with ChatML's markers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {char: i for i, char in enumerate(_byte_chars())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    return (tokenizer.to_str(pretty=True) + "\n").encode()


def _tokenizer_config() -> dict:
    added = {
        str(256 + i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": N_CTX,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def model_files(seed: int) -> dict[str, bytes]:
    """Repository path -> content of the tiny Llama's files (``FILES``)."""
    generation = {
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "pad_token_id": ENDOFTEXT_ID,
    }
    return {
        "config.json": _json(_config()),
        "generation_config.json": _json(generation),
        "model.safetensors": safetensors_bytes(_tensors(seed)),
        "tokenizer.json": tokenizer_json(),
        "tokenizer_config.json": _json(_tokenizer_config()),
    }


def write_tiny_hf_llama(directory: Path, *, seed: int) -> list[Path]:
    """
    Write the tiny Llama's files into ``directory``, as a Hub repository holds them.

    + directory: created if missing; files of the same names are replaced
    + seed: weight seed (same seed, same bytes)

    Returns the written paths, in ``FILES`` order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in model_files(seed).items():
        (directory / name).write_bytes(data)
        written.append(directory / name)
    return written
