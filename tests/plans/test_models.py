"""The ``model`` step on its own (``gpufleet.plan.models``): verification, and the files
hashed again in the same run; its fixtures are ``tests/plans/model/``."""

from __future__ import annotations

import pytest

from gpufleet.core.snapshot import ModelFileState, Snapshot
from gpufleet.plan.models import unverified_reason
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


def test_a_crash_loop_caught_between_two_restarts_hashes_the_model_once_answering_nothing():
    loading = {"compose.containers.llama.health": "starting", "health.llama.status": 503}
    assert _rehash(**loading, **{"compose.containers.llama.restarts": 3}) == [MODEL_FILE]
    # its twin: restarted once long ago, answering now
    assert _rehash(**{"compose.containers.llama.restarts": 1}) == []


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
