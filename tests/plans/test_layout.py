"""The ``layout`` and ``env`` steps on their own (``gpufleet.plan.layout``); their fixtures are
``tests/plans/layout/`` and ``tests/plans/env/``."""

from __future__ import annotations

import json

from gpufleet.core.snapshot import Snapshot
from gpufleet.plan.host import plan_host
from tests.support.plans import config_for, control_for, converged, set_path


def test_a_plan_holds_no_secret_value():
    config = config_for("spark", secrets={"HF_TOKEN": "env:HF_TOKEN"})
    control = control_for(config, env_sha256="f" * 64)
    snap = converged(config, control)
    set_path(snap, "files[/opt/gpufleet/.env].sha256", "0" * 64)
    plan = plan_host(config, Snapshot.model_validate(snap), control)
    env = plan.of("env")[0]
    # the .env is compared by hash, and not even the hash is shown
    assert env.reason == "content differs" and "f" * 12 not in json.dumps(env.as_item())
