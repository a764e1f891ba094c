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
