"""Faults injected for real during a converge: a Hub or mirror that answers 5xx, 429, resets or
stalls, corrupt bytes, a full filesystem, a held apt lock, a server that crash-loops, a dropped
SSH connection, a Docker engine stopped between steps.

Each test checks what the user saw (the line itself), what the host holds after, and that the
next run converges and the one after it changes nothing. Jetson (its image received, so no
build) takes every fault; rtx5090 is the peer that must finish when jetson's connection drops.
"""

from __future__ import annotations

import functools
import re
import subprocess
import time
import uuid

import pytest

from tests.sandbox.conftest import PYINFRA, ROOT, pyinfra, stored

pytestmark = pytest.mark.sandbox

JETSON, RTX = "sandbox-jetson", "sandbox-rtx5090"
LLAMA = "docker ps -q --no-trunc --filter label=com.docker.compose.service=llama"
CHAT = (
    "curl -fsS -H 'Content-Type: application/json' "
    """-d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":1}' """
    "http://127.0.0.1:{port}/v1/chat/completions"
)
PORTS = {JETSON: 11434, RTX: 8000}


@functools.cache
def blob():
    """Jetson's model in its Hub cache (read from the sandbox's state, once it is up)."""
    return stored(JETSON, "llama-3.2-3b")


@pytest.fixture(scope="module")
def converged(sandbox, hosts):
    """Jetson converged (it receives its image: no build)."""
    run = pyinfra("--limit", JETSON)
    assert run.rc == 0, run.stderr[-3000:]
    return sandbox


@pytest.fixture(scope="module")
def with_rtx(converged):
    """rtx5090 converged too (the demo fleet's tests built its image already)."""
    run = pyinfra("--limit", RTX)
    assert run.rc == 0, run.stderr[-3000:]
    return converged


def endpoint(sandbox, path: str) -> str:
    return f"hf_endpoint={sandbox['mirror']['internal_url']}/{path}"


def output(run) -> str:
    return run.stdout + run.stderr


def answers(host, name: str) -> bool:
    return '"choices"' in host.check_output(CHAT.replace("{port}", str(PORTS[name])))


def recovers(hosts, *names: str) -> None:
    """The next run converges and answers; the one after it changes nothing."""
    limits = [a for n in names for a in ("--limit", n)]
    again = pyinfra(*limits)
    assert again.rc == 0, again.stderr[-3000:]
    for name in names:
        assert answers(hosts[name], name)
    quiet = pyinfra(*limits, "--json")
    assert quiet.rc == 0 and quiet.changed() == {}, quiet.changed()


def model_sha(sandbox) -> str:
    repo = sandbox["hf"]["repos"]["gpufleet-sandbox/tiny-llama-GGUF"]
    return repo["files"]["tiny-llama-Q8_0.gguf"]["sha256"]


def drop_model(host) -> str:
    """Remove jetson's model (its server keeps the open file) and return the server's id."""
    host.check_output(f"rm -f {blob().blob} {blob().stamp} {blob().incomplete}")
    return host.check_output(LLAMA)


