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
from gpufleet.core.schema import LlamaServer
from gpufleet.core.snapshot import ModelFileState, Snapshot
from gpufleet.plan.container_toolkit import owned_daemon_keys, toolkit_unavailable
from gpufleet.plan.host import plan_host
from gpufleet.plan.models import unverified_reason
from gpufleet.plan.services import gate_seconds
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


def test_a_plan_holds_no_secret_value():
    config = config_for("spark", secrets={"HF_TOKEN": "env:HF_TOKEN"})
    control = control_for(config, env_sha256="f" * 64)
    snap = converged(config, control)
    set_path(snap, "files[/opt/gpufleet/.env].sha256", "0" * 64)
    plan = plan_host(config, Snapshot.model_validate(snap), control)
    env = plan.of("env")[0]
    # the .env is compared by hash, and not even the hash is shown
    assert env.reason == "content differs" and "f" * 12 not in json.dumps(env.as_item())


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
    assert llama.model_files[0].path == "gpt-oss-20b/gpt-oss-20b-Q4_K_M.gguf"
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


# --- the decisions on their own ---------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (None, "absent"),
        ({"size": 9, "mtime": 100, "stamp": "s 10", "stamp_mtime": 101},
         "size 9 found, 10 declared"),
        ({"size": 10, "mtime": 100, "stamp": None, "stamp_mtime": None},
         "never verified (no stamp)"),
        ({"size": 10, "mtime": 100, "stamp": "t 10", "stamp_mtime": 101},
         "verified as another file (stamp differs)"),
        ({"size": 10, "mtime": 102, "stamp": "s 10", "stamp_mtime": 101},
         "changed since it was verified"),
        ({"size": 10, "mtime": 100, "stamp": "s 10", "stamp_mtime": 101, "sha256": "d" * 64},
         "sha256 dddddddddddd found, s declared"),
        ({"size": 10, "mtime": 100, "stamp": "s 10", "stamp_mtime": 100}, None),
        ({"size": 10, "mtime": 100, "stamp": "s 10", "stamp_mtime": 101, "sha256": "s"}, None),
    ],
    ids=["absent", "size", "no-stamp", "other-stamp", "changed", "deep-mismatch",
         "stamp-same-second", "deep-match"],
)  # fmt: skip
def test_model_file_verification(state, reason):
    value = ModelFileState.model_validate(state) if state else None
    assert unverified_reason(value, sha256="s", size=10) == reason


def test_gate_deadline_scales_with_the_model_and_stops_at_start_period():
    svc = LlamaServer.model_validate({"port": 8000, "model": "m", "ctx_size": 0,
                                      "image": {"ref": "x"}})  # fmt: skip
    assert gate_seconds(svc, 500_000) == 60
    assert gate_seconds(svc, 10 * 2**30) == 60 + 102
    assert gate_seconds(svc, 63 * 2**30) == 600  # start_period 10m caps it


def test_owned_daemon_keys_leave_others_alone():
    daemon = {"runtimes": {"nvidia": dict(known.NVIDIA_RUNTIME)}, "log-driver": "journald"}
    assert owned_daemon_keys(daemon, set_default=False, cdi=False) == []
    assert owned_daemon_keys(daemon, set_default=True, cdi=True) == [
        "default-runtime", "features.cdi"
    ]  # fmt: skip
    assert owned_daemon_keys(None, set_default=False, cdi=False) == ["runtimes.nvidia"]


def test_toolkit_availability_names_what_the_repository_has():
    config = config_for("rtx5090", toolkit_version="1.19.0-1")
    url = "http://mirror/libnvidia-container/stable/deb/amd64"
    offered = {"nvidia-container-toolkit": ["1.17.8-1", "1.18.0-1"]}
    assert toolkit_unavailable(config, offered, url) == (
        f"NVIDIA Container Toolkit 1.19.0-1 is not in {url} (it has 1.17.8-1, 1.18.0-1); "
        "set toolkit_version to one of those"
    )
    assert toolkit_unavailable(config_for("rtx5090"), offered, url) is None
    assert toolkit_unavailable(config, {"": ["curl: (6) Could not resolve host"]}, url) == (
        f"cannot read the toolkit repository {url}: curl: (6) Could not resolve host"
    )


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


