"""The release's shell (record, make current, prune, migrate), run by a real ``sh`` against a
temporary state directory, with a stand-in ``docker`` that logs what it is asked."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from deploys.release import current_script, migrate_script, record_script
from facts._sections import MARKER, split_sections
from facts.statedir import from_sections
from gpufleet.core.known import STATE_DIR
from gpufleet.core.snapshot import Snapshot
from gpufleet.plan.host import plan_host
from tests.support.plans import config_for, control_for, converged

IDS = ("a1b2c3d4e5f6", "b1b2c3d4e5f6", "c1b2c3d4e5f6", "d1b2c3d4e5f6", "e1b2c3d4e5f6")
IMAGE_ID = "sha256:" + "ab" * 32
# docker as the scripts use it: inspect prints an id, images lists the kept tags, tag and rmi
# are logged (one call a line, rmi's arguments from stdin as xargs passes them)
DOCKER = f"""#!/bin/sh
echo "docker $*" >> "$DOCKER_LOG"
case "$1" in
  image) echo {IMAGE_ID} ;;
  images) printf '%s\\n' "$KEPT_TAGS" ;;
esac
"""


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A state directory and a stack directory under ``tmp_path``, ``docker`` stood in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(DOCKER)
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_LOG", str(tmp_path / "docker.log"))
    monkeypatch.setenv("KEPT_TAGS", "")
    return tmp_path


def _run(host: Path, script: str, stack_dir: str) -> list[str]:
    """``script`` with the state and stack directories moved under ``host``; docker's calls."""
    script = script.replace(STATE_DIR, str(host / "state")).replace(stack_dir, str(host / "stack"))
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    log = host / "docker.log"
    return log.read_text().splitlines() if log.exists() else []


def _state(history: list[str], current: str | None) -> dict:
    lines = [f"{MARKER}state.current", current or "", "", f"{MARKER}state.history", *history]
    lines += ["", f"{MARKER}state.models"]
    return from_sections(split_sections(lines)).model_dump(mode="json")


def _plan(history: list[str], current: str | None):
    config = config_for("spark")
    control = control_for(config)
    snap = converged(config, control)
    snap["state"] = _state(history, current)
    return config, plan_host(config, Snapshot.model_validate(snap), control)


def _seed(host: Path, rids: list[str], current: str | None) -> Path:
    """A state directory keeping ``rids``, and a stack with a compose file and a Dockerfile
    for each of spark's services."""
    state = host / "state"
    state.mkdir(parents=True, exist_ok=True)
    for rid in rids:
        (state / "releases" / rid).mkdir(parents=True)
        (state / "releases" / rid / "manifest.json").write_text("{}")
    (state / "history").write_text("".join(f"{rid}\n" for rid in rids))
    if current:
        (state / "current").write_text(f"{current}\n")
    stack = host / "stack"
    stack.mkdir(exist_ok=True)
    (stack / "compose.yaml").write_text("services: {}\n")
    for name in config_for("spark").services:
        (stack / "build" / name).mkdir(parents=True, exist_ok=True)
        (stack / "build" / name / "Dockerfile").write_text(f"FROM {name}\n")
    return state


def test_recording_a_release_keeps_its_files_tags_its_images_and_makes_it_current(host):
    config, plan = _plan([], None)
    rid = plan.release.id
    state = _seed(host, [], None)
    calls = _run(host, record_script(config, plan), config.layout.stack_dir)
    rel = state / "releases" / rid
    assert (state / "current").read_text() == f"{rid}\n"
    assert (state / "history").read_text() == f"{rid}\n"
    assert (rel / "compose.yaml").read_text() == "services: {}\n"
    images = [line.split("\t") for line in (rel / "images").read_text().splitlines()]
    assert images == [[n, s.image, IMAGE_ID] for n, s in plan.release.services.items()]
    # the snapshots it uses, as pruning reads them back (``state.kept_models``)
    models = sorted({f.snapshot_key() for s in plan.release.services.values()
                     for f in s.model_files})  # fmt: skip
    assert (rel / "models").read_text().split() == models
    assert models and all(m.startswith("models--") for m in models)
    for name, svc in plan.release.services.items():
        assert f"docker tag {svc.image} gpufleet/kept:{name}-{rid}" in calls
    built = sorted(p.parent.name for p in (rel / "build").glob("*/Dockerfile"))
    from_source = [n for n, s in config.services.items() if getattr(s, "image", None)]
    from_source = [n for n in from_source if config.services[n].image.source == "build"]
    assert built == sorted(from_source) and built  # spark builds llama.cpp from source
    assert not list(state.rglob("*.tmp"))  # every file whole, by mv
    assert oct((rel).stat().st_mode & 0o777) == oct(0o700)  # umask 077


def test_recording_past_the_limit_prunes_the_oldest_release_and_only_its_tags(host, monkeypatch):
    config, plan = _plan(list(IDS), IDS[-1])
    assert plan.pruned == (IDS[0],)
    state = _seed(host, list(IDS), IDS[-1])
    kept = [f"gpufleet/kept:llama-{rid}" for rid in IDS[:2]] + ["gpufleet/kept:x-other"]
    monkeypatch.setenv("KEPT_TAGS", "\n".join(kept))
    calls = _run(host, record_script(config, plan), config.layout.stack_dir)
    assert sorted(p.name for p in (state / "releases").iterdir()) == sorted(
        [*IDS[1:], plan.release.id]
    )
    assert (state / "history").read_text().split() == [*IDS[1:], plan.release.id]
    assert [c for c in calls if c.startswith("docker rmi")] == [f"docker rmi {kept[0]}"]


def test_making_a_kept_release_current_again_rewrites_only_current_and_history(host):
    state = _seed(host, list(IDS[:3]), IDS[2])
    before = {p: p.read_bytes() for p in (state / "releases").rglob("*") if p.is_file()}
    calls = _run(host, current_script(IDS[0], (IDS[1], IDS[2], IDS[0])), "/opt/gpufleet")
    assert (state / "current").read_text() == f"{IDS[0]}\n"
    assert (state / "history").read_text().split() == [IDS[1], IDS[2], IDS[0]]
    assert {p: p.read_bytes() for p in (state / "releases").rglob("*") if p.is_file()} == before
    assert calls == []


def test_migrating_a_kept_env_copy_leaves_its_public_part_only(host):
    config = config_for("spark")
    state = _seed(host, [IDS[0]], IDS[0])
    env = state / "releases" / IDS[0] / "env"
    env.write_text("LOG='1'\nHF_TOKEN='hf_secret'\n")
    _run(host, migrate_script(config, (IDS[0],)), config.layout.stack_dir)
    assert not env.exists()
    public = (env.parent / "env.public").read_text()
    assert "hf_secret" not in public
    assert oct(env.parent.joinpath("env.public").stat().st_mode & 0o777) == oct(0o600)
