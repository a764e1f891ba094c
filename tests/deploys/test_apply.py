"""Plan and apply agree: every change a plan or a rollback's plan can emit is applied.

The walk: every change of every plan fixture (``tests/plans``) and of the rollback scenarios
below, each run alone through the deploys with pyinfra's operations recorded (not executed):
each must issue at least one operation and be listed in ``deploys._apply.APPLIED``; every
``Op`` must be applied by some step and emitted by some example. An ``Op`` added without a
deploy that applies it, or a plan that emits a change no deploy handles, fails here.
"""

from __future__ import annotations

import dataclasses
import json
from types import ModuleType

import pytest

from deploys import (
    _apt,
    container_toolkit,
    docker_engine,
    gpu_probe,
    layout,
    models,
    release,
    services,
)
from deploys._apply import APPLIED
from gpufleet.core.render import public_env
from gpufleet.core.snapshot import ModelsState, Snapshot
from gpufleet.core.wire import STEPS, Op
from gpufleet.plan.host import plan_host
from gpufleet.plan.restore import KeptEnv, plan_restore
from gpufleet.plan.types import HostPlan
from tests.plans.test_host import CASES, plan_of
from tests.support.plans import ENV_SHA, config_for, control_for, converged, set_path

DEPLOYS = (docker_engine, container_toolkit, gpu_probe, layout, models, services, release, _apt)


def _fixture_plans():
    for case in CASES:
        spec = json.loads(case.read_text())
        config = config_for(spec["group"], patch=spec.get("data_patch"), **spec.get("data", {}))
        yield f"plans/{case.parent.name}/{case.stem}", config, plan_of(spec)


def _restore_plans():
    """A host a rollout moved on, with a container started by hand in its project, a model
    file gone and no fetch script: a rollback brings everything back."""
    config = config_for("spark")
    control = control_for(config)
    snap = converged(config, control)
    kept = plan_host(config, Snapshot.model_validate(snap), control).release
    images = {
        n: (s.image, snap["compose"]["images"][s.image]["id"]) for n, s in kept.services.items()
    }
    model = f"{config.layout.models_dir}/{kept.services['llama'].model_files[0].path}"
    set_path(snap, "files[/opt/gpufleet/compose.yaml].sha256", "0" * 64)
    set_path(snap, "files[/opt/gpufleet/.env].sha256", "1" * 64)
    set_path(snap, "files[/usr/local/bin/gpufleet-fetch-model]", None)
    set_path(snap, "compose.images[gpufleet/llama.cpp:spark].id", "sha256:" + "n" * 64)
    set_path(snap, f"models.files[{model}]", None)
    set_path(snap, "state.current", "0123456789ab")
    snap["compose"]["containers"]["handmade"] = {
        "id": "f" * 64,
        "state": "running",
        "inputs": None,
        "health": None,
    }
    snap["state"]["secret_copies"] = ["0123456789ab"]
    models_state = ModelsState.model_validate(snap["models"])
    env = KeptEnv(public_env(config), sha256=ENV_SHA)
    plan = plan_restore(
        config, Snapshot.model_validate(snap), kept, images, models_state, control, env=env
    )
    yield "restore/moved_on", config, plan


EXAMPLES = [*_fixture_plans(), *_restore_plans()]


class _Recorded:
    """A module whose pyinfra operations are recorded instead of run."""

    def __init__(self, module: ModuleType, calls: list[str]) -> None:
        self._module, self._calls = module, calls

    def __getattr__(self, name: str):
        real = getattr(self._module, name)
        if not hasattr(real, "_inner"):  # not an operation (ops.Secret, a constant)
            return real

        def record(*args, **kwargs):
            self._calls.append(f"{self._module.__name__}.{name}")
            return type("Op", (), {"did_change": lambda self: True})()

        return record


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    for mod in DEPLOYS:
        for attr in ("files", "server", "systemd", "ops"):
            if isinstance(getattr(mod, attr, None), ModuleType):
                monkeypatch.setattr(mod, attr, _Recorded(getattr(mod, attr), calls))
    return calls


def _apply(config, plan: HostPlan) -> None:
    secrets: dict[str, str] = {}
    docker_engine.docker_engine._inner(config, plan)
    container_toolkit.container_toolkit._inner(config, plan)
    gpu_probe.gpu_probe._inner(config, plan)
    layout.layout._inner(config, secrets, plan)
    models.models._inner(config, plan)
    services.services._inner(config, secrets, plan)
    release.record_release._inner(config, plan)


def test_every_op_is_applied_by_a_deploy_and_emitted_by_some_plan():
    applied = {op for ops in APPLIED.values() for op in ops}
    assert set(Op) - applied == set(), "add the Op to deploys._apply.APPLIED and apply it"
    assert set(APPLIED) == set(STEPS)
    emitted = {(c.step, c.op) for _, _, plan in EXAMPLES for c in plan.changes}
    listed = {(step, op) for step, ops in APPLIED.items() for op in ops}
    assert listed - emitted == set(), "an applied (step, op) no example plan emits: add one"
    assert emitted - listed == set(), "a plan emits a change no deploy applies"


