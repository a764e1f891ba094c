"""The sandbox mirror (assets/mirror.py) run as a real server over a tree from build_hf_tree."""

from __future__ import annotations

import hashlib
import http.client
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gpufleet.core.hubcache import CachedFile, ref_path
from gpufleet.sandbox.models import SANDBOX_REPOS, build_hf_tree, git_blob_sha1
from tests.support.mirror import Mirror, start

PUBLIC = "gpufleet-sandbox/tiny-llama-GGUF"
SPLIT = "gpufleet-sandbox/tiny-llama-split-GGUF"
GATED = "gpufleet-sandbox/tiny-gated-GGUF"
SAFETENSORS = "gpufleet-sandbox/tiny-llama-safetensors"
STATIC = b"Origin: gpufleet sandbox\nLabel: test\n" * 20


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict, str]:
    tmp = tmp_path_factory.mktemp("mirror")
    repos = build_hf_tree(tmp / "hf", SANDBOX_REPOS)
    (tmp / "www" / "debian" / "dists" / "stable").mkdir(parents=True)
    (tmp / "www" / "debian" / "dists" / "stable" / "Release").write_bytes(STATIC)
    (tmp / "secret.txt").write_text("outside the root\n")
    token = "hf_" + secrets.token_hex(16)
    (tmp / "hf_token").write_text(token + "\n")
    return tmp, repos, token


@pytest.fixture(scope="module")
def mirror(tree) -> Iterator[Mirror]:
    tmp, repos, token = tree
    proc, url, log = start(tmp, "--page-size", "3")
    try:
        yield Mirror(url, log, token, repos, int(url.rsplit(":", 1)[1]))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def list_tree(m: Mirror, repo: str, rev: str = "main", recursive: bool = True, **kw) -> list:
    url: str | None = f"{m.url}/api/models/{repo}/tree/{rev}?recursive={str(recursive).lower()}"
    entries = []
    while url:
        resp = requests.get(url, timeout=10, **kw)
        assert resp.status_code == 200, resp.text
        entries += resp.json()
        url = resp.links.get("next", {}).get("url")
    return entries


def test_health(mirror: Mirror) -> None:
    resp = mirror.get("/health")
    assert resp.status_code == 200 and resp.text.strip() == "ok"


@pytest.mark.parametrize("repo", [PUBLIC, SPLIT, SAFETENSORS])
def test_tree_matches_resolved_bytes(mirror: Mirror, repo: str) -> None:
    files = [e for e in list_tree(mirror, repo) if e["type"] == "file"]
    assert sorted(e["path"] for e in files) == sorted(mirror.repos[repo]["files"])
    for entry in files:
        resp = mirror.get(f"/{repo}/resolve/main/{entry['path']}")
        assert resp.status_code == 200
        data = resp.content
        assert entry["size"] == len(data) == int(resp.headers["Content-Length"])
        if entry["path"].endswith((".gguf", ".safetensors")):
            assert entry["lfs"]["oid"] == hashlib.sha256(data).hexdigest()
            assert entry["lfs"]["size"] == len(data)
            assert entry["lfs"]["pointerSize"] > 100
            assert resp.headers["ETag"] == f'"{entry["lfs"]["oid"]}"'
        else:
            assert "lfs" not in entry
            assert entry["oid"] == git_blob_sha1(data)


def test_tree_pagination(mirror: Mirror) -> None:
    first = mirror.get(f"/api/models/{SPLIT}/tree/main?recursive=true")
    assert len(first.json()) == 3
    assert first.links["next"]["url"].startswith(mirror.url)
    entries = list_tree(mirror, SPLIT)
    paths = [e["path"] for e in entries]
    assert len(paths) == len(set(paths)) == len(mirror.repos[SPLIT]["files"]) + 1
    last = requests.get(first.links["next"]["url"], timeout=10)
    assert "next" not in last.links


