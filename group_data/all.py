# Fleet-wide defaults. Plain literals only: pyinfra reads every top-level name as host data.
# Keys are flat and prefixed by subsystem (gpu_, toolkit_, docker_, layout_, probe_) so that an
# inventory or `--data key=value` can override one value alone; gpufleet/schema.py documents
# each and rejects unknown ones.

# The oldest NVIDIA driver anywhere in the fleet; a group's CUDA minimum can raise it.
gpu_driver_floor = "570"
# Memory kept free beside the model weights for the KV cache and activations.
gpu_kv_allowance_gib = 2.0

# NVIDIA Container Toolkit: all four packages pinned to this version.
toolkit_version = "1.18.0-1"
toolkit_repo_url = "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH)"
toolkit_key_url = "https://nvidia.github.io/libnvidia-container/gpgkey"

# Engine for hosts that have none (Docker's repository; {os_id}/{codename} come from the host).
docker_engine_packages = ["docker-ce", "docker-ce-cli", "containerd.io"]
docker_compose_packages = ["docker-compose-plugin"]
docker_repo_url = "https://download.docker.com/linux/{os_id}"
docker_repo_dist = "{codename} stable"
docker_key_url = "https://download.docker.com/linux/{os_id}/gpg"

# Host keys are checked against known_hosts: a host never seen is refused, not trusted on its
# first answer. `gpufleet bootstrap` records a new host's key; "accept-new" trusts on first use.
ssh_strict_host_key_checking = "yes"

layout_stack_dir = "/opt/gpufleet"
# HF_HOME: every model in its Hub cache (<it>/hub, huggingface_hub's layout), one copy of each
# file shared by llama-server, vLLM and the `hf` tools (`hf cache ls` on the host lists them)
layout_hf_home = "/opt/gpufleet/huggingface"
# where gpufleet kept models before the Hub cache: verified files there are linked in, not
# downloaded again
layout_models_dir = "/opt/gpufleet/models"

# Secrets come from the control machine, never from git: "env:VAR" or "file:/path".
secrets = {"HF_TOKEN": "env:HF_TOKEN"}
hf_endpoint = "https://huggingface.co"
