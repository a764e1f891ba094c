# RTX 5090 workstations: sm_120, x86_64, 32 GB VRAM; often a fresh Ubuntu with no Docker.
gpu_min_cuda = "12.8"  # driver >= 570.26
gpu_compute_caps = ["12.0"]
gpu_arch = "x86_64"

probe_image = {"ref": "nvidia/cuda:12.8.1-base-ubuntu24.04", "source": "pull"}