def test_tree_directories(mirror: Mirror) -> None:
    top = list_tree(mirror, SPLIT, recursive=False)
    assert {e["path"]: e["type"] for e in top} == {
        ".gitattributes": "file",
        "README.md": "file",
        "Q8_0": "directory",
    }
    folder = next(e for e in top if e["type"] == "directory")
    assert folder["size"] == 0 and len(folder["oid"]) == 40
    inside = mirror.get(f"/api/models/{SPLIT}/tree/main/Q8_0").json()
    assert [e["path"] for e in inside] == sorted(
        p for p in mirror.repos[SPLIT]["files"] if p.startswith("Q8_0/")
    )


def test_revision_by_commit(mirror: Mirror) -> None:
    sha = mirror.repos[PUBLIC]["sha"]
    assert list_tree(mirror, PUBLIC, rev=sha) == list_tree(mirror, PUBLIC)
    resp = mirror.get(f"/{PUBLIC}/resolve/{sha}/tiny-llama-Q8_0.gguf")
    assert resp.status_code == 200 and resp.headers["X-Repo-Commit"] == sha


def test_not_found_shapes(mirror: Mirror) -> None:
    cases = {
        "/api/models/nobody/nothing": "RepoNotFound",
        "/api/models/nobody/nothing/tree/main": "RepoNotFound",
        "/nobody/nothing/resolve/main/x.gguf": "RepoNotFound",
        f"/api/models/{PUBLIC}/tree/v9": "RevisionNotFound",
        f"/api/models/{PUBLIC}/revision/{'0' * 40}": "RevisionNotFound",
        f"/{PUBLIC}/resolve/nope/tiny-llama-Q8_0.gguf": "RevisionNotFound",
        f"/{PUBLIC}/resolve/main/missing.gguf": "EntryNotFound",
        f"/api/models/{PUBLIC}/tree/main/nodir": "EntryNotFound",
    }
    for path, code in cases.items():
        resp = mirror.get(path)
        assert resp.status_code == 404, path
        assert resp.headers["X-Error-Code"] == code, path
        assert isinstance(resp.json()["error"], str)
    assert mirror.get("/api/models/nobody/nothing").json() == {"error": "Repository not found"}
    assert "Revision Not Found" in mirror.get(f"/api/models/{PUBLIC}/tree/v9").json()["error"]


def test_model_info(mirror: Mirror) -> None:
    repo = mirror.repos[SPLIT]
    info = mirror.get(f"/api/models/{SPLIT}?blobs=true").json()
    assert info["id"] == SPLIT and info["sha"] == repo["sha"] and info["gated"] is False
    by_name = {s["rfilename"]: s for s in info["siblings"]}
    assert set(by_name) == set(repo["files"])
    for path, meta in repo["files"].items():
        assert by_name[path]["size"] == meta["size"]
        assert by_name[path]["blobId"] == meta["blob"]
        lfs = by_name[path].get("lfs")
        assert (lfs["sha256"] if lfs else None) == (meta["sha256"] if meta["lfs"] else None)
    plain = mirror.get(f"/api/models/{SPLIT}/revision/main").json()
    assert plain["sha"] == repo["sha"]
    assert all(set(s) == {"rfilename"} for s in plain["siblings"])
    assert plain["library_name"] == "gguf"


def test_model_info_of_a_transformers_repo(mirror: Mirror) -> None:
    info = mirror.get(f"/api/models/{SAFETENSORS}?blobs=true").json()
    assert info["library_name"] == "transformers"
    by_name = {s["rfilename"]: s for s in info["siblings"]}
    # the weights in LFS (sha256), config and tokenizer as plain git blobs (sha1)
    assert "lfs" in by_name["model.safetensors"]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(by_name)
    assert all("lfs" not in by_name[p] for p in by_name if not p.endswith(".safetensors"))


def test_range_and_resume(mirror: Mirror) -> None:
    path = f"/{PUBLIC}/resolve/main/tiny-llama-Q8_0.gguf"
    whole = mirror.get(path).content
    head = mirror.get(path, headers={"Range": "bytes=0-999"})
    assert head.status_code == 206 and len(head.content) == 1000
    assert head.headers["Content-Range"] == f"bytes 0-999/{len(whole)}"
    tail = mirror.get(path, headers={"Range": "bytes=1000-"})
    assert tail.status_code == 206
    assert tail.headers["Content-Range"] == f"bytes 1000-{len(whole) - 1}/{len(whole)}"
    assert int(tail.headers["Content-Length"]) == len(whole) - 1000
    assert (
        hashlib.sha256(head.content + tail.content).hexdigest()
        == (mirror.repos[PUBLIC]["files"]["tiny-llama-Q8_0.gguf"]["sha256"])
    )
    assert mirror.get(path, headers={"Range": "bytes=-16"}).content == whole[-16:]
    bad = mirror.get(path, headers={"Range": f"bytes={len(whole)}-"})
    assert bad.status_code == 416 and bad.headers["Content-Range"] == f"bytes */{len(whole)}"


