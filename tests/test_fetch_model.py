"""templates/fetch-model.sh run by dash (and bash) against the sandbox mirror, with real curl,
filling a Hub cache laid out by gpufleet.core.hubcache; and huggingface_hub on the same cache."""

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
from dataclasses import dataclass, replace
from pathlib import Path

import filelock
import huggingface_hub
import pytest
from packaging.version import Version

if not shutil.which("curl"):
    pytest.skip("curl is not installed", allow_module_level=True)

from gpufleet.core.hubcache import CachedFile, hub_root
from gpufleet.sandbox.models import git_blob_sha1
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


@dataclass(frozen=True)
class Fetch:
    """One repository file: where the mirror serves it, and where fetch-model puts it under a
    test's directory (the Hub cache in ``<tmp>/hf``, gpufleet's state in ``<tmp>/host/...``)."""

    url: str
    file: CachedFile
    host: Path  # stands in for the host's /, under which the stamp lives

    @property
    def etag(self) -> str:
        return self.file.etag

    @property
    def size(self) -> str:
        return str(self.file.size)

    @property
    def blob(self) -> Path:
        return Path(self.file.blob)

    @property
    def incomplete(self) -> Path:
        return Path(self.file.incomplete)

    @property
    def stamp(self) -> Path:
        return Path(f"{self.host}{self.file.stamp}")

    @property
    def link(self) -> Path:
        return Path(self.file.link)

    @property
    def lock(self) -> Path:
        return Path(self.file.lock)

    @property
    def env(self) -> dict[str, str]:
        return {
            "FETCH_STAMP": str(self.stamp),
            "FETCH_LOCK": str(self.lock),
            "FETCH_LINK": str(self.link),
        }

    @property
    def args(self) -> list[str]:
        return [self.url, str(self.blob), self.etag, self.size]

    def on(self, server: Server) -> Fetch:
        """The same file from another server (the slow one, or the mirror after it)."""
        return replace(self, url=re.sub(r"^http://[^/]+", server.url, self.url))


def model(
    server: Server | None, repos: dict, tmp_path: Path, repo: str = PUBLIC, suffix: str = ".gguf"
) -> Fetch:
    """The repo's first file ending in ``suffix``, named by its Hub etag (sha256 if in LFS)."""
    info = repos[repo]
    path = next(p for p in info["files"] if p.endswith(suffix))
    meta = info["files"][path]
    etag = meta["sha256"] if meta["lfs"] else meta["blob"]
    cached = CachedFile(str(tmp_path / "hf"), repo, info["sha"], path, etag, meta["size"])
    base = server.url if server else "http://127.0.0.1:9"  # nowhere: a test that sets its own
    return Fetch(f"{base}/{repo}/resolve/{info['sha']}/{path}", cached, tmp_path / "host")