def slow_converge(sandbox, *names: str) -> subprocess.Popen:
    """A converge of ``names`` in the background, its downloads at 16 KiB/s (the 120 KiB
    model takes about 7 s: time to do something to the host meanwhile)."""
    limits = [a for n in names for a in ("--limit", n)]
    return subprocess.Popen(
        [PYINFRA, "-y", "inventory/sandbox.py", "deploys/fleet.py", *limits,
         "--data", endpoint(sandbox, "slow/16384")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_partial(host, converge: subprocess.Popen, at_least: int) -> None:
    """Until the download has written ``at_least`` bytes."""
    deadline = time.monotonic() + 120
    while True:
        partial = host.file(blob().incomplete)
        if partial.exists and partial.size >= at_least:
            return
        assert time.monotonic() < deadline and converge.poll() is None, "no download began"
        time.sleep(0.2)


# --- the Hub or mirror on a bad minute ------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("500x2", "HTTP 500 from "),
        ("429x1", "HTTP 429 from "),
        ("resetx1", "the connection was reset (curl exit 56) by "),
        ("stallx1", "stalled: under 1 KiB/s for 5s from "),
    ],
)
def test_a_passing_fault_is_retried_and_the_run_converges(converged, hosts, fault, said):
    host = hosts[JETSON]
    drop_model(host)
    spec = f"fault/{fault}.{uuid.uuid4().hex[:8]}"
    run = pyinfra("--limit", JETSON, "--data", endpoint(converged, spec),
                  "--data", "models_stall_seconds=5")  # fmt: skip
    assert run.rc == 0, output(run)[-3000:]
    # shown live at the default verbosity, with the host's name
    assert re.search(rf"{JETSON}.*fetch: tiny-llama-Q8_0.gguf: {re.escape(said)}http://\S+"
                     rf"/{re.escape(spec)}/\S+; trying again in 1s \(2 of 4\)",
                     output(run)), output(run)[-3000:]  # fmt: skip
    assert host.file(blob().blob).sha256sum == model_sha(converged)
    assert answers(host, JETSON)
    recovers(hosts, JETSON)  # (back on the usual endpoint: a new release is recorded, no more)


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("500", r"download failed after 2 attempts: HTTP 500 from http://\S+/fault/500/\S+; "
                "run again to resume"),
        ("404", r"download failed: HTTP 404 from http://\S+/fault/404/\S+; run again to resume"),
        ("corrupt", r"sha256 is [0-9a-f]{64}, expected [0-9a-f]{64} \(from http://\S+/fault/"
                    r"corrupt/\S+\); removed the corrupt download"),
    ],
)  # fmt: skip
def test_a_lasting_fault_fails_the_host_in_one_line_and_moves_nothing(converged, hosts, fault,
                                                                      said):  # fmt: skip
    host = hosts[JETSON]
    server = drop_model(host)
    run = pyinfra("--limit", JETSON, "--data", endpoint(converged, f"fault/{fault}"),
                  "--data", "models_download_attempts=2")  # fmt: skip
    assert run.rc != 0
    assert re.search(rf"{JETSON}.*tiny-llama-Q8_0.gguf: {said}", output(run)), output(run)[-3000:]
    assert "Traceback" not in output(run) and "Unexpected error" not in output(run)
    # and the run's last word says which host failed, and why
    assert re.fullmatch(rf"--> gpufleet: {JETSON} failed at 'Models \| Fetch model llama-3.2-3b: "
                        rf"tiny-llama-Q8_0.gguf \(0 MiB\)': tiny-llama-Q8_0.gguf: {said}",
                        run.stderr.strip().splitlines()[-1]), run.stderr[-1000:]  # fmt: skip
    assert not host.file(blob().blob).exists and not host.file(blob().incomplete).exists
    assert host.check_output(LLAMA) == server  # never recreated onto a missing or partial file
    recovers(hosts, JETSON)
    assert host.file(blob().blob).sha256sum == model_sha(converged)


# --- the host's own troubles ----------------------------------------------------------------


