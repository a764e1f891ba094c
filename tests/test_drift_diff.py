"""`gpufleet drift --diff`: how a file differs, secrets never shown; decisions unchanged."""

from __future__ import annotations

import json

from gpufleet.core.wire import ChangeRecord, Op
from gpufleet.fleet import diffs
from tests.test_sim import sim  # noqa: F401 - the simulated fleet fixture


def test_a_compose_diff_is_unified_and_masks_secret_values():
    found = "services:\n  llama:\n    command: --ctx 4096 --key sk-secret-1\n"
    declared = "services:\n  llama:\n    command: --ctx 8192 --key sk-secret-1\n"
    d = diffs.compose_diff(found, declared, "/opt/gpufleet/compose.yaml", {"K": "sk-secret-1"})
    assert d.kind == "compose"
    assert "-    command: --ctx 4096 --key <secret>\n" in d.diff
    assert "+    command: --ctx 8192 --key <secret>\n" in d.diff
    assert "sk-secret-1" not in d.diff
    assert d.diff.startswith("--- /opt/gpufleet/compose.yaml (on the host)\n")
    # the twin: the same text is no diff at all
    assert diffs.compose_diff(declared, declared, "/x", {}) is None


def test_an_absent_compose_file_is_all_added():
    d = diffs.compose_diff(None, "a\nb\n", "/c.yaml", {})
    assert "+a\n+b\n" in d.diff


def test_an_env_diff_shows_key_names_only():
    d = diffs.env_diff("HF_TOKEN\nOLD_KEY\n", ["HF_TOKEN", "LLAMA_API_KEY"], "/opt/gpufleet/.env")
    assert "-OLD_KEY\n" in d.diff and "+LLAMA_API_KEY\n" in d.diff and "=" not in d.diff
    assert diffs.env_diff("B\nA\n", ["A", "B"], "/e") is None  # same names, any order


def test_the_host_prints_env_names_not_values():
    import subprocess

    env = "HF_TOKEN='hf_value'\n# secret X\nPLAIN='1'\n"
    out = subprocess.run(
        ["sh", "-c", diffs.ENV_NAMES_COMMAND + "/dev/stdin"],
        input=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["HF_TOKEN", "PLAIN"] and "hf_value" not in out


def test_image_changes_need_no_read():
    pull = ChangeRecord(
        step="image",
        op=Op.PULL,
        resource="vllm",
        reason="image differs",
        action="pull",
        expected="sha256:new",
        found="sha256:old",
    )
    env = ChangeRecord(
        step="env", op=Op.WRITE, resource="/opt/gpufleet/.env", reason="mode", action="write"
    )
    (d,) = diffs.image_diffs([pull, env])
    assert (d.kind, d.resource, d.diff) == ("image", "vllm", "- sha256:old\n+ sha256:new\n")
    assert diffs.image_diffs([env]) == []


def test_diffs_travel_typed_through_a_file(tmp_path):
    d = diffs.compose_diff("a\n", "b\n", "/c", {})
    diffs.write(str(tmp_path), "spark-01", [d])
    assert diffs.read(str(tmp_path), "spark-01") == [d]
    assert diffs.read(str(tmp_path), "other") == []
    assert json.loads((tmp_path / "spark-01.json").read_text())[0]["kind"] == "compose"


def test_on_a_simulated_host_a_hand_edited_compose_file_is_shown_as_a_diff(sim):  # noqa: F811
    """Real SSH, the real deploys/diff.py: the edited host gets a compose diff in the JSON,
    the others none, and the verdicts are those of a plain drift."""
    from tests.test_sim import drift

    folder, fleet = sim
    host = fleet.hosts[0]
    compose = next(p for p in host.files if p.endswith("compose.yaml"))
    saved = host.files[compose]
    host.files[compose] = "0" * 64 + "\t644 root root"
    try:
        done = drift(folder, "--diff", "--json")
    finally:
        host.files[compose] = saved
    assert done.returncode == 2, done.stderr
    hosts = {h["host"]: h for h in json.loads(done.stdout)["hosts"]}
    changed = hosts.pop(host.name)
    assert [d["kind"] for d in changed["diffs"]] == ["compose"], changed
    assert changed["diffs"][0]["resource"] == compose
    # the simulated host cannot print the file's text (it answers hashes only): all is added
    assert f'+name: "gpufleet-{host.group}"\n' in changed["diffs"][0]["diff"]
    assert all(h["status"] == "in-sync" and h["diffs"] == [] for h in hosts.values())


def test_a_dockerfile_diff_is_unified_masked_and_no_image_line():
    d = diffs.dockerfile_diff(
        "FROM base\nARG CUDA=12.8\n", "FROM base\nARG CUDA=13.0\n", "/b/llama/Dockerfile", {}
    )
    assert (d.kind, d.resource) == ("dockerfile", "/b/llama/Dockerfile")
    assert "-ARG CUDA=12.8\n+ARG CUDA=13.0\n" in d.diff
    assert diffs.dockerfile_diff("same\n", "same\n", "/b/Dockerfile", {}) is None
    masked = diffs.dockerfile_diff("", "ARG T=tok-1\n", "/b/Dockerfile", {"HF_TOKEN": "tok-1"})
    assert "tok-1" not in masked.diff and "<secret>" in masked.diff
    write = ChangeRecord(step="build", op=Op.WRITE, resource="/b/llama/Dockerfile",
                         reason="edited", action="write", expected="aa", found="bb")  # fmt: skip
    assert diffs.image_diffs([write]) == []


def test_on_a_simulated_host_a_hand_edited_dockerfile_is_shown_as_a_diff(sim):  # noqa: F811
    """The build context's Dockerfile edited on one host: its drift --diff carries the
    Dockerfile's unified diff, and the image it built stays (no image line)."""
    from tests.test_sim import drift

    folder, fleet = sim
    host, path = next((h, p) for h in fleet.hosts for p in h.files if p.endswith("/Dockerfile"))
    saved = host.files[path]
    host.files[path] = "0" * 64 + "\t644 root root"
    try:
        done = drift(folder, "--diff", "--json")
    finally:
        host.files[path] = saved
    assert done.returncode == 2, done.stderr
    changed = next(h for h in json.loads(done.stdout)["hosts"] if h["host"] == host.name)
    assert [d["kind"] for d in changed["diffs"]] == ["dockerfile"], changed
    assert changed["diffs"][0]["resource"] == path
    # the simulated host answers hashes only: the rendered Dockerfile is all added
    assert "+FROM " in changed["diffs"][0]["diff"]
