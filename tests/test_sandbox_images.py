"""What `gpufleet sandbox up` removes: older builds of its own images, nothing else."""

from __future__ import annotations

from gpufleet.sandbox import images


def test_only_older_builds_of_the_sandboxs_own_images_are_removed(monkeypatch):
    listed = [
        "gpufleet-sandbox/host:new", "gpufleet-sandbox/host:old", "gpufleet-sandbox/base:b1",
        # made on demand by the CUDA check and `make cuda-build`: never the sandbox's to remove
        "gpufleet-sandbox/cuda-devel-13.0:36f9", "gpufleet-sandbox/cuda-runtime-13.0:9e5a",
    ]  # fmt: skip
    removed: list[list[str]] = []
    monkeypatch.setattr(images.docker, "out", lambda args: "\n".join(listed) + "\n")
    monkeypatch.setattr(images.docker, "run", lambda args, check=True: removed.append(args))
    stale = images.remove_unused({"gpufleet-sandbox/host:new", "gpufleet-sandbox/base:b1"})
    assert stale == ["gpufleet-sandbox/host:old"]
    assert removed == [["rmi", "gpufleet-sandbox/host:old"]]


def test_nothing_stale_removes_nothing(monkeypatch):
    monkeypatch.setattr(images.docker, "out", lambda args: "gpufleet-sandbox/host:new\n")
    monkeypatch.setattr(images.docker, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert images.remove_unused({"gpufleet-sandbox/host:new"}) == []
