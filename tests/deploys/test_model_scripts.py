"""The model step's shell scripts, run for real on a local Hub cache: a move from where gpufleet
kept models before, a snapshot linked whole, and a prune that keeps what another snapshot or
another tool still uses. ``huggingface_hub`` reads the result back (``scan_cache_dir``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

import deploys.models as scripts
from gpufleet.core import hubcache
from gpufleet.core.hubcache import CachedFile, ref_path
from gpufleet.plan.types import ModelMove, SnapshotLinks

A, B = b"GGUF" + b"a" * 60, b"GGUF" + b"b" * 60
OLD, NEW = "1" * 40, "2" * 40


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    """gpufleet's state directory under ``tmp_path`` (stamps and placed records)."""
    root = tmp_path / "state"
    monkeypatch.setattr(hubcache, "VERIFIED_DIR", str(root / "verified"))
    monkeypatch.setattr(hubcache, "PLACED_DIR", str(root / "placed"))
    monkeypatch.setattr(scripts, "VERIFIED_DIR", str(root / "verified"))
    monkeypatch.setattr(scripts, "PLACED_DIR", str(root / "placed"))
    return root


def sh(script: str) -> None:
    ran = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False)
    assert ran.returncode == 0, ran.stderr


def cached(home: Path, commit: str, path: str, data: bytes) -> CachedFile:
    etag = hashlib.sha256(data).hexdigest()
    return CachedFile(str(home), "org/model-GGUF", commit, path, etag, len(data))


def place(file: CachedFile, data: bytes) -> None:
    """A blob as fetch-model leaves it: the bytes, its stamp, its link."""
    os.makedirs(os.path.dirname(file.blob), exist_ok=True)
    Path(file.blob).write_bytes(data)
    sh(scripts.stamp_script(file))
    sh(scripts.link_script(links(file)))


def links(*files: CachedFile, revision: str | None = None) -> SnapshotLinks:
    first = files[0]
    ref = ref_path(first.hf_home, first.repo, revision) if revision else None
    return SnapshotLinks(repo=first.repo, commit=first.commit, files=files, ref=ref,
                         placed=hubcache.placed_path(first.repo, first.commit))  # fmt: skip


def test_a_file_kept_before_the_hub_cache_becomes_its_blob_without_a_copy(tmp_path, state):
    old = tmp_path / "models" / "m" / "a.gguf"
    old.parent.mkdir(parents=True)
    old.write_bytes(A)
    file = cached(tmp_path / "hf", NEW, "a.gguf", A)
    sh(scripts.move_script(ModelMove(model="m", legacy=str(old), file=file)))
    assert os.stat(file.blob).st_ino == old.stat().st_ino  # one inode: no byte copied
    assert old.exists()  # a release kept from before still finds it where it was
    assert Path(file.link).read_bytes() == A
    assert os.readlink(file.link) == file.target
    assert Path(file.stamp).read_text().split() == [file.etag, str(len(A))]
    assert os.stat(file.stamp).st_mtime >= os.stat(file.blob).st_mtime


def test_a_snapshot_is_linked_whole_with_its_ref_and_record(tmp_path, state):
    a = cached(tmp_path / "hf", NEW, "a.gguf", A)
    nested = cached(tmp_path / "hf", NEW, "sub/dir/b.json", B)
    for f, data in ((a, A), (nested, B)):
        os.makedirs(os.path.dirname(f.blob), exist_ok=True)
        Path(f.blob).write_bytes(data)
    sh(scripts.link_script(links(a, nested, revision="main")))
    assert Path(nested.link).read_bytes() == B and os.readlink(nested.link) == nested.target
    assert Path(ref_path(a.hf_home, a.repo, "main")).read_text() == NEW  # no newline, as hf
    assert Path(hubcache.placed_path(a.repo, NEW)).exists()
    # linked again over a wrong link: swapped whole
    os.remove(a.link)
    os.symlink("../../blobs/" + "0" * 64, a.link)
    sh(scripts.link_script(links(a, nested)))
    assert Path(a.link).read_bytes() == A


def test_a_prune_keeps_blobs_another_snapshot_links_and_what_another_tool_placed(tmp_path, state):
    home = tmp_path / "hf"
    shared_old, only_old = cached(home, OLD, "a.gguf", A), cached(home, OLD, "b.gguf", B)
    shared_new = cached(home, NEW, "a.gguf", A)  # the revision moved; a.gguf did not change
    place(shared_old, A)
    place(only_old, B)
    sh(scripts.link_script(links(shared_old, only_old)))
    place(shared_new, A)
    other = home / "hub" / "models--someone--else" / "snapshots" / ("3" * 40)
    other.mkdir(parents=True)  # `hf download` placed it: gpufleet has no record of it
    sh(scripts.prune_script(shared_old.snapshot_dir))
    assert not Path(shared_old.snapshot_dir).exists()
    assert not Path(hubcache.placed_path(shared_old.repo, OLD)).exists()
    assert not Path(only_old.blob).exists() and not Path(only_old.stamp).exists()
    assert Path(shared_new.link).read_bytes() == A  # still linked by the new snapshot
    assert Path(shared_new.stamp).exists() and other.exists()


def test_huggingface_hub_reads_the_cache_gpufleet_wrote(tmp_path, state):
    from huggingface_hub import scan_cache_dir

    home = tmp_path / "hf"
    a, b = cached(home, NEW, "a.gguf", A), cached(home, NEW, "sub/b.json", B)
    for f, data in ((a, A), (b, B)):
        os.makedirs(os.path.dirname(f.blob), exist_ok=True)
        Path(f.blob).write_bytes(data)
    sh(scripts.link_script(links(a, b, revision="main")))
    info = scan_cache_dir(home / "hub")
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == "org/model-GGUF" and repo.size_on_disk == len(A) + len(B)
    (revision,) = repo.revisions
    assert revision.commit_hash == NEW and revision.refs == frozenset({"main"})
    assert {f.file_name for f in revision.files} == {"a.gguf", "b.json"}
