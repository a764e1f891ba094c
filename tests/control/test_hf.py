"""gpufleet.control.hf.resolve against the sandbox mirror (assets/mirror.py), a real server, and
against a fake transport behind huggingface_hub's client where a server cannot misbehave enough."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from pydantic import ValidationError

from gpufleet.control import hf
from gpufleet.control.hf import HubError, resolve
from gpufleet.core.schema import ModelSpec
from gpufleet.sandbox.models import git_blob_sha1
from tests.support.mirror import Server

PUBLIC = "gpufleet-sandbox/tiny-llama-GGUF"
SPLIT = "gpufleet-sandbox/tiny-llama-split-GGUF"
GATED = "gpufleet-sandbox/tiny-gated-GGUF"
SAFETENSORS = "gpufleet-sandbox/tiny-llama-safetensors"
PUBLIC_FILE = "tiny-llama-Q8_0.gguf"
SPLIT_FILES = [f"Q8_0/tiny-llama-split-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
GATED_MESSAGE = (
    f"{GATED} is gated: the Hub refused access without a valid HF_TOKEN (set it in secrets)"
)
NO_TOKEN_MESSAGE = (
    " is gated and no HF_TOKEN is set: set HF_TOKEN on the control machine"
    ' (secrets = {"HF_TOKEN": "env:HF_TOKEN"}) to a token with access to it, and mark the'
    ' model "gated": True'
)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def spec(repo: str = PUBLIC, files: list[str] | None = None, **kw) -> ModelSpec:
    if files is None and not kw.get("patterns"):
        files = [PUBLIC_FILE]
    return ModelSpec(repo=repo, files=files or [], **kw)


def test_public_repo_in_one_request(mirror, tree, cache) -> None:
    _, repos, _ = tree
    before = len(mirror.requests())
    got = resolve(spec(), endpoint=mirror.url + "/", token=None, cache_dir=cache)
    # the model's info with its files' metadata: the commit, sizes and etags at once
    [asked] = mirror.requests()[before:]
    assert f'"GET /api/models/{PUBLIC}/revision/main?blobs=true ' in asked
    commit = repos[PUBLIC]["sha"]
    meta = repos[PUBLIC]["files"][PUBLIC_FILE]
    assert (got.repo, got.revision, got.commit) == (PUBLIC, "main", commit)
    [file] = got.files
    assert (file.path, file.size, file.etag) == (PUBLIC_FILE, meta["size"], meta["sha256"])
    assert file.sha256 == file.etag
    assert file.url == f"{mirror.url}/{PUBLIC}/resolve/{commit}/{PUBLIC_FILE}"
    assert got.total_size == meta["size"]
    body = requests.get(file.url, timeout=10).content
    assert hashlib.sha256(body).hexdigest() == file.etag


def test_split_parts_in_order(mirror, tree, cache) -> None:
    _, repos, _ = tree
    got = resolve(spec(SPLIT, SPLIT_FILES), endpoint=mirror.url, token=None, cache_dir=cache)
    assert [f.path for f in got.files] == SPLIT_FILES
    assert [f.etag for f in got.files] == [repos[SPLIT]["files"][p]["sha256"] for p in SPLIT_FILES]
    assert got.total_size == sum(repos[SPLIT]["files"][p]["size"] for p in SPLIT_FILES)
    assert all(f"/resolve/{repos[SPLIT]['sha']}/Q8_0/" in f.url for f in got.files)


def test_a_file_outside_lfs_is_named_by_its_git_blob_sha1(mirror, tree, cache) -> None:
    _, repos, _ = tree
    got = resolve(spec(files=["README.md"]), endpoint=mirror.url, token=None, cache_dir=cache)
    [readme] = got.files
    meta = repos[PUBLIC]["files"]["README.md"]
    assert (readme.size, readme.etag, readme.sha256) == (meta["size"], meta["blob"], None)
    assert git_blob_sha1(requests.get(readme.url, timeout=10).content) == readme.etag


def test_patterns_add_what_they_match_sorted_after_the_listed_files(mirror, tree, cache) -> None:
    _, repos, _ = tree
    vllm = spec(SAFETENSORS, ["model.safetensors"], patterns=["*.json", "tokenizer*"])
    got = resolve(vllm, endpoint=mirror.url, token=None, cache_dir=cache)
    assert [f.path for f in got.files] == [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    files = repos[SAFETENSORS]["files"]
    assert got.files[0].etag == files["model.safetensors"]["sha256"]
    assert [f.etag for f in got.files[1:]] == [files[f.path]["blob"] for f in got.files[1:]]
    # a file listed and matched is fetched once, where it is listed
    both = spec(SAFETENSORS, ["tokenizer.json"], patterns=["tokenizer*"])
    got = resolve(both, endpoint=mirror.url, token=None, cache_dir=cache)
    assert [f.path for f in got.files] == ["tokenizer.json", "tokenizer_config.json"]
    only = spec(SAFETENSORS, patterns=["*.safetensors"])
    assert [f.path for f in resolve(only, endpoint=mirror.url, token=None).files] == [
        "model.safetensors"
    ]


def test_a_pattern_matching_nothing_is_one_line(mirror, cache) -> None:
    with pytest.raises(HubError) as err:
        resolve(spec(SAFETENSORS, patterns=["*.json", "*.bin"]), endpoint=mirror.url,
                token=None, cache_dir=cache)  # fmt: skip
    assert str(err.value) == (
        f"{SAFETENSORS}@main: no file matches '*.bin'; it has: .gitattributes, README.md,"
        " config.json, generation_config.json, model.safetensors, tokenizer.json,"
        " tokenizer_config.json"
    )


def test_gated(mirror, tree, cache) -> None:
    _, repos, token = tree
    gated = spec(GATED, ["tiny-gated-Q8_0.gguf"], gated=True)
    with pytest.raises(HubError) as err:
        resolve(gated, endpoint=mirror.url, token=None, cache_dir=cache)
    assert str(err.value) == GATED + NO_TOKEN_MESSAGE
    public = resolve(spec(PUBLIC, [PUBLIC_FILE]), endpoint=mirror.url, token=None, cache_dir=cache)
    assert public.files[0].path == PUBLIC_FILE  # a public repository needs no token
    wrong = "hf_wrong_" + secrets.token_hex(8)
    with pytest.raises(HubError) as err:
        resolve(gated, endpoint=mirror.url, token=wrong, cache_dir=cache)
    assert str(err.value) == GATED_MESSAGE
    assert token not in str(err.value) and wrong not in str(err.value)
    got = resolve(gated, endpoint=mirror.url, token=token, cache_dir=cache)
    assert got.files[0].etag == repos[GATED]["files"]["tiny-gated-Q8_0.gguf"]["sha256"]
    assert token not in mirror.log.read_text()


def test_no_token_saved_on_this_machine_is_sent(mirror, tree, cache, monkeypatch) -> None:
    _, _, token = tree
    monkeypatch.setenv("HF_TOKEN", token)  # what huggingface_hub would send by default
    with pytest.raises(HubError, match="is gated and no HF_TOKEN is set"):
        resolve(spec(GATED, ["tiny-gated-Q8_0.gguf"]), endpoint=mirror.url, token=None,
                cache_dir=cache)  # fmt: skip


def test_missing_file_lists_what_is_there(mirror, cache) -> None:
    with pytest.raises(HubError) as err:
        resolve(spec(files=["tiny-llama-Q4_K_M.gguf"]), endpoint=mirror.url, token=None,
                cache_dir=cache)  # fmt: skip
    assert str(err.value) == (
        f"{PUBLIC}@main: no file 'tiny-llama-Q4_K_M.gguf'; it has: .gitattributes, README.md,"
        f" {PUBLIC_FILE}"
    )


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
    # the one request failed twice: waited 1 then 2 s, or Retry-After's 1 s after a 429
    assert waits == ([1, 1] if kind == "429" else [1, 2])


def test_a_lasting_hub_error_names_the_url_status_and_attempts(mirror, cache, waits) -> None:
    with pytest.raises(HubError) as err:
        resolve(spec(), endpoint=f"{mirror.url}/fault/api-503", token="hf_x", cache_dir=cache)
    assert str(err.value) == (
        f"{PUBLIC}: HTTP 503 from {mirror.url}/fault/api-503/api/models/{PUBLIC}/revision/main"
        " after 4 attempts: Service Unavailable"
    )
    assert waits == [1, 2, 4]


def test_a_refusal_is_not_retried(mirror, cache, waits) -> None:
    with pytest.raises(HubError) as err:
        resolve(spec(), endpoint=f"{mirror.url}/fault/api-404", token=None, cache_dir=cache)
    assert "HTTP 404 from" in str(err.value) and "attempts" not in str(err.value)
    assert waits == []


def test_a_large_repository_is_listed_from_its_tree(tree, cache, monkeypatch) -> None:
    tmp, repos, _ = tree
    monkeypatch.setattr(hf, "LARGE_REPO", 3)  # the split repo has 5 files
    server = Server(tmp, "--page-size", "2")
    try:
        got = resolve(spec(SPLIT, SPLIT_FILES[:1], patterns=["Q8_0/*"]), endpoint=server.url,
                      token=None, cache_dir=cache)  # fmt: skip
        asked = server.requests()
    finally:
        server.stop()
    assert [f.path for f in got.files] == SPLIT_FILES
    assert [f.etag for f in got.files] == [repos[SPLIT]["files"][p]["sha256"] for p in SPLIT_FILES]
    commit = repos[SPLIT]["sha"]
    pages = [line for line in asked if f"/tree/{commit}" in line]
    # five files and the Q8_0 folder, two a page, at the commit the info named
    assert len(asked) == 1 + len(pages) and len(pages) == 3


def test_pinned_revision_is_cached(tree, cache, waits) -> None:
    tmp, repos, _ = tree
    commit = repos[PUBLIC]["sha"]
    server = Server(tmp)
    try:
        pinned = spec(revision=commit)
        first = resolve(pinned, endpoint=server.url, token=None, cache_dir=cache)
        assert len(server.requests()) == 1
        assert resolve(pinned, endpoint=server.url, token=None, cache_dir=cache) == first
        assert len(server.requests()) == 1  # a converge that changes nothing asks nothing
        # another endpoint is another key; a branch is asked every time
        other = server.url.replace("127.0.0.1", "localhost")
        assert resolve(pinned, endpoint=other, token=None, cache_dir=cache).commit == commit
        for _ in range(2):
            resolve(spec(revision="main"), endpoint=server.url, token=None, cache_dir=cache)
        assert len(server.requests()) == 1 + 1 + 2
        # patterns are part of the key
        with_json = spec(files=[PUBLIC_FILE], patterns=["*.md"], revision=commit)
        assert len(resolve(with_json, endpoint=server.url, token=None, cache_dir=cache).files) == 2
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
    # an entry of the old shape (sha256, no etag) is resolved again too
    old = {"repo": PUBLIC, "revision": commit, "commit": commit, "files": [
        {"path": PUBLIC_FILE, "size": 1, "sha256": "b" * 64, "url": "u"}]}  # fmt: skip
    stored.write_text(json.dumps(old))
    with pytest.raises(HubError, match="cannot reach"):
        resolve(pinned, endpoint=server.url, token=None, cache_dir=cache)


LAZY = """
import sys
from pathlib import Path
from gpufleet.control import hf
from gpufleet.core.schema import ModelSpec
spec = ModelSpec(repo=sys.argv[1], files=[sys.argv[2]], revision=sys.argv[3])
got = hf.resolve(spec, endpoint="http://127.0.0.1:9", token=None, cache_dir=Path(sys.argv[4]))
print(got.commit, sorted(m for m in ("huggingface_hub", "httpx2") if m in sys.modules))
"""


def test_a_run_whose_models_are_cached_imports_no_hub_client(mirror, tree, cache) -> None:
    commit = tree[1][PUBLIC]["sha"]
    pinned = spec(revision=commit)
    hf._cache_write(
        hf._cache_path(cache, "http://127.0.0.1:9", pinned),
        resolve(pinned, endpoint=mirror.url, token=None, cache_dir=cache / "other"),
    )
    out = subprocess.run(
        [sys.executable, "-c", LAZY, PUBLIC, PUBLIC_FILE, commit, str(cache)],
        capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.stdout.split() == [commit, "[]"]


def test_default_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GPUFLEET_CACHE", str(tmp_path))
    assert hf.default_cache_dir() == tmp_path / "hf"
    monkeypatch.delenv("GPUFLEET_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hf.default_cache_dir() == tmp_path / ".cache" / "gpufleet" / "hf"


# --- a fake Hub behind huggingface_hub's own client ---------------------------------------

SHA, OID = "a" * 40, "b" * 64
INFO = "https://hub.example/api/models/org/m/revision/main"
GOOD = {"rfilename": "m.gguf", "size": 5, "blobId": "c" * 40,
        "lfs": {"sha256": OID, "size": 5, "pointerSize": 130}}  # fmt: skip


class FakeHub:
    """Answers from a dict of URL (without its query) -> (status, headers, body), or a list
    of them answered in turn; records each request's URL and Authorization header."""

    def __init__(self) -> None:
        self.answers: dict[str, object] = {}
        self.sent: list[tuple[str, str | None]] = []

    def __call__(self, request):
        import httpx2

        url = str(request.url).split("?")[0]
        self.sent.append((url, request.headers.get("Authorization")))
        answer = self.answers[url]
        status, headers, body = answer.pop(0) if isinstance(answer, list) else answer
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx2.Response(status, headers=headers, content=content)


