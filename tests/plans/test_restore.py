"""A rollback's plan: a kept release in, the changes that bring it back out."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from deploys.release import migrate_script
from facts._sections import split_sections
from facts.statedir import ReleaseRecord
from gpufleet.core.known import STATE_DIR
from gpufleet.core.render import plain_names, public_env, render_env, restore_env
from gpufleet.core.snapshot import ModelsState, Snapshot
from gpufleet.plan.host import plan_host
from gpufleet.plan.restore import (
    KeptEnv,
    kept_env,
    plan_restore,
    resolve_target,
    store_reads,
)
from tests.support.plans import ENV_SHA, config_for, control_for, converged, set_path


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


def _plan(config, control, snap, release, images, models, env: KeptEnv | None = None):
    # the kept .env, rendered with today's secrets, is the one the converged host has
    env = env or KeptEnv(public_env(config), sha256=ENV_SHA)
    return plan_restore(
        config, Snapshot.model_validate(snap), release, images, models, control, env=env
    )


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
    path = store_reads(release, config)["entries"][0][0]  # the first file's blob
    set_path(snap, f"models.files[{path}].size", 7)
    models = ModelsState.model_validate(snap["models"])
    plan = _plan(config, control, snap, release, images, models)
    assert plan.changes[0].step == "model" and plan.changes[0].resource == path
    assert plan.fetches[path].url == release.services["llama"].model_files[0].url
    # fetched, then its snapshot linked again
    assert [c.action for c in plan.of("model")] == ["fetch and verify", "link the snapshot"]


def test_a_rollback_whose_blobs_are_in_the_cache_downloads_nothing():
    """A pruned or moved snapshot whose blobs stayed: linked again, no byte fetched."""
    config, control, snap, release, images, models = _kept()
    link = store_reads(release, config)["entries"][0][2]
    set_path(snap, f"models.links[{link}]", None)
    models = ModelsState.model_validate(snap["models"])
    plan = _plan(config, control, snap, release, images, models)
    assert plan.fetches == {}
    assert [(c.step, c.action) for c in plan.of("model")] == [("model", "link the snapshot")]


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


# --- a rollback never brings an old secret back ---------------------------------------------

KEY_OLD, KEY_NEW = "sk-old-revoked-0000", "sk-new-rotated-1111"


def _keyed():
    return config_for(
        "jetson",
        secrets={"LLAMA_API_KEY": "env:K"},
        env={"LOG_LEVEL": "info"},
        patch={"services.llama.api_key_secret": "LLAMA_API_KEY"},
    )


def test_a_release_keeps_plain_values_and_secret_names_never_a_secret_value():
    config = _keyed()
    kept = public_env(config)
    assert kept.splitlines()[1:] == ["LOG_LEVEL='info'", "# secret LLAMA_API_KEY"]
    # rendered again with the values of the day it was kept, it is that day's .env exactly
    assert restore_env(kept, {"LLAMA_API_KEY": KEY_OLD}, where="k") == render_env(
        config, {"LLAMA_API_KEY": KEY_OLD}
    )


def test_a_rollback_after_a_key_rotation_writes_the_rotated_key():
    config = _keyed()
    env = kept_env(public_env(config), {"LLAMA_API_KEY": KEY_NEW}, where="k")
    restored = restore_env(public_env(config), {"LLAMA_API_KEY": KEY_NEW}, where="k")
    assert KEY_NEW in restored and KEY_OLD not in restored
    assert (
        env.sha256
        == hashlib.sha256(render_env(config, {"LLAMA_API_KEY": KEY_NEW}).encode()).hexdigest()
    )
    # the host has the rotated .env already: nothing to restore; the old .env: restore it
    control = control_for(config, env_sha256=env.sha256)
    snap = converged(config, control)
    release = plan_host(config, Snapshot.model_validate(snap), control).release
    images = {
        n: (s.image, snap["compose"]["images"][s.image]["id"]) for n, s in release.services.items()
    }
    models = ModelsState.model_validate(snap["models"])
    assert _plan(config, control, snap, release, images, models, env).changes == ()
    set_path(
        snap,
        "files[/opt/gpufleet/.env].sha256",
        hashlib.sha256(render_env(config, {"LLAMA_API_KEY": KEY_OLD}).encode()).hexdigest(),
    )
    plan = _plan(config, control, snap, release, images, models, env)
    assert [(c.step, c.op.value) for c in plan.changes][:2] == [
        ("env", "restore"),
        ("recreate", "recreate"),
    ]
    assert plan.restore_env == public_env(config) and KEY_NEW not in repr(plan)


def test_a_rotated_secret_alone_is_neither_a_new_release_nor_new_inputs():
    config = _keyed()
    old = control_for(config, env_sha256="1" * 64)
    new = control_for(config, env_sha256="2" * 64)  # the same public part, another key
    snap = Snapshot.model_validate(converged(config, old))
    assert plan_host(config, snap, old).release.id == plan_host(config, snap, new).release.id


def test_a_release_whose_secret_is_no_longer_declared_is_refused_in_one_line():
    config, control, snap, release, images, models = _kept()
    env = kept_env("# Managed by gpufleet for the spark group: x\n# secret GONE\n", {}, where="k")
    plan = _plan(config, control, snap, release, images, models, env)
    assert plan.refusal == (
        "k: the release's .env has the secret GONE, which is not among the "
        "secrets declared now: declare it in secrets to roll back to it"
    )
    assert kept_env(None, {}, where="k").error == "k is absent: the release kept no .env"
    assert kept_env("LOG='1'\n", {}, where="k").error == (
        "k line 1 is not the header gpufleet writes"
    )


def _sh(script: str, root: Path) -> subprocess.CompletedProcess:
    script = script.replace(STATE_DIR, str(root))
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False)


def test_an_older_release_is_read_and_migrated_without_its_secret_values(tmp_path):
    config = _keyed()
    rid = "a1b2c3d4e5f6"
    rel = tmp_path / "releases" / rid
    rel.mkdir(parents=True)
    whole = render_env(
        config.model_copy(update={"secrets": {**config.secrets, "RETIRED_TOKEN": "x"}}),
        {"LLAMA_API_KEY": KEY_OLD, "RETIRED_TOKEN": "hf_retired"},
    )
    (rel / "env").write_text(whole)
    (rel / "manifest.json").write_text(_kept()[3].manifest())
    (rel / "images").write_text("")
    # a rollback reads it stripped on the host: no value leaves it
    fact = ReleaseRecord()
    out = subprocess.run(
        ["sh", "-c", str(fact.command(rid, root=str(tmp_path), plain=plain_names(config)))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert KEY_OLD not in out and "hf_retired" not in out
    sections = split_sections(out.splitlines())
    env = "\n".join(sections["release.env"].lines) + "\n"
    assert env.splitlines()[1:] == [
        "# secret LLAMA_API_KEY",
        "LOG_LEVEL='info'",
        "# secret RETIRED_TOKEN",
    ]
    # and the next converge rewrites it as its public part
    ran = _sh(migrate_script(config, (rid,)), tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert not (rel / "env").exists()
    assert (rel / "env.public").read_text() == env
    assert oct((rel / "env.public").stat().st_mode & 0o777) == "0o600"
    assert _sh(migrate_script(config, (rid,)), tmp_path).returncode == 0  # twice: nothing to do
