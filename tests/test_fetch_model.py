"""templates/fetch-model.sh run by dash (and bash) against the sandbox mirror, with real curl."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

if not shutil.which("curl"):
    pytest.skip("curl is not installed", allow_module_level=True)

from tests.support.mirror import Server

SCRIPT = Path(__file__).resolve().parents[1] / "templates" / "fetch-model.sh"
SH = shutil.which("dash") or "sh"
PUBLIC = "gpufleet-sandbox/tiny-llama-GGUF"
GATED = "gpufleet-sandbox/tiny-gated-GGUF"


@pytest.fixture
def slow(tree) -> Iterator[Server]:
    # about 3 s for a 120 KiB model
    server = Server(tree[0], "--throttle-bytes-per-sec", "40000")
    yield server
    server.stop()


def model(server: Server, repos: dict, repo: str = PUBLIC) -> tuple[str, str, str]:
    """URL, sha256 and size of the repo's one GGUF."""
    info = repos[repo]
    path = next(p for p in info["files"] if p.endswith(".gguf"))
    meta = info["files"][path]
    return f"{server.url}/{repo}/resolve/{info['sha']}/{path}", meta["sha256"], str(meta["size"])


def run(*args: str | Path, shell: str = SH, env: dict | None = None, timeout: float = 60):
    return subprocess.run(
        [shell, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("shell", ["dash", "bash"])
def test_fetch_then_already_verified(mirror, tree, tmp_path, shell) -> None:
    if not shutil.which(shell):
        pytest.skip(f"{shell} is not installed")
    url, sha, size = model(mirror, tree[1])
    dest = tmp_path / "models" / "sub" / "tiny.gguf"
    done = run(url, dest, sha, size, shell=shell)
    assert done.returncode == 0, done.stderr
    assert sha256(dest) == sha and str(dest.stat().st_size) == size
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644
    assert stat.S_IMODE(dest.parent.stat().st_mode) == 0o755
    assert Path(f"{dest}.verified").read_text() == f"{sha} {size}\n"
    assert not Path(f"{dest}.partial").exists()
    assert done.stdout.splitlines()[-1].startswith("fetch: tiny.gguf done in ")

    asked = len(mirror.requests())
    started = time.monotonic()
    again = run(url, dest, sha, size, shell=shell)
    assert again.returncode == 0 and again.stdout == f"fetch: {dest} already verified\n"
    assert time.monotonic() - started < 1 and len(mirror.requests()) == asked

    # a stamp older than the file (the file changed since) means hash it again, not download
    os.utime(f"{dest}.verified", (1, 1))
    checked = run(url, dest, sha, size, shell=shell)
    assert checked.returncode == 0 and f"fetch: {dest} verified" in checked.stdout
    assert len(mirror.requests()) == asked
    assert run(url, dest, sha, size).stdout == f"fetch: {dest} already verified\n"


def test_wrong_sha256_leaves_nothing(mirror, tree, tmp_path) -> None:
    url, sha, size = model(mirror, tree[1])
    dest = tmp_path / "tiny.gguf"
    bad = run(url, dest, "0" * 64, size)
    assert bad.returncode == 5
    assert (
        f"sha256 is {sha}, expected {'0' * 64} (from {url}); removed the corrupt download"
        in bad.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_keeps_the_partial(mirror, tree, tmp_path) -> None:
    url, sha, size = model(mirror, tree[1])
    dest = tmp_path / "tiny.gguf"
    short = str(int(size) - 1)  # curl gets the whole file: one byte more than declared
    bad = run(url, dest, sha, short)
    assert bad.returncode == 4, bad.stderr
    assert f"downloaded {size} bytes, expected {short}" in bad.stderr
    assert not dest.exists() and Path(f"{dest}.partial").stat().st_size == int(size)


def test_interrupted_download_resumes(tree, mirror, slow, tmp_path) -> None:
    url, sha, size = model(slow, tree[1])
    dest = tmp_path / "tiny.gguf"
    partial = Path(f"{dest}.partial")
    proc = subprocess.Popen([SH, str(SCRIPT), url, str(dest), sha, size], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    time.sleep(1.2)
    proc.terminate()  # the script only: its trap must stop curl too
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 143, err
    assert not dest.exists()
    had = partial.stat().st_size
    time.sleep(0.5)
    assert 0 < had == partial.stat().st_size < int(size)  # nothing writes to it any more

    resumed = run(url.replace(slow.url, mirror.url), dest, sha, size)
    assert resumed.returncode == 0, resumed.stderr
    tenths = had * 10 // 1024
    assert f"fetch: tiny.gguf: resuming at {tenths // 10}.{tenths % 10} KiB" in resumed.stdout
    assert sha256(dest) == sha and not partial.exists()
    assert '" 206 ' in mirror.requests()[-1]


def test_progress_lines(slow, tree, tmp_path) -> None:
    url, sha, size = model(slow, tree[1])
    done = run(url, tmp_path / "tiny.gguf", sha, size, env={"FETCH_PROGRESS_SECONDS": "1"})
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stdout.splitlines() if "%" in line]
    assert progress and all(" of 120.3 KiB, " in line for line in progress), done.stdout
    assert progress[0].startswith("fetch: tiny.gguf ") and " KiB of " in progress[0]
    # a rate and the time left, from the bytes since the last line
    assert re.search(r", \d+\.\d KiB/s, (ETA \d+s|stalled)\)$", progress[0]), progress[0]


def test_server_that_ignores_ranges(tree, tmp_path) -> None:
    # python's http.server answers 200 with the whole file to a Range request
    tmp, repos, _ = tree
    info = repos[PUBLIC]
    name = next(p for p in info["files"] if p.endswith(".gguf"))
    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(tmp / "hf" / PUBLIC / "files" / name, www / name)
    port_log = tmp_path / "http.log"
    with port_log.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
            cwd=www, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while "port " not in port_log.read_text():
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.05)
        port = port_log.read_text().split("port ")[1].split()[0]
        dest = tmp_path / "out" / "tiny.gguf"
        dest.parent.mkdir()
        Path(f"{dest}.partial").write_bytes(b"x" * 1000)  # junk a restart must not keep
        meta = info["files"][name]
        done = run(f"http://127.0.0.1:{port}/{name}", dest, meta["sha256"], meta["size"])
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert done.returncode == 0, done.stderr
    assert "the server cannot resume; starting over" in done.stdout
    assert sha256(dest) == meta["sha256"]


def curl_spy(tmp_path: Path) -> tuple[dict, Path]:
    """PATH with a ``curl`` first that logs its argv, then runs the real one."""
    bin_dir, log = tmp_path / "bin", tmp_path / "curl-argv.log"
    bin_dir.mkdir()
    spy = bin_dir / "curl"
    spy.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\nexec {shutil.which("curl")} "$@"\n')
    spy.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


def test_gated_needs_the_token_file(mirror, tree, tmp_path) -> None:
    _, repos, token = tree
    url, sha, size = model(mirror, repos, GATED)
    env, argv_log = curl_spy(tmp_path)
    dest = tmp_path / "models" / "gated.gguf"

    refused = run(url, dest, sha, size, env=env)
    assert refused.returncode == 1
    assert "download failed: HTTP 401 from " in refused.stderr.splitlines()[-1]
    assert not dest.exists()

    env_file = tmp_path / ".env"
    env_file.write_text(f"# Managed by gpufleet\nOTHER=1\nHF_TOKEN={token}\n")
    env_file.chmod(0o600)
    done = run(url, dest, sha, size, env_file, env=env)
    assert done.returncode == 0, done.stderr
    assert sha256(dest) == sha
    argv = argv_log.read_text()
    assert url in argv and "-K -" in argv
    for text in (argv, done.stdout, done.stderr, refused.stdout, refused.stderr):
        assert token not in text

    quoted = tmp_path / "quoted.env"
    quoted.write_text(f'HF_TOKEN="{token}"')  # quoted, no final newline
    dest.unlink()
    assert run(url, dest, sha, size, quoted).returncode == 0

    odd = tmp_path / "odd.env"
    odd.write_text('HF_TOKEN=abc"\nheader = "X: y\n')
    broken = run(url, tmp_path / "x.gguf", sha, size, odd)
    assert broken.returncode == 2 and "is not a token" in broken.stderr


def test_not_enough_space(mirror, tree, tmp_path) -> None:
    url, sha, _ = model(mirror, tree[1])
    asked = len(mirror.requests())
    full = run(url, tmp_path / "m" / "huge.gguf", sha, 2**50)
    assert full.returncode == 3
    assert full.stderr.startswith(f"fetch: need {2**30} MiB free in {tmp_path / 'm'}, have ")
    assert full.stderr.rstrip().endswith(" MiB")
    assert len(mirror.requests()) == asked
    assert list((tmp_path / "m").iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["u", "d", "a" * 64],
        ["u", "d", "A" * 64, "1"],
        ["u", "d", "a" * 63, "1"],
        ["u", "d", "a" * 64, "0"],
        ["u", "d", "a" * 64, "1e9"],
        ["u", "d", "a" * 64, "0100"],
        ["u", "d", "a" * 64, "1" * 18],
        ["u", "d/", "a" * 64, "1"],
        ["u", "d", "a" * 64, "1", "/nonexistent/.env"],
    ],
)
def test_usage_errors(args, tmp_path) -> None:
    done = subprocess.run([SH, str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("fetch: ") and done.stdout == ""


def test_exit_codes_are_documented() -> None:
    head = SCRIPT.read_text().split("\nset ")[0]
    for code in range(6):
        assert f"#   {code}  " in head
    # uploaded as a plain file, but must survive a jinja2 render unchanged too
    assert "{{" not in SCRIPT.read_text() and "{%" not in SCRIPT.read_text()
    assert "{#" not in SCRIPT.read_text()


def test_killed_with_its_process_group(slow, mirror, tree, tmp_path) -> None:
    # as when an SSH session dies: everything goes at once and the next run picks up
    url, sha, size = model(slow, tree[1])
    dest = tmp_path / "tiny.gguf"
    proc = subprocess.Popen([SH, str(SCRIPT), url, str(dest), sha, size], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert not dest.exists() and Path(f"{dest}.partial").exists()
    done = run(url.replace(slow.url, mirror.url), dest, sha, size)
    assert done.returncode == 0 and "resuming at" in done.stdout, done.stderr
    assert sha256(dest) == sha


# --- a server or link that goes wrong (the mirror's /fault/ prefix) -------------------------

FAST = {"FETCH_BACKOFF_SECONDS": "1", "FETCH_PROGRESS_SECONDS": "60"}


def faulty(mirror: Server, url: str, spec: str) -> str:
    return url.replace(mirror.url, f"{mirror.url}/fault/{spec}", 1)


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("500x2", "HTTP 500 from "),
        ("503x1", "HTTP 503 from "),
        ("resetx1", "the connection was reset (curl exit 56) by "),
        ("stallx1", "stalled: under 1 KiB/s for 2s from "),
    ],
)
def test_a_passing_fault_is_retried_and_the_file_lands(mirror, tree, tmp_path, spec, said) -> None:
    url, sha, size = model(mirror, tree[1])
    bad = faulty(mirror, url, f"{spec}.{tmp_path.name}")
    dest = tmp_path / "tiny.gguf"
    done = run(bad, dest, sha, size, env={**FAST, "FETCH_STALL_SECONDS": "2"})
    assert done.returncode == 0, done.stdout + done.stderr
    retries = [line for line in done.stdout.splitlines() if "trying again in" in line]
    failures = int(spec.split("x")[1].split(".")[0])
    assert len(retries) == failures, done.stdout
    assert retries[0] == f"fetch: tiny.gguf: {said}{bad}; trying again in 1s (2 of 4)"
    if failures > 1:
        assert retries[1].endswith("trying again in 2s (3 of 4)")  # the wait doubles
    assert sha256(dest) == sha and not Path(f"{dest}.partial").exists()
    if spec.startswith(("reset", "stall")):  # half the file came first: the retry resumed
        assert "fetch: tiny.gguf: resuming at 60.1 KiB of 120.3 KiB" in done.stdout
        assert '" 206 ' in mirror.requests()[-1]


def test_retry_after_is_waited_for(mirror, tree, tmp_path) -> None:
    url, sha, size = model(mirror, tree[1])
    bad = faulty(mirror, url, f"429x1.{tmp_path.name}")
    started = time.monotonic()
    done = run(bad, tmp_path / "tiny.gguf", sha, size, env={**FAST, "FETCH_BACKOFF_SECONDS": "9"})
    assert done.returncode == 0, done.stderr
    assert f"fetch: tiny.gguf: HTTP 429 from {bad}; trying again in 1s (2 of 4)" in done.stdout
    assert time.monotonic() - started < 8  # the server's 1 s, not the 9 s backoff


def test_a_lasting_fault_ends_in_one_line_with_the_url(mirror, tree, tmp_path) -> None:
    url, sha, size = model(mirror, tree[1])
    # user:password in the URL is never shown
    bad = faulty(mirror, url, "500").replace("http://", "http://someone:hunter2@", 1)
    dest = tmp_path / "tiny.gguf"
    started = time.monotonic()
    done = run(bad, dest, sha, size, env={**FAST, "FETCH_ATTEMPTS": "3"})
    assert done.returncode == 1
    shown = bad.replace("someone:hunter2@", "")
    assert done.stderr.splitlines()[-1] == (
        f"fetch: tiny.gguf: download failed after 3 attempts: HTTP 500 from {shown}; "
        "run again to resume"
    )
    assert "hunter2" not in done.stdout + done.stderr
    assert 3 <= time.monotonic() - started < 8  # waited 1 s, then 2 s
    assert not dest.exists()


def test_a_refusal_is_not_retried(mirror, tree, tmp_path) -> None:
    url, sha, size = model(mirror, tree[1])
    bad = faulty(mirror, url, "404")
    asked = len(mirror.requests())
    done = run(bad, tmp_path / "tiny.gguf", sha, size, env=FAST)
    assert done.returncode == 1 and "trying again" not in done.stdout
    assert done.stderr.splitlines()[-1] == (
        f"fetch: tiny.gguf: download failed: HTTP 404 from {bad}; run again to resume"
    )
    assert len(mirror.requests()) == asked + 1


def test_corrupt_bytes_never_reach_the_final_path(mirror, tree, tmp_path) -> None:
    url, sha, size = model(mirror, tree[1])
    bad = faulty(mirror, url, "corrupt")
    dest = tmp_path / "tiny.gguf"
    done = run(bad, dest, sha, size, env=FAST)
    assert done.returncode == 5
    assert f"expected {sha} (from {bad}); removed the corrupt download" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_file_dated_ahead_of_the_clock_is_hashed_once_then_trusted(tmp_path) -> None:
    # the host's clock stepped back: the file's mtime is ahead of any stamp written now
    dest = tmp_path / "tiny.gguf"
    dest.write_bytes(b"GGUF" + bytes(1000))
    sha, size = sha256(dest), str(dest.stat().st_size)
    ahead = time.time() + 86400
    os.utime(dest, (ahead, ahead))
    nowhere = "http://127.0.0.1:9/never-asked"
    first = run(nowhere, dest, sha, size)
    assert first.returncode == 0 and f"fetch: {dest} verified" in first.stdout, first.stderr
    stamp = Path(f"{dest}.verified")
    assert stamp.stat().st_mtime >= dest.stat().st_mtime  # dated with the file, not the clock
    again = run(nowhere, dest, sha, size)
    assert again.returncode == 0 and again.stdout == f"fetch: {dest} already verified\n"


def test_a_file_known_not_to_match_is_fetched_whatever_its_stamp_says(
    mirror, tree, tmp_path
) -> None:
    url, sha, size = model(mirror, tree[1])
    dest = tmp_path / "tiny.gguf"
    # corrupted in place, its mtime put back: the stamp still looks right
    dest.write_bytes(os.urandom(int(size)))
    Path(f"{dest}.verified").write_text(f"{sha} {size}\n")
    os.utime(dest, (time.time() - 60, time.time() - 60))
    trusted = run(url, dest, sha, size)
    assert trusted.stdout == f"fetch: {dest} already verified\n"  # what a stamp alone says
    asked = len(mirror.requests())
    fetched = run(url, dest, sha, size, env={"FETCH_DISTRUST": "1"})
    assert fetched.returncode == 0, fetched.stderr
    assert "checking the file already at" not in fetched.stdout  # not hashed a second time
    assert sha256(dest) == sha and len(mirror.requests()) > asked
