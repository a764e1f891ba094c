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

Its id is the first 12 hex digits of the sha256 of that JSON (sorted keys, no spaces).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelFileRelease(_Model):
    """A model file as a release uses it, and where to fetch it again (a pinned Hub URL)."""

    path: str
    sha256: str
    size: int
    url: str


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

    def manifest(self) -> str:
        """The release as its manifest file holds it: deterministic JSON."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1) + "\n"

    @property
    def id(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]