@pytest.fixture
def fake(monkeypatch) -> FakeHub:
    import httpx2
    import huggingface_hub

    hub = FakeHub()

    def client():
        return httpx2.Client(transport=httpx2.MockTransport(hub), follow_redirects=True)

    monkeypatch.setattr(hf, "_new_client", client)
    huggingface_hub.close_session()  # the next request builds a client with the fake
    yield hub
    huggingface_hub.close_session()


def info(*siblings, sha: str = SHA, **extra) -> tuple[int, dict, dict]:
    return 200, {}, {"id": "org/m", "sha": sha, "siblings": list(siblings), **extra}


def resolve_fake(token: str | None = None, **kw) -> hf.ResolvedModel:
    model = ModelSpec(repo="org/m", files=kw.pop("files", ["m.gguf"]), **kw)
    return resolve(model, endpoint="https://hub.example", token=token, cache_dir=None)


def test_a_gated_model_the_hub_describes_to_anyone_still_needs_a_token(fake) -> None:
    # huggingface.co answers a gated model's info without a token; only downloads are refused
    fake.answers[INFO] = info(GOOD, gated="manual")
    with pytest.raises(HubError) as err:
        resolve_fake()
    assert str(err.value) == "org/m" + NO_TOKEN_MESSAGE
    assert resolve_fake(token="hf_secret").files[0].etag == OID


