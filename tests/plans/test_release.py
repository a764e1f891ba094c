"""The ``release`` step on its own (``gpufleet.plan.release``); its fixtures are
``tests/plans/release/``."""

from __future__ import annotations

import json

from gpufleet.core.snapshot import Snapshot
from gpufleet.plan.host import plan_host
from tests.support.plans import config_for, control_for, converged


def test_the_release_names_what_the_host_serves_and_changes_with_it():
    config = config_for("spark")
    control = control_for(config)
    release = plan_host(config, Snapshot.model_validate(converged(config, control)),
                        control).release  # fmt: skip
    llama = release.services["llama"]
    assert (release.toolkit, release.driver, release.cuda) == ("1.18.0-1", "580.95.05", "13.0")
    assert llama.build["cuda_archs"] == ["121"] and llama.build["cuda_version"] == "13.0.1"
    assert llama.build["source"] == "https://github.com/ggml-org/llama.cpp@v0.6.0"
    assert llama.model == "gpt-oss-20b"
    assert llama.model_files[0].path == "gpt-oss-20b-Q4_K_M.gguf"
    assert llama.model_files[0].repo == "unsloth/gpt-oss-20b-GGUF"
    assert llama.model_files[0].url.endswith(f"/resolve/{'c' * 40}/gpt-oss-20b-Q4_K_M.gguf")
    other = config_for("spark", services={**config_for("spark").model_dump()["services"]})
    assert plan_host(other, Snapshot.model_validate(converged(other, control)),
                     control).release.id == release.id  # fmt: skip
    bigger = config_for("spark", services=_with_llama(ctx_size=16384))
    assert plan_host(bigger, Snapshot.model_validate(converged(bigger, control)),
                     control).release.id != release.id  # fmt: skip


def _with_llama(**changes) -> dict:
    from tests.support.plans import group_data

    services = json.loads(json.dumps(group_data("spark")["services"]))
    services["llama"].update(changes)
    return services
