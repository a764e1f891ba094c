"""A release: what a host serves, named by a hash of it.

The plan computes the release a host runs once its changes are applied; a converge records it
in gpufleet's state directory on the host, with what it needs to come back (the compose file,
the ``.env`` as a 0600 copy, the build contexts' Dockerfiles, and the images kept by a tag that
names the release). A rollback restores those; the driver and the toolkit are recorded but
never rolled back.

The manifest holds hashes and names, never a secret value::

    {"gpufleet": "0.1.0", "driver": "580.95.05", "toolkit": "1.18.0-1",
     "services": {"llama": {"kind": "llama-server", "image": "gpufleet/llama.cpp:spark",
                            "build": {"inputs": "5d0b...", "source": "sha256:...", ...},
                            "model_files": [{"path": "gpt-oss-20b-Q4_K_M.gguf",
                                             "sha256": "...", "size": ..., "url": ...}], ...}},
     "compose_sha256": "...", "env_sha256": "..."}

Its id is the first 12 hex digits of the sha256 of that JSON (sorted keys, no spaces), and
the manifest file also holds it as ``"id"``. A kept manifest is read by ``read_manifest``: its id
must match its directory's name, and it is taken from the file (or, in a manifest written
before the field existed, recomputed from the file's own JSON), never from this version's
schema, so fields a later version added, or defaults this one has, change no kept release's id.

``.env`` appears as ``env_sha256``: the hash of its public form
(``gpufleet.core.render.public_env``: the non-secret lines and the secrets' names), so a rotated
secret alone is not a new release.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any
from urllib.parse import unquote

from pydantic import PrivateAttr, ValidationInfo, model_validator

from gpufleet.core.model import FrozenModel

RELEASE_ID = re.compile(r"[0-9a-f]{12}")


def is_release_id(text: str) -> bool:
    """Whether ``text`` can name a release: 12 lowercase hex digits, nothing else."""
    return RELEASE_ID.fullmatch(text) is not None


def _canonical_id(data: dict) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class _Model(FrozenModel):
    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any, info: ValidationInfo) -> Any:
        # a kept manifest, written by another version: what this one does not know is left out
        if info.context and info.context.get("kept") and isinstance(data, dict):
            return {k: v for k, v in data.items() if k in cls.model_fields}
        return data


class ModelFileRelease(_Model):
    """A model file as a release uses it: its snapshot in the Hub cache, its blob's etag, and
    where to fetch it again (a pinned Hub URL)."""

    repo: str
    commit: str
    path: str  # inside the repository
    etag: str  # sha256 (Git LFS) or git blob sha1: the blob's name
    size: int
    url: str

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any, info: ValidationInfo) -> Any:
        # a release kept by a gpufleet that stored models as <model>/<file>: its URL names the
        # repository, commit and path (``known.hub_file_url``); its sha256 is the blob's etag
        if isinstance(data, dict) and "repo" not in data and "sha256" in data:
            match = _HUB_URL.search(str(data.get("url", "")))
            if match:
                data = {**data, "repo": match["repo"], "commit": match["commit"],
                        "path": unquote(match["path"]), "etag": data["sha256"]}  # fmt: skip
        return _Model._known_fields.__func__(cls, data, info)

    def snapshot_key(self) -> str:
        return f"models--{self.repo.replace('/', '--')}/{self.commit}"


_HUB_URL = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<commit>[0-9a-f]{40})/(?P<path>.+)$")


class ServiceRelease(_Model):
    kind: str
    port: int
    image: str
    image_source: str
    image_id: str | None = None  # known before the run only for images sent from the control
    build: dict[str, Any] | None = None
    model: str | None = None
    model_files: tuple[ModelFileRelease, ...] = ()
    inputs: str


class Release(_Model):
    gpufleet: str
    driver: str | None
    cuda: str | None
    l4t: str | None
    toolkit: str
    services: dict[str, ServiceRelease]
    compose_sha256: str | None
    env_sha256: str
    _kept_id: str | None = PrivateAttr(None)  # the id a kept manifest holds (read_manifest)

    def manifest(self) -> str:
        """The release as its manifest file holds it: deterministic JSON, with its id."""
        return (
            json.dumps({**self.model_dump(mode="json"), "id": self.id}, sort_keys=True, indent=1)
            + "\n"
        )

    @property
    def id(self) -> str:
        return self._kept_id or _canonical_id(self.model_dump(mode="json"))


def read_manifest(text: str, *, release_id: str, where: str) -> Release:
    """A kept release's manifest, checked against the directory it was found in.

    + text: the manifest file's content
    + release_id: the directory's name (already checked by ``is_release_id``)
    + where: the file, for messages

    Raises ValueError, one line naming ``where``: not JSON, not a release, or naming another id.
    """
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f"{where} is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} is not a release manifest")
    data = dict(data)
    stored = data.pop("id", None)
    # older manifests have no id field: theirs is the hash of the file's own JSON
    rid = stored if stored is not None else _canonical_id(data)
    if not isinstance(rid, str) or not is_release_id(rid):
        raise ValueError(f"{where} holds an id that is not a release id: {str(rid)[:40]!r}")
    if rid != release_id:
        raise ValueError(
            f"{where} is release {rid}, not {release_id}: the directory or the "
            "manifest was changed by hand"
        )
    try:
        release = Release.model_validate(data, context={"kept": True})
    except ValueError as exc:
        lines = str(exc).splitlines()  # pydantic's second line is the field's path
        field = lines[1] if len(lines) > 1 else lines[0]
        raise ValueError(f"{where} is not a release manifest ({field})") from None
    release._kept_id = rid
    return release
