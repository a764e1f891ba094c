"""The image, build, compose, recreate and gate steps on their own (``gpufleet.plan.services``):
the gate's deadline, images received from a builder, and the check that an image can run on
the host's GPUs; their fixtures are ``tests/plans/{image,build,compose,recreate,gate}/``."""

from __future__ import annotations

from gpufleet.core import known
from gpufleet.core.schema import LlamaServer
from gpufleet.core.snapshot import Snapshot
from gpufleet.plan.host import plan_host
from gpufleet.plan.services import gate_seconds
from gpufleet.plan.types import PlanOptions
from tests.support.plans import config_for, control_for, converged, set_path


def test_gate_deadline_scales_with_the_model_and_stops_at_start_period():
    svc = LlamaServer.model_validate({"port": 8000, "model": "m", "ctx_size": 0,
                                      "image": {"ref": "x"}})  # fmt: skip
    assert gate_seconds(svc, 500_000) == 60
    assert gate_seconds(svc, 10 * 2**30) == 60 + 102
    assert gate_seconds(svc, 63 * 2**30) == 600  # start_period 10m caps it


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
