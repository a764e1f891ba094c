"""gpufleet.control.hf.resolve against the sandbox mirror (assets/mirror.py), a real server."""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
from pathlib import Path

import pytest
import requests
from pydantic import ValidationError

from gpufleet.control import hf
from gpufleet.control.hf import HubError, resolve
from gpufleet.core.schema import ModelSpec
from tests.support.mirror import Server

PUBLIC = "gpufleet-sandbox/tiny-llama-GGUF"
SPLIT = "gpufleet-sandbox/tiny-llama-split-GGUF"
GATED = "gpufleet-sandbox/tiny-gated-GGUF"
PUBLIC_FILE = "tiny-llama-Q8_0.gguf"
SPLIT_FILES = [f"Q8_0/tiny-llama-split-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
GATED_MESSAGE = (
    f"{GATED} is gated: the Hub refused access without a valid HF_TOKEN (set it in secrets)"
)


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def spec(repo: str = PUBLIC, files: list[str] | None = None, **kw) -> ModelSpec:
    return ModelSpec(repo=repo, files=files or [PUBLIC_FILE], **kw)


def test_public_repo(mirror, tree, cache) -> None:
    _, repos, _ = tree
    got = resolve(spec(), endpoint=mirror.url + "/", token=None, cache_dir=cache)
    commit = repos[PUBLIC]["sha"]
    meta = repos[PUBLIC]["files"][PUBLIC_FILE]
    assert (got.repo, got.revision, got.commit) == (PUBLIC, "main", commit)
    [file] = got.files
    assert (file.path, file.size, file.sha256) == (PUBLIC_FILE, meta["size"], meta["sha256"])
    assert file.url == f"{mirror.url}/{PUBLIC}/resolve/{commit}/{PUBLIC_FILE}"
    assert got.total_size == meta["size"]
    body = requests.get(file.url, timeout=10).content
    assert hashlib.sha256(body).hexdigest() == file.sha256
    # the mirror's tree answer has no X-Repo-Commit, so the commit came from /revision/main
    assert any(f"/api/models/{PUBLIC}/revision/main " in line for line in mirror.requests())


def test_split_parts_in_order(mirror, tree, cache) -> None:
    _, repos, _ = tree
    got = resolve(spec(SPLIT, SPLIT_FILES), endpoint=mirror.url, token=None, cache_dir=cache)
    assert [f.path for f in got.files] == SPLIT_FILES
    assert [f.sha256 for f in got.files] == [
        repos[SPLIT]["files"][p]["sha256"] for p in SPLIT_FILES
    ]
    assert got.total_size == sum(repos[SPLIT]["files"][p]["size"] for p in SPLIT_FILES)
    assert all(f"/resolve/{repos[SPLIT]['sha']}/Q8_0/" in f.url for f in got.files)


def test_gated(mirror, tree, cache) -> None:
    _, repos, token = tree
    gated = spec(GATED, ["tiny-gated-Q8_0.gguf"], gated=True)
    with pytest.raises(HubError) as err:
        resolve(gated, endpoint=mirror.url, token=None, cache_dir=cache)
    assert str(err.value) == (
        f"{GATED} is gated and no HF_TOKEN is set: set HF_TOKEN on the control machine"
        ' (secrets = {"HF_TOKEN": "env:HF_TOKEN"}) to a token with access to it, and mark the'
        ' model "gated": True'
    )
    public = resolve(spec(PUBLIC, [PUBLIC_FILE]), endpoint=mirror.url, token=None, cache_dir=cache)
    assert public.files[0].path == PUBLIC_FILE  # a public repository needs no token
    for wrong in ("hf_wrong_" + secrets.token_hex(8),):
        with pytest.raises(HubError) as err:
            resolve(gated, endpoint=mirror.url, token=wrong, cache_dir=cache)
        assert str(err.value) == GATED_MESSAGE
        assert token not in str(err.value) and (wrong or token) not in str(err.value)
    got = resolve(gated, endpoint=mirror.url, token=token, cache_dir=cache)
    assert got.files[0].sha256 == repos[GATED]["files"]["tiny-gated-Q8_0.gguf"]["sha256"]
    assert token not in mirror.log.read_text()


def test_missing_file_lists_what_is_there(mirror, cache) -> None:
    with pytest.raises(HubError) as err:
        resolve(spec(files=["tiny-llama-Q4_K_M.gguf"]), endpoint=mirror.url, token=None,
                cache_dir=cache)  # fmt: skip
    assert str(err.value) == (
        f"{PUBLIC}@main: no file 'tiny-llama-Q4_K_M.gguf'; it has: .gitattributes, README.md,"
        f" {PUBLIC_FILE}"
    )


def test_file_outside_lfs_has_no_sha256(mirror, cache) -> None:
    with pytest.raises(HubError, match="README.md is not stored in Git LFS, so the Hub gives no"
                       " sha256 to verify it against"):  # fmt: skip
        resolve(spec(files=["README.md"]), endpoint=mirror.url, token=None, cache_dir=cache)


@pytest.mark.parametrize(
    ("repo", "revision", "token", "message"),
    [
        ("nobody/nothing", "main", None, "nobody/nothing: repository not found at {url} (or it"
         " is private and needs HF_TOKEN)"),
        ("nobody/nothing", "main", "hf_x", "nobody/nothing: repository not found at {url}"),
        (PUBLIC, "v9", None, f"{PUBLIC}: revision 'v9' not found"),
        (PUBLIC, "0" * 40, None, f"{PUBLIC}: revision '{'0' * 40}' not found"),
    ],
)  # fmt: skip
def test_not_found(mirror, cache, repo, revision, token, message) -> None:
    with pytest.raises(HubError) as err:
        resolve(spec(repo, revision=revision), endpoint=mirror.url, token=token, cache_dir=cache)
    assert str(err.value) == message.format(url=mirror.url)


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """The pauses resolve makes between attempts, recorded instead of slept."""
    made: list[float] = []
    monkeypatch.setattr(hf, "_sleep", made.append)
    return made


def test_unreachable(cache, waits) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(HubError) as err:
        resolve(spec(), endpoint=url, token="hf_secret", cache_dir=cache)
    assert str(err.value) == f"cannot reach {url} after 4 attempts: Connection refused"
    assert waits == [1, 2, 4]


@pytest.mark.parametrize("kind", ["500", "502", "503", "429"])
def test_a_bad_minute_on_the_hub_is_waited_out(mirror, tree, cache, waits, kind, request) -> None:
    endpoint = f"{mirror.url}/fault/api-{kind}x2.{request.node.name.replace('[', '-')[:-1]}"
    got = resolve(spec(), endpoint=endpoint, token=None, cache_dir=cache)
    assert got.commit == tree[1][PUBLIC]["sha"]
    # each API path fails twice: waited 1 then 2 s, or Retry-After's 1 s after a 429
    per_path = [1, 1] if kind == "429" else [1, 2]
    assert waits and waits == per_path * (len(waits) // 2)


def test_a_lasting_hub_error_names_the_url_status_and_attempts(mirror, cache, waits) -> None:
    with pytest.raises(HubError) as err:
        resolve(spec(), endpoint=f"{mirror.url}/fault/api-503", token="hf_x", cache_dir=cache)
    assert str(err.value).startswith(
        f"{PUBLIC}: HTTP 503 from {mirror.url}/fault/api-503/api/models/{PUBLIC}/"
    )
    assert "after 4 attempts" in str(err.value) and len(waits) == 3


def test_a_refusal_is_not_retried(mirror, cache, waits) -> None:
    with pytest.raises(HubError) as err:
        resolve(spec(), endpoint=f"{mirror.url}/fault/api-404", token=None, cache_dir=cache)
    assert "HTTP 404 from" in str(err.value) and "attempts" not in str(err.value)
    assert waits == []


def test_pagination(tree, cache) -> None:
    tmp, repos, _ = tree
    server = Server(tmp, "--page-size", "1")
    try:
        got = resolve(spec(SPLIT, SPLIT_FILES), endpoint=server.url, token=None, cache_dir=cache)
    finally:
        server.stop()
    assert [f.path for f in got.files] == SPLIT_FILES
    pages = [line for line in server.requests() if "/tree/main" in line]
    # every file and the Q8_0 directory is one entry, one page each
    assert len(pages) == len(repos[SPLIT]["files"]) + 1


def test_commit_from_header(mirror, tree, cache) -> None:
    _, repos, _ = tree
    session = requests.Session()

    def add_header(resp, *args, **kwargs):
        resp.headers.setdefault("X-Repo-Commit", repos[PUBLIC]["sha"])

    session.hooks["response"].append(add_header)
    before = len(mirror.requests())
    got = resolve(spec(), endpoint=mirror.url, token=None, session=session, cache_dir=cache)
    assert got.commit == repos[PUBLIC]["sha"]
    assert [line for line in mirror.requests()[before:] if "/revision/" in line] == []


def test_pinned_revision_is_cached(tree, cache, waits) -> None:
    tmp, repos, _ = tree
    commit = repos[PUBLIC]["sha"]
    server = Server(tmp)
    try:
        pinned = spec(revision=commit)
        first = resolve(pinned, endpoint=server.url, token=None, cache_dir=cache)
        asked = len(server.requests())
        assert asked == 1  # the tree listing; a sha needs no /revision lookup
        assert resolve(pinned, endpoint=server.url, token=None, cache_dir=cache) == first
        assert len(server.requests()) == asked
        # another endpoint is another key; a branch is asked every time (tree + revision)
        other = server.url.replace("127.0.0.1", "localhost")
        assert resolve(pinned, endpoint=other, token=None, cache_dir=cache).commit == commit
        for _ in range(2):
            resolve(spec(revision="main"), endpoint=server.url, token=None, cache_dir=cache)
        assert len(server.requests()) == asked + 1 + 4
    finally:
        server.stop()
    # with the Hub gone, the pinned model still resolves; the branch does not
    assert resolve(pinned, endpoint=server.url, token=None, cache_dir=cache) == first
    with pytest.raises(HubError, match=f"cannot reach {server.url} after 4 attempts: "):
        resolve(spec(revision="main"), endpoint=server.url, token=None, cache_dir=cache)
    stored = hf._cache_path(cache, server.url, pinned)
    assert json.loads(stored.read_text())["commit"] == commit
    stored.write_text("{not json")  # a damaged entry is resolved again, not trusted
    with pytest.raises(HubError, match="cannot reach"):
        resolve(pinned, endpoint=server.url, token=None, cache_dir=cache)


def test_default_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GPUFLEET_CACHE", str(tmp_path))
    assert hf.default_cache_dir() == tmp_path / "hf"
    monkeypatch.delenv("GPUFLEET_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hf.default_cache_dir() == tmp_path / ".cache" / "gpufleet" / "hf"


class FakeSession:
    """Answers from a dict of URL -> (status, headers, body) and records what was sent."""

    def __init__(self, answers: dict[str, tuple[int, dict, object]]) -> None:
        self.answers, self.sent = answers, []

    def get(self, url: str, headers: dict, timeout) -> requests.Response:
        assert timeout
        self.sent.append((url, headers))
        status, extra, body = self.answers[url]
        resp = requests.Response()
        resp.status_code, resp.url, resp._content = status, url, json.dumps(body).encode()
        resp.headers.update(extra)
        return resp


def test_token_only_to_the_endpoint() -> None:
    sha, oid = "a" * 40, "b" * 64
    first = "https://hub.example/api/models/org/m/tree/main?recursive=true"
    elsewhere = "https://elsewhere.example/page2"
    entry = {"type": "file", "path": "m.gguf", "size": 5, "lfs": {"oid": oid, "size": 5}}
    session = FakeSession({
        first: (200, {"Link": f'<{elsewhere}>; rel="next"', "X-Repo-Commit": sha}, []),
        elsewhere: (200, {}, [entry]),
    })  # fmt: skip
    got = resolve(ModelSpec(repo="org/m", files=["m.gguf"]), endpoint="https://hub.example",
                  token="hf_secret", session=session, cache_dir=None)  # fmt: skip
    assert got.files[0].url == f"https://hub.example/org/m/resolve/{sha}/m.gguf"
    assert session.sent == [(first, {"Authorization": "Bearer hf_secret"}), (elsewhere, {})]


def test_error_echoing_the_token_is_scrubbed(waits) -> None:
    url = "https://hub.example/api/models/org/m/tree/main?recursive=true"
    session = FakeSession({url: (500, {"X-Error-Message": "bad token hf_secret"}, {})})
    with pytest.raises(HubError) as err:
        resolve(ModelSpec(repo="org/m", files=["m.gguf"]), endpoint="https://hub.example",
                token="hf_secret", session=session)  # fmt: skip
    assert str(err.value) == (
        "org/m: HTTP 500 from https://hub.example/api/models/org/m/tree/main after 4 attempts: "
        "bad token <secret>"
    )


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"repo": "just-a-name", "files": ["a.gguf"]}, "repo"),
        ({"repo": "org/name/x", "files": ["a.gguf"]}, "repo"),
        ({"repo": "org/name", "files": []}, "files"),
        ({"repo": "org/name", "files": ["../a.gguf"]}, "files"),
        ({"repo": "org/name", "files": ["/a.gguf"]}, "files"),
        ({"repo": "org/name", "files": ["a.gguf", "a.gguf"]}, "files"),
        ({"repo": "org/name", "files": ["a.gguf"], "revision": "a b"}, "revision"),
        ({"repo": "org/name", "files": ["a.gguf"], "size_bytes": 0}, "size_bytes"),
        ({"repo": "org/name", "files": ["a.gguf"], "sha256": "x"}, "sha256"),
    ],
)
def test_spec_validation(data, field) -> None:
    with pytest.raises(ValidationError) as err:
        ModelSpec.model_validate(data)
    assert [e["loc"][0] for e in err.value.errors()] == [field]