def run(
    f: Fetch, *args: str | Path, shell: str = SH, env: dict | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """The script with ``f``'s arguments and environment, or ``args`` in their place."""
    return subprocess.run(
        [shell, str(SCRIPT), *map(str, args or f.args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **f.env, **(env or {})},
    )


def start(f: Fetch, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [SH, str(SCRIPT), *f.args], env={**os.environ, **f.env}, text=True, **kw
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spies(tmp_path: Path, *tools: str) -> tuple[dict, Path]:
    """PATH with each tool first as a wrapper that logs its name and argv, then runs it."""
    bin_dir, log = tmp_path / "bin", tmp_path / "spied.log"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        spy = bin_dir / tool
        real = shutil.which(tool)
        spy.write_text(f'#!/bin/sh\nprintf "{tool} %s\\n" "$*" >> "{log}"\nexec {real} "$@"\n')
        spy.chmod(0o755)
    log.touch()
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


def etag_of(path: Path, kind: str) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest() if kind == "sha256" else git_blob_sha1(data)


def assert_in_place(f: Fetch) -> None:
    """The blob verified, stamped, and linked from its snapshot the way huggingface_hub links."""
    assert etag_of(f.blob, f.file.kind) == f.etag and str(f.blob.stat().st_size) == f.size
    assert stat.S_IMODE(f.blob.stat().st_mode) == 0o644
    assert f.stamp.read_text() == f"{f.file.stamp_text}\n"
    assert f.stamp.stat().st_mtime >= f.blob.stat().st_mtime
    assert os.readlink(f.link) == f.file.target and f.link.resolve() == f.blob.resolve()
    assert not f.incomplete.exists()


@pytest.mark.parametrize("shell", ["dash", "bash"])
def test_fetch_then_already_verified(mirror, tree, tmp_path, shell) -> None:
    if not shutil.which(shell):
        pytest.skip(f"{shell} is not installed")
    f = model(mirror, tree[1], tmp_path)
    done = run(f, shell=shell)
    assert done.returncode == 0, done.stderr
    assert_in_place(f)
    assert os.readlink(f.link) == f"../../blobs/{f.etag}"
    assert stat.S_IMODE(f.blob.parent.stat().st_mode) == 0o755
    # left in place as filelock leaves it, group-writable as huggingface_hub makes it
    assert stat.S_IMODE(f.lock.stat().st_mode) == 0o664
    assert done.stdout.splitlines()[-1].startswith("fetch: tiny-llama-Q8_0.gguf done in ")

    # a second run trusts the stamp: no request, and no hashing at all
    env, spied = spies(tmp_path, "sha256sum", "sha1sum", "curl")
    asked = len(mirror.requests())
    started = time.monotonic()
    again = run(f, shell=shell, env=env)
    assert again.returncode == 0 and again.stdout == f"fetch: {f.blob} already verified\n"
    assert time.monotonic() - started < 1 and len(mirror.requests()) == asked
    assert spied.read_text() == ""

    # a stamp older than the blob (the blob changed since) means hash it again, not download
    os.utime(f.stamp, (1, 1))
    checked = run(f, shell=shell, env=env)
    assert checked.returncode == 0 and f"fetch: {f.blob} verified" in checked.stdout
    assert spied.read_text().startswith("sha256sum") and len(mirror.requests()) == asked
    assert run(f).stdout == f"fetch: {f.blob} already verified\n"


def test_wrong_sha256_leaves_nothing(mirror, tree, tmp_path) -> None:
    f = model(mirror, tree[1], tmp_path)
    bad = run(f, f.url, f.blob, "0" * 64, f.size)
    assert bad.returncode == 5
    assert (
        f"sha256 is {f.etag}, expected {'0' * 64} (from {f.url}); removed the corrupt download"
        in bad.stderr
    )
    assert list(f.blob.parent.iterdir()) == []
    assert not f.stamp.exists() and not f.link.parent.exists()


def test_a_file_outside_lfs_is_verified_by_its_git_blob_sha1(mirror, tree, tmp_path) -> None:
    f = model(mirror, tree[1], tmp_path, suffix="README.md")
    assert f.file.kind == "sha1" and len(f.etag) == 40  # the Hub's etag for a plain git file
    done = run(f)
    assert done.returncode == 0, done.stderr
    assert "fetch: README.md: checking sha1" in done.stdout
    assert_in_place(f)
    assert f.blob.name == git_blob_sha1(f.blob.read_bytes()) != sha256(f.blob)
    assert run(f).stdout == f"fetch: {f.blob} already verified\n"

    wrong = replace(f, file=replace(f.file, etag="0" * 40, hf_home=str(tmp_path / "other")))
    bad = run(wrong)
    assert bad.returncode == 5
    assert (
        f"fetch: README.md: sha1 is {f.etag}, expected {'0' * 40} (from {f.url}); "
        "removed the corrupt download"
    ) in bad.stderr
    assert list(wrong.blob.parent.iterdir()) == [] and not wrong.stamp.exists()


def test_the_link_is_relative_at_any_depth(mirror, tree, tmp_path) -> None:
    f = model(mirror, tree[1], tmp_path)
    nested = replace(f, file=replace(f.file, path="a/b/c.json"))
    assert nested.file.target == f"../../../../blobs/{f.etag}"
    os.makedirs(nested.link.parent)
    nested.link.symlink_to("../../../../blobs/elsewhere")  # an older link is replaced
    done = run(nested)
    assert done.returncode == 0, done.stderr
    assert f"fetch: c.json: linked {nested.link} -> ../../../../blobs/{f.etag}" in done.stdout
    assert_in_place(nested)
    assert [p.name for p in nested.link.parent.iterdir()] == ["c.json"]  # no temporary left

    # the top-level path of the same blob: linked on the run that finds it verified
    top = run(f)
    assert top.returncode == 0 and f"fetch: {f.blob} already verified" in top.stdout
    assert_in_place(f)
    assert os.readlink(f.link) == f"../../blobs/{f.etag}"

    # the cache moved elsewhere: the relative links still find the blob
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "hf", moved)
    again = Path(str(nested.link).replace(str(tmp_path / "hf"), str(moved)))
    assert sha256(again) == f.etag


def test_a_blob_placed_without_a_stamp_is_hashed_not_fetched(mirror, tree, tmp_path) -> None:
    # as `hf download` leaves it: the blob, no gpufleet stamp, no snapshot link for this path
    f = model(mirror, tree[1], tmp_path)
    served = tree[0] / "hf" / PUBLIC / "files" / f.file.path
    f.blob.parent.mkdir(parents=True)
    shutil.copy(served, f.blob)
    f.incomplete.write_bytes(b"left by an interrupted run")
    env, spied = spies(tmp_path, "curl")
    done = run(f, env=env)
    assert done.returncode == 0, done.stderr
    assert f"fetch: tiny-llama-Q8_0.gguf: checking the file already at {f.blob}" in done.stdout
    assert f"fetch: {f.blob} verified" in done.stdout
    assert_in_place(f)  # and the partial beside it is gone
    assert spied.read_text() == ""


def test_a_blob_linked_into_the_shared_store_is_hashed_then_trusted(mirror, tree, tmp_path) -> None:
    # huggingface_hub 2.x with Xet makes blobs/<etag> a relative symlink into <hub>/blobs/<xx>/
    f = model(mirror, tree[1], tmp_path)
    served = tree[0] / "hf" / PUBLIC / "files" / f.file.path
    shared = Path(hub_root(f.file.hf_home)) / "blobs" / "ab" / ("ab" + "0" * 62)
    shared.parent.mkdir(parents=True)
    shutil.copy(served, shared)
    f.blob.parent.mkdir(parents=True)
    f.blob.symlink_to(os.path.relpath(shared, f.blob.parent))
    assert os.lstat(f.blob).st_size != int(f.size)  # the link's own size is not the file's
    env, spied = spies(tmp_path, "curl", "sha256sum")
    done = run(f, env=env)
    assert done.returncode == 0, done.stderr
    assert f"fetch: {f.blob} verified" in done.stdout
    assert f.blob.is_symlink() and f.link.resolve() == shared.resolve()  # left as it was
    assert f.stamp.read_text() == f"{f.file.stamp_text}\n"
    assert spied.read_text().splitlines() == ["sha256sum "]  # hashed once, nothing fetched

    # the stamp is dated against the file, not the link: a rerun trusts it
    past = time.time() - 3600
    os.utime(f.blob, (past, past), follow_symlinks=False)
    assert run(f, env=env).stdout == f"fetch: {f.blob} already verified\n"
    # and the file changed behind the link means hash it again
    ahead = time.time() + 60
    os.utime(shared, (ahead, ahead))
    assert f"fetch: {f.blob} verified" in run(f, env=env).stdout
    assert spied.read_text().count("sha256sum") == 2


def test_wrong_size_keeps_the_partial(mirror, tree, tmp_path) -> None:
    f = model(mirror, tree[1], tmp_path)
    short = str(int(f.size) - 1)  # curl gets the whole file: one byte more than declared
    bad = run(f, f.url, f.blob, f.etag, short)
    assert bad.returncode == 4, bad.stderr
    assert f"downloaded {f.size} bytes, expected {short}" in bad.stderr
    assert not f.blob.exists() and f.incomplete.stat().st_size == int(f.size)


def test_interrupted_download_resumes(tree, mirror, slow, tmp_path) -> None:
    f = model(slow, tree[1], tmp_path)
    proc = start(f, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.2)
    proc.terminate()  # the script only: its trap must stop curl too
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 143, err
    assert not f.blob.exists()
    had = f.incomplete.stat().st_size
    time.sleep(0.5)
    assert 0 < had == f.incomplete.stat().st_size < int(f.size)  # nothing writes to it any more

    resumed = run(f.on(mirror))
    assert resumed.returncode == 0, resumed.stderr
    tenths = had * 10 // 1024
    said = f"fetch: tiny-llama-Q8_0.gguf: resuming at {tenths // 10}.{tenths % 10} KiB"
    assert said in resumed.stdout
    assert_in_place(f)
    assert '" 206 ' in mirror.requests()[-1]


def test_progress_lines(slow, tree, tmp_path) -> None:
    f = model(slow, tree[1], tmp_path)
    done = run(f, env={"FETCH_PROGRESS_SECONDS": "1"})
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stdout.splitlines() if "%" in line]
    assert progress and all(" of 120.3 KiB, " in line for line in progress), done.stdout
    assert progress[0].startswith("fetch: tiny-llama-Q8_0.gguf ") and " KiB of " in progress[0]
    # a rate and the time left, from the bytes since the last line
    assert re.search(r", \d+\.\d KiB/s, (ETA \d+s|stalled)\)$", progress[0]), progress[0]


def test_server_that_ignores_ranges(tree, tmp_path) -> None:
    # python's http.server answers 200 with the whole file to a Range request
    tmp, repos, _ = tree
    www = tmp_path / "www"
    www.mkdir()
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
        f = model(None, repos, tmp_path)
        f = replace(f, url=f"http://127.0.0.1:{port}/{f.file.path}")
        shutil.copy(tmp / "hf" / PUBLIC / "files" / f.file.path, www / f.file.path)
        f.incomplete.parent.mkdir(parents=True)
        f.incomplete.write_bytes(b"x" * 1000)  # junk a restart must not keep
        done = run(f)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert done.returncode == 0, done.stderr
    assert "the server cannot resume; starting over" in done.stdout
    assert_in_place(f)


def test_gated_needs_the_token_file(mirror, tree, tmp_path) -> None:
    _, repos, token = tree
    f = model(mirror, repos, tmp_path, GATED)
    env, argv_log = spies(tmp_path, "curl")

    refused = run(f, env=env)
    assert refused.returncode == 1
    assert "download failed: HTTP 401 from " in refused.stderr.splitlines()[-1]
    assert not f.blob.exists()

    env_file = tmp_path / ".env"
    env_file.write_text(f"# Managed by gpufleet\nOTHER=1\nHF_TOKEN={token}\n")
    env_file.chmod(0o600)
    done = run(f, *f.args, env_file, env=env)
    assert done.returncode == 0, done.stderr
    assert_in_place(f)
    argv = argv_log.read_text()
    assert f.url in argv and "-K -" in argv
    for text in (argv, done.stdout, done.stderr, refused.stdout, refused.stderr):
        assert token not in text

    quoted = tmp_path / "quoted.env"
    quoted.write_text(f'HF_TOKEN="{token}"')  # quoted, no final newline
    f.blob.unlink()
    assert run(f, *f.args, quoted).returncode == 0

    odd = tmp_path / "odd.env"
    odd.write_text('HF_TOKEN=abc"\nheader = "X: y\n')
    other = replace(f, file=replace(f.file, hf_home=str(tmp_path / "other")))
    broken = run(other, *other.args, odd)
    assert broken.returncode == 2 and "is not a token" in broken.stderr


def test_not_enough_space(mirror, tree, tmp_path) -> None:
    f = model(mirror, tree[1], tmp_path)
    huge = replace(f, file=replace(f.file, size=2**50))
    asked = len(mirror.requests())
    full = run(huge)
    assert full.returncode == 3
    assert full.stderr.startswith(f"fetch: need {2**30} MiB free in {huge.blob.parent}, have ")
    assert full.stderr.rstrip().endswith(" MiB")
    assert len(mirror.requests()) == asked
    assert list(huge.blob.parent.iterdir()) == []


STAMP = {"FETCH_STAMP": "verified/x"}


@pytest.mark.parametrize(
    ("args", "env"),
    [
        ([], STAMP),
        (["u", "d", "a" * 64], STAMP),
        (["u", "d", "A" * 64, "1"], STAMP),
        (["u", "d", "a" * 63, "1"], STAMP),
        (["u", "d", "a" * 41, "1"], STAMP),
        (["u", "d", "a" * 64, "0"], STAMP),
        (["u", "d", "a" * 64, "1e9"], STAMP),
        (["u", "d", "a" * 64, "0100"], STAMP),
        (["u", "d", "a" * 64, "1" * 18], STAMP),
        (["u", "d/", "a" * 64, "1"], STAMP),
        (["u", "d", "a" * 64, "1", "/nonexistent/.env"], STAMP),
        (["u", "d", "a" * 40, "1"], {}),  # no stamp path
        (["u", "d", "a" * 40, "1"], {"FETCH_STAMP": "verified/"}),
        (["u", "d", "a" * 40, "1"], {**STAMP, "FETCH_LINK": "snapshots/c/"}),
        (["u", "d", "a" * 40, "1"], {**STAMP, "FETCH_LOCK": ".."}),
    ],
)
def test_usage_errors(args, env, tmp_path) -> None:
    done = subprocess.run(
        [SH, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("FETCH_")}, **env},
    )
    assert done.returncode == 2 and done.stderr.startswith("fetch: ") and done.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_exit_codes_are_documented() -> None:
    head = SCRIPT.read_text().split("\nset ")[0]
    for code in range(7):
        assert f"#   {code}  " in head
    # uploaded as a plain file, but must survive a jinja2 render unchanged too
    assert "{{" not in SCRIPT.read_text() and "{%" not in SCRIPT.read_text()
    assert "{#" not in SCRIPT.read_text()


