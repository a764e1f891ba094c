"""Proposed `models` and `services` group data, per group (DESIGN.md's host groups table).

Plain literals, ready to move into group_data/<group>.py as the top-level names ``models`` and
``services``. A model is ``{"repo", "revision", "files", "size_bytes"}``: the first file is the
one llama-server loads (a split GGUF loads its other parts from beside it); ``size_bytes`` is the
total of the files, for the memory fit (marked "approx." where not read from the hub).
"""

GROUPS = {
    "spark": {
        "models": {
            "gpt-oss-20b": {
                "repo": "unsloth/gpt-oss-20b-GGUF",
                "revision": "main",
                "files": ["gpt-oss-20b-Q4_K_M.gguf"],
                "size_bytes": 11_624_759_488,
            },
            # Production: MXFP4, a 3-part split GGUF (about 63 GB).
            # "gpt-oss-120b": {
            #     "repo": "ggml-org/gpt-oss-120b-GGUF",
            #     "revision": "main",
            #     "files": [
            #         "gpt-oss-120b-mxfp4-00001-of-00003.gguf",
            #         "gpt-oss-120b-mxfp4-00002-of-00003.gguf",
            #         "gpt-oss-120b-mxfp4-00003-of-00003.gguf",
            #     ],
            #     "size_bytes": 63_400_000_000,  # approx.
            # },
        },
        "services": {
            "llama": {
                "kind": "llama-server",
                "port": 8000,
                "model": "gpt-oss-20b",  # 120b: "gpt-oss-120b" with "ctx_size": 131072
                "ctx_size": 8192,
                "gpu_layers": 99,  # every layer; "all" needs a build newer than the pinned one
                "jinja": True,
                "unified_memory": True,
                "image": {"ref": "gpufleet/llama.cpp:spark", "source": "build"},
                "build": {
                    "source_git": "https://github.com/ggml-org/llama.cpp",
                    "source_ref": "b7000",
                    "cuda_version": "13.0.1",
                    "cuda_archs": ["121"],
                },
            },
            "vllm": {
                "kind": "vllm",
                "enabled": False,
                "port": 8001,  # llama-server owns 8000
                "model_id": "Qwen/Qwen3-32B-FP8",
                "image": {"ref": "nvcr.io/nvidia/vllm:25.09-py3", "source": "pull"},
                "gpu_memory_utilization": 0.85,  # vLLM's 0.92 default OOMs at startup on GB10
                "max_model_len": 32000,
                "max_num_batched_tokens": 8192,
                "max_num_seqs": 32,
                "enable_chunked_prefill": True,
                "enable_prefix_caching": True,
                "hf_cache": "/opt/gpufleet/huggingface",
            },
            "ollama": {
                "kind": "ollama",
                "enabled": False,
                "port": 11434,
                "keep_alive": "30m",
                "image": {"ref": "ollama/ollama:0.12.6", "source": "pull"},
                "models_dir": "/opt/gpufleet/ollama",
            },
        },
    },
    "rtx5090": {
        "models": {
            "qwen3-vl-30b-a3b": {
                "repo": "unsloth/Qwen3-VL-30B-A3B-Instruct-GGUF",
                "revision": "main",
                "files": ["Qwen3-VL-30B-A3B-Instruct-Q4_K_M.gguf"],
                "size_bytes": 18_600_000_000,  # approx.
            },
        },
        "services": {
            "llama": {
                "kind": "llama-server",
                "port": 8000,
                "model": "qwen3-vl-30b-a3b",
                "ctx_size": 8192,
                "gpu_layers": 99,
                "jinja": True,  # OpenAI API with tool calls
                "flash_attn": "on",
                "cont_batching": True,
                "metrics": True,
                "image": {"ref": "gpufleet/llama.cpp:rtx5090", "source": "build"},
                "build": {
                    "source_git": "https://github.com/ggml-org/llama.cpp",
                    "source_ref": "b7000",
                    "cuda_version": "12.8.1",
                    "cuda_archs": ["120"],
                },
            },
        },
    },
    "jetson": {
        "models": {
            "llama-3.2-3b": {
                "repo": "bartowski/Llama-3.2-3B-Instruct-GGUF",
                "revision": "main",
                "files": ["Llama-3.2-3B-Instruct-Q4_K_M.gguf"],
                "size_bytes": 2_019_377_600,
            },
            "qwen2.5-coder-7b": {
                "repo": "Qwen/Qwen2.5-Coder-7B-Instruct-GGUF",
                "revision": "main",
                "files": ["qwen2.5-coder-7b-instruct-q4_k_m.gguf"],
                "size_bytes": 4_680_000_000,  # approx.
            },
        },
        "services": {
            "llama": {
                "kind": "llama-server",
                "port": 11434,
                "model": "llama-3.2-3b",  # switch: "qwen2.5-coder-7b"
                "ctx_size": 4096,
                "gpu_layers": 99,
                "threads": 6,
                "parallel": 4,
                "jinja": None,  # the prebuilt image may predate --jinja
                "gpu": "runtime",
                "image": {"ref": "dustynv/llama_cpp:r36.4.0", "source": "pull"},
                "entrypoint": ["llama-server"],  # jetson-containers installs it in /usr/local/bin
            },
        },
    },
}
