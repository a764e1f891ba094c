"""The groups' real CUDA Dockerfiles configure, and their kernels compile for their GPUs.

A real nvcc (the control machine's CUDA 13.0) in a devel base made from it and PyPI's cuBLAS
wheel: ``docker build --target configure`` of each group's rendered Dockerfile, then a few
kernels compiled in that build tree and read back with cuobjdump. Nothing runs on a GPU: this
proves the build, not the kernels. rtx5090's flags compile with CUDA 13.0 too; no CUDA 12.8
compiler can be had from the package registries (gpufleet/sandbox/cuda.py says why), only its
ptxas, which assembles rtx5090's kernels again.
"""

from __future__ import annotations

import sys

import pytest

from gpufleet.core.render import cmake_flags
from gpufleet.core.schema import LlamaBuild
from gpufleet.sandbox import cuda
from tests.conftest import IN_CI

pytestmark = pytest.mark.sandbox

# What each group's binary must hold: llama.cpp's CMake turns the plain 121/120 of the group
# data into the architecture-specific 121a/120a that Blackwell's FP4 MMA needs.
EXPECTED = {"spark": "sm_121a", "rtx5090": "sm_120a"}


def _log(msg: str) -> None:
    print(f"cuda: {msg}", file=sys.stderr)


@pytest.fixture(scope="module")
def prepared():
    """The source archive and the CUDA 13.0 devel base (built once, cached by their inputs)."""
    from gpufleet.sandbox import docker
    from gpufleet.sandbox.roster import Sandbox

    try:
        docker.engine_info()
        cuda._local_toolkit(cuda.TOOLKITS["13.0"], None)
    except docker.SandboxError as exc:
        if IN_CI:
            pytest.fail(f"CUDA compile check unavailable under CI: {exc}")
        pytest.skip(str(exc))
    cache = Sandbox().state / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    archive, devel, runtime = cuda.prepare(cache=cache, log=_log)
    return {"archive": archive, "devel": devel, "runtime": runtime, "cache": cache}


@pytest.fixture(scope="module")
def checks(prepared) -> dict[str, cuda.CompileCheck]:
    results = {}
    for group in EXPECTED:
        results[group] = cuda.compile_check(group=group, log=_log, **prepared)
        _log(results[group].summary())
    return results


@pytest.mark.parametrize("group", list(EXPECTED))
def test_cmake_configures_with_the_rendered_flags(prepared, checks, group):
    result = checks[group]
    bases = {k: prepared[k] for k in ("archive", "devel", "runtime")}
    settings = cuda.check_settings(group=group, **bases)
    build = LlamaBuild.model_validate(settings)
    # the flags came from the rendered Dockerfile, and they are cmake_flags() of the group's data
    assert result.cmake_flags == cmake_flags(build)
    assert result.cache["GGML_CUDA"] == "ON"
    assert result.cache["GGML_NATIVE"] == "OFF"
    assert result.cache["GGML_BACKEND_DL"] == "ON"
    assert result.cache["CMAKE_CUDA_ARCHITECTURES"] == ";".join(build.cuda_archs)
    # what CMake asks nvcc for, after llama.cpp's own rewrite of the architectures
    assert result.asked.elf == (EXPECTED[group],)
    assert result.toolkit.startswith("13.0.")


@pytest.mark.parametrize("group", list(EXPECTED))
def test_each_kernel_compiles_for_the_group_architecture(checks, group):
    result = checks[group]
    assert [k.source for k in result.kernels] == list(cuda.DEFAULT_KERNELS)
    for kernel in result.kernels:
        assert kernel.code.elf == (EXPECTED[group],), kernel.listing
        assert kernel.code.ptx == (EXPECTED[group],), kernel.listing
    assert result.problems() == []


def test_rtx5090_kernels_assemble_with_cuda_12_8s_own_ptxas(checks):
    # no CUDA 12.8 compiler here, but its assembler: the sm_120a PTX of every kernel assembles
    # with ptxas 12.8.93 (spark's CUDA is the base's own, so it has no such second step)
    for kernel in checks["rtx5090"].kernels:
        assert kernel.ptxas == "12.8.93 sm_120a: ok", kernel.ptxas
    assert all(k.ptxas == "" for k in checks["spark"].kernels)
