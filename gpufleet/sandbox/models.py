"""
Tiny random-weight llama models and the Hugging Face repo layout the sandbox mirror serves.

The models are real GGUF files that llama.cpp's ``llama-server`` loads and answers with (random
text, but every endpoint works), and one repository in the Transformers layout (safetensors,
``tokenizer.json``) that vLLM serves (``hfmodel``). Output is byte-for-byte deterministic for a
given seed, so the sha256 of each file can be pinned in tests and group data.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np

from gpufleet.sandbox.hfmodel import CHAT_TEMPLATE, FILES, write_tiny_hf_llama

# Shapes: small enough for < 0.5 MB, big enough for llama.cpp's CPU kernels (rows of 32).
N_LAYER = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_CTX = 16384  # a byte per token: room for bench's long built-in prompts (about 9k bytes)
# SPM vocab: <unk> <s> </s>, one <0xNN> token per byte, and the word-boundary piece.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
N_VOCAB = len(SPECIAL_TOKENS) + 256 + 1
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0


LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".onnx")
LFS_MIN_SIZE = 10 * 1024 * 1024
SHARD_FORMAT = "{stem}-{no:05d}-of-{count:05d}.gguf"


@dataclass(frozen=True)
class RepoSpec:
    """
    One Hugging Face model repository of the sandbox mirror.

    + repo_id: ``org/name``
    + model: path of the GGUF in the repo; with ``split_parts > 1`` the shards sit beside it as
      ``<stem>-00001-of-0000N.gguf`` and ``model`` itself is not written
    + seed: weight seed (same seed, same bytes)
    + split_parts: number of GGUF split shards
    + gated: require the mirror's token for every endpoint of this repo
    + corrupt: the mirror serves other bytes (one flipped, same size) than its listing's sha256
      says, as a broken mirror or a man in the middle would: a fetch must refuse them
    + format: ``gguf`` for llama.cpp; ``safetensors`` for vLLM: the Transformers layout
      (weights, config, tokenizer) at the repo's root, and ``model`` names its weights file
    """

    repo_id: str
    model: str
    seed: int
    split_parts: int = 1
    gated: bool = False
    corrupt: bool = False
    format: Literal["gguf", "safetensors"] = "gguf"

    @property
    def library(self) -> str:
        """The Hub's ``library_name`` for the repo."""
        return "transformers" if self.format == "safetensors" else "gguf"

    def model_files(self) -> list[str]:
        """Repo paths of the model's files: GGUF file(s), first shard first; or the
        Transformers files, weights first."""
        if self.format == "safetensors":
            return [self.model, *(f for f in FILES if f != self.model)]
        if self.split_parts == 1:
            return [self.model]
        path = PurePosixPath(self.model)
        return [
            str(path.with_name(SHARD_FORMAT.format(stem=path.stem, no=i, count=self.split_parts)))
            for i in range(1, self.split_parts + 1)
        ]


SANDBOX_REPOS: tuple[RepoSpec, ...] = (
    RepoSpec("gpufleet-sandbox/tiny-llama-GGUF", "tiny-llama-Q8_0.gguf", seed=1),
    # stands in for gpt-oss-120b's 3-part split, kept in a quant folder as such repos do
    RepoSpec(
        "gpufleet-sandbox/tiny-llama-split-GGUF",
        "Q8_0/tiny-llama-split-Q8_0.gguf",
        seed=2,
        split_parts=3,
    ),
    RepoSpec("gpufleet-sandbox/tiny-gated-GGUF", "tiny-gated-Q8_0.gguf", seed=3, gated=True),
    RepoSpec("gpufleet-sandbox/tiny-coder-GGUF", "tiny-coder-Q8_0.gguf", seed=4),
    RepoSpec("gpufleet-sandbox/tiny-corrupt-GGUF", "tiny-corrupt-Q8_0.gguf", seed=5, corrupt=True),
    # what the real vLLM serves on the sandbox's spark
    RepoSpec(
        "gpufleet-sandbox/tiny-llama-safetensors", "model.safetensors", seed=6, format="safetensors"
    ),
)


def _vocab() -> tuple[list[str], list[float], list[int]]:
    from gguf import TokenType

    tokens = [*SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256)), "\u2581"]
    scores = [0.0] * len(SPECIAL_TOKENS) + [0.0] * 256 + [-1.0]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    types += [TokenType.BYTE] * 256 + [TokenType.NORMAL]
    return tokens, scores, [int(t) for t in types]


def _tensors(seed: int) -> list[tuple[str, np.ndarray, bool]]:
    """(name, float32 array in numpy row-major order, quantize?) in llama.cpp's order."""
    rng = np.random.default_rng(seed)
    head_dim = N_EMBD // N_HEAD

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    def norm() -> np.ndarray:
        return np.ones(N_EMBD, dtype=np.float32)

    out = [("token_embd.weight", weight(N_VOCAB, N_EMBD), True)]
    for i in range(N_LAYER):
        blk = f"blk.{i}"
        out += [
            (f"{blk}.attn_norm.weight", norm(), False),
            (f"{blk}.attn_q.weight", weight(N_HEAD * head_dim, N_EMBD), True),
            (f"{blk}.attn_k.weight", weight(N_HEAD_KV * head_dim, N_EMBD), True),
            (f"{blk}.attn_v.weight", weight(N_HEAD_KV * head_dim, N_EMBD), True),
            (f"{blk}.attn_output.weight", weight(N_EMBD, N_HEAD * head_dim), True),
            (f"{blk}.ffn_norm.weight", norm(), False),
            (f"{blk}.ffn_gate.weight", weight(N_FF, N_EMBD), True),
            (f"{blk}.ffn_up.weight", weight(N_FF, N_EMBD), True),
            (f"{blk}.ffn_down.weight", weight(N_EMBD, N_FF), True),
        ]
    out += [("output_norm.weight", norm(), False), ("output.weight", weight(N_VOCAB, N_EMBD), True)]
    return out


