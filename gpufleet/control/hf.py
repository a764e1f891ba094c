"""Hugging Face Hub metadata, read on the control machine: which bytes a model is.

``resolve`` turns a ``ModelSpec`` (repo, revision, files, patterns) into the commit it points at
and, per file, the size, the etag and a download URL pinned to that commit. The etag is what the
Hub cache names a blob by (``gpufleet.core.hubcache``): the sha256 of a file in Git LFS, else
its git blob sha1. Hosts then fetch and verify against these values; they never ask the Hub what
a model is. The endpoint is a setting (``hf_endpoint``, the ``HF_ENDPOINT`` convention), so a
mirror works the same way.

The Hub is asked through ``huggingface_hub``'s ``HfApi``, imported only when a model has to be
asked for: a revision that is a 40-hex commit sha cannot change, so its resolution is cached on
disk, and a converge that changes nothing sends no request and imports no Hub client.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gpufleet.core.hubcache import SHA1_RE, SHA256_RE
from gpufleet.core.known import hub_file_url
from gpufleet.core.schema import ModelSpec

if TYPE_CHECKING:
    import httpx2
    from huggingface_hub import HfApi

# every request of a resolution: connect, then each read, write or wait for a pooled connection
TIMEOUT = {"connect": 10.0, "read": 60.0, "write": 60.0, "pool": 60.0}
# What a Hub or mirror may answer on a bad minute: tried again, up to ATTEMPTS times in all,
# waiting its Retry-After (at most MAX_WAIT) or 1, 2, 4 s.
RETRIED = frozenset({408, 429, 500, 502, 503, 504})
ATTEMPTS = 4
MAX_WAIT = 60.0
_sleep = time.sleep  # tests count the waits instead
MAX_LISTED = 20
# A model's info lists every file (its "siblings"), except that the Hub may cut that list short
# on a repository of many files; huggingface_hub stopped trusting it from 1000 files on
# (huggingface/huggingface_hub#3565), and so does this: such a repository's tree is listed.
LARGE_REPO = 1000


class HubError(ValueError):
    """The Hub could not tell what a model is; the message is one line and never the token."""


@dataclass(frozen=True)
class ModelFile:
    """One file to fetch: what the host verifies it against and where it comes from.

    + etag: the sha256 of a file stored in Git LFS (64 hex), else its git blob sha1 (40 hex)
    """

    path: str
    size: int
    etag: str
    url: str

    @property
    def sha256(self) -> str | None:
        """The etag when it is a sha256 (a Git LFS file), else None."""
        return self.etag if SHA256_RE.fullmatch(self.etag) else None


@dataclass(frozen=True)
class ResolvedModel:
    """A ``ModelSpec`` pinned to a commit: its listed files in their order, then the files its
    patterns match, sorted."""

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
    key = json.dumps([endpoint, spec.repo, spec.revision, spec.files, spec.patterns])
    return cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def _cache_read(path: Path) -> ResolvedModel | None:
    try:
        return ResolvedModel.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None  # absent, unreadable or an older shape: resolve again


def _cache_write(path: Path, model: ResolvedModel) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
            json.dump(asdict(model), tmp, indent=1)
        os.replace(tmp.name, path)
    except OSError:
        pass  # a cache that cannot be written only costs a lookup next time


def resolve(
    spec: ModelSpec, *, endpoint: str, token: str | None, cache_dir: Path | None = None
) -> ResolvedModel:
    """
    Pin a model to a commit and read each file's size and etag from the Hub.

    + spec: the model as declared
    + endpoint: Hub URL (``https://huggingface.co`` or a mirror)
    + token: HF_TOKEN, sent as ``Authorization: Bearer`` to the endpoint only; None for none
      (a token saved on this machine by ``hf auth login`` is not used)
    + cache_dir: where resolutions of commit shas are kept (default ``default_cache_dir()``)

    One request: the model's info with its files' metadata (``HfApi.model_info(...,
    files_metadata=True)``); a repository of ``LARGE_REPO`` files or more also has its tree
    listed at that commit.

    Raises ``HubError`` with one line: gated, unknown repo or revision, a missing file, a pattern
    matching nothing, an unreachable endpoint.

    Example: ``resolve(ModelSpec(repo="org/m", patterns=["*.json"]), endpoint=url, token=None)``
    """
    endpoint = endpoint.rstrip("/")
    cache = _cache_path(cache_dir or default_cache_dir(), endpoint, spec) if spec.pinned else None
    if cache and (hit := _cache_read(cache)):
        return hit
    try:
        model = _Hub(spec, endpoint, token).resolve()
    except HubError as exc:
        if token and token in str(exc):  # the Hub echoing something back must not leak it
            raise HubError(str(exc).replace(token, "<secret>")) from None
        raise
    if cache:
        _cache_write(cache, model)
    return model


# --- asking the Hub ---------------------------------------------------------------------

# (scheme, host[:port]) of the endpoint a resolution asks, while it asks: its requests get
# TIMEOUT, and the token goes to that origin only (not to another host a redirect or a
# listing's next page names). None: huggingface_hub used by someone else, left alone.
_asking: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "gpufleet_hub_origin", default=None
)
_installed: list[bool] = []


def _guard(request: httpx2.Request) -> None:
    """A request hook on huggingface_hub's shared client (see ``_asking``)."""
    origin = _asking.get()
    if origin is None:
        return
    if (request.url.scheme, request.url.netloc.decode().lower()) != origin:
        request.headers.pop("Authorization", None)
    if all(v is None for v in request.extensions.get("timeout", {}).values()):
        request.extensions["timeout"] = TIMEOUT


def _new_client() -> httpx2.Client:
    # huggingface_hub's own client (its request hook, redirects followed); tests swap in theirs
    from huggingface_hub.utils._http import default_client_factory

    return default_client_factory()


def _client() -> httpx2.Client:
    client = _new_client()
    client.event_hooks["request"].append(_guard)
    return client


def _api(endpoint: str, token: str | None) -> HfApi:
    import huggingface_hub

    if not _installed:
        huggingface_hub.set_client_factory(_client)  # replaces the shared client: ours next
        _installed.append(True)
    # token=False: no token saved on this machine is sent in its place
    return huggingface_hub.HfApi(endpoint=endpoint, token=token or False)


def _reason(exc: Exception) -> str:
    import httpx2

    if isinstance(exc, httpx2.TimeoutException):
        return "timed out"
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    return m.group(1).strip() if m else type(exc).__name__


def _retry_after(headers: Any) -> float | None:
    """The seconds a Retry-After header asks for (its delta-seconds form), else None."""
    value = headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


@dataclass(frozen=True)
class _Entry:
    """One file of a listing, from a model info's siblings or a tree's files."""

    path: str
    size: Any
    etag: Any  # the LFS sha256, else the git blob id


class _Hub:
    def __init__(self, spec: ModelSpec, endpoint: str, token: str | None) -> None:
        self.spec, self.endpoint, self.token = spec, endpoint, token
        scheme, netloc = urlsplit(endpoint)[:2]
        self.origin = (scheme, netloc.lower())

    def ask(self, call, *, attempts: int = ATTEMPTS):
        """``call()`` with the bad minutes waited out; every failure becomes one ``HubError``."""
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        retried = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)
        wait = 1.0
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            tries = f" after {attempts} attempts" if last and attempts > 1 else ""
            asking = _asking.set(self.origin)
            try:
                return call()
            except HfHubHTTPError as exc:
                resp = exc.response
                if resp.status_code not in RETRIED or last:
                    raise HubError(self.refusal(exc, tries)) from None
                pause = _retry_after(resp.headers) or wait
            except retried as exc:
                if last:
                    raise HubError(f"cannot reach {self.endpoint}{tries}: {_reason(exc)}") from None
                pause = wait
            except OfflineModeIsEnabled:
                raise HubError(f"cannot reach {self.endpoint}: HF_HUB_OFFLINE is set") from None
            except httpx2.HTTPError as exc:
                raise HubError(f"cannot reach {self.endpoint}: {_reason(exc)}") from None
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise HubError(
                    f"{self.spec.repo}: {self.endpoint} answered {self.spec.revision!r} with"
                    f" something that is not a Hub's answer ({type(exc).__name__}: {exc})"
                ) from None
            finally:
                _asking.reset(asking)
            _sleep(min(pause, MAX_WAIT))
            wait *= 2
        raise AssertionError("unreachable")  # the last attempt returned or raised

    def refusal(self, exc: Exception, tries: str = "") -> str:
        from huggingface_hub.errors import (
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        spec = self.spec
        if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError: a subclass of it
            return self.gated()
        if isinstance(exc, RepositoryNotFoundError):
            hint = "" if self.token else " (or it is private and needs HF_TOKEN)"
            return f"{spec.repo}: repository not found at {self.endpoint}{hint}"
        if isinstance(exc, RevisionNotFoundError):
            return f"{spec.repo}: revision {spec.revision!r} not found"
        # anything else, EntryNotFound included: what the server said, and where
        resp = exc.response  # type: ignore[attr-defined]
        detail = resp.headers.get("X-Error-Message") or resp.reason_phrase or ""
        where = str(resp.request.url).split("?")[0]  # the endpoint and the path asked for
        return f"{spec.repo}: HTTP {resp.status_code} from {where}{tries}: {detail}"

    def gated(self) -> str:
        if not self.token:
            return (
                f"{self.spec.repo} is gated and no HF_TOKEN is set: set HF_TOKEN on the control"
                ' machine (secrets = {"HF_TOKEN": "env:HF_TOKEN"}) to a token with access to it,'
                ' and mark the model "gated": True'
            )
        return (
            f"{self.spec.repo} is gated: the Hub refused access without a valid HF_TOKEN"
            " (set it in secrets)"
        )

    def resolve(self) -> ResolvedModel:
        spec = self.spec
        api = _api(self.endpoint, self.token)
        info = self.ask(
            lambda: api.model_info(spec.repo, revision=spec.revision, files_metadata=True)
        )
        commit = info.sha
        if not (isinstance(commit, str) and SHA1_RE.fullmatch(commit)):
            raise HubError(f"{spec.repo}: the Hub gave no commit sha for {spec.revision!r}")
        if info.gated and not self.token:
            # huggingface.co shows a gated model's files to anyone; only downloads are refused
            raise HubError(self.gated())
        siblings = info.siblings or []
        if len(siblings) < LARGE_REPO:
            entries = [
                _Entry(s.rfilename, s.size, s.lfs.sha256 if s.lfs else s.blob_id) for s in siblings
            ]
        else:  # huggingface_hub's own retries (and its waits) page through the tree
            tree = self.ask(
                lambda: list(api.list_repo_tree(spec.repo, revision=commit, recursive=True)),
                attempts=1,
            )
            entries = [
                _Entry(f.path, f.size, f.lfs.sha256 if f.lfs else f.blob_id)
                for f in tree
                if hasattr(f, "blob_id")  # a file, not a folder
            ]
        listed = {e.path: e for e in entries}
        files = [self.file(listed, path, commit) for path in self.wanted(listed)]
        return ResolvedModel(repo=spec.repo, revision=spec.revision, commit=commit, files=files)

    def wanted(self, listed: dict[str, _Entry]) -> list[str]:
        """The spec's files in their order, then those its patterns match, sorted."""
        from huggingface_hub.utils import filter_repo_objects

        spec, where = self.spec, f"{self.spec.repo}@{self.spec.revision}"
        for path in spec.files:
            if path not in listed:
                raise HubError(f"{where}: no file {path!r}; it has: {self.shown(listed)}")
        matched: set[str] = set()
        for pattern in spec.patterns:
            found = set(filter_repo_objects(listed, allow_patterns=[pattern]))
            if not found:
                raise HubError(
                    f"{where}: no file matches {pattern!r}; it has: {self.shown(listed)}"
                )
            matched |= found
        return [*spec.files, *sorted(matched - set(spec.files))]

    @staticmethod
    def shown(listed: dict[str, _Entry]) -> str:
        there = sorted(listed)
        more = len(there) - MAX_LISTED
        return (", ".join(there[:MAX_LISTED]) + (f" (and {more} more)" if more > 0 else "")) or (
            "no files"
        )

    def file(self, listed: dict[str, _Entry], path: str, commit: str) -> ModelFile:
        entry, where = listed[path], f"{self.spec.repo}@{self.spec.revision}"
        size, etag = entry.size, entry.etag
        if not (isinstance(etag, str) and (SHA256_RE.fullmatch(etag) or SHA1_RE.fullmatch(etag))):
            raise HubError(f"{where}: {path} has no sha256 or git blob sha1 in the listing")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:  # JSON true: no size
            raise HubError(f"{where}: {path} has no size in the listing")
        url = hub_file_url(self.endpoint, self.spec.repo, commit, path)
        return ModelFile(path=path, size=size, etag=etag, url=url)