def test_a_host_receiving_from_the_control_machine_needs_no_build_bases():
    plan = _without_its_image(**{"services.llama.build.base_source": "transfer"})
    received = plan(known.CONTROL_MACHINE, "fleet/llama.cpp:abc", building=False)
    build = received.builds["llama"]
    assert (build.receive_from, build.receive_ref) == (known.CONTROL_MACHINE, "fleet/llama.cpp:abc")
    assert not build.source_builds  # nothing to wait for: the image is there already
    assert [(c.resource, c.action) for c in received.of("build")] == [
        ("llama", "receive from the control machine")]  # fmt: skip
    assert received.of("image") == []  # no build bases, though the host has none


def test_a_host_that_builds_is_sent_the_build_bases_it_lacks():
    plan = _without_its_image(**{"services.llama.build.base_source": "transfer"})
    bases = plan("rtx5090-01", "gpufleet/llama.cpp:rtx5090").of("image")
    assert [(c.resource, c.action) for c in bases] == [
        ("nvidia/cuda:12.8.1-devel-ubuntu24.04", "transfer"),
        ("nvidia/cuda:12.8.1-runtime-ubuntu24.04", "transfer")]  # fmt: skip
    received = plan(known.CONTROL_MACHINE, "fleet/llama.cpp:abc", building=False)
    assert received.of("image") == []


def _without_its_image(**patch):
    """A function that plans an rtx5090 host lacking its llama image, with ``builder`` building
    that image (tagged ``ref`` there) in this run. ``patch``: host data overrides, by path."""
    config = config_for("rtx5090", patch=patch)
    control = control_for(config)
    snap = converged(config, control)
    set_path(snap, "compose.images[gpufleet/llama.cpp:rtx5090]", None)
    for base in (config.services["llama"].build.devel_image,
                 config.services["llama"].build.runtime_image):  # fmt: skip
        set_path(snap, f"compose.images[{base}]", None)
    snapshot = Snapshot.model_validate(snap)
    inputs = plan_host(config, snapshot, control).builds["llama"].inputs

    def plan(builder: str, ref: str, building: bool = True):
        options = PlanOptions(builders={inputs: (builder, ref, building)})
        return plan_host(config, snapshot, control, options)

    return plan


def test_a_receiving_host_plans_to_take_the_builders_tag():
    plan = _without_its_image()
    build = plan("spark-01", "gpufleet/llama.cpp:spark").builds["llama"]
    assert (build.receive_from, build.receive_ref) == ("spark-01", "gpufleet/llama.cpp:spark")
    assert build.source_builds
    # the builder itself builds
    assert plan("rtx5090-01", "gpufleet/llama.cpp:rtx5090").builds["llama"].receive_from is None


SPARK_120A = {"gpufleet.cuda.sm": "sm_120a", "gpufleet.cuda.ptx": ""}
REFUSED_120A = ('services.llama: image gpufleet/llama.cpp:spark has sm_120a; this GPU is 12.1 '
                '(NVIDIA GB10): rebuild with cuda_archs ["121"]')  # fmt: skip


def _plan_with(group: str, **snapshot):
    config = config_for(group)
    control = control_for(config)
    snap = converged(config, control)
    for path, value in snapshot.items():
        set_path(snap, path, value)
    return plan_host(config, Snapshot.model_validate(snap), control)


def test_an_image_the_host_keeps_is_checked_by_the_plan_itself():
    plan = _plan_with("spark", **{"compose.images[gpufleet/llama.cpp:spark].labels": SPARK_120A})
    assert plan.refusal == REFUSED_120A and plan.changes == ()
    assert _plan_with("spark").image_checks == {}  # nothing delivered: nothing left to check


