"""Hugging Face Hub metadata, read on the control machine: which bytes a model is.

``resolve`` turns a ``ModelSpec`` (repo, revision, files) into the commit it points at and, per
file, the size, sha256 and a download URL pinned to that commit. Hosts then fetch with
``templates/fetch-model.sh`` and verify against these values; they never ask the Hub what a
model is. The endpoint is a setting (``hf_endpoint``, the ``HF_ENDPOINT`` convention), so a
mirror works the same way.

A revision that is a 40-hex commit sha cannot change, so its resolution is cached on disk and a
converge that changes nothing sends no request to the Hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin, urlsplit

from gpufleet.core.known import hub_file_url
from gpufleet.core.schema import ModelSpec

if TYPE_CHECKING:  # imported when the Hub is asked: a run whose models are cached never is
    import requests

TIMEOUT = (10, 60)  # connect, read (seconds)
# What a Hub or mirror may answer on a bad minute: tried again, up to ATTEMPTS times in all,
# waiting its Retry-After (at most MAX_WAIT) or 1, 2, 4 s.
RETRIED = frozenset({408, 429, 500, 502, 503, 504})
ATTEMPTS = 4
MAX_WAIT = 60.0
_sleep = time.sleep  # tests count the waits instead
SHA1_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_LISTED = 20
# pages of one tree listing read at most: the Hub pages 1000 entries at a time (huggingface_hub
# reads the same Link header), so this is a million files; a mirror whose next links never end
# stops here instead of running the control machine out of memory
MAX_PAGES = 1000


class HubError(ValueError):
    """The Hub could not tell what a model is; the message is one line and never the token."""


@dataclass(frozen=True)
class ModelFile:
    """One file to fetch: what the host verifies it against and where it comes from."""

    path: str
    size: int
    sha256: str
    url: str


@dataclass(frozen=True)
class ResolvedModel:
    """A ``ModelSpec`` pinned to a commit, its files in the order the spec lists them."""

    repo: str
    revision: str
    commit: str
    files: list[ModelFile]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def from_dict(cls, data: dict) -> ResolvedModel:
        return cls(**{**data, "files": [ModelFile(**f) for f in data["files"]]})


def default_cache_dir() -> Path:
    """``$GPUFLEET_CACHE/hf``, else ``~/.cache/gpufleet/hf``."""
    root = os.environ.get("GPUFLEET_CACHE") or Path.home() / ".cache" / "gpufleet"
    return Path(root) / "hf"


def _cache_path(cache_dir: Path, endpoint: str, spec: ModelSpec) -> Path:
    key = json.dumps([endpoint, spec.repo, spec.revision, spec.files])
    return cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def _cache_read(path: Path) -> ResolvedModel | None:
    try:
        return ResolvedModel.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None  # absent or unreadable: resolve again


def _cache_write(path: Path, model: ResolvedModel) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
            json.dump(asdict(model), tmp, indent=1)
        os.replace(tmp.name, path)
    except OSError:
        pass  # a cache that cannot be written only costs a lookup next time


def _reason(exc: requests.RequestException) -> str:
    import requests

    if isinstance(exc, requests.Timeout):
        return "timed out"
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    return m.group(1).strip() if m else type(exc).__name__


def _retry_after(resp: requests.Response) -> float | None:
    """The seconds a Retry-After header asks for (its delta-seconds form), else None."""
    value = resp.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


class _Hub:
    def __init__(
        self, spec: ModelSpec, endpoint: str, token: str | None, session: requests.Session
    ) -> None:
        self.spec, self.endpoint, self.token, self.session = spec, endpoint, token, session
        self.origin = urlsplit(endpoint)[:2]

    def get(self, url: str) -> requests.Response:
        # the token goes only to the endpoint's own origin, never to a host a Link names
        auth = self.token and urlsplit(url)[:2] == self.origin
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        import requests

        wait = 1.0
        for attempt in range(1, ATTEMPTS + 1):
            last = attempt == ATTEMPTS
            tries = f" after {ATTEMPTS} attempts" if last else ""
            try:
                resp = self.session.get(url, headers=headers, timeout=TIMEOUT)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if last:
                    raise HubError(f"cannot reach {self.endpoint}{tries}: {_reason(exc)}") from None
                pause = wait
            except requests.RequestException as exc:
                raise HubError(f"cannot reach {self.endpoint}: {_reason(exc)}") from None
            else:
                if resp.status_code == 200:
                    return resp
                if resp.status_code not in RETRIED or last:
                    raise HubError(self.refusal(resp, tries))
                pause = _retry_after(resp) or wait
            _sleep(min(pause, MAX_WAIT))
            wait *= 2
        raise AssertionError("unreachable")  # the last attempt returned or raised

    def refusal(self, resp: requests.Response, tries: str = "") -> str:
        spec, code = self.spec, resp.headers.get("X-Error-Code", "")
        if code == "GatedRepo" and not self.token:
            return (
                f"{spec.repo} is gated and no HF_TOKEN is set: set HF_TOKEN on the control"
                ' machine (secrets = {"HF_TOKEN": "env:HF_TOKEN"}) to a token with access to it,'
                ' and mark the model "gated": True'
            )
        if code == "GatedRepo":
            return (
                f"{spec.repo} is gated: the Hub refused access without a valid HF_TOKEN"
                " (set it in secrets)"
            )
        if code == "RepoNotFound":
            hint = "" if self.token else " (or it is private and needs HF_TOKEN)"
            return f"{spec.repo}: repository not found at {self.endpoint}{hint}"
        if code == "RevisionNotFound":
            return f"{spec.repo}: revision {spec.revision!r} not found"
        detail = resp.headers.get("X-Error-Message") or resp.reason or ""
        where = resp.url.split("?")[0]  # the endpoint and the path asked for
        return f"{spec.repo}: HTTP {resp.status_code} from {where}{tries}: {detail}"

    def json(self, url: str) -> tuple[requests.Response, Any]:
        resp = self.get(url)
        try:
            return resp, resp.json()
        except ValueError:
            raise HubError(f"{self.spec.repo}: {url.split('?')[0]} did not answer JSON") from None


def resolve(
    spec: ModelSpec,
    *,
    endpoint: str,
    token: str | None,
    session: requests.Session | None = None,
    cache_dir: Path | None = None,
) -> ResolvedModel:
    """
    Pin a model to a commit and read each file's size and sha256 from the Hub's tree listing.

    + spec: the model as declared
    + endpoint: Hub URL (``https://huggingface.co`` or a mirror)
    + token: HF_TOKEN, sent as ``Authorization: Bearer`` to the endpoint only; None for none
    + session: a ``requests.Session`` to reuse connections
    + cache_dir: where resolutions of commit shas are kept (default ``default_cache_dir()``)

    Raises ``HubError`` with one line: gated, unknown repo or revision, a missing file, a file
    outside Git LFS (no sha256 to verify), an unreachable endpoint.
    """
    endpoint = endpoint.rstrip("/")
    cache = _cache_path(cache_dir or default_cache_dir(), endpoint, spec) if spec.pinned else None
    if cache and (hit := _cache_read(cache)):
        return hit
    if session is None:
        import requests

        session = requests.Session()
    try:
        model = _resolve(_Hub(spec, endpoint, token, session))
    except HubError as exc:
        if token and token in str(exc):  # the Hub echoing something back must not leak it
            raise HubError(str(exc).replace(token, "<secret>")) from None
        raise
    if cache:
        _cache_write(cache, model)
    return model


def _entry(spec: ModelSpec, item: Any) -> dict:
    """One entry of a tree listing, checked for the shape the Hub gives it: an object with a
    string ``type`` and ``path``, and ``lfs`` (when there) an object."""
    if (
        isinstance(item, dict)
        and isinstance(item.get("type"), str)
        and isinstance(item.get("path"), str)
        and isinstance(item.get("lfs") or {}, dict)
    ):
        return item
    shown = json.dumps(item)
    shown = shown if len(shown) <= 120 else f"{shown[:120]}..."
    raise HubError(
        f"{spec.repo}: the tree listing holds an entry that is not a file or directory "
        f"(an object with a string type and path): {shown}"
    )


def _resolve(hub: _Hub) -> ResolvedModel:
    spec, endpoint = hub.spec, hub.endpoint
    url: str | None = (
        f"{endpoint}/api/models/{spec.repo}/tree/{quote(spec.revision, safe='')}?recursive=true"
    )
    entries: list[dict] = []
    commit, seen = None, set()
    while url and url not in seen:
        if len(seen) == MAX_PAGES:
            raise HubError(
                f"{spec.repo}: the tree listing of {spec.revision!r} goes on past {MAX_PAGES} "
                f"pages at {endpoint}; is the endpoint a Hub or a mirror of one?"
            )
        seen.add(url)
        resp, page = hub.json(url)
        if not isinstance(page, list):
            raise HubError(f"{spec.repo}: the tree listing is not a list")
        entries += [_entry(spec, item) for item in page]
        commit = commit or resp.headers.get("X-Repo-Commit")
        nxt = resp.links.get("next", {}).get("url")
        url = urljoin(resp.url, nxt) if nxt else None
    if not commit:
        if spec.pinned:
            commit = spec.revision
        else:
            rev = quote(spec.revision, safe="")
            info = hub.json(f"{endpoint}/api/models/{spec.repo}/revision/{rev}")[1]
            commit = info.get("sha") if isinstance(info, dict) else None
    if not (isinstance(commit, str) and SHA1_RE.fullmatch(commit)):
        raise HubError(f"{spec.repo}: the Hub gave no commit sha for {spec.revision!r}")

    listed = {e["path"]: e for e in entries if e["type"] == "file"}
    files = []
    for path in spec.files:
        entry = listed.get(path)
        if entry is None:
            there = sorted(listed)
            shown = ", ".join(there[:MAX_LISTED]) + (
                f" (and {len(there) - MAX_LISTED} more)" if len(there) > MAX_LISTED else ""
            )
            raise HubError(
                f"{spec.repo}@{spec.revision}: no file {path!r}; it has: {shown or 'no files'}"
            )
        lfs = entry.get("lfs") or {}
        sha256, size = lfs.get("oid"), lfs.get("size")
        if isinstance(size, bool):  # JSON true is no size
            size = None
        if not (isinstance(sha256, str) and SHA256_RE.fullmatch(sha256)):
            raise HubError(
                f"{spec.repo}@{spec.revision}: {path} is not stored in Git LFS, so the Hub"
                " gives no sha256 to verify it against"
            )
        if not isinstance(size, int) or size < 1:
            raise HubError(f"{spec.repo}@{spec.revision}: {path} has no size in the listing")
        url = hub_file_url(endpoint, spec.repo, commit, path)
        files.append(ModelFile(path=path, size=size, sha256=sha256, url=url))
    return ResolvedModel(repo=spec.repo, revision=spec.revision, commit=commit, files=files)
