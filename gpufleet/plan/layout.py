"""The ``layout`` and ``env`` steps (applied by ``deploys/layout.py``): the stack directory and the
Hub cache (HF_HOME) with their owner and mode, and the ``.env`` compared by hash (never by value),
recreating the services that read a secret from it.
"""

from __future__ import annotations

from gpufleet.control.inputs import ControlInputs
from gpufleet.core.schema import HostConfig
from gpufleet.core.snapshot import Snapshot
from gpufleet.core.wire import Op
from gpufleet.plan.draft import PlanDraft


def plan_layout(
    draft: PlanDraft, config: HostConfig, snap: Snapshot, control: ControlInputs
) -> None:
    lay = config.layout
    draft.directory(snap, "layout", lay.stack_dir, "755", "root", "root")
    access = (lay.models_mode, lay.models_owner, lay.models_group)
    draft.directory(snap, "layout", lay.hf_home, *access)
    env = snap.files.get(lay.env_path)
    wanted = "file 600 root:root"
    # a service reads its secrets from the .env when it is created: new values need a new
    # container (the inputs label holds no secret, so it does not say so itself)
    readers = secret_readers(config)
    if env is None:
        draft.add(
            "env",
            lay.env_path,
            "absent",
            "write (0600, atomically)",
            expected=wanted,
            found="absent",
            op=Op.WRITE,
            recreates=readers,
        )
    elif env.sha256 != control.env_sha256 or env.describe() != wanted:
        why = []
        if env.describe() != wanted:
            why.append(f"{env.describe()} found, {wanted} declared")
        if env.sha256 != control.env_sha256:
            why.append("content differs")  # never a value, nor its hash: secrets live here
        draft.add(
            "env",
            lay.env_path,
            "; ".join(why),
            "write (0600, atomically)",
            expected=wanted,
            found=env.describe(),
            op=Op.WRITE,
            recreates=readers if env.sha256 != control.env_sha256 else (),
        )


def secret_readers(config: HostConfig) -> tuple[str, ...]:
    """Enabled services that are given a secret from the ``.env`` (an API key, a Hub token)."""
    return tuple(
        name
        for name, svc in config.enabled_services.items()
        if getattr(svc, "api_key_secret", None) or getattr(svc, "hf_token_secret", None)
    )