def test_a_filesystem_full_during_the_download_says_so_and_resumes(converged, hosts):
    host = hosts[JETSON]
    server = host.check_output(LLAMA)
    # a small filesystem of its own over the model's directory (hiding the file there)
    host.check_output(f"mount -t tmpfs -o size=192k gpufleet-test-full {blob().blobs_dir}")
    try:
        converge = slow_converge(converged, JETSON)
        wait_partial(host, converge, 24 * 1024)
        host.run(f"dd if=/dev/zero of={blob().blobs_dir}/filler bs=4k")  # until the disk is full
        said, _ = converge.communicate(timeout=120)
        assert converge.returncode != 0
        partial = re.escape(blob().incomplete)
        assert re.search(rf"{JETSON}.*tiny-llama-Q8_0.gguf: no space left in {blob().blobs_dir}: "
                         r"\d+\.\d KiB more needed, \d+\.\d KiB free; kept \d+\.\d KiB in "
                         rf"{partial} to resume", said), said[-3000:]  # fmt: skip
        assert not host.file(blob().blob).exists
        assert 0 < host.file(blob().incomplete).size < 123232
        assert host.check_output(LLAMA) == server
        host.check_output(f"rm {blob().blobs_dir}/filler")
        resumed = pyinfra("--limit", JETSON)
        assert resumed.rc == 0, output(resumed)[-3000:]
        assert "tiny-llama-Q8_0.gguf: resuming at" in output(resumed)
        assert host.file(blob().blob).sha256sum == model_sha(converged)
        quiet = pyinfra("--limit", JETSON, "--json")
        assert quiet.rc == 0 and quiet.changed() == {}
    finally:
        host.run(f"umount {blob().blobs_dir}")
    recovers(hosts, JETSON)  # the file under the mount, verified before, serves again


def hold_lock(host, seconds: float) -> int:
    """Take dpkg's frontend lock as apt does (a POSIX record lock) for ``seconds``; its pid."""
    script = (
        "import fcntl,time;f=open('/var/lib/dpkg/lock-frontend','w');"
        f"fcntl.lockf(f,fcntl.LOCK_EX);open('/tmp/held','w').close();time.sleep({seconds})"
    )
    host.check_output(f'rm -f /tmp/held; nohup python3 -c "{script}" >/dev/null 2>&1 & echo $!')
    deadline = time.monotonic() + 10
    while not host.file("/tmp/held").exists:
        assert time.monotonic() < deadline, "the lock was never taken"
        time.sleep(0.1)
    return int(host.check_output("pgrep -n -f '[f]cntl.lockf'"))  # fmt: skip


def test_a_held_apt_lock_is_waited_for_then_named(converged, hosts):
    host = hosts[JETSON]
    host.check_output(
        "DEBIAN_FRONTEND=noninteractive apt-get remove -y -q nvidia-container-toolkit"
    )
    holder = hold_lock(host, 60)
    try:
        started = time.monotonic()
        run = pyinfra("--limit", JETSON, "--data", "apt_lock_seconds=6")
        took = time.monotonic() - started
        assert run.rc != 0
        assert (f"/var/lib/dpkg/lock-frontend is held by process {holder} (python3) after "
                "waiting 6s: let it finish (or stop it), then run again") in output(run), \
            output(run)[-3000:]  # fmt: skip
        assert took < 60  # bounded: it did not wait for the holder to finish
        assert not host.package("nvidia-container-toolkit").is_installed
    finally:
        host.run(f"kill {holder}")
    # a lock released within the bound is simply waited for
    holder = hold_lock(host, 4)
    started = time.monotonic()
    run = pyinfra("--limit", JETSON)
    assert run.rc == 0, output(run)[-3000:]
    assert time.monotonic() - started > 3
    assert host.package("nvidia-container-toolkit").is_installed
    recovers(hosts, JETSON)


def test_a_server_that_crash_loops_fails_its_gate_early_with_its_log(converged, hosts):
    host = hosts[JETSON]
    size = host.file(blob().blob).size
    # bytes that are no GGUF, with a stamp saying they were verified: the server cannot load them
    host.check_output(f"head -c {size} /dev/urandom > {blob().blob} && touch {blob().stamp}")
    host.check_output(f"docker rm -f $({LLAMA})")
    started = time.monotonic()
    run = pyinfra("--limit", JETSON)
    took = time.monotonic() - started
    assert run.rc != 0
    said = output(run)
    assert re.search(r"llama exited \(status \w+, exit code \d+, restarted \d+ times\) before it "
                     r"was healthy; its last log lines:", said), said[-3000:]  # fmt: skip
    assert re.search(r"(?i)gguf|magic|failed to load model", said), said[-3000:]
    assert took < 45  # its deadline is 60 s: it did not wait it out
    host.check_output(f"rm {blob().blob} {blob().stamp}")
    recovers(hosts, JETSON)


