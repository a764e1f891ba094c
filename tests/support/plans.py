"""Plans without hosts: a group's config, the control inputs, and the snapshot of a host that
is exactly as declared (a converged host), for plan fixtures to vary one thing at a time.

``converged(config, control)`` is built from the plan's own outputs (its compose file, build
inputs, labels and release) and the fact fixtures of the sandbox's hosts, so a plan of it must
list nothing: that is every fixture's no-change twin.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import runpy
from pathlib import Path

from gpufleet.control.hf import ModelFile, ResolvedModel
from gpufleet.control.inputs import ControlInputs
from gpufleet.core import known
from gpufleet.core.hubcache import ref_path, repo_folder
from gpufleet.core.render import FETCH_SCRIPT
from gpufleet.core.schema import SHA1_RE, HostConfig, LlamaServer, Ollama, parse
from gpufleet.core.snapshot import Snapshot
from gpufleet.plan.container_toolkit import toolkit_source
from gpufleet.plan.docker_engine import docker_source, engine_packages
from gpufleet.plan.host import plan_host
from gpufleet.plan.models import cached_files
from gpufleet.plan.services import service_labels
from gpufleet.plan.types import PlanOptions

ROOT = Path(__file__).resolve().parents[2]
IDENTITIES = ROOT / "tests" / "facts" / "identity.HostIdentity"
ARCH = {"spark": "aarch64", "rtx5090": "x86_64", "jetson": "aarch64"}
ENV_SHA = "e" * 64
ENV_PUBLIC_SHA = "d" * 64
SOURCE = "5" * 64


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def group_data(group: str) -> dict:
    data: dict = {}
    for name in ("all", group):
        values = runpy.run_path(str(ROOT / "group_data" / f"{name}.py"))
        data.update({k: v for k, v in values.items() if not k.startswith("_")})
    return data


def config_for(group: str, host: str | None = None, *, patch: dict | None = None,
               **overrides) -> HostConfig:  # fmt: skip
    """The group's shipped data with ``overrides`` (keys) and ``patch`` (paths) applied."""
    data = copy.deepcopy(group_data(group))
    data["secrets"] = {}
    data.update(overrides)
    for path, value in (patch or {}).items():
        set_path(data, path, value)
    return parse(host or f"{group}-01", group, data)


def control_for(config: HostConfig, *, model_size: int = 1000, **overrides) -> ControlInputs:
    """Control inputs as a run would gather them, with made-up but consistent hashes.

    + model_size: the size of each model file (the first; later parts one byte more each)
    """
    models = {}
    for name, spec in config.served_models().items():
        files = [
            ModelFile(path=p, size=model_size + i, etag=sha(f"{spec.repo}/{p}"),
                      url=f"https://huggingface.co/{spec.repo}/resolve/{'c' * 40}/{p}")
            # a pattern matches one file here (on the Hub, what it matches)
            for i, p in enumerate(spec.files or [f"{n}.{q.strip('*.') or 'bin'}"
                                                 for n, q in enumerate(spec.patterns)])
        ]  # fmt: skip
        models[name] = ResolvedModel(repo=spec.repo, revision=spec.revision, commit="c" * 40,
                                     files=files)  # fmt: skip
    sources = {}
    for name, svc in config.enabled_services.items():
        if isinstance(svc, LlamaServer) and svc.image.source == "build" and svc.build:
            build = svc.build
            sources[name] = (
                SOURCE if build.source_archive else f"{build.source_git}@{build.source_ref}"
            )
    values = dict(
        models=models,
        sources=sources,
        local_images={},
        env_sha256=ENV_SHA,
        env_public_sha256=ENV_PUBLIC_SHA,
        version="0.1.0",
    )
    values.update(overrides)
    return ControlInputs(**values)


def identity(group: str) -> dict:
    name = {"spark": "spark", "rtx5090": "rtx5090", "jetson": "jetson"}[group]
    data = json.loads((IDENTITIES / f"sandbox_{name}.json").read_text())["fact"]
    data["host"]["arch"] = ARCH[group]
    data["host"]["mem_total_bytes"] = 128 * 2**30
    data["host"]["disk_free_bytes"] = 500 * 2**30
    return data


def _file(digest: str | None, mode: str = "644") -> dict:
    return {"kind": "file", "sha256": digest, "mode": mode, "owner": "root", "group": "root"}


def _dir(mode: str = "755", owner: str = "root", group: str = "root") -> dict:
    return {"kind": "dir", "sha256": None, "mode": mode, "owner": owner, "group": group}