def test_spec_pinning() -> None:
    assert spec(revision="c" * 40).pinned and not spec(revision="main").pinned
    assert not spec(revision="C" * 40).pinned  # the Hub's shas are lowercase
    with pytest.raises(ValidationError):
        spec().revision = "v2"  # type: ignore[misc]


# --- listings a Hub (or something posing as one) should not send --------------------------

TREE = "https://hub.example/api/models/org/m/tree/main?recursive=true"
GOOD = {"type": "file", "path": "m.gguf", "size": 5, "lfs": {"oid": "b" * 64, "size": 5}}


def _resolve_listing(entries: list) -> hf.ResolvedModel:
    session = FakeSession({TREE: (200, {"X-Repo-Commit": "a" * 40}, entries)})
    return _resolve_with(session)


def _resolve_with(session) -> hf.ResolvedModel:
    spec = ModelSpec(repo="org/m", files=["m.gguf"])
    return resolve(
        spec, endpoint="https://hub.example", token=None, session=session, cache_dir=None
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "file", "size": 5},  # no path
        {"type": "file", "path": 7},
        {"path": "x.gguf"},  # no type
        {"type": "file", "path": "x.gguf", "lfs": ["b" * 64, 5]},
        "m.gguf",
        None,
    ],
)
def test_a_malformed_listing_entry_is_one_hub_error_naming_the_repo(bad) -> None:
    with pytest.raises(HubError) as err:
        _resolve_listing([GOOD, bad])
    message = str(err.value)
    assert message.startswith("org/m: the tree listing holds an entry that is not a file")
    assert "\n" not in message


