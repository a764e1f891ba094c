"""The Hugging Face Hub cache layout, as ``huggingface_hub`` writes it and gpufleet fills it.

One copy of each file, shared by llama.cpp, vLLM and the ``hf`` tools::

    <hf_home>/hub/models--Org--Repo/blobs/<sha256 or git sha1>
    <hf_home>/hub/models--Org--Repo/blobs/<hash>.incomplete      a download under way
    <hf_home>/hub/models--Org--Repo/snapshots/<commit>/<path>   -> ../../blobs/<hash>
    <hf_home>/hub/models--Org--Repo/refs/<branch or tag>        the commit it resolved to
    <hf_home>/hub/.locks/models--Org--Repo/<hash>.lock          flock(2)ed while a blob is written

A blob is named by its Hub etag: the sha256 of a file stored in Git LFS, else its git blob sha1.
gpufleet keeps what it verified out of the cache, keyed by blob, under its own state
(``<state>/verified/models--Org--Repo/<hash>`` holds ``"<hash> <size>"``, dated not older than
the blob), and what it placed (``<state>/placed/models--Org--Repo/<commit>``), so pruning never
touches a snapshot another tool made.

Everything here is a name: no I/O, so the plan, the facts, the deploys, the sandbox and the tests
compute the same paths from the same inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from gpufleet.core.known import STATE_DIR

SHA1_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
VERIFIED_DIR = f"{STATE_DIR}/verified"
PLACED_DIR = f"{STATE_DIR}/placed"


def hub_root(hf_home: str) -> str:
    """``HF_HUB_CACHE`` for an ``HF_HOME``."""
    return f"{hf_home.rstrip('/')}/hub"


def repo_folder(repo: str) -> str:
    """``models--Org--Repo``: huggingface_hub's ``repo_folder_name`` for a model repository."""
    return "models--" + repo.replace("/", "--")


def repo_of_folder(folder: str) -> str | None:
    """The repository a ``models--Org--Repo`` folder holds, or None for any other name."""
    if not folder.startswith("models--"):
        return None
    parts = folder.removeprefix("models--").split("--")
    return "/".join(parts) if len(parts) == 2 and all(parts) else None


def hash_kind(etag: str) -> str:
    """``sha256`` (a Git LFS file) or ``sha1`` (a git blob): how a blob of this name is hashed."""
    if SHA256_RE.fullmatch(etag):
        return "sha256"
    if SHA1_RE.fullmatch(etag):
        return "sha1"
    raise ValueError(f"{etag!r} is neither a sha256 nor a git blob sha1")


@dataclass(frozen=True)
class CachedFile:
    """Where one file of one commit of one repository lives in a Hub cache, and its stamps."""

    hf_home: str
    repo: str
    commit: str
    path: str  # inside the repository
    etag: str  # sha256 (LFS) or git blob sha1
    size: int

    @property
    def repo_dir(self) -> str:
        return f"{hub_root(self.hf_home)}/{repo_folder(self.repo)}"

    @property
    def blob(self) -> str:
        return f"{self.repo_dir}/blobs/{self.etag}"

    @property
    def blobs_dir(self) -> str:
        return f"{self.repo_dir}/blobs"

    @property
    def incomplete(self) -> str:
        return f"{self.blob}.incomplete"

    @property
    def snapshot_dir(self) -> str:
        return f"{self.repo_dir}/snapshots/{self.commit}"

    @property
    def link(self) -> str:
        return f"{self.snapshot_dir}/{self.path}"

    @property
    def target(self) -> str:
        """The relative symlink target from ``link`` to ``blob``, as huggingface_hub makes it."""
        depth = len(PurePosixPath(self.path).parts) - 1
        return "../" * (depth + 2) + f"blobs/{self.etag}"

    @property
    def lock(self) -> str:
        return f"{hub_root(self.hf_home)}/.locks/{repo_folder(self.repo)}/{self.etag}.lock"

    @property
    def stamp(self) -> str:
        return f"{VERIFIED_DIR}/{repo_folder(self.repo)}/{self.etag}"

    @property
    def stamp_text(self) -> str:
        return f"{self.etag} {self.size}"

    @property
    def kind(self) -> str:
        return hash_kind(self.etag)


def ref_path(hf_home: str, repo: str, revision: str) -> str:
    """``refs/<revision>``: the commit a branch or tag resolved to (not written for a sha)."""
    return f"{hub_root(hf_home)}/{repo_folder(repo)}/refs/{revision}"


def placed_path(repo: str, commit: str) -> str:
    """gpufleet's record that it placed this snapshot (pruning removes only these)."""
    return f"{PLACED_DIR}/{repo_folder(repo)}/{commit}"


def snapshot_dir(hf_home: str, repo: str, commit: str) -> str:
    return f"{hub_root(hf_home)}/{repo_folder(repo)}/snapshots/{commit}"
