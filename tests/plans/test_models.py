"""The ``model`` step on its own (``gpufleet.plan.models``): verification, and the files
hashed again in the same run; its fixtures are ``tests/plans/model/``."""

from __future__ import annotations

import pytest

from gpufleet.core.hubcache import CachedFile
from gpufleet.core.snapshot import ModelFileState, Snapshot
from gpufleet.plan.host import plan_host
from gpufleet.plan.models import cached_files, space_refusal, unverified_reason
from gpufleet.plan.types import ModelFetch
from tests.support.plans import config_for, control_for, converged, set_path


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
        ({"size": 10, "mtime": 100, "stamp": "s 10", "stamp_mtime": 101, "digest": "d" * 64},
         "hash dddddddddddd found, s declared"),
        ({"size": 10, "mtime": 100, "stamp": "s 10", "stamp_mtime": 100}, None),
        ({"size": 10, "mtime": 100, "stamp": "s 10", "stamp_mtime": 101, "digest": "s"}, None),
    ],
    ids=["absent", "size", "no-stamp", "other-stamp", "changed", "deep-mismatch",
         "stamp-same-second", "deep-match"],
)  # fmt: skip
def test_model_file_verification(state, reason):
    value = ModelFileState.model_validate(state) if state else None
    assert unverified_reason(value, etag="s", size=10) == reason


CONFIG = config_for("spark")
CONTROL = control_for(CONFIG)
FILE = cached_files(CONFIG, CONTROL)["gpt-oss-20b"][0]
MODEL_FILE = FILE.blob
LEGACY = "/opt/gpufleet/models/gpt-oss-20b/gpt-oss-20b-Q4_K_M.gguf"


def _snap(**snapshot) -> Snapshot:
    snap = converged(CONFIG, CONTROL)
    for path, value in snapshot.items():
        set_path(snap, path, value)
    return Snapshot.model_validate(snap)


def _rehash(**snapshot) -> list[str]:
    from gpufleet.plan.models import rehash_paths

    return rehash_paths(CONFIG, _snap(**snapshot), CONTROL)


def _model_changes(config=CONFIG, **snapshot):
    plan = plan_host(config, _snap(**snapshot), CONTROL)
    return plan, [(c.resource, c.action) for c in plan.of("model")]


def test_a_converged_host_hashes_nothing():
    assert _rehash() == []