def converged(config: HostConfig, control: ControlInputs) -> dict:
    """The snapshot (as JSON data, to vary) of a host exactly as ``config`` declares it."""
    ident = identity(config.group)
    tk = config.toolkit
    docker = ident["docker"]
    docker.update(present=True, active=True, compose_version="2.40.3")
    docker["toolkit_packages"] = {p: tk.version for p in known.TOOLKIT_PACKAGES}
    daemon = {"runtimes": {"nvidia": copy.deepcopy(known.NVIDIA_RUNTIME)}}
    if tk.set_default_runtime:
        daemon["default-runtime"] = "nvidia"
    if tk.cdi:
        daemon["features"] = {"cdi": True}
    docker["daemon_json"] = daemon

    blank = Snapshot.model_validate({"identity": ident})
    first = plan_host(config, blank, control, PlanOptions())
    assert first.refusal is None, first.refusal
    lay = config.layout
    files = {
        tk.keyring: _file("k" * 64),
        tk.list_path: _file(sha(toolkit_source(config).line)),
        lay.stack_dir: _dir(),
        lay.hf_home: _dir(lay.models_mode.lstrip("0"), lay.models_owner, lay.models_group),
        lay.env_path: _file(control.env_sha256, "600"),
        known.FETCH_MODEL: _file(sha(FETCH_SCRIPT.read_text()), "755"),
    }
    if tk.cdi:
        files[known.CDI_SPEC] = _file("c" * 64)
    if first.compose:
        files[lay.compose_path] = _file(sha(first.compose))
    images = {config.probe.image.ref: {"id": "sha256:" + "p" * 64, "inputs": None}}
    identities = {}
    for name, svc in config.enabled_services.items():
        build = first.builds.get(name)
        if build:
            images[build.ref] = {"id": "sha256:" + "b" * 64, "inputs": build.inputs}
            files[f"{build.context}/Dockerfile"] = _file(sha(build.dockerfile))
            identities[name] = build.inputs
        else:
            local = control.local_images.get(svc.image.ref)
            images[svc.image.ref] = {"id": local or "sha256:" + "i" * 64, "inputs": None}
            identities[name] = (
                (local or "absent") if svc.image.source == "transfer" else (svc.image.ref)
            )
        if isinstance(svc, Ollama):
            files[svc.models_dir] = _dir()
            for model in svc.models:  # pulled: the manifest ollama writes for each
                files[known.ollama_manifest(svc.models_dir, model)] = _file("m" * 64, "644")
    labels = service_labels(config, control, identities)
    models: dict = {"files": {}, "incomplete": {}, "links": {}, "legacy": {}, "refs": {},
                    "snapshots": [], "placed": []}  # fmt: skip
    for name, cached in cached_files(config, control).items():
        for f in cached:
            models["files"][f.blob] = {
                "size": f.size, "mtime": 100, "stamp": f.stamp_text, "stamp_mtime": 101,
            }  # fmt: skip
            models["links"][f.link] = f.target
        head = cached[0]
        key = f"{repo_folder(head.repo)}/{head.commit}"
        models["snapshots"].append(key)
        models["placed"].append(key)
        revision = control.models[name].revision
        if not SHA1_RE.fullmatch(revision):
            ref = ref_path(config.layout.hf_home, head.repo, revision)
            models["refs"][ref] = head.commit
    containers = {
        name: {"id": sha(name), "state": "running", "inputs": labels[name]["gpufleet.inputs"],
               "health": "healthy", "status": "Up 2 hours (healthy)"}
        for name in config.enabled_services
    }  # fmt: skip
    health = {
        name: {"port": svc.port, "path": known.HEALTH_PATHS[svc.kind], "status": 200}
        for name, svc in config.enabled_services.items()
    }
    assert not engine_packages(config, Snapshot.model_validate({"identity": ident}))
    if config.docker.repo_url:
        docker_source(config, blank)  # formats with the host's os: must not raise
    return {
        "identity": ident,
        "files": files,
        "models": models,
        "compose": {"containers": containers, "images": images},
        "health": health,
        "state": {"current": first.release.id if first.release else None,
                  "releases": [first.release.id] if first.release else []},
    }  # fmt: skip


def set_path(data: dict, path: str, value) -> None:
    """Set the value at ``a.b[key with . or /].c`` in ``data``; ``"$delete"`` removes it."""
    pattern = r"([^.\[\]]+)|\[([^\]]+)\]"
    keys = [plain or bracketed for plain, bracketed in re.findall(pattern, path)]
    target = data
    for key in keys[:-1]:
        target = target[key]
    if value == "$delete":
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