def test_an_image_built_in_this_run_is_checked_after_its_build_not_by_its_old_labels():
    # the image on the host is stale (other inputs) and has no code for the GPU: it is rebuilt,
    # so its labels say nothing about the image the service will run
    plan = _plan_with("spark", **{
        "compose.images[gpufleet/llama.cpp:spark].inputs": "0" * 64,
        "compose.images[gpufleet/llama.cpp:spark].labels": SPARK_120A,
    })  # fmt: skip
    assert plan.refusal is None and plan.touches("build", "llama")
    check = plan.image_checks["llama"]
    assert (check.service, check.ref) == ("llama", "gpufleet/llama.cpp:spark")
    assert check.refusal(SPARK_120A) == REFUSED_120A
    assert check.refusal({"gpufleet.cuda.sm": "sm_121a", "gpufleet.cuda.ptx": ""}) is None
    # the build comes before the compose step that starts the service
    assert [c.step for c in plan.changes] == ["build", "recreate", "gate"]


def test_a_pulled_image_is_checked_on_arrival_with_advice_for_an_image_not_a_build():
    plan = _plan_with("jetson", **{"compose.images[dustynv/llama_cpp:r36.4.0]": None})
    assert plan.touches("image", "dustynv/llama_cpp:r36.4.0")
    check = plan.image_checks["llama"]
    assert check.refusal({"gpufleet.cuda.sm": "sm_121a"}) == (
        "services.llama: image dustynv/llama_cpp:r36.4.0 has sm_121a; this GPU is 8.7 "
        "(Orin (nvgpu)): use an image built for sm_87"
    )
    assert check.refusal({}) is None  # a prebuilt image without gpufleet's labels


def test_a_received_image_is_checked_on_arrival():
    plan = _without_its_image()("spark-01", "gpufleet/llama.cpp:spark")
    assert plan.builds["llama"].receive_from == "spark-01"
    assert "llama" in plan.image_checks


def test_a_gpu_without_a_compute_capability_checks_nothing():
    config = config_for("spark")
    control = control_for(config)
    snap = converged(config, control)
    snap["identity"]["nvidia"]["gpus"][0]["compute_cap"] = None  # nvidia-smi said [N/A]
    set_path(snap, "compose.images[gpufleet/llama.cpp:spark].labels", SPARK_120A)
    plan = plan_host(config, Snapshot.model_validate(snap), control)
    assert plan.refusal is None and plan.changes == ()


