"""A rollback's plan: a kept release in, the changes that bring it back out."""

from __future__ import annotations

from gpufleet.core.snapshot import ModelsState, Snapshot
from gpufleet.plan.host import plan_host
from gpufleet.plan.restore import plan_restore, resolve_target, restored_llama_paths
from tests.support.plans import config_for, control_for, converged, set_path


def _kept(group: str = "spark"):
    """A host converged on a release, that release's record, and the state of its models."""
    config = config_for(group)
    control = control_for(config)
    snap = converged(config, control)
    release = plan_host(config, Snapshot.model_validate(snap), control).release
    images = {name: (svc.image, snap["compose"]["images"][svc.image]["id"])
              for name, svc in release.services.items()}  # fmt: skip
    models = ModelsState.model_validate(snap["models"])
    return config, control, snap, release, images, models


def _plan(config, control, snap, release, images, models):
    return plan_restore(config, Snapshot.model_validate(snap), release, images, models, control)


def test_a_host_on_the_release_needs_nothing():
    assert _plan(*_kept()).changes == ()


def test_a_host_a_rollout_moved_on_gets_the_releases_files_image_and_containers_back():
    config, control, snap, release, images, models = _kept()
    newer = "sha256:" + "n" * 64
    set_path(snap, "files[/opt/gpufleet/compose.yaml].sha256", "0" * 64)
    set_path(snap, "files[/opt/gpufleet/.env].sha256", "1" * 64)
    set_path(snap, "compose.images[gpufleet/llama.cpp:spark].id", newer)
    set_path(snap, "compose.containers.llama.inputs", "2" * 64)
    set_path(snap, "state.current", "0123456789ab")
    plan = _plan(config, control, snap, release, images, models)
    assert [(c.step, c.resource, c.action) for c in plan.changes] == [
        ("env", "/opt/gpufleet/.env", "restore"),
        ("image", "gpufleet/llama.cpp:spark", "retag"),
        ("build", "/opt/gpufleet/build/llama/Dockerfile", "restore"),
        ("compose", "/opt/gpufleet/compose.yaml", "restore"),
        ("recreate", "llama", "recreate"),
        ("gate", "llama", "health and a one-token chat within 60s"),
        ("release", release.id, "make current"),
    ]
    # the driver and the toolkit are not part of it
    assert not [c for c in plan.changes if c.step in ("toolkit", "engine", "daemon")]


def test_a_model_file_a_release_needs_is_fetched_again_from_its_pinned_url():
    config, control, snap, release, images, models = _kept()
    path = restored_llama_paths(release, config)[0]
    set_path(snap, f"models.files[{path}].size", 7)
    models = ModelsState.model_validate(snap["models"])
    plan = _plan(config, control, snap, release, images, models)
    assert plan.changes[0].step == "model" and plan.changes[0].resource == path
    assert plan.fetches[path].url == release.services["llama"].model_files[0].url


def test_previous_is_the_release_before_the_current_one():
    config = config_for("spark")
    state = {"current": "bbb", "releases": ["aaa", "bbb", "ccc"]}
    snap = Snapshot.model_validate({**converged(config, control_for(config)), "state": state})
    assert resolve_target("previous", snap) == "aaa"
    assert resolve_target("ccc", snap) == "ccc"
    assert resolve_target("ddd", snap) is None
    first = Snapshot.model_validate({**snap.model_dump(mode="json"),
                                     "state": {"current": "aaa", "releases": ["aaa"]}})  # fmt: skip
    assert resolve_target("previous", first) is None