@pytest.mark.parametrize(
    ("config", "plan", "change"),
    [(config, plan, c) for _, config, plan in EXAMPLES for c in plan.changes],
    ids=[f"{name}:{c.step}/{c.op.value}" for name, _, plan in EXAMPLES for c in plan.changes],
)
def test_each_change_is_applied_by_an_operation(calls, config, plan, change):
    alone = dataclasses.replace(plan, changes=(change,))
    _apply(config, alone)
    assert calls, f"{change.step} {change.op.value} {change.resource}: no operation issued"


def test_an_orphan_is_removed_by_its_container_id_exactly(calls, monkeypatch):
    config = config_for("spark")
    control = control_for(config)
    snap = converged(config, control)
    snap["compose"]["containers"]["handmade"] = {
        "id": "f" * 64,
        "state": "running",
        "inputs": None,
        "health": None,
    }
    plan = plan_host(config, Snapshot.model_validate(snap), control)
    assert [(c.step, c.resource, c.op) for c in plan.changes[:1]] == [
        ("recreate", "handmade", Op.REMOVE)
    ]
    shells: list[str] = []
    monkeypatch.setattr(
        services,
        "server",
        type(
            "S", (), {"shell": staticmethod(lambda name, commands, **kw: shells.extend(commands))}
        ),
    )
    services.services._inner(config, {}, plan)
    assert shells[0] == "docker rm -f -- " + "f" * 64
    assert (
        plan_host(config, Snapshot.model_validate(converged(config, control)), control).orphans
        == {}
    )


def test_a_container_id_that_is_not_one_is_refused():
    from pyinfra.api.exceptions import DeployError

    with pytest.raises(DeployError, match="not a container id"):
        services.remove_command(["abc; rm -rf /"])


def test_a_stopped_engine_is_started_with_a_bounded_wait_and_one_line_when_it_fails():
    from types import SimpleNamespace

    from gpufleet.ops import operations as ops

    ran = []

    def host(ok: bool, stderr: list[str]):
        def run_shell_command(command, _sudo):
            ran.append((command.get_raw_value(), _sudo))
            return ok, SimpleNamespace(stderr_lines=stderr)

        return SimpleNamespace(data={"_sudo": True}, run_shell_command=run_shell_command)

    state = SimpleNamespace(config=SimpleNamespace(SUDO=False))
    assert ops.start_engine_now(state, host(True, []), seconds=5) is None
    assert ran[0] == (
        "systemctl start docker && for i in $(seq 5); do docker info >/dev/null 2>&1 && exit 0; "
        "sleep 1; done; exit 1",
        True,
    )
    failed = ops.start_engine_now(state, host(False, ["Job for docker.service failed.", ""]), 5)
    assert failed == (
        "the Docker engine was stopped and did not answer within 5s of `systemctl start "
        "docker`: Job for docker.service failed."
    )


def test_the_converge_applies_every_step_once_in_the_plans_order():
    from deploys._converge import APPLIERS, appliers
    from gpufleet.core.wire import STEPS

    applied = [step for apply in appliers() for step in APPLIERS[apply]]
    assert applied == list(STEPS)  # every step, once, in order: the order is STEPS alone
    assert set(APPLIED) == set(STEPS)


def test_every_remote_command_of_the_converge_has_a_bound_fitted_to_what_it_does(monkeypatch):
    from deploys import _converge

    assert set(_converge.BOUNDS) == set(_converge.APPLIERS)
    config = config_for("spark", timeout_apt_seconds=901, timeout_download_seconds=902,
                        timeout_build_seconds=903, timeout_transfer_seconds=904,
                        timeout_command_seconds=905)  # fmt: skip
    assert _converge.bound(docker_engine.docker_engine, config) == 901
    assert _converge.bound(models.models, config) == 902
    assert _converge.bound(layout.layout, config) == 905
    # inside the services deploy, each long command carries its own bound
    bounds: dict[str, object] = {}
    real_ops = services.ops

    class Ops:
        def __getattr__(self, name):
            real = getattr(real_ops, name)
            if not hasattr(real, "_inner"):
                return real
            return lambda *a, **kw: bounds.setdefault(name, kw.get("_timeout"))

    class Server:
        def shell(self, *, name, commands, **kw):
            bounds.setdefault(name.split(" (")[0], kw.get("_timeout"))

    monkeypatch.setattr(services, "ops", Ops())
    monkeypatch.setattr(services, "server", Server())
    monkeypatch.setattr(services, "files", Server())
    monkeypatch.setattr(services, "_build", lambda build, timeouts: None)
    spec = json.loads(next(c for c in CASES if c.stem == "inputs_changed").read_text())
    plan = plan_of(spec)
    gates = [c for c in plan.changes if c.step == "gate"]
    services.services._inner(config, {}, plan)
    assert bounds["build_image"] == 903 + 904  # a receiver waits for the build, then loads
    assert bounds["Bring up changed services"] == 904  # compose may pull
    assert gates and bounds["health_gate"] == plan.gate_seconds[gates[0].resource] + 120