def test_hosts_asking_the_control_machine_the_same_question_at_once_start_one_process():
    import threading
    import time as clock

    from gpufleet.control.inputs import _asked_once

    calls = []

    @_asked_once
    def image_id(ref: str) -> str:
        calls.append(ref)
        clock.sleep(0.2)  # a docker process
        return f"sha256:{ref}"

    answers = []
    threads = [threading.Thread(target=lambda: answers.append(image_id("x:1"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["x:1"] and answers == ["sha256:x:1"] * 6
    assert image_id("x:2") == "sha256:x:2" and calls == ["x:1", "x:2"]  # another question asks


def test_the_control_machine_remembers_what_each_hosts_docker_printed(tmp_path, monkeypatch):
    from gpufleet.control import inputs as control
    from gpufleet.core.snapshot import DockerInfo

    monkeypatch.setenv("GPUFLEET_CACHE", str(tmp_path))
    monkeypatch.setattr(control, "_versions", {})
    read = dict(present=True, version="28.3.3", compose_version="2.39.1", active=True,
                daemon_json=None, daemon_json_error=None, runtimes=(), default_runtime=None,
                toolkit_packages={})  # fmt: skip
    assert control.docker_versions("ws-1") is None  # never read: the host is asked
    control.remember_docker("ws-1", DockerInfo(**read, binaries="/usr/bin/docker 1 2 3"))
    assert control.docker_versions("ws-1") == ("/usr/bin/docker 1 2 3", "28.3.3", "2.39.1")
    written = (tmp_path / "docker-versions.json").stat().st_mtime_ns
    control.remember_docker("ws-1", DockerInfo(**read, binaries="/usr/bin/docker 1 2 3"))
    assert (tmp_path / "docker-versions.json").stat().st_mtime_ns == written  # unchanged: kept

    monkeypatch.setattr(control, "_versions", {})  # the next run reads it from the file
    assert control.docker_versions("ws-1") == ("/usr/bin/docker 1 2 3", "28.3.3", "2.39.1")
    assert control.docker_versions("ws-2") is None
    gone = {**read, "present": False, "version": None, "compose_version": None}
    control.remember_docker("ws-1", DockerInfo(**gone, binaries="/usr/libexec/x 4 5 6"))
    assert control.docker_versions("ws-1") is None  # no docker: nothing to print back
    monkeypatch.setattr(control, "_versions", {})
    assert control.docker_versions("ws-1") is None


def test_a_cache_file_gpufleet_did_not_write_is_ignored(tmp_path, monkeypatch):
    from gpufleet.control import inputs as control

    monkeypatch.setenv("GPUFLEET_CACHE", str(tmp_path))
    for junk in ('{"ws-1": ["a", 3, null]}', "[1, 2]", "{not json"):
        (tmp_path / "docker-versions.json").write_text(junk)
        monkeypatch.setattr(control, "_versions", {})
        assert control.docker_versions("ws-1") is None


# --- re-verified in the same run: a clock stepped back, a crash loop ----------------------

MODEL_FILE = "/opt/gpufleet/models/gpt-oss-20b/gpt-oss-20b-Q4_K_M.gguf"


def _rehash(**snapshot) -> list[str]:
    from gpufleet.plan.models import rehash_paths

    config = config_for("spark")
    snap = converged(config, control_for(config))
    for path, value in snapshot.items():
        set_path(snap, path, value)
    return rehash_paths(config, Snapshot.model_validate(snap))


def test_a_converged_host_hashes_nothing():
    assert _rehash() == []


def test_a_model_dated_ahead_of_its_stamp_is_hashed_once():
    assert _rehash(**{f"models.files[{MODEL_FILE}].mtime": 4_000_000_000}) == [MODEL_FILE]
    # hashed in this read already (--deep): not again
    assert (
        _rehash(
            **{
                f"models.files[{MODEL_FILE}].mtime": 4_000_000_000,
                f"models.files[{MODEL_FILE}].sha256": "d" * 64,
            }
        )
        == []
    )


@pytest.mark.parametrize(
    "snapshot",
    [
        {"compose.containers.llama.state": "restarting"},
        {"compose.containers.llama.state": "exited"},
        {"compose.containers.llama.health": "unhealthy"},
        {"health.llama.status": None, "health.llama.error": "timeout"},
    ],
    ids=["restarting", "exited", "unhealthy", "hung"],
)
def test_a_failing_servers_model_files_are_hashed(snapshot):
    assert _rehash(**snapshot) == [MODEL_FILE]


def test_a_loading_server_or_a_missing_container_hashes_nothing():
    loading = {"compose.containers.llama.health": "starting", "health.llama.status": 503}
    assert _rehash(**loading) == []
    assert _rehash(**{"compose.containers.llama": "$delete"}) == []


def test_a_stamp_refresh_dates_the_stamp_with_the_file(tmp_path):
    import os
    import subprocess
    import time

    from deploys.models import stamp_script
    from facts.modelfiles import ModelFiles

    path = tmp_path / "m.gguf"
    path.write_bytes(b"x" * 10)
    ahead = time.time() + 86400
    os.utime(path, (ahead, ahead))
    ran = subprocess.run(
        ["sh", "-c", stamp_script(str(path), "s 10")], capture_output=True, text=True, check=False
    )
    assert ran.returncode == 0, ran.stderr
    fact = ModelFiles()
    out = subprocess.run(
        ["sh", "-c", str(fact.command(str(tmp_path), [str(path)]))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    state = fact.process(out.splitlines()).files[str(path)]
    assert unverified_reason(state, sha256="s", size=10) is None  # the next run: verified