def test_token_only_to_the_endpoint(fake, monkeypatch) -> None:
    elsewhere = "https://elsewhere.example/api/models/org/m/revision/main"
    fake.answers[INFO] = (302, {"Location": elsewhere}, b"")
    fake.answers[elsewhere] = info(GOOD)
    got = resolve_fake(token="hf_secret")
    assert got.files[0].url == f"https://hub.example/org/m/resolve/{SHA}/m.gguf"
    assert fake.sent == [(INFO, "Bearer hf_secret"), (elsewhere, None)]
    # a tree listing's next page on another host gets no token either
    monkeypatch.setattr(hf, "LARGE_REPO", 1)
    tree = f"https://hub.example/api/models/org/m/tree/{SHA}"
    page2 = "https://elsewhere.example/page2"
    entry = {"type": "file", "path": "m.gguf", "size": 5, "oid": "c" * 40,
             "lfs": {"oid": OID, "size": 5, "pointerSize": 130}}  # fmt: skip
    fake.answers.update({
        INFO: info(GOOD),
        tree: (200, {"Link": f'<{page2}>; rel="next"'}, []),
        page2: (200, {}, [entry]),
    })  # fmt: skip
    fake.sent.clear()
    assert resolve_fake(token="hf_secret").files[0].etag == OID
    assert fake.sent == [(INFO, "Bearer hf_secret"), (tree, "Bearer hf_secret"), (page2, None)]