def write_tiny_llama(path: Path, *, seed: int, name: str, split_parts: int = 1) -> list[Path]:
    """
    Write a random-weight llama GGUF (Q8_0 weights, F32 norms) that llama.cpp loads.

    + path: output file; with ``split_parts > 1`` the shards are written beside it as
      ``<stem>-00001-of-0000N.gguf`` (llama.cpp split naming and ``split.*`` keys), and
      ``path`` itself is not written
    + seed: weight seed
    + name: ``general.name``
    + split_parts: number of shards

    Returns the written paths, first shard first.
    """
    import gguf

    path = Path(path)
    tensors = _tensors(seed)
    if not 1 <= split_parts <= len(tensors):
        raise ValueError(f"split_parts must be 1..{len(tensors)}, got {split_parts}")

    per_shard = math.ceil(len(tensors) / split_parts) if split_parts > 1 else 0
    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=per_shard)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(N_VOCAB)

    tokens, scores, types = _vocab()
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for tname, data, quantize in tensors:
        if quantize:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(tname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tname, data)

    shards = len(writer.tensors)
    if shards != split_parts:
        raise ValueError(f"{len(tensors)} tensors cannot be split in {split_parts} parts")
    paths = (
        [path]
        if shards == 1
        else [
            path.with_name(SHARD_FORMAT.format(stem=path.stem, no=i, count=shards))
            for i in range(1, shards + 1)
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return paths


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file git stores in place of an LFS object."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
    ).encode()


def _readme(spec: RepoSpec) -> str:
    files = "\n".join(f"- `{f}`" for f in spec.model_files())
    gated = "\nAccess is gated: send the mirror's token as `Authorization: Bearer`.\n"
    kind = "GGUF" if spec.format == "gguf" else "in the Transformers layout (safetensors)"
    return (
        f"# {spec.repo_id}\n\nRandom-weight llama {kind} (seed {spec.seed}) generated by"
        f" gpufleet for its sandbox. It produces noise, not text.\n\n{files}\n"
        + (gated if spec.gated else "")
    )


GITATTRIBUTES = "*.gguf filter=lfs diff=lfs merge=lfs -text\n"
GITATTRIBUTES_SAFETENSORS = "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def _write_model(spec: RepoSpec, files_dir: Path) -> None:
    """The model's files under ``files_dir`` at their repo paths."""
    if spec.format == "safetensors":
        write_tiny_hf_llama(files_dir, seed=spec.seed)
        return
    with tempfile.TemporaryDirectory() as tmp:
        name = spec.repo_id.split("/", 1)[1].removesuffix("-GGUF")
        written = write_tiny_llama(
            Path(tmp) / PurePosixPath(spec.model).name,
            seed=spec.seed,
            name=name,
            split_parts=spec.split_parts,
        )
        for repo_path, src in zip(spec.model_files(), written, strict=True):
            assert src.name == PurePosixPath(repo_path).name
            dest = files_dir / repo_path
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(src, dest)


def build_hf_tree(hf_root: Path, repos: list[RepoSpec] | tuple[RepoSpec, ...]) -> dict:
    """
    Write the repositories the way ``assets/mirror.py`` reads them.

    Layout: ``<hf_root>/<org>/<name>/repo.json`` and ``<hf_root>/<org>/<name>/files/<path>``.
    The commit sha is derived from the content, so the same specs give the same commits.

    Returns ``{repo_id: {"sha", "gated", "library", "files": {path: {"sha256", "size", "blob",
    "lfs"}}}}``.
    """
    hf_root = Path(hf_root)
    result: dict = {}
    for spec in repos:
        repo_dir = hf_root / spec.repo_id
        files_dir = repo_dir / "files"
        if files_dir.exists():
            shutil.rmtree(files_dir)
        files_dir.mkdir(parents=True)
        attributes = GITATTRIBUTES if spec.format == "gguf" else GITATTRIBUTES_SAFETENSORS
        (files_dir / ".gitattributes").write_text(attributes)
        (files_dir / "README.md").write_text(_readme(spec))
        _write_model(spec, files_dir)

        files = {}
        for f in sorted(p for p in files_dir.rglob("*") if p.is_file()):
            rel = f.relative_to(files_dir).as_posix()
            data = f.read_bytes()
            sha256 = hashlib.sha256(data).hexdigest()
            lfs = rel.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
            # git stores the pointer for LFS files, so the blob id is the pointer's
            blob = git_blob_sha1(lfs_pointer(sha256, len(data)) if lfs else data)
            files[rel] = {"sha256": sha256, "size": len(data), "blob": blob, "lfs": lfs}
        if spec.corrupt:  # the listing keeps the true sha256; the bytes served do not match it
            for repo_path in spec.model_files():
                served = files_dir / repo_path
                data = bytearray(served.read_bytes())
                data[len(data) // 2] ^= 0xFF
                served.write_bytes(bytes(data))
        listing = "".join(f"{p} {v['blob']}\n" for p, v in files.items())
        commit = hashlib.sha1(f"{spec.repo_id}\n{listing}".encode()).hexdigest()
        info = {"sha": commit, "gated": spec.gated, "library": spec.library, "files": files}
        (repo_dir / "repo.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        result[spec.repo_id] = info
    return result