def test_a_well_formed_listing_with_a_directory_resolves() -> None:
    got = _resolve_listing([{"type": "directory", "path": "sub", "oid": "c" * 40}, GOOD])
    assert [(f.path, f.size) for f in got.files] == [("m.gguf", 5)]


def test_a_listing_size_of_true_is_no_size() -> None:
    with pytest.raises(HubError, match="has no size in the listing"):
        _resolve_listing([{**GOOD, "lfs": {"oid": "b" * 64, "size": True}}])


class EndlessPages:
    """A listing whose every page links to a next one."""

    def __init__(self) -> None:
        self.sent = 0

    def get(self, url: str, headers: dict, timeout) -> requests.Response:
        self.sent += 1
        assert self.sent <= 50, "the listing is read with no bound on its pages"
        resp = requests.Response()
        resp.status_code, resp.url, resp._content = 200, url, b"[]"
        resp.headers["Link"] = f'<https://hub.example/page{self.sent}>; rel="next"'
        return resp


def test_pagination_is_bounded_and_named(monkeypatch) -> None:
    monkeypatch.setattr(hf, "MAX_PAGES", 5)
    session = EndlessPages()
    with pytest.raises(HubError) as err:
        _resolve_with(session)
    assert session.sent == 5
    assert str(err.value).startswith("org/m: the tree listing of 'main' goes on past 5 pages")


def test_a_listing_of_as_many_pages_as_the_bound_resolves(monkeypatch) -> None:
    monkeypatch.setattr(hf, "MAX_PAGES", 2)
    second = "https://hub.example/page2"
    first = {"Link": f'<{second}>; rel="next"', "X-Repo-Commit": "a" * 40}
    session = FakeSession({TREE: (200, first, []), second: (200, {}, [GOOD])})
    got = _resolve_with(session)
    assert got.files[0].path == "m.gguf"