def test_interrupted_download_resumes(tree) -> None:
    tmp, repos, _ = tree
    proc, url, _ = start(tmp, "--throttle-bytes-per-sec", "65536")
    try:
        target = f"{url}/{PUBLIC}/resolve/main/tiny-llama-Q8_0.gguf"
        meta = repos[PUBLIC]["files"]["tiny-llama-Q8_0.gguf"]
        got = b""
        started = time.monotonic()
        with requests.get(target, stream=True, timeout=10) as resp:
            for chunk in resp.iter_content(4096):
                got += chunk
                if len(got) >= 20000:
                    break
        assert len(got) < meta["size"]
        assert time.monotonic() - started < 2
        rest = requests.get(target, headers={"Range": f"bytes={len(got)}-"}, timeout=30)
        assert rest.status_code == 206
        assert hashlib.sha256(got + rest.content).hexdigest() == meta["sha256"]
        assert time.monotonic() - started > 1  # the throttle held it back
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_slow_prefix_serves_the_same_bytes_at_its_rate(mirror: Mirror) -> None:
    name = "tiny-llama-Q8_0.gguf"
    meta = mirror.repos[PUBLIC]["files"][name]
    started = time.monotonic()
    fast = mirror.get(f"/{PUBLIC}/resolve/main/{name}")
    fast_s = time.monotonic() - started
    started = time.monotonic()
    slow = mirror.get(f"/slow/200000/{PUBLIC}/resolve/main/{name}")
    slow_s = time.monotonic() - started
    assert slow.status_code == fast.status_code == 200
    assert (
        hashlib.sha256(slow.content).hexdigest()
        == meta["sha256"]
        == (hashlib.sha256(fast.content).hexdigest())
    )
    assert slow_s >= meta["size"] / 200000 * 0.9 > fast_s
    tail = mirror.get(f"/slow/200000/{PUBLIC}/resolve/main/{name}",
                      headers={"Range": "bytes=1000-"})  # fmt: skip
    assert tail.status_code == 206 and tail.content == fast.content[1000:]
    listing = mirror.get(f"/slow/200000/api/models/{PUBLIC}/tree/main")
    assert listing.status_code == 200 and listing.json()
    assert mirror.get("/slow/200000/debian/dists/stable/Release").content == STATIC


def test_fault_prefix_counts_only_the_requests_it_is_about(mirror: Mirror) -> None:
    name = "tiny-llama-Q8_0.gguf"
    file_path, api_path = f"{PUBLIC}/resolve/main/{name}", f"api/models/{PUBLIC}/tree/main"
    # a file fault leaves the API alone, and fails a path's first n downloads only
    assert mirror.get(f"/fault/500x2.a/{api_path}").status_code == 200
    assert [mirror.get(f"/fault/500x2.a/{file_path}").status_code for _ in range(3)] == [
        500, 500, 200]  # fmt: skip
    assert mirror.get(f"/fault/500x2.b/{file_path}").status_code == 500  # its own count
    limited = mirror.get(f"/fault/429/{file_path}")
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    # an api- fault is the other way round
    assert mirror.get(f"/fault/api-503x1.c/{file_path}").status_code == 200
    assert [mirror.get(f"/fault/api-503x1.c/{api_path}").status_code for _ in range(2)] == [
        503, 200]  # fmt: skip
    whole = mirror.get(f"/{file_path}").content
    corrupt = mirror.get(f"/fault/corrupt/{file_path}").content
    assert len(corrupt) == len(whole) and corrupt != whole
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # reset after half the body
        mirror.get(f"/fault/reset/{file_path}")
    with pytest.raises(requests.exceptions.ConnectionError):  # half, then nothing
        requests.get(f"{mirror.url}/fault/stall/{file_path}", timeout=1)