def test_an_error_echoing_the_token_is_scrubbed(fake, waits) -> None:
    fake.answers[INFO] = (500, {"X-Error-Message": "bad token hf_secret"}, {})
    with pytest.raises(HubError) as err:
        resolve_fake(token="hf_secret")
    assert str(err.value) == f"org/m: HTTP 500 from {INFO} after 4 attempts: bad token <secret>"
    assert waits == [1, 2, 4]


def test_503_then_200_waits_what_retry_after_asks(fake, waits) -> None:
    fake.answers[INFO] = [(503, {"Retry-After": "7"}, {}), (503, {}, {}), info(GOOD)]
    assert resolve_fake().commit == SHA
    assert waits == [7, 2] and len(fake.sent) == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"size": 5},  # no rfilename
        "m.gguf",
        None,
        {"rfilename": "m.gguf", "size": 5, "lfs": ["b" * 64, 5]},
    ],
)
def test_a_malformed_answer_is_one_hub_error_naming_the_repo(fake, bad) -> None:
    fake.answers[INFO] = info(GOOD, bad)
    with pytest.raises(HubError) as err:
        resolve_fake()
    message = str(err.value)
    assert message.startswith("org/m: https://hub.example answered 'main' with something that")
    assert "\n" not in message


def test_an_answer_that_is_not_json_is_one_hub_error(fake) -> None:
    fake.answers[INFO] = (200, {}, b"<html>a captive portal</html>")
    with pytest.raises(HubError, match="^org/m: https://hub.example answered 'main' with some"):
        resolve_fake()


