# RTX 5090 workstations: sm_120, x86_64, 32 GB VRAM; often a fresh Ubuntu with no Docker.
gpu_min_cuda = "12.8"  # driver >= 570.26
gpu_compute_caps = ["12.0"]
gpu_arch = "x86_64"

probe_image = {"ref": "nvidia/cuda:12.8.1-base-ubuntu24.04", "source": "pull"}

models = {
    "qwen3-vl-30b-a3b": {
        "repo": "unsloth/Qwen3-VL-30B-A3B-Instruct-GGUF",
        # NOT PINNED YET: the commit the Hub gives for main (api/models/<repo>/revision/main)
        "revision": "main",
        "files": ["Qwen3-VL-30B-A3B-Instruct-Q4_K_M.gguf"],
        "size_bytes": 18_600_000_000,  # approx.
    },
}

services = {
    "llama": {
        "kind": "llama-server",
        "port": 8000,
        "model": "qwen3-vl-30b-a3b",
        "ctx_size": 8192,
        "gpu_layers": 99,
        "jinja": True,  # OpenAI API with tool calls
        "flash_attn": "on",
        "cont_batching": True,
        "image": {"ref": "gpufleet/llama.cpp:rtx5090", "source": "build"},
        "build": {
            "source_git": "https://github.com/ggml-org/llama.cpp",
            "source_ref": "v0.6.0",  # stable tag (nightly b11429, 2026-10-05); 120 -> 120a
            "cuda_version": "12.8.1",
            "cuda_archs": ["120"],
        },
    },
}