def test_killed_with_its_process_group(slow, mirror, tree, tmp_path) -> None:
    # as when an SSH session dies: everything goes at once and the next run picks up
    f = model(slow, tree[1], tmp_path)
    proc = start(f, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert not f.blob.exists() and f.incomplete.exists()
    done = run(f.on(mirror))  # the lock died with its holder: nothing waits
    assert done.returncode == 0 and "resuming at" in done.stdout, done.stderr
    assert "waiting" not in done.stdout
    assert_in_place(f)


# --- the lock, shared with huggingface_hub -----------------------------------------------


def test_a_held_lock_is_waited_for_then_given_up_on(mirror, tree, tmp_path) -> None:
    f = model(mirror, tree[1], tmp_path)
    f.lock.parent.mkdir(parents=True)
    asked = len(mirror.requests())
    # held as huggingface_hub holds it while it writes the blob (filelock: flock(2))
    with filelock.FileLock(f.lock):
        started = time.monotonic()
        refused = run(f, env={"FETCH_LOCK_SECONDS": "1"})
        waited = time.monotonic() - started
    assert refused.returncode == 6
    assert refused.stderr == (
        f"fetch: tiny-llama-Q8_0.gguf: another download holds {f.lock}; gave up after 1s\n"
    )
    assert 1 <= waited < 3
    assert len(mirror.requests()) == asked and not f.blob.parent.exists()

    # held for a moment: the script waits, then goes on as if nothing had happened
    holder = subprocess.Popen(["flock", str(f.lock), "sleep", "1.5"])
    try:
        time.sleep(0.3)
        started = time.monotonic()
        done = run(f)
        waited = time.monotonic() - started
    finally:
        holder.wait(timeout=10)
    assert done.returncode == 0, done.stderr
    said = f"waiting up to 3600s for {f.lock}: another download holds it"
    assert done.stdout.startswith(f"fetch: tiny-llama-Q8_0.gguf: {said}\n")
    assert waited >= 1
    assert_in_place(f)


# --- huggingface_hub on the same cache ---------------------------------------------------

# huggingface_hub 1.18 (huggingface/huggingface_hub#4306) writes each download to a file of its
# own, <etag>.<random>.incomplete, and never resumes another process's partial; up to 1.17 it
# appended to <etag>.incomplete with a Range request, as fetch-model does
HF_RESUMES = Version(huggingface_hub.__version__) < Version("1.18")
HF_DOWNLOAD = """
import sys
from huggingface_hub import hf_hub_download

repo, path, commit, hub, endpoint = sys.argv[1:]
print(hf_hub_download(repo, path, revision=commit, cache_dir=hub, endpoint=endpoint, token=False))
"""


def hf_download(server: Server, f: Fetch, **kw):
    """``hf_hub_download`` of ``f``'s file into ``f``'s cache, in a process of its own."""
    argv = [f.file.repo, f.file.path, f.file.commit, hub_root(f.file.hf_home), server.url]
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
    return subprocess.Popen(
        [sys.executable, "-c", HF_DOWNLOAD, *argv],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def hf_done(proc: subprocess.Popen, f: Fetch) -> None:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == str(f.link)


def test_huggingface_hub_completes_a_blob_fetch_model_began(slow, mirror, tree, tmp_path) -> None:
    f = model(slow, tree[1], tmp_path)
    proc = start(f, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    had = f.incomplete.stat().st_size
    assert 0 < had < int(f.size) and not f.blob.exists()

    asked = len(mirror.requests())
    hf_done(hf_download(mirror, f), f)
    assert sha256(f.blob) == f.etag and os.readlink(f.link) == f.file.target
    got = mirror.requests()[asked:]
    assert len(got) == 1
    if HF_RESUMES:
        assert '" 206 ' in got[0] and not f.incomplete.exists()
    else:  # the whole file again, beside the partial, which it neither reads nor removes
        assert '" 200 ' in got[0] and f.incomplete.stat().st_size == had

    # fetch-model then takes the blob as its own: hashed, stamped, the partial gone, no request
    done = run(f.on(mirror))
    assert done.returncode == 0, done.stderr
    assert f"checking the file already at {f.blob}" in done.stdout
    assert "linked" not in done.stdout  # huggingface_hub's link is the same link
    assert_in_place(f)
    assert len(mirror.requests()) == asked + 1
    assert sorted(p.name for p in f.blob.parent.iterdir()) == [f.etag]


def test_fetch_model_resumes_a_partial_huggingface_hub_left(mirror, tree, tmp_path) -> None:
    # as huggingface_hub up to 1.17 leaves an interrupted download: the first bytes, in order,
    # in blobs/<etag>.incomplete
    f = model(mirror, tree[1], tmp_path)
    served = (tree[0] / "hf" / PUBLIC / "files" / f.file.path).read_bytes()
    f.incomplete.parent.mkdir(parents=True)
    f.incomplete.write_bytes(served[: len(served) // 2])
    done = run(f)
    assert done.returncode == 0, done.stderr
    assert "fetch: tiny-llama-Q8_0.gguf: resuming at 60.1 KiB of 120.3 KiB" in done.stdout
    assert '" 206 ' in mirror.requests()[-1]
    assert_in_place(f)

    # and huggingface_hub takes what fetch-model placed as its own: no download
    asked = len(mirror.requests())
    hf_done(hf_download(mirror, f), f)
    assert len(mirror.requests()) == asked
    assert_in_place(f)


def test_huggingface_hub_waits_for_the_lock_fetch_model_holds(mirror, tree, tmp_path) -> None:
    f = model(mirror, tree[1], tmp_path)
    # about 6 s on a slow link, from the mirror's /slow/ prefix
    fetching = start(replace(f, url=f.url.replace(mirror.url, f"{mirror.url}/slow/20000", 1)),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 10
    while not f.incomplete.exists():
        assert time.monotonic() < deadline and fetching.poll() is None
        time.sleep(0.05)
    asked = len(mirror.requests())
    heads = mirror.log.read_text().count('"HEAD ')
    hf = hf_download(mirror, f)  # the same blob, at full speed
    while mirror.log.read_text().count('"HEAD ') == heads:
        assert time.monotonic() < deadline + 10 and hf.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)  # it has the metadata: now at the lock
    assert fetching.poll() is None and hf.poll() is None and not f.blob.exists()
    out, err = fetching.communicate(timeout=60)
    assert fetching.returncode == 0, err
    hf_done(hf, f)
    # it waited on the lock, then found the blob in place and linked: it fetched nothing itself
    assert [r for r in mirror.requests()[asked:] if "/slow/" not in r] == []
    assert_in_place(f)
    assert sorted(p.name for p in f.blob.parent.iterdir()) == [f.etag]


# --- a server or link that goes wrong (the mirror's /fault/ prefix) -------------------------

FAST = {"FETCH_BACKOFF_SECONDS": "1", "FETCH_PROGRESS_SECONDS": "60"}


def faulty(mirror: Server, f: Fetch, spec: str) -> Fetch:
    return replace(f, url=f.url.replace(mirror.url, f"{mirror.url}/fault/{spec}", 1))


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
    f = model(mirror, tree[1], tmp_path)
    bad = faulty(mirror, f, f"{spec}.{tmp_path.name}")
    done = run(bad, env={**FAST, "FETCH_STALL_SECONDS": "2"})
    assert done.returncode == 0, done.stdout + done.stderr
    retries = [line for line in done.stdout.splitlines() if "trying again in" in line]
    failures = int(spec.split("x")[1].split(".")[0])
    assert len(retries) == failures, done.stdout
    assert (
        retries[0] == f"fetch: tiny-llama-Q8_0.gguf: {said}{bad.url}; trying again in 1s (2 of 4)"
    )
    if failures > 1:
        assert retries[1].endswith("trying again in 2s (3 of 4)")  # the wait doubles
    assert_in_place(f)
    if spec.startswith(("reset", "stall")):  # half the file came first: the retry resumed
        assert "fetch: tiny-llama-Q8_0.gguf: resuming at 60.1 KiB of 120.3 KiB" in done.stdout
        assert '" 206 ' in mirror.requests()[-1]


def test_retry_after_is_waited_for(mirror, tree, tmp_path) -> None:
    f = model(mirror, tree[1], tmp_path)
    bad = faulty(mirror, f, f"429x1.{tmp_path.name}")
    started = time.monotonic()
    done = run(bad, env={**FAST, "FETCH_BACKOFF_SECONDS": "9"})
    assert done.returncode == 0, done.stderr
    said = f"fetch: tiny-llama-Q8_0.gguf: HTTP 429 from {bad.url}; trying again in 1s (2 of 4)"
    assert said in done.stdout
    assert time.monotonic() - started < 8  # the server's 1 s, not the 9 s backoff


def test_a_lasting_fault_ends_in_one_line_with_the_url(mirror, tree, tmp_path) -> None:
    f = model(mirror, tree[1], tmp_path)
    # user:password in the URL is never shown
    bad = faulty(mirror, f, "500")
    bad = replace(bad, url=bad.url.replace("http://", "http://someone:hunter2@", 1))
    started = time.monotonic()
    done = run(bad, env={**FAST, "FETCH_ATTEMPTS": "3"})
    assert done.returncode == 1
    shown = bad.url.replace("someone:hunter2@", "")
    assert done.stderr.splitlines()[-1] == (
        f"fetch: tiny-llama-Q8_0.gguf: download failed after 3 attempts: HTTP 500 from {shown}; "
        "run again to resume"
    )
    assert "hunter2" not in done.stdout + done.stderr
    assert 3 <= time.monotonic() - started < 8  # waited 1 s, then 2 s
    assert not f.blob.exists() and not f.link.exists() and not f.stamp.exists()


def test_a_refusal_is_not_retried(mirror, tree, tmp_path) -> None:
    bad = faulty(mirror, model(mirror, tree[1], tmp_path), "404")
    asked = len(mirror.requests())
    done = run(bad, env=FAST)
    assert done.returncode == 1 and "trying again" not in done.stdout
    assert done.stderr.splitlines()[-1] == (
        f"fetch: tiny-llama-Q8_0.gguf: download failed: HTTP 404 from {bad.url}; "
        "run again to resume"
    )
    assert len(mirror.requests()) == asked + 1


def test_corrupt_bytes_never_reach_the_final_path(mirror, tree, tmp_path) -> None:
    bad = faulty(mirror, model(mirror, tree[1], tmp_path), "corrupt")
    done = run(bad, env=FAST)
    assert done.returncode == 5
    assert f"expected {bad.etag} (from {bad.url}); removed the corrupt download" in done.stderr
    assert list(bad.blob.parent.iterdir()) == []
    assert not bad.link.parent.exists() and not bad.stamp.exists()


def test_a_file_dated_ahead_of_the_clock_is_hashed_once_then_trusted(tmp_path) -> None:
    # the host's clock stepped back: the blob's mtime is ahead of any stamp written now
    data = b"GGUF" + bytes(1000)
    etag = hashlib.sha256(data).hexdigest()
    f = Fetch(
        "http://127.0.0.1:9/never-asked",
        CachedFile(str(tmp_path / "hf"), PUBLIC, "c" * 40, "tiny.gguf", etag, len(data)),
        tmp_path / "host",
    )
    f.blob.parent.mkdir(parents=True)
    f.blob.write_bytes(data)
    ahead = time.time() + 86400
    os.utime(f.blob, (ahead, ahead))
    first = run(f)
    assert first.returncode == 0 and f"fetch: {f.blob} verified" in first.stdout, first.stderr
    assert f.stamp.stat().st_mtime >= f.blob.stat().st_mtime  # dated with the blob, not the clock
    again = run(f)
    assert again.returncode == 0 and again.stdout == f"fetch: {f.blob} already verified\n"


def test_a_file_known_not_to_match_is_fetched_whatever_its_stamp_says(
    mirror, tree, tmp_path
) -> None:
    f = model(mirror, tree[1], tmp_path)
    # corrupted in place, its mtime put back: the stamp still looks right
    f.blob.parent.mkdir(parents=True)
    f.blob.write_bytes(os.urandom(int(f.size)))
    f.stamp.parent.mkdir(parents=True)
    f.stamp.write_text(f"{f.etag} {f.size}\n")
    os.utime(f.blob, (time.time() - 60, time.time() - 60))
    trusted = run(f)
    assert trusted.stdout.startswith(f"fetch: {f.blob} already verified\n")  # a stamp alone says
    asked = len(mirror.requests())
    fetched = run(f, env={"FETCH_DISTRUST": "1"})
    assert fetched.returncode == 0, fetched.stderr
    assert "checking the file already at" not in fetched.stdout  # not hashed a second time
    assert_in_place(f)
    assert len(mirror.requests()) > asked
