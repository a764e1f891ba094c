# DGX Spark: GB10 (sm_121), aarch64 SBSA, 128 GB unified memory. DGX OS ships Docker and the
# Container Toolkit; gpufleet upgrades the toolkit to the pinned version.
gpu_min_cuda = "13.0"  # so the driver must be >= 580.65.06 (CUDA's own table)
gpu_compute_caps = ["12.1"]
gpu_arch = "aarch64"
gpu_unified_memory = True

probe_image = {"ref": "nvidia/cuda:13.0.1-base-ubuntu24.04", "source": "pull"}

# Models by name: Hugging Face repo, revision, files (a split GGUF lists every part, the first
# is loaded) and the declared total size, for the preflight's memory fit.
models = {
    "gpt-oss-20b": {
        "repo": "unsloth/gpt-oss-20b-GGUF",
        "revision": "d449b42d93e1c2c7bda5312f5c25c8fb91dfa9b4",  # a commit holding the Q4_K_M file
        "files": ["gpt-oss-20b-Q4_K_M.gguf"],
        "size_bytes": 11_624_759_488,
    },
    # Production: MXFP4, a 3-part split GGUF (about 63 GB); serve it with
    # services["llama"]["model"] = "gpt-oss-120b" and "ctx_size": 131072.
    "gpt-oss-120b": {
        "repo": "ggml-org/gpt-oss-120b-GGUF",
        "revision": "d932fcea62f83e088d8f076a2cd2d7eb02dfa682",  # the 3-part MXFP4 split
        "files": [
            "gpt-oss-120b-mxfp4-00001-of-00003.gguf",
            "gpt-oss-120b-mxfp4-00002-of-00003.gguf",
            "gpt-oss-120b-mxfp4-00003-of-00003.gguf",
        ],
        "size_bytes": 63_400_000_000,  # approx.
    },
    # vLLM's model, declared like llama.cpp's and pinned to a commit: every file vLLM reads
    # (config, tokenizer, weights) is fetched and verified into the Hub cache before it starts,
    # and it loads it offline (--revision <commit>). For example:
    #   "qwen3-32b-fp8": {"repo": "Qwen/Qwen3-32B-FP8", "revision": "<40-hex commit>",
    #                     "patterns": ["*.json", "*.safetensors", "merges.txt", "vocab.json"]},
    # with services["vllm"]["model"] = "qwen3-32b-fp8".
}
# Keep models no service uses any more (False: snapshots gpufleet placed that no enabled service
# and no kept release uses are removed, then blobs no snapshot links, like `hf cache prune`).
models_keep_unused = True

services = {
    "llama": {
        "kind": "llama-server",
        "port": 8000,
        "model": "gpt-oss-20b",
        "ctx_size": 8192,
        "gpu_layers": 99,  # every layer
        "jinja": True,
        "unified_memory": True,  # GGML_CUDA_ENABLE_UNIFIED_MEMORY=1: 128 GB shared with the CPU
        "image": {"ref": "gpufleet/llama.cpp:spark", "source": "build"},
        "build": {
            "source_git": "https://github.com/ggml-org/llama.cpp",
            "source_ref": "v0.6.0",  # stable tag (nightly b11429, 2026-10-05); 121 -> 121a
            "cuda_version": "13.0.1",
            "cuda_archs": ["121"],
        },
    },
    "vllm": {
        "kind": "vllm",
        "enabled": False,
        "port": 8001,  # llama-server owns 8000
        "model": None,  # a key of `models` above (required to enable it)
        "image": {"ref": "nvcr.io/nvidia/vllm:25.09-py3", "source": "pull"},
        "gpu_memory_utilization": 0.85,  # vLLM's 0.92 default OOMs at startup on GB10
        "max_model_len": 32000,
        "max_num_batched_tokens": 8192,
        "max_num_seqs": 32,
        "enable_chunked_prefill": True,
        "enable_prefix_caching": True,
    },
    "ollama": {
        "kind": "ollama",
        "enabled": False,
        "port": 11434,
        "keep_alive": "30m",
        "image": {"ref": "ollama/ollama:0.12.6", "source": "pull"},
        "models_dir": "/opt/gpufleet/ollama",
    },
}