@pytest.mark.parametrize(
    ("sibling", "message"),
    [
        ({**GOOD, "lfs": {**GOOD["lfs"], "sha256": "x"}}, "has no sha256 or git blob sha1"),
        ({**GOOD, "lfs": None, "blobId": None}, "has no sha256 or git blob sha1"),
        ({**GOOD, "size": True}, "has no size in the listing"),
        ({**GOOD, "size": None}, "has no size in the listing"),
    ],
)
def test_a_file_without_a_size_or_etag_is_refused(fake, sibling, message) -> None:
    fake.answers[INFO] = info(sibling)
    with pytest.raises(HubError, match=f"^org/m@main: m.gguf {message}"):
        resolve_fake()


def test_no_commit_sha_is_refused(fake) -> None:
    fake.answers[INFO] = info(GOOD, sha="main")
    with pytest.raises(HubError, match="^org/m: the Hub gave no commit sha for 'main'$"):
        resolve_fake()


# --- the spec ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"repo": "just-a-name", "files": ["a.gguf"]}, "repo"),
        ({"repo": "org/name/x", "files": ["a.gguf"]}, "repo"),
        ({"repo": "org/name", "files": ["../a.gguf"]}, "files"),
        ({"repo": "org/name", "files": ["/a.gguf"]}, "files"),
        ({"repo": "org/name", "files": ["a.gguf", "a.gguf"]}, "files"),
        ({"repo": "org/name", "patterns": ["*.json", "*.json"]}, "patterns"),
        ({"repo": "org/name", "patterns": [" "]}, "patterns"),
        ({"repo": "org/name", "files": ["a.gguf"], "revision": "a b"}, "revision"),
        ({"repo": "org/name", "files": ["a.gguf"], "size_bytes": 0}, "size_bytes"),
        ({"repo": "org/name", "files": ["a.gguf"], "sha256": "x"}, "sha256"),
    ],
)
def test_spec_validation(data, field) -> None:
    with pytest.raises(ValidationError) as err:
        ModelSpec.model_validate(data)
    assert [e["loc"][0] for e in err.value.errors()] == [field]


@pytest.mark.parametrize("data", [{}, {"files": []}, {"files": [], "patterns": []}])
def test_a_spec_without_files_or_patterns_is_one_message(data) -> None:
    with pytest.raises(ValidationError) as err:
        ModelSpec.model_validate({"repo": "org/name", **data})
    [error] = err.value.errors()
    assert error["loc"] == ("files",)  # the path names what is missing
    assert error["msg"].endswith("give files, patterns or both: nothing would be fetched")
    assert ModelSpec(repo="org/name", patterns=["*.json"]).files == []


def test_spec_pinning() -> None:
    assert spec(revision="c" * 40).pinned and not spec(revision="main").pinned
    assert not spec(revision="C" * 40).pinned  # the Hub's shas are lowercase
    with pytest.raises(ValidationError):
        spec().revision = "v2"  # type: ignore[misc]
