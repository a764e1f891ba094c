"""Faults in gpufleet's own state and in what a service depends on, injected on the converged
sandbox: a rotated API key and a rollback, a tampered history line, a model dated ahead of the
host's clock, a container started by hand in gpufleet's compose project, a model corrupted in
place under a restarted server, a stopped Docker engine.

Each test checks what the operator sees and what the host holds after, and that the run after
the repair changes nothing. Jetson (its image received, so no build) takes every fault.
"""

from __future__ import annotations

import functools
import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sandbox.conftest import ROOT, pyinfra, stored
from tests.support.inventories import variant

pytestmark = pytest.mark.sandbox

GPUFLEET = str(Path(sys.executable).with_name("gpufleet"))
JETSON = "sandbox-jetson"
PORT = 11434
PROJECT = "gpufleet-jetson"
STATE = "/var/lib/gpufleet"
LLAMA = "docker ps -q --no-trunc --filter label=com.docker.compose.service=llama"
SENT = "--> gpufleet: images sent from the control machine: "


@functools.cache
def blob():
    """Jetson's model in its Hub cache (read from the sandbox's state, once it is up)."""
    return stored("sandbox-jetson", "llama-3.2-3b")


def gpufleet(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [GPUFLEET, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def output(run) -> str:
    return run.stdout + run.stderr


def chat_status(host, key: str | None = None) -> int:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    auth = f"-H 'Authorization: Bearer {key}' " if key else ""
    return int(
        host.check_output(
            f"curl -s -o /dev/null -w '%{{http_code}}' {auth}-H 'Content-Type: application/json' "
            f"-d '{body}' http://127.0.0.1:{PORT}/v1/chat/completions"
        )
    )


def converge(inventory: str) -> None:
    """A converge of jetson with another inventory (must succeed)."""
    pyinfra_bin = str(Path(sys.executable).with_name("pyinfra"))
    args = [pyinfra_bin, "-y", inventory, "deploys/fleet.py", "--limit", JETSON]
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]


def quiet(*args: str) -> None:
    """A converge of jetson that changes nothing."""
    run = pyinfra("--limit", JETSON, "--json", *args)
    assert run.rc == 0 and run.changed() == {}, (run.changed(), run.stderr[-2000:])


def model_sha(sandbox) -> str:
    repo = sandbox["hf"]["repos"]["gpufleet-sandbox/tiny-llama-GGUF"]
    return repo["files"]["tiny-llama-Q8_0.gguf"]["sha256"]


@pytest.fixture(scope="module")
def converged(sandbox, hosts):
    """Jetson converged on the sandbox's own data, and left so after each test."""
    run = pyinfra("--limit", JETSON)
    assert run.rc == 0, run.stderr[-3000:]
    yield hosts[JETSON]
    run = pyinfra("--limit", JETSON)
    assert run.rc == 0, run.stderr[-3000:]


# --- secrets ---------------------------------------------------------------------------------


def test_a_rotated_key_stays_rotated_after_a_rollback(converged, tmp_path):
    host = converged
    old, new = "sk-" + secrets.token_hex(16), "sk-" + secrets.token_hex(16)
    keyfile = tmp_path / "llama.key"
    keyfile.write_text(old + "\n")
    keyfile.chmod(0o600)
    keyed = {
        "secrets.LLAMA_API_KEY": f"file:{keyfile}",
        "services.llama.api_key_secret": "LLAMA_API_KEY",
    }
    first = variant(tmp_path / "first.py", {"jetson": keyed})
    second = variant(tmp_path / "second.py", {"jetson": {**keyed, "services.llama.ctx_size": 2048}})
    for inventory in (first, second):
        converge(inventory)
    releases = host.check_output(f"cat {STATE}/history").split()
    assert chat_status(host, old) == 200

    # the key is rotated (the old one revoked) and the host converged on it: the same release
    keyfile.write_text(new + "\n")
    converge(second)
    assert host.check_output(f"cat {STATE}/history").split() == releases
    assert chat_status(host, new) == 200 and chat_status(host, old) == 401

    back = gpufleet("rollback", second, "--limit", JETSON, "--to", "previous")
    assert back.returncode == 0, output(back)
    assert host.check_output(f"cat {STATE}/current") == releases[-2]
    assert chat_status(host, new) == 200  # the release before, with today's key
    assert chat_status(host, old) == 401  # the revoked key is not live again
    # neither key is in any file of gpufleet's state, nor in any output
    for key in (old, new):
        assert host.run(f"grep -rlsF '{key}' {STATE}").stdout.strip() == ""
        assert key not in output(back)


# --- state that cannot be turned against the host ------------------------------------------


def test_a_tampered_history_line_is_ignored_and_reported(converged):
    host = converged
    host.check_output("mkdir -p /tmp/victim && touch /tmp/victim/keep")
    line = "../../../../tmp/victim"
    host.check_output(f"sed -i '1i {line}' {STATE}/history && rm -f {STATE}/current")
    # a new record (no current) with one release kept: every other history entry is pruned
    run = pyinfra("--limit", JETSON, "--data", "releases_keep=1")
    assert run.rc == 0, output(run)[-3000:]
    assert (
        f"{STATE}/history line 1 is not a release id ('{line}'): ignored; remove that line"
        in output(run)
    ), output(run)[-3000:]
    assert host.file("/tmp/victim/keep").exists  # never removed
    history = host.check_output(f"cat {STATE}/history").split()
    assert history == [host.check_output(f"cat {STATE}/current")]  # rewritten: ids only
    kept = host.check_output(f"ls {STATE}/releases").split()
    # the history's releases stay; a directory the history never listed is not pruned (it is
    # left alone rather than judged from a file that was tampered with)
    assert set(history) <= set(kept) and all(len(k) == 12 for k in kept), kept
    again = pyinfra("--limit", JETSON, "--json", "--data", "releases_keep=1")
    assert again.rc == 0 and again.changed() == {}
    assert "is not a release id" not in output(again)
    host.check_output("rm -rf /tmp/victim")


# --- what a service depends on ---------------------------------------------------------------


def test_three_converges_with_a_future_dated_model_give_one_container(converged):
    host = converged
    server = host.check_output(LLAMA)
    host.check_output(f"touch -d '+1 day' {blob().blob}")  # the clock stepped back a day since
    first = pyinfra("--limit", JETSON)
    assert first.rc == 0, output(first)[-3000:]
    assert host.file(blob().stamp).mtime >= host.file(blob().blob).mtime
    quiet()
    quiet()
    assert host.check_output(LLAMA) == server  # never recreated
    host.check_output(f"touch {blob().blob} {blob().stamp}")  # back to today's clock


def test_an_orphan_in_gpufleets_project_is_removed_and_drift_is_zero(converged):
    host = converged
    image = host.check_output(f"docker inspect --format '{{{{.Config.Image}}}}' $({LLAMA})")
    orphan = host.check_output(
        f"docker create --label com.docker.compose.project={PROJECT} "
        f"--label com.docker.compose.service=handmade {image}"
    )
    drift = gpufleet("drift", "inventory/sandbox.py", "--limit", JETSON)
    assert drift.returncode == 2, output(drift)
    assert "  - recreate handmade: no longer declared -> remove" in drift.stdout
    run = pyinfra("--limit", JETSON)
    assert run.rc == 0, output(run)[-3000:]
    assert host.run(f"docker inspect {orphan}").rc != 0  # gone
    drift = gpufleet("drift", "inventory/sandbox.py", "--limit", JETSON)
    assert drift.returncode == 0, output(drift)


def test_a_model_corrupted_in_place_under_a_restarted_server_is_repaired_by_one_converge(
    converged, sandbox
):
    host = converged
    size = host.file(blob().blob).size
    # bytes that are no GGUF, the file's mtime put back: its stamp still looks right
    host.check_output(
        f"f={blob().blob}; m=$(stat -c %Y $f); head -c {size} /dev/urandom > $f; touch -d @$m $f"
    )
    cid = host.check_output(LLAMA)
    host.check_output(f"docker restart {cid}")  # it cannot load its model now: a crash loop
    host.check_output(
        "for i in $(seq 60); do [ \"$(docker inspect --format '{{.RestartCount}}' "
        f'{cid})" -ge 1 ] && exit 0; sleep 0.5; done; exit 1'
    )
    # left crash-looping: a read finds it restarting, exited, or between two restarts looking
    # like a server still loading (Docker's restart count tells those apart); each names the file
    for _ in range(3):
        drift = gpufleet("drift", "inventory/sandbox.py", "--limit", JETSON)
        assert drift.returncode == 2, output(drift)
        named = f"  - model {blob().blob}: {blob().repo}/{blob().path}: hash "  # the file, named
        assert named in drift.stdout, drift.stdout
        assert f"its model file is replaced (blob {blob().etag[:12]})" in drift.stdout, drift.stdout
    run = pyinfra("--limit", JETSON)
    assert run.rc == 0, output(run)[-3000:]
    assert host.file(blob().blob).sha256sum == model_sha(sandbox)
    assert chat_status(host) == 200
    quiet()


def test_a_stopped_engine_is_started_without_sending_the_image_again(converged):
    host = converged
    tagged = (
        "docker image inspect --format '{{.Id}} {{.Metadata.LastTagTime}}' $(docker inspect "
        f"--format '{{{{.Config.Image}}}}' $({LLAMA}))"
    )
    before = host.check_output(tagged)
    host.check_output("systemctl stop docker.socket docker.service")
    drift = gpufleet("drift", "inventory/sandbox.py", "--limit", JETSON)
    assert drift.returncode == 2, output(drift)
    assert f"{JETSON}: 1 to change" in drift.stdout and "  - engine docker.service:" in drift.stdout
    run = pyinfra("--limit", JETSON)
    assert run.rc == 0, output(run)[-3000:]
    assert host.service("docker").is_running
    # the engine brought its containers back (unless-stopped): let the server load its model
    host.check_output(
        f"curl -fsS --retry 30 --retry-connrefused --retry-delay 1 http://127.0.0.1:{PORT}/health"
    )
    sent = [line for line in run.stderr.splitlines() if SENT in line]
    assert not any(JETSON in line for line in sent), sent  # no byte of the image sent again
    assert host.check_output(tagged) == before  # the same image, never loaded again
    assert chat_status(host) == 200
    quiet()