def session_of(host, pattern: str) -> int:
    """The sshd session process above the newest process matching ``pattern``."""
    pid = host.check_output(f"pgrep -n -f {pattern!r}")
    while True:
        parent, command = host.check_output(f"ps -o ppid=,args= -p {pid}").split(None, 1)
        if command.startswith("sshd:"):
            return int(pid)
        pid = parent.strip()
        assert pid not in ("0", "1"), "no sshd session above it"


def test_an_ssh_connection_dropped_mid_run_fails_that_host_alone(with_rtx, hosts):
    jetson, rtx = hosts[JETSON], hosts[RTX]
    drop_model(jetson)
    rtx_blob = stored(RTX, "qwen3-vl-30b-a3b")
    rtx.check_output(f"rm {rtx_blob.blob} {rtx_blob.stamp}")
    converge = slow_converge(with_rtx, JETSON, RTX)
    wait_partial(jetson, converge, 16 * 1024)
    jetson.run(f"kill -KILL {session_of(jetson, '[f]etch-model')}")
    said, _ = converge.communicate(timeout=300)
    assert converge.returncode != 0
    assert re.search(rf"{JETSON}.*Fetch model llama-3.2-3b.*: the SSH connection was lost",
                     said, re.S), said[-3000:]  # fmt: skip
    assert "Traceback" not in said
    # the other host finished its run: the model fetched, its server recreated and answering
    assert rtx.file(rtx_blob.stamp).exists and answers(rtx, RTX)
    assert not jetson.file(blob().blob).exists
    recovers(hosts, JETSON, RTX)


def test_docker_stopped_between_steps_fails_that_step_and_the_next_run_starts_it(converged, hosts):
    host = hosts[JETSON]
    drop_model(host)
    converge = slow_converge(converged, JETSON)
    wait_partial(host, converge, 1)
    host.check_output("systemctl stop docker.socket docker.service")
    said, _ = converge.communicate(timeout=300)
    assert converge.returncode != 0
    assert f"[{JETSON}]     Cannot connect to the Docker daemon at unix:///var/run/docker.sock" \
        in said, said[-3000:]  # fmt: skip
    assert "Traceback" not in said
    assert re.fullmatch(rf"--> gpufleet: {JETSON} failed at '[^']+': its output is above",
                        said.strip().splitlines()[-1]), said[-1000:]  # fmt: skip
    assert host.file(blob().stamp).exists  # the step before it finished
    recovers(hosts, JETSON)


def test_docker_killed_during_compose_up_and_the_next_run_converges(converged, hosts):
    host = hosts[JETSON]
    host.check_output(f"docker rm -f $({LLAMA})")  # the plan recreates it: compose up runs
    converge = subprocess.Popen(
        [PYINFRA, "-y", "inventory/sandbox.py", "deploys/fleet.py", "--limit", JETSON],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    # on the host itself: kill dockerd the moment compose starts bringing the service up
    killed = host.run(
        "for i in $(seq 600); do if pgrep -f '[d]ocker compose -p gpufleet-jetson up' >/dev/null;"
        " then pkill -KILL -x dockerd && echo killed; exit; fi; sleep 0.05; done; exit 1"
    )
    said, _ = converge.communicate(timeout=300)
    assert killed.rc == 0 and "killed" in killed.stdout, said[-3000:]
    assert "Traceback" not in said
    # dockerd restarts (systemd) and compose may carry on; if it did not, the run names the step
    if converge.returncode != 0:
        assert re.fullmatch(rf"--> gpufleet: {JETSON} failed at '[^']+': .+",
                            said.strip().splitlines()[-1]), said[-2000:]  # fmt: skip
    else:
        assert answers(host, JETSON)  # a converge that says success leaves it answering
    recovers(hosts, JETSON)
