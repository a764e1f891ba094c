"""gpufleet's state on a host, read defensively: release ids checked against their directory
and the manifest's own id, history lines that are not ids reported and never used in a path,
and pruning that removes only checked ids under the releases directory."""

from __future__ import annotations

import json
import re

import pytest
from pyinfra.api.exceptions import FactProcessError

from deploys.release import current_script, history_lines, prune_lines, record_script
from facts._sections import MARKER, split_sections
from facts.statedir import ReleaseRecord, from_sections
from gpufleet.core.release import _canonical_id, read_manifest
from gpufleet.core.snapshot import Snapshot
from gpufleet.plan.host import plan_host
from gpufleet.plan.release import next_history
from tests.support.plans import config_for, control_for, converged

IDS = ("a1b2c3d4e5f6", "b1b2c3d4e5f6", "c1b2c3d4e5f6", "d1b2c3d4e5f6", "e1b2c3d4e5f6")


def _state(history: list[str], current: str = "e1b2c3d4e5f6") -> dict:
    lines = [
        f"{MARKER}state.current",
        current,
        "",
        f"{MARKER}state.history",
        *history,
        "",
        f"{MARKER}state.models",
    ]
    return from_sections(split_sections(lines)).model_dump(mode="json")


def _plan(state: dict, **overrides):
    config = config_for("spark", **overrides)
    control = control_for(config)
    snap = converged(config, control)
    snap["state"] = state
    return config, plan_host(config, Snapshot.model_validate(snap), control)


def test_a_tampered_history_line_is_reported_and_never_reaches_a_path():
    state = _state([IDS[0], "../../../../tmp/victim", *IDS[1:]])
    assert state["releases"] == list(IDS)
    config, plan = _plan(state)
    assert (
        "/var/lib/gpufleet/history line 2 is not a release id ('../../../../tmp/victim'): "
        "ignored; remove that line"
    ) in plan.warnings
    script = record_script(config, plan)
    assert "victim" not in script
    # releases_keep 5: the oldest leaves, by its checked id, under the releases directory only
    assert re.findall(r"rm -rf [^;]*", script) == [f'rm -rf -- "$d/releases/"{IDS[0]}']
    assert plan.history == (*IDS[1:], plan.release.id) and plan.pruned == (IDS[0],)


def test_an_untampered_history_prunes_nothing_while_under_the_limit():
    config, plan = _plan(_state(list(IDS[:2]), current=IDS[1]))
    assert plan.warnings == () and plan.pruned == ()
    assert "rm -rf" not in record_script(config, plan)
    assert plan.history == (*IDS[:2], plan.release.id)


def test_a_bad_current_file_is_reported_and_ignored():
    state = _state(list(IDS[:1]), current="$(reboot)")
    assert state["current"] is None
    assert state["problems"] == [
        "/var/lib/gpufleet/current line 1 is not a release id "
        "('$(reboot)'): ignored; remove that line"
    ]


def test_the_next_history_moves_the_release_to_the_end_and_keeps_the_newest():
    assert next_history(IDS[:3], IDS[0], 5) == ((IDS[1], IDS[2], IDS[0]), ())
    assert next_history(IDS, "f" * 12, 2) == ((IDS[4], "f" * 12), IDS[:4])


@pytest.mark.parametrize("bad", ["../x", "A1B2C3D4E5F6", "a1b2c3d4e5f", "a1b2c3d4e5f6\n", "*"])
def test_the_scripts_refuse_anything_but_a_release_id(bad):
    with pytest.raises(ValueError, match="not a release id"):
        prune_lines((bad,))
    with pytest.raises(ValueError, match="not a release id"):
        history_lines(IDS[0], (bad,))
    with pytest.raises(ValueError, match="not a release id"):
        current_script(bad, ())
    with pytest.raises(ValueError, match="not a release id"):
        ReleaseRecord().command(bad)


# --- manifests ------------------------------------------------------------------------------


def _release():
    config = config_for("spark")
    control = control_for(config)
    return plan_host(config, Snapshot.model_validate(converged(config, control)), control).release


def test_a_manifest_holds_its_id_and_reads_back_as_the_same_release():
    release = _release()
    text = release.manifest()
    assert json.loads(text)["id"] == release.id
    back = read_manifest(text, release_id=release.id, where="m")
    assert back.id == release.id and back.model_dump() == release.model_dump()


def test_a_manifest_with_fields_this_version_does_not_know_still_restores_by_its_id():
    release = _release()
    data = json.loads(release.manifest())
    data["signed_by"] = "a later gpufleet"
    data["services"]["llama"]["cpu_set"] = "0-3"
    data["id"] = "0123456789ab"  # a later version's id, over fields this one does not know
    back = read_manifest(json.dumps(data), release_id="0123456789ab", where="m")
    assert (
        back.id == "0123456789ab"
        and back.services["llama"].image == release.services["llama"].image
    )


def test_an_older_manifest_without_an_id_is_named_by_its_own_json_not_todays_defaults():
    data = json.loads(_release().manifest())
    del data["id"]
    del data["services"]["llama"]["image_id"]  # written before the field (default None) existed
    rid = _canonical_id(data)
    back = read_manifest(json.dumps(data), release_id=rid, where="m")
    assert back.id == rid and back.services["llama"].image_id is None


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (
            {"id": "0123456789ab"},
            "m is release 0123456789ab, not {rid}: the directory or the "
            "manifest was changed by hand",
        ),
        ({"id": "../../etc"}, "m holds an id that is not a release id: '../../etc'"),
        ({"toolkit": ["no"]}, "m is not a release manifest (toolkit)"),
    ],
)
def test_a_manifest_that_names_another_release_or_none_is_refused_in_one_line(edit, said):
    release = _release()
    data = {**json.loads(release.manifest()), **edit}
    with pytest.raises(ValueError) as exc:
        read_manifest(json.dumps(data), release_id=release.id, where="m")
    assert str(exc.value) == said.format(rid=release.id)


def test_a_kept_release_read_from_the_host_is_checked_against_its_directory():
    release = _release()
    fact = ReleaseRecord()
    command = str(fact.command(release.id))
    assert f"release.manifest id={release.id}" in command
    images = "llama\tgpufleet/llama.cpp:spark\tsha256:" + "b" * 64
    out = [
        f"{MARKER}release.manifest id={release.id}",
        *release.manifest().splitlines(),
        f"{MARKER}release.images",
        images,
    ]
    assert fact.process(out)["manifest"].id == release.id
    moved = [f"{MARKER}release.manifest id={'f' * 12}", *out[1:]]
    with pytest.raises(FactProcessError, match=f"is release {release.id}, not ffffffffffff"):
        fact.process(moved)
