# DGX Spark: GB10 (sm_121), aarch64 SBSA, 128 GB unified memory. DGX OS ships Docker and the
# Container Toolkit; gpufleet upgrades the toolkit to the pinned version.
gpu_min_cuda = "13.0"  # so the driver must be >= 580.65.06 (CUDA's own table)
gpu_compute_caps = ["12.1"]
gpu_arch = "aarch64"
gpu_unified_memory = True

probe_image = {"ref": "nvidia/cuda:13.0.1-base-ubuntu24.04", "source": "pull"}