def test_head(mirror: Mirror) -> None:
    meta = mirror.repos[PUBLIC]["files"]["tiny-llama-Q8_0.gguf"]
    resp = mirror.head(f"/{PUBLIC}/resolve/main/tiny-llama-Q8_0.gguf")
    assert resp.status_code == 200 and resp.content == b""
    assert int(resp.headers["Content-Length"]) == meta["size"]
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert resp.headers["ETag"] == resp.headers["X-Linked-Etag"] == f'"{meta["sha256"]}"'
    assert int(resp.headers["X-Linked-Size"]) == meta["size"]
    assert resp.headers["X-Repo-Commit"] == mirror.repos[PUBLIC]["sha"]
    readme = mirror.head(f"/{PUBLIC}/resolve/main/README.md")
    assert readme.headers["ETag"] == f'"{mirror.repos[PUBLIC]["files"]["README.md"]["blob"]}"'


def test_gated(mirror: Mirror) -> None:
    paths = [
        f"/api/models/{GATED}",
        f"/api/models/{GATED}/revision/main?blobs=true",
        f"/api/models/{GATED}/tree/main?recursive=true",
        f"/{GATED}/resolve/main/tiny-gated-Q8_0.gguf",
    ]
    for path in paths:
        for headers in ({}, mirror.auth("hf_wrong"), {"Authorization": mirror.token}):
            resp = mirror.get(path, headers=headers)
            assert resp.status_code == 401, path
            assert resp.headers["X-Error-Code"] == "GatedRepo"
            assert resp.json()["error"] == (
                f"Access to model {GATED} is restricted. You must have access to it and be"
                " authenticated to access it. Please log in."
            )
        assert mirror.get(path, headers=mirror.auth()).status_code == 200, path
    assert mirror.head(paths[-1]).status_code == 401
    ok = mirror.get(paths[-1], headers=mirror.auth())
    sha = mirror.repos[GATED]["files"]["tiny-gated-Q8_0.gguf"]["sha256"]
    assert hashlib.sha256(ok.content).hexdigest() == sha
    assert mirror.get(f"/api/models/{GATED}", headers=mirror.auth()).json()["gated"] == "manual"


def test_static_files(mirror: Mirror) -> None:
    path = "/debian/dists/stable/Release"
    full = mirror.get(path)
    assert full.status_code == 200 and full.content == STATIC
    assert full.headers["Accept-Ranges"] == "bytes"
    part = mirror.get(path, headers={"Range": "bytes=10-"})
    assert part.status_code == 206 and part.content == STATIC[10:]
    assert part.headers["Content-Range"] == f"bytes 10-{len(STATIC) - 1}/{len(STATIC)}"
    assert mirror.get(path, headers={"Range": "bytes=99999-"}).status_code == 416
    head = mirror.head(path)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(STATIC)
    assert mirror.get("/debian/dists/stable/InRelease").status_code == 404
    assert mirror.get("/debian/dists").status_code == 404


def test_static_refuses_traversal(mirror: Mirror) -> None:
    for raw in (
        "/../secret.txt",
        "/debian/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/debian/%2E%2E/%2E%2E/secret.txt",
        "/..%2fsecret.txt",
    ):
        conn = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=10)
        conn.request("GET", raw)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status in (403, 404), raw
        assert b"outside the root" not in body


def test_log_never_contains_token(mirror: Mirror) -> None:
    mirror.get(f"/{GATED}/resolve/main/README.md", headers=mirror.auth())
    mirror.get(f"/api/models/{GATED}", headers=mirror.auth("hf_wrong_but_secret"))
    log = mirror.log.read_text()
    assert f"/{GATED}/resolve/main/README.md" in log
    assert mirror.token not in log and "hf_wrong_but_secret" not in log
    assert "Authorization" not in log and "Bearer" not in log


# --- what huggingface_hub asks: HfApi for the control machine, `hf download` for a host ---------