def test_a_model_dated_ahead_of_its_stamp_is_hashed_once():
    assert _rehash(**{f"models.files[{MODEL_FILE}].mtime": 4_000_000_000}) == [MODEL_FILE]
    # hashed in this read already (--deep): not again
    assert (
        _rehash(
            **{
                f"models.files[{MODEL_FILE}].mtime": 4_000_000_000,
                f"models.files[{MODEL_FILE}].digest": "d" * 64,
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


def test_a_crash_loop_caught_between_two_restarts_hashes_the_model_once_answering_nothing():
    loading = {"compose.containers.llama.health": "starting", "health.llama.status": 503}
    assert _rehash(**loading, **{"compose.containers.llama.restarts": 3}) == [MODEL_FILE]
    # its twin: restarted once long ago, answering now
    assert _rehash(**{"compose.containers.llama.restarts": 1}) == []


def test_a_blob_is_named_by_its_etag_and_linked_relative_from_its_snapshot():
    assert FILE.blob == (
        "/opt/gpufleet/huggingface/hub/models--unsloth--gpt-oss-20b-GGUF/blobs/" + FILE.etag
    )
    assert FILE.link.endswith(f"/snapshots/{'c' * 40}/gpt-oss-20b-Q4_K_M.gguf")
    assert FILE.target == f"../../blobs/{FILE.etag}"
    nested = CachedFile("/h", "o/r", "c" * 40, "a/b/c.json", "1" * 40, 3)
    assert nested.target == f"../../../../blobs/{'1' * 40}" and nested.kind == "sha1"
    assert nested.lock == f"/h/hub/.locks/models--o--r/{'1' * 40}.lock"


def test_a_file_verified_where_gpufleet_kept_it_before_is_moved_not_downloaded():
    kept = {"size": FILE.size, "mtime": 100, "stamp": FILE.stamp_text, "stamp_mtime": 101}
    plan, changes = _model_changes(
        **{f"models.files[{MODEL_FILE}]": None, f"models.legacy[{LEGACY}]": kept}
    )
    assert changes == [(MODEL_FILE, "move into the Hub cache")]
    assert plan.fetches == {} and plan.moves[MODEL_FILE].legacy == LEGACY
    # its twin: the old file is not verified (its stamp names other bytes): downloaded
    other = {**kept, "stamp": f"{'0' * 64} {FILE.size}"}
    plan, changes = _model_changes(
        **{f"models.files[{MODEL_FILE}]": None, f"models.legacy[{LEGACY}]": other}
    )
    assert changes == [(MODEL_FILE, "fetch and verify")] and plan.moves == {}


def test_a_snapshot_link_gone_is_linked_again_without_a_download():
    plan, changes = _model_changes(**{f"models.links[{FILE.link}]": None})
    assert changes == [(FILE.snapshot_dir, "link the snapshot")]
    assert plan.fetches == {} and plan.snapshots[FILE.snapshot_dir].files[0] == FILE
    # a link to another blob (a tool rewrote it) is as wrong as none
    _, changes = _model_changes(**{f"models.links[{FILE.link}]": "../../blobs/" + "0" * 64})
    assert changes == [(FILE.snapshot_dir, "link the snapshot")]


def test_a_branch_revision_writes_its_ref_and_a_commit_writes_none():
    config = config_for("spark", patch={"models.gpt-oss-20b.revision": "main"})
    control = control_for(config)
    snap = converged(config, control)
    ref = "/opt/gpufleet/huggingface/hub/models--unsloth--gpt-oss-20b-GGUF/refs/main"
    assert snap["models"]["refs"] == {ref: "c" * 40}
    assert plan_host(config, Snapshot.model_validate(snap), control).of("model") == []
    set_path(snap, f"models.refs[{ref}]", "d" * 40)  # main moved by another tool
    plan = plan_host(config, Snapshot.model_validate(snap), control)
    assert [c.action for c in plan.of("model")] == ["link the snapshot"]
    assert plan.snapshots[FILE.snapshot_dir].ref == ref
    assert plan.of("model")[0].reason == f"refs/main is not {'c' * 12}"


def test_pruning_removes_only_snapshots_gpufleet_placed_that_nothing_uses():
    old = "models--ggml-org--gpt-oss-120b-GGUF/" + "d" * 40
    other = "models--someone--else/" + "e" * 40  # `hf download` placed it
    keep = CONFIG.model_copy(update={"models_keep_unused": False})
    placed = [f"models--unsloth--gpt-oss-20b-GGUF/{'c' * 40}", old]
    snapshot = {"models.placed": placed, "models.snapshots": [*placed, other]}
    _, changes = _model_changes(keep, **snapshot)
    gone = f"/opt/gpufleet/huggingface/hub/models--ggml-org--gpt-oss-120b-GGUF/snapshots/{'d' * 40}"
    assert changes == [(gone, "remove, with the blobs only it linked")]
    # kept by a release: stays; the name a host printed that is no snapshot key: never a path
    _, changes = _model_changes(keep, **snapshot, **{"state.kept_models": [old]})
    assert changes == []
    forged = {"models.placed": [placed[0], "models--a--b/../../../etc"]}
    assert _model_changes(keep, **forged)[1] == []


def test_only_the_bytes_still_missing_count_against_the_disk():
    half = FILE.size // 2
    snap = _snap(**{f"models.files[{MODEL_FILE}]": None, f"models.incomplete[{MODEL_FILE}]": half})
    fetch = ModelFetch(model="gpt-oss-20b", file=FILE, url="u")
    free = snap.identity.host.model_copy(update={"disk_free_bytes": FILE.size - half})
    snap = snap.model_copy(update={"identity": snap.identity.model_copy(update={"host": free})})
    assert space_refusal([fetch], snap) is None
    free = free.model_copy(update={"disk_free_bytes": FILE.size - half - 1})
    snap = snap.model_copy(update={"identity": snap.identity.model_copy(update={"host": free})})
    assert space_refusal([fetch], snap) is not None


def test_a_stamp_refresh_dates_the_stamp_with_the_blob(tmp_path, monkeypatch):
    import os
    import subprocess
    import time

    from deploys.models import stamp_script
    from facts.modelfiles import ModelFiles

    blob = CachedFile(str(tmp_path), "o/r", "c" * 40, "m.gguf", "a" * 64, 10)
    monkeypatch.setattr(CachedFile, "stamp", property(lambda f: str(tmp_path / "stamp" / f.etag)))
    os.makedirs(os.path.dirname(blob.blob))
    with open(blob.blob, "wb") as out:
        out.write(b"x" * 10)
    ahead = time.time() + 86400
    os.utime(blob.blob, (ahead, ahead))
    ran = subprocess.run(
        ["sh", "-c", stamp_script(blob)], capture_output=True, text=True, check=False
    )
    assert ran.returncode == 0, ran.stderr
    fact = ModelFiles()
    entries = [(blob.blob, blob.stamp, blob.link, "")]
    out = subprocess.run(
        ["sh", "-c", str(fact.command(str(tmp_path / "hub"), entries))],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    state = fact.process(out.splitlines()).files[blob.blob]
    assert unverified_reason(state, etag="a" * 64, size=10) is None  # the next run: verified


def test_a_snapshot_gpufleet_has_no_record_of_is_recorded_so_pruning_may_take_it_later():
    key = f"models--unsloth--gpt-oss-20b-GGUF/{'c' * 40}"
    plan, changes = _model_changes(**{"models.placed": []})
    assert changes == [(FILE.snapshot_dir, "link the snapshot")]
    assert plan.of("model")[0].reason == "not recorded as placed by gpufleet"
    assert plan.snapshots[FILE.snapshot_dir].placed.endswith(f"/placed/{key}")
    assert _model_changes(**{"models.placed": [key]})[1] == []  # its twin: recorded
