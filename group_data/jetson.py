# Jetson Orin (NX / AGX): sm_87, aarch64 Tegra, JetPack 6 (L4T R36). The nvgpu driver's
# version is not comparable with desktop drivers, so the L4T release is the gate.
gpu_driver_floor = None
gpu_min_l4t = "36.0"
gpu_compute_caps = ["8.7"]
gpu_arch = "aarch64"
gpu_unified_memory = True

# JetPack's Docker runs GPU containers with `runtime: nvidia`.
toolkit_set_default_runtime = True
probe_gpu_request = "runtime"
probe_image = {"ref": "nvcr.io/nvidia/l4t-base:r36.2.0", "source": "pull"}
probe_command = ["true"]

models = {
    "llama-3.2-3b": {
        "repo": "bartowski/Llama-3.2-3B-Instruct-GGUF",
        "revision": "5ab33fa94d1d04e903623ae72c95d1696f09f9e8",  # holds the Q4_K_M file
        "files": ["Llama-3.2-3B-Instruct-Q4_K_M.gguf"],
        "size_bytes": 2_019_377_600,
    },
    "qwen2.5-coder-7b": {
        "repo": "Qwen/Qwen2.5-Coder-7B-Instruct-GGUF",
        # NOT PINNED YET: the commit the Hub gives for main (api/models/<repo>/revision/main)
        "revision": "main",
        "files": ["qwen2.5-coder-7b-instruct-q4_k_m.gguf"],
        "size_bytes": 4_680_000_000,  # approx.
    },
}
models_keep_unused = True

services = {
    "llama": {
        "kind": "llama-server",
        "port": 11434,
        "model": "llama-3.2-3b",  # switch models by changing this one value
        "ctx_size": 4096,
        "gpu_layers": 99,
        "threads": 6,
        "parallel": 4,
        "jinja": None,  # the prebuilt image may predate --jinja
        "gpu": "runtime",
        "image": {"ref": "dustynv/llama_cpp:r36.4.0", "source": "pull"},
        "entrypoint": ["llama-server"],  # jetson-containers installs it in /usr/local/bin
    },
}