def test_hfapi_model_info_and_tree(mirror: Mirror) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=mirror.url, token=False)
    repo = mirror.repos[SAFETENSORS]
    info = api.model_info(SAFETENSORS, revision="main", files_metadata=True)
    assert info.sha == repo["sha"]
    siblings = {s.rfilename: s for s in info.siblings}
    tree = {f.path: f for f in api.list_repo_tree(SAFETENSORS, revision=info.sha, recursive=True)}
    assert set(siblings) == set(tree) == set(repo["files"])  # the tree in pages of three
    for path, meta in repo["files"].items():
        for got in (siblings[path], tree[path]):
            assert (got.size, got.blob_id) == (meta["size"], meta["blob"])
            etag = got.lfs.sha256 if got.lfs else got.blob_id
            assert etag == (meta["sha256"] if meta["lfs"] else meta["blob"])


def test_paths_info(mirror: Mirror) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RevisionNotFoundError

    api = HfApi(endpoint=mirror.url, token=False)
    repo = mirror.repos[SAFETENSORS]
    asked = ["model.safetensors", "config.json", "missing.json"]
    got = {f.path: f for f in api.get_paths_info(SAFETENSORS, asked, revision=repo["sha"])}
    assert set(got) == {"model.safetensors", "config.json"}  # what is not there is left out
    assert got["model.safetensors"].lfs.sha256 == repo["files"]["model.safetensors"]["sha256"]
    assert got["config.json"].lfs is None
    assert got["config.json"].blob_id == repo["files"]["config.json"]["blob"]
    folder = api.get_paths_info(SPLIT, "Q8_0")
    assert [(f.path, type(f).__name__) for f in folder] == [("Q8_0", "RepoFolder")]
    # a JSON body, as the Hub also takes
    url = f"{mirror.url}/api/models/{SAFETENSORS}/paths-info/main"
    as_json = requests.post(url, json={"paths": ["config.json"]}, timeout=10).json()
    assert [e["oid"] for e in as_json] == [repo["files"]["config.json"]["blob"]]
    with pytest.raises(RevisionNotFoundError):
        api.get_paths_info(SAFETENSORS, ["config.json"], revision="v9")
    with pytest.raises(GatedRepoError):
        api.get_paths_info(GATED, ["README.md"])
    gated = HfApi(endpoint=mirror.url, token=mirror.token).get_paths_info(GATED, ["README.md"])
    assert [f.path for f in gated] == ["README.md"]
    # nothing else is posted to
    refused = requests.post(f"{mirror.url}/{SAFETENSORS}/resolve/main/config.json", timeout=10)
    assert refused.status_code == 405


def hf_download(m: Mirror, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": m.url, "HF_HOME": str(home),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"}  # fmt: skip
    hf = Path(sys.executable).with_name("hf")
    return subprocess.run([str(hf), "download", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


def test_hf_download_fills_a_hub_cache_named_by_etags(mirror: Mirror, tmp_path: Path) -> None:
    repo = mirror.repos[SAFETENSORS]
    home = tmp_path / "home"
    wanted = ["config.json", "model.safetensors", "tokenizer.json"]
    before = len(mirror.log.read_text().splitlines())
    done = hf_download(mirror, home, SAFETENSORS, "--include", "*.json", "--include", "*.safe*")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("Traceback") == 0
    asked = mirror.log.read_text().splitlines()[before:]
    assert any(f'"GET /api/models/{SAFETENSORS}/revision/main ' in line for line in asked)
    assert any(f"/api/models/{SAFETENSORS}/tree/{repo['sha']}?recursive" in line for line in asked)
    assert any(f'"HEAD /{SAFETENSORS}/resolve/{repo["sha"]}/' in line for line in asked)
    for path in wanted:
        meta = repo["files"][path]
        etag = meta["sha256"] if meta["lfs"] else meta["blob"]
        cached = CachedFile(str(home), SAFETENSORS, repo["sha"], path, etag, meta["size"])
        assert os.readlink(cached.link) == cached.target
        data = Path(cached.blob).read_bytes()
        assert len(data) == meta["size"]
        hashed = hashlib.sha256(data).hexdigest() if meta["lfs"] else git_blob_sha1(data)
        assert hashed == etag
    ref = Path(ref_path(str(home), SAFETENSORS, "main"))
    assert ref.read_text() == repo["sha"]
