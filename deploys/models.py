"""Models: resolved on the control machine, fetched by the host, verified before use."""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass
from pathlib import Path

from pyinfra import host
from pyinfra.api.deploy import deploy
from pyinfra.operations import files, server

from facts.modelfiles import ModelFiles, is_verified
from gpufleet import hf
from gpufleet.schema import HostConfig

FETCH = "/usr/local/libexec/gpufleet/fetch-model"
FETCH_SCRIPT = Path(__file__).resolve().parent.parent / "templates" / "fetch-model.sh"
_resolved: dict[tuple, hf.ResolvedModel] = {}


@dataclass(frozen=True)
class PlannedFile:
    model: str
    dest: str
    url: str
    sha256: str
    size: int
    verified: bool


def _resolve(spec: hf.ModelSpec, endpoint: str, token: str | None) -> hf.ResolvedModel:
    # One lookup per model per run, whatever the number of hosts that serve it.
    key = (endpoint, spec.repo, spec.revision, tuple(spec.files), bool(token))
    if key not in _resolved:
        _resolved[key] = hf.resolve(spec, endpoint=endpoint, token=token)
    return _resolved[key]


def plan(config: HostConfig, secrets: dict[str, str]) -> tuple[list[PlannedFile], dict]:
    """Every file the served models need, and whether the host already has it verified.

    Raises ``hf.HubError`` when the Hub (or mirror) cannot answer for a model.
    """
    endpoint = config.hf_control_endpoint or config.hf_endpoint
    wanted = []
    for name, spec in config.served_models().items():
        resolved = _resolve(spec, endpoint, secrets.get("HF_TOKEN"))
        for item in resolved.files:
            url = f"{config.hf_endpoint}/{spec.repo}/resolve/{resolved.commit}/{item.path}"
            dest = f"{config.layout.models_dir}/{name}/{item.path}"
            wanted.append((name, dest, url, item))
    state = host.get_fact(
        ModelFiles, root=config.layout.models_dir, paths=[dest for _, dest, _, _ in wanted]
    )
    planned = [
        PlannedFile(
            model=name,
            dest=dest,
            url=url,
            sha256=item.sha256,
            size=item.size,
            verified=is_verified(state["files"].get(dest), sha256=item.sha256, size=item.size),
        )  # fmt: skip
        for name, dest, url, item in wanted
    ]
    return planned, state


def short_of_space(planned: list[PlannedFile], identity: dict) -> str | None:
    """Why the missing files cannot fit, checked before any byte is fetched."""
    missing = sum(f.size for f in planned if not f.verified)
    free = identity["host"]["disk_free_bytes"]
    if missing and free is not None and missing > free:
        return (
            f"models need {missing / 2**30:.1f} GiB more in {identity['host']['disk_path']}, "
            f"which has {free / 2**30:.1f} GiB free"
        )
    return None


def model_path(config: HostConfig, name: str) -> str:
    """Host path of the file a server loads for model ``name`` (the first part of a split)."""
    return f"{config.layout.models_dir}/{name}/{config.models[name].files[0]}"


@deploy("Models")
def models(config: HostConfig, planned: list[PlannedFile], state: dict, current: dict):
    """Fetch what is missing (resumable, verified, moved into place whole) and prune.

    + config: validated host config (``models``, ``models_keep_unused``)
    + planned: from ``plan()``
    + state: ``facts.modelfiles.ModelFiles`` from ``plan()``
    + current: ``facts.managed.ManagedFiles`` of the managed paths
    """
    script_sha = hashlib.sha256(FETCH_SCRIPT.read_bytes()).hexdigest()
    if (
        any(not f.verified for f in planned)
        and (current.get(FETCH) or {}).get("sha256") != script_sha
    ):
        files.put(name="Model fetch script", src=str(FETCH_SCRIPT), dest=FETCH, mode="755")
    env_file = f"{config.layout.stack_dir}/.env"
    for f in planned:
        if f.verified:
            continue
        server.shell(
            name=f"Fetch model {f.model}: {Path(f.dest).name} ({f.size / 2**20:.0f} MiB)",
            commands=[
                " ".join(
                    shlex.quote(a) for a in (FETCH, f.url, f.dest, f.sha256, str(f.size), env_file)
                )  # fmt: skip
            ],
        )
    if not config.models_keep_unused:
        in_use = set(config.served_models())
        for name in sorted(set(state["dirs"]) & set(config.models) - in_use):
            files.directory(
                name=f"Remove unused model {name}",
                path=f"{config.layout.models_dir}/{name}",
                present=False,
            )
