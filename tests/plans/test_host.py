"""Plan fixtures, pyinfra style: a snapshot in, a plan out, for every step gpufleet decides.

Each ``tests/plans/<step>/<case>.json`` holds:

    group      the host group whose shipped group data is used
    data       host data overrides, by key (optional)
    data_patch host data overrides, by path (optional): ``services.llama.image``
    control    control-input overrides the host was converged with (optional): model_size, ...
    control_now  control-input overrides since then (optional): local_images, hub_error, ...
    options    plan options (optional): lease_id, now
    build_by   another host of the run that builds this host's images (optional)
    snapshot   overrides of the converged host's snapshot, by path
               (``identity.docker.active``, ``files[/opt/gpufleet/.env].mode``; "$delete")
    changes    every change the plan must list, in order: [step, resource, action]
    reasons    "<step> <resource>" -> the exact reason of that change (optional)
    refusal    the refusal, for a host that must not be changed (instead of changes)

``$release`` in ``changes`` and ``reasons`` stands for the id of the release the plan makes.

A converged host (``tests/support/plans.converged``) plans nothing; every step's folder has
at least one case that changes and one that, though close, must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpufleet.core import known
from gpufleet.core.snapshot import Snapshot
from gpufleet.plan.host import plan_host
from gpufleet.plan.types import PlanOptions
from tests.support.plans import config_for, control_for, converged, set_path

FIXTURES = Path(__file__).parent


CASES = sorted(FIXTURES.glob("*/*.json"))


def plan_of(spec: dict):
    config = config_for(spec["group"], patch=spec.get("data_patch"), **spec.get("data", {}))
    control = control_for(config, **spec.get("control", {}))
    snap = converged(config, control)
    if "control_now" in spec:
        control = control_for(config, **spec.get("control", {}), **spec["control_now"])
    for path, value in spec.get("snapshot", {}).items():
        set_path(snap, path, value)
    snapshot = Snapshot.model_validate(snap)
    options = PlanOptions(**spec.get("options", {}))
    if "build_by" in spec:
        refs = [(b.inputs, b.ref) for b in plan_host(config, snapshot, control).builds.values()]
        builders = {i: (spec["build_by"], "gpufleet/llama.cpp:other", True) for i, _ in refs}
        options = PlanOptions(**spec.get("options", {}), builders=builders)
    return plan_host(config, snapshot, control, options)


def _fill(value, release: str):
    return json.loads(json.dumps(value).replace("$release", release))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.stem}" for c in CASES])
def test_plan(case: Path):
    spec = json.loads(case.read_text())
    plan = plan_of(spec)
    if "refusal" in spec:
        assert plan.refusal == spec["refusal"]
        assert plan.changes == ()
        return
    assert plan.refusal is None
    release = plan.release.id if plan.release else "none"
    assert [[c.step, c.resource, c.action] for c in plan.changes] == _fill(spec["changes"], release)
    reasons = {f"{c.step} {c.resource}": c.reason for c in plan.changes}
    for resource, reason in _fill(spec.get("reasons", {}), release).items():
        assert reasons[resource] == reason


def test_every_step_has_a_change_case_and_a_no_change_twin():
    folders = {case.parent for case in CASES}
    assert {f.name for f in folders} >= {
        "engine", "toolkit", "daemon", "cdi", "probe", "layout", "env", "model", "image",
        "build", "compose", "recreate", "gate", "release", "refusal",
    }  # fmt: skip
    for folder in folders - {FIXTURES / "refusal"}:
        kinds = {bool(json.loads(c.read_text()).get("changes")) for c in folder.glob("*.json")}
        assert kinds == {True, False}, f"{folder.name} needs a change case and a no-change twin"


@pytest.mark.parametrize("group", ["spark", "rtx5090", "jetson"])
def test_a_converged_host_plans_nothing(group):
    config = config_for(group)
    control = control_for(config)
    plan = plan_host(config, Snapshot.model_validate(converged(config, control)), control)
    assert plan.refusal is None and plan.changes == () and plan.in_sync
    assert plan.release is not None and len(plan.release.id) == 12


def test_one_build_per_set_of_inputs_per_run():
    from gpufleet.plan.host import choose_builders

    order = ["spark-01", "ws-a", "ws-b", "ws-c"]
    needs = {"ws-b": [("in1", "llama:rtx")], "ws-a": [("in1", "llama:rtx")],
             "spark-01": [("in2", "llama:spark")], "ws-c": []}  # fmt: skip
    assert choose_builders(order, needs, {}) == {
        "in1": ("ws-a", "llama:rtx", True), "in2": ("spark-01", "llama:spark", True)}  # fmt: skip
    # a host that has the image already sends it rather than anyone building it
    haves = {"ws-c": [("in1", "llama:rtx")], "ws-b": [("in2", "llama:spark2")]}
    assert choose_builders(order, needs, haves) == {
        "in1": ("ws-c", "llama:rtx", False), "in2": ("ws-b", "llama:spark2", False)}  # fmt: skip


def test_an_image_the_control_machine_holds_is_sent_and_nobody_builds():
    from gpufleet.plan.host import choose_builders

    order = ["spark-01", "ws-a", "ws-b"]
    needs = {"ws-a": [("in1", "llama:rtx")], "ws-b": [("in1", "llama:rtx")],
             "spark-01": [("in2", "llama:spark")]}  # fmt: skip
    control = {"in1": "fleet/llama.cpp:abc"}
    assert choose_builders(order, needs, {}, control) == {
        "in1": (known.CONTROL_MACHINE, "fleet/llama.cpp:abc", False),
        "in2": ("spark-01", "llama:spark", True)}  # fmt: skip
    # a host of the run that has it still sends it: nothing leaves the control machine
    haves = {"spark-01": [("in1", "llama:spark")]}
    assert choose_builders(order, needs, haves, control)["in1"] == (
        "spark-01", "llama:spark", False)  # fmt: skip


def test_the_control_machines_image_is_offered_only_where_every_host_takes_it(monkeypatch):
    from deploys import _fleet

    held = {"in1": "fleet/llama.cpp:abc", "in2": "fleet/llama.cpp:def"}
    monkeypatch.setattr(_fleet.control, "image_built_from", held.get)
    registry = _fleet.BuildRegistry.__new__(_fleet.BuildRegistry)
    registry.needs, registry.haves, registry.own_builds = {}, {}, set()
    registry.register("ws-a", [("in1", "llama:rtx")])
    registry.register("ws-b", [("in1", "llama:rtx"), ("in2", "llama:x")], from_control=False)
    registry.register("ws-c", [("in3", "llama:y")], [("in2", "llama:x")])
    # in1: ws-b builds its own; in2: ws-c has it; in3: the control machine has none
    assert registry.from_control() == {}
    registry = _fleet.BuildRegistry.__new__(_fleet.BuildRegistry)
    registry.needs, registry.haves, registry.own_builds = {}, {}, set()
    registry.register("ws-a", [("in1", "llama:rtx")])
    registry.register("ws-b", [("in1", "llama:rtx")])
    assert registry.from_control() == {"in1": "fleet/llama.cpp:abc"}
