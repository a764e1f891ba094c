"""CUDA builds of llama.cpp: the rendered Dockerfiles, the binary's architectures, the pins.

The compile check itself (a real nvcc) is in tests/sandbox/test_60_cuda.py; these run anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from pyinfra.api import OperationError

from gpufleet.core.render import cmake_flags, render_dockerfile
from gpufleet.core.schema import LlamaBuild
from gpufleet.core.snapshot import Gpu
from gpufleet.ops import operations as ops
from gpufleet.plan.gate import image_check
from gpufleet.sandbox import cuda
from gpufleet.sandbox.docker import SandboxError

ROOT = Path(__file__).resolve().parent.parent

# The sandbox's CPU build exactly as gpufleet/sandbox/artefacts.py::llama renders it here (bases
# from images.llama_bases, the archive's sha256): its images and build caches are keyed on this
# text, so CUDA-only template changes must leave it byte for byte.
SANDBOX_CPU = {
    "source_archive": "/work/main/.sandbox/cache/llama.cpp-src.tar.gz",
    "archive_subdir": "llama.cpp", "cuda": False,
    "base_devel": "gpufleet-sandbox/builder:1fdd4e3e55c3",
    "base_runtime": "gpufleet-sandbox/runtime:f45c9030f8f4", "base_source": "transfer",
    "targets": ["llama-server"], "cpu_all_variants": False,
}  # fmt: skip
SANDBOX_SOURCE_ID = "a007bcc454713200dbfc6fe92b12622573015842bc3b738bfea8d37f69669987"
SANDBOX_CPU_SHA256 = "04396f2267c4d076ed8aa1169f9efef9995e14da856724d31df0f3aa64a85e6e"
# A default CPU build from git (every tool, every CPU variant), rendered before the CUDA change.
GIT_CPU_SHA256 = "b084d6447a23cac1ec6126e21c7578ab12ab9c5d46ecf3f0ed6bb196dbf49c65"

# Captured on this project's control machine (CUDA 13.0.88, cuobjdump 13.2.51).
# A kernel object from the compile check (rtx5090: sm_120a), PTX listed before the cubin:
LISTING_OBJECT = (
    "PTX file    1: mmq-instance-mxfp4.cu.1.sm_120a.ptx\n"
    "ELF file    1: mmq-instance-mxfp4.cu.1.sm_120a.cubin\n"
)
# A shared library of two .cu files built for sm_120a, sm_121a, sm_86 and compute_90 (PTX):
LISTING_LIBRARY = """\
ELF file    1: libk.1.sm_120a.cubin
ELF file    2: libk.2.sm_121a.cubin
ELF file    3: libk.3.sm_86.cubin
ELF file    4: libk.4.sm_120a.cubin
ELF file    5: libk.5.sm_121a.cubin
PTX file    1: libk.1.sm_90.ptx
ELF file    6: libk.6.sm_86.cubin
ELF file    7: libk.7.sm_120a.cubin
ELF file    8: libk.8.sm_121a.cubin
PTX file    2: libk.2.sm_90.ptx
ELF file    9: libk.9.sm_86.cubin
"""
# flags.make of the spark check's configured build tree (ggml-cuda.dir), the CUDA_FLAGS line:
FLAGS_MAKE_SPARK = (
    'CUDA_FLAGS = -O3 -DNDEBUG -std=c++17 "--generate-code=arch=compute_121a,code=[compute_121a,'
    'sm_121a]" -Xcompiler=-fPIC -use_fast_math -extended-lambda -compress-mode=size -Xcompiler '
    '"-Wmissing-declarations -Wmissing-noreturn -Wall -Wextra -Wpedantic -Wcast-qual '
    '-Wno-unused-function -Wno-array-bounds -Wextra-semi -Wno-pedantic"'
)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def group_render(group: str) -> tuple[LlamaBuild, str]:
    build = LlamaBuild.model_validate(cuda.group_build(group))
    return build, render_dockerfile(build)


# --- the CPU render is unchanged --------------------------------------------------------------


def test_sandbox_cpu_render_is_byte_identical():
    text = render_dockerfile(LlamaBuild.model_validate(SANDBOX_CPU), SANDBOX_SOURCE_ID)
    assert _sha(text) == SANDBOX_CPU_SHA256
    assert "cuobjdump" not in text and "AS configure" not in text


def test_git_cpu_render_is_byte_identical():
    build = LlamaBuild(source_ref="b7000", cuda=False)
    assert _sha(render_dockerfile(build)) == GIT_CPU_SHA256


# --- the CUDA renders -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("group", "arch", "cuda_version"), [("spark", "121", "13.0.1"), ("rtx5090", "120", "12.8.1")]
)
def test_group_cuda_render_flags_and_bases(group, arch, cuda_version):
    build, text = group_render(group)
    flags = cuda.rendered_cmake_flags(text)
    for flag in ("-DGGML_CUDA=ON", "-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON",
                 f"-DCMAKE_CUDA_ARCHITECTURES={arch}"):  # fmt: skip
        assert flag in flags
    assert f"ARG BASE_DEVEL=nvidia/cuda:{cuda_version}-devel-ubuntu24.04" in text
    assert f"ARG BASE_RUNTIME=nvidia/cuda:{cuda_version}-runtime-ubuntu24.04" in text
    assert f'gpufleet.build.cuda_archs="{arch}"' in text


@pytest.mark.parametrize("group", ["spark", "rtx5090"])
def test_cuda_render_configures_in_its_own_stage(group):
    _, text = group_render(group)
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.M)
    assert stages == [("${BASE_DEVEL}", "configure"), ("configure", "build"),
                      ("${BASE_RUNTIME}", "runtime")]  # fmt: skip
    configure = text.split(" AS configure\n")[1].split("\nFROM configure AS build\n")[0]
    assert "RUN cmake -B build " in configure and "cmake --build" not in configure
    build = text.split("\nFROM configure AS build\n")[1].split(" AS runtime\n")[0]
    assert "cmake --build build --config Release" in build


@pytest.mark.parametrize("group", ["spark", "rtx5090"])
def test_cuda_render_reads_the_architectures_from_the_binary(group):
    _, text = group_render(group)
    build = text.split("\nFROM configure AS build\n")[1].split(" AS runtime\n")[0]
    copy_at = build.index("cp build/bin/")
    dump_at = build.index("cuobjdump --list-elf --list-ptx")
    assert copy_at < dump_at, "cuobjdump must read the built library in /app"
    assert "cuda_lib=/app/libggml-cuda.so" in build
    assert f"> {cuda.OBJECTS_FILE}" in build
    # a build whose listing holds no device code fails rather than labelling nothing
    assert f"grep -q -e '^ELF file' -e '^PTX file' {cuda.OBJECTS_FILE}" in build
    # the file reaches the runtime image with /app
    assert "COPY --from=build /app /app" in text.split(" AS runtime\n")[1]


def test_spark_image_keeps_every_cli_tool():
    build, text = group_render("spark")
    assert tuple(build.targets) == cuda.CLI_TOOLS
    cp_line = next(line for line in text.splitlines() if "cp build/bin/" in line)
    build_line = next(line for line in text.splitlines() if "cmake --build build" in line)
    for tool in cuda.CLI_TOOLS:
        assert f"build/bin/{tool}" in cp_line
        assert f" {tool}" in build_line


@pytest.mark.parametrize("cuda_on", [True, False])
def test_the_check_reads_the_flags_the_render_produces(cuda_on):
    build = LlamaBuild(source_ref="v0.6.0", cuda=cuda_on, cuda_archs=["121"],
                       cmake_args=["-DGGML_CUDA_FA_QUANTS=f16-f16,q8_0-q8_0"])  # fmt: skip
    assert cuda.rendered_cmake_flags(render_dockerfile(build)) == cmake_flags(build)


def test_rendered_cmake_flags_needs_a_configure_line():
    with pytest.raises(ValueError, match="cmake -B build"):
        cuda.rendered_cmake_flags("FROM scratch\nRUN true\n")


# --- the pinned release -----------------------------------------------------------------------


def test_both_groups_pin_the_same_current_release():
    refs = {g: cuda.group_build(g)["source_ref"] for g in ("spark", "rtx5090")}
    assert len(set(refs.values())) == 1, refs
    ref = refs["spark"]
    # PR 18457 (12X -> 12Xa in llama.cpp's CMake) and native MXFP4 on Blackwell (PR 17906)
    # came after b7000; the check compiles 121a/120a from plain 121/120 with this release.
    # Stable tags (vMAJOR.MINOR.PATCH) began in August 2026 with v0.1, long after both.
    if nightly := re.fullmatch(r"b(\d{4,6})", ref):
        assert int(nightly.group(1)) > 7000
    else:
        stable = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", ref)
        assert stable and tuple(map(int, stable.groups())) >= (0, 6, 0), ref


def test_check_settings_keep_the_group_build_and_swap_source_and_bases(tmp_path):
    archive = tmp_path / "llama.cpp-src.tar.gz"
    settings = cuda.check_settings(group="spark", archive=archive, devel="d:1", runtime="r:1")
    build = LlamaBuild.model_validate(settings)
    assert build.cuda and build.cuda_archs == ["121"] and build.cuda_version == "13.0.1"
    assert build.source_git is None and build.source_archive == str(archive)
    assert (build.base_devel, build.base_runtime, build.base_source) == ("d:1", "r:1", "transfer")
    assert list(build.targets) == list(cuda.CLI_TOOLS) and build.cpu_all_variants


# --- reading cuobjdump ------------------------------------------------------------------------


def test_parse_cuobjdump_kernel_object():
    assert cuda.parse_cuobjdump(LISTING_OBJECT) == cuda.DeviceCode(elf=("sm_120a",),
                                                                   ptx=("sm_120a",))  # fmt: skip


def test_parse_cuobjdump_library_dedups_and_orders_by_arch():
    code = cuda.parse_cuobjdump(LISTING_LIBRARY)
    assert code.elf == ("sm_86", "sm_120a", "sm_121a")
    assert code.ptx == ("sm_90",)


def test_sm_label_from_the_binary():
    assert cuda.sm_label(LISTING_LIBRARY) == {
        "gpufleet.cuda.sm": "sm_86,sm_120a,sm_121a",
        "gpufleet.cuda.ptx": "compute_90",
    }
    assert cuda.sm_label(LISTING_OBJECT)["gpufleet.cuda.sm"] == "sm_120a"


def test_sm_label_refuses_a_listing_without_device_code():
    assert cuda.parse_cuobjdump("") == cuda.DeviceCode((), ())
    with pytest.raises(ValueError, match="no device code"):
        cuda.sm_label("")


@pytest.mark.parametrize("line", ["ELF file    1: libk.1.cubin", "PTX file 1: x.compute_90.ptx",
                                  "ELF file    1: libk.1.sm_121a.fatbin"])  # fmt: skip
def test_parse_cuobjdump_rejects_an_unknown_entry(line):
    with pytest.raises(ValueError, match="unrecognised"):
        cuda.parse_cuobjdump(LISTING_OBJECT + line + "\n")


def test_gencode_archs_from_flags_make():
    assert cuda.gencode_archs(FLAGS_MAKE_SPARK) == cuda.DeviceCode(("sm_121a",), ("sm_121a",))
    mixed = ('"--generate-code=arch=compute_75,code=[compute_75]" '
             '"--generate-code=arch=compute_120a,code=[sm_120a]"')  # fmt: skip
    assert cuda.gencode_archs(mixed) == cuda.DeviceCode(("sm_120a",), ("sm_75",))


def test_parse_cmake_cache():
    text = ("# comment\nGGML_CUDA:BOOL=ON\nCMAKE_CUDA_ARCHITECTURES:UNINITIALIZED=121\n"
            "//help\nGGML_NATIVE:BOOL=OFF\nCMAKE_C_FLAGS:STRING=-O2 -g\n")  # fmt: skip
    assert cuda.parse_cmake_cache(text) == {
        "GGML_CUDA": "ON", "CMAKE_CUDA_ARCHITECTURES": "121", "GGML_NATIVE": "OFF",
        "CMAKE_C_FLAGS": "-O2 -g",
    }  # fmt: skip


def _check(**changes) -> cuda.CompileCheck:
    kernel = cuda.KernelResult("k.cu", cuda.parse_cuobjdump(LISTING_OBJECT), 1.0, LISTING_OBJECT)
    base = cuda.CompileCheck(
        group="rtx5090", toolkit="13.0.88", wanted_cuda="12.8.1", image="i",
        cmake_flags=[], cache={"GGML_CUDA": "ON", "GGML_NATIVE": "OFF", "GGML_BACKEND_DL": "ON"},
        asked=cuda.DeviceCode(("sm_120a",), ("sm_120a",)), kernels=[kernel],
    )  # fmt: skip
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def test_compile_check_problems():
    assert _check().problems() == []
    assert _check(cache={"GGML_CUDA": "ON", "GGML_NATIVE": "ON", "GGML_BACKEND_DL": "ON"}
                  ).problems() == ["GGML_NATIVE is 'ON' in CMakeCache.txt, not OFF"]  # fmt: skip
    wrong = _check(asked=cuda.DeviceCode(("sm_121a",), ()))
    assert wrong.problems() == ["k.cu holds cubins ['sm_120a'], flags ask for ['sm_121a']"]
    assert "ok" in _check().summary().splitlines()[-1]


def test_compile_check_problems_include_the_older_ptxas():
    check = _check()
    code = check.kernels[0].code
    check.kernels = [
        cuda.KernelResult("k.cu", code, 1.0, "", ptxas)
        for ptxas in ("12.8.93 sm_120a: ok", "12.8.93 sm_120a: FAILED boom")
    ]
    assert check.problems() == ["k.cu: ptxas 12.8.93 sm_120a: FAILED boom"]


# --- the devel base's inputs ------------------------------------------------------------------


def test_tree_digest_follows_contents_modes_and_links(tmp_path):
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("a")
    (tmp_path / "lib64").symlink_to("bin")
    first = cuda.tree_digest(tmp_path)
    nvcc.write_text("b")
    second = cuda.tree_digest(tmp_path)
    nvcc.chmod(0o755)
    third = cuda.tree_digest(tmp_path)
    (tmp_path / "lib64").unlink()
    (tmp_path / "lib64").symlink_to("lib")
    assert len({first, second, third, cuda.tree_digest(tmp_path)}) == 4


def test_no_cuda_12_8_base_and_it_says_why():
    with pytest.raises(SandboxError, match="no nvcc, cudafe"):
        cuda.base_images(builder="b", runtime="r", cache=Path("/nonexistent"), log=print,
                         version="12.8")  # fmt: skip


def test_fetch_wheels_pins_hashes_and_binary_only(tmp_path, monkeypatch):
    wheel = cuda.Wheel("demo", "1.0", "demo-1.0-py3-none-any.whl",
                       hashlib.sha256(b"wheel").hexdigest())  # fmt: skip
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        seen["req"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        Path(cmd[cmd.index("-d") + 1], wheel.filename).write_bytes(b"wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cuda.subprocess, "run", fake_run)
    found = cuda.fetch_wheels(wheels=[wheel], cache=tmp_path, log=lambda m: None)
    assert found == {"demo": tmp_path / wheel.filename}
    assert {"--only-binary", ":all:", "--require-hashes", "--no-deps"} <= set(seen["cmd"])
    assert seen["req"] == f"demo==1.0 --hash=sha256:{wheel.sha256}\n"
    # cached and verified: pip is not asked again
    seen.clear()
    cuda.fetch_wheels(wheels=[wheel], cache=tmp_path, log=lambda m: None)
    assert seen == {}


def test_fetch_wheels_rejects_a_file_with_another_hash(tmp_path, monkeypatch):
    wheel = cuda.Wheel("demo", "1.0", "demo-1.0-py3-none-any.whl", "0" * 64)

    def fake_run(cmd, **kwargs):
        Path(cmd[cmd.index("-d") + 1], wheel.filename).write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cuda.subprocess, "run", fake_run)
    with pytest.raises(SandboxError, match="sha256 is not"):
        cuda.fetch_wheels(wheels=[wheel], cache=tmp_path, log=lambda m: None)


def test_pinned_wheels_are_binary_and_exact():
    for toolkit in cuda.TOOLKITS.values():
        for wheel in toolkit.wheels:
            assert wheel.filename.endswith(".whl") and re.fullmatch(r"[0-9a-f]{64}", wheel.sha256)
            assert wheel.filename.startswith(f"{wheel.name.replace('-', '_')}-{wheel.version}-")


def test_context_puts_long_paths_back_in_the_tree(tmp_path):
    # images.llama_source_archive keeps the sdist's pax "path" header of long names
    archive = tmp_path / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("llama.cpp/CMakeLists.txt", b"top"),
                           ("pkg-1.0/vendor/llama.cpp/ggml/src/ggml-cuda/template-instances/"
                            "fattn-vec-instance-f16-f16.cu", b"instance")):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with cuda._context(archive, "FROM scratch\n", tmp_path) as ctx:
        src = Path(ctx, "src")
        inst = src / "ggml/src/ggml-cuda/template-instances/fattn-vec-instance-f16-f16.cu"
        assert inst.read_bytes() == b"instance" and (src / "CMakeLists.txt").read_bytes() == b"top"
        assert sorted(p.name for p in Path(ctx).iterdir()) == ["Dockerfile", "src"]


def test_label_image_labels_what_the_binary_holds(monkeypatch):
    calls = []

    def fake_out(args, **kwargs):
        calls.append(("out", args))
        return LISTING_LIBRARY

    def fake_run(args, **kwargs):
        calls.append(("run", args, kwargs.get("input")))
        return subprocess.CompletedProcess(args, 0, b"", b"")

    monkeypatch.setattr(cuda.docker, "out", fake_out)
    monkeypatch.setattr(cuda.docker, "run", fake_run)
    labels = cuda.label_image(image="gpufleet-cuda-full/spark:abc", log=lambda m: None)
    assert labels["gpufleet.cuda.sm"] == "sm_86,sm_120a,sm_121a"
    read, build = calls
    assert read[1][-2:] == ["gpufleet-cuda-full/spark:abc", cuda.OBJECTS_FILE]
    assert build[1][:4] == ["build", "-q", "-t", "gpufleet-cuda-full/spark:abc"]
    assert "gpufleet.cuda.sm=sm_86,sm_120a,sm_121a" in build[1]
    assert build[2] == b"FROM gpufleet-cuda-full/spark:abc\n"


# --- a real host: the built image labelled from its binary, then checked ------------------


class _Host:
    """What ``ops._docker_build`` and ``ops._pull_image`` use of a pyinfra host."""

    name = "spark-01"

    def __init__(self, *outputs: list[str], ok: bool = True) -> None:
        self.data: dict = {}
        self.commands: list[str] = []
        self._outputs = list(outputs)
        self._ok = ok
        self.live: list[bool] = []

    def run_shell_command(self, command, _sudo=False, print_output=False):
        self.commands.append(command.get_raw_value())
        self.live.append(print_output)
        lines = self._outputs.pop(0) if self._outputs else []
        return self._ok, SimpleNamespace(stdout_lines=lines, stderr_lines=[])


def _state():
    return SimpleNamespace(config=SimpleNamespace(SUDO=False))


def _gpu_check(cc: str = "12.1", name: str = "NVIDIA GB10", ref: str = "gpufleet/llama.cpp:spark"):
    gpu = Gpu(index=0, name=name, uuid=None, compute_cap=cc, memory_total_mib=None, bus_id=None)
    return image_check("llama", ref, (gpu,), built=ref.startswith("gpufleet/"))


def test_the_binary_reading_is_one_code_shared_with_the_sandbox():
    from gpufleet.core import cuda as real

    assert cuda.parse_cuobjdump is real.parse_cuobjdump and cuda.sm_label is real.sm_label
    assert cuda.OBJECTS_FILE == real.OBJECTS_FILE == "/app/gpufleet-cuda-objects.txt"


def test_a_cpu_build_is_one_command_labelled_as_it_builds():
    command = ops.build_command("/opt/gpufleet/build/llama", "gpufleet/llama.cpp:spark", "5d0b")
    assert command.startswith("cd /opt/gpufleet/build/llama && { ")
    assert (
        "( DOCKER_BUILDKIT=0 docker build -t gpufleet/llama.cpp:spark --label "
        "gpufleet.inputs=5d0b . ) > /opt/gpufleet/build/llama.build.log 2>&1" in command
    )
    assert command.endswith(" && rm -rf src source.tar.gz")


def _wrapped(tmp_path, command: str) -> subprocess.CompletedProcess:
    log = tmp_path / "ctx.build.log"
    wrapped = f"cd {tmp_path} && {ops.with_progress(command, str(log), every=1)} && echo AFTER"
    return subprocess.run(["sh", "-c", wrapped], capture_output=True, text=True, timeout=30)


def test_a_long_build_says_where_it_is_while_it_runs(tmp_path):
    proc = _wrapped(tmp_path, "echo 'Step 1/2 : FROM x'; sleep 1.5; echo 'Step 2/2 : RUN make'; "
                              "sleep 2")  # fmt: skip
    *progress, last = proc.stdout.splitlines()
    assert proc.returncode == 0 and last == "AFTER"
    assert progress and all(re.fullmatch(r"build: \d+s, Step [12]/2 : .*", p) for p in progress)
    assert progress[-1].endswith("Step 2/2 : RUN make")
    assert list(tmp_path.iterdir()) == []  # the log is removed


def test_a_compile_step_shows_its_own_percentage(tmp_path):
    steps = "echo 'Step 1/1 : RUN cmake --build build'; echo '[  5%] Building a.o'"
    proc = _wrapped(tmp_path, f"{steps}; sleep 1.5; echo '[ 45%] Building b.o'; sleep 1.5")
    progress = proc.stdout.splitlines()[:-1]
    assert proc.returncode == 0 and progress, proc.stdout
    assert all(re.fullmatch(r"build: \d+s, Step 1/1 : RUN cmake --build build \[ *\d+%\]", p)
               for p in progress), progress  # fmt: skip
    assert progress[-1].endswith("[ 45%]")


def test_a_failed_build_shows_the_log_tail_and_fails(tmp_path):
    proc = _wrapped(tmp_path, "echo 'Step 1/1 : RUN false'; echo boom; sleep 1.2; exit 3")
    assert proc.returncode != 0
    assert proc.stdout.splitlines()[-2:] == ["Step 1/1 : RUN false", "boom"]
    assert "AFTER" not in proc.stdout and list(tmp_path.iterdir()) == []


def test_a_quick_build_prints_nothing(tmp_path):
    proc = _wrapped(tmp_path, "true")
    assert (proc.returncode, proc.stdout) == (0, "AFTER\n")


def test_a_cuda_build_reads_the_listing_its_build_stage_wrote():
    command = ops.build_command("/opt/gpufleet/build/llama", "gpufleet/llama.cpp:spark", "5d0b",
                                cuda=True)  # fmt: skip
    assert "--label gpufleet.inputs" not in command  # not current until it is labelled
    assert command.endswith(
        "docker run --rm --network none -e NVIDIA_VISIBLE_DEVICES=void --entrypoint cat "
        f"gpufleet/llama.cpp:spark {cuda.OBJECTS_FILE}"
    )


def test_the_relabel_is_a_build_from_the_image_under_the_same_tag():
    labels = {"gpufleet.inputs": "5d0b", "gpufleet.cuda.sm": "sm_121a", "gpufleet.cuda.ptx": ""}
    command = ops.label_command("/opt/gpufleet/build/llama", "gpufleet/llama.cpp:spark", labels)
    printf, build = command.split(" | ", 1)
    assert subprocess.run(["sh", "-c", printf], capture_output=True, text=True,
                          check=True).stdout == "FROM gpufleet/llama.cpp:spark\n"  # fmt: skip
    assert build.startswith("DOCKER_BUILDKIT=0 docker build -q -t gpufleet/llama.cpp:spark "
                            "--label gpufleet.inputs=5d0b --label gpufleet.cuda.sm=sm_121a "
                            "--label gpufleet.cuda.ptx= - && ")  # fmt: skip
    assert build.endswith("&& cd /opt/gpufleet/build/llama && rm -rf src source.tar.gz")


def test_a_cuda_build_on_the_host_is_labelled_from_its_binary_and_passes_its_gpu_check():
    host = _Host(["sha256:1111", *LISTING_LIBRARY.splitlines()], ["sha256:2222"])
    state = _state()
    ops._docker_build(state, host, "/ctx", "gpufleet/llama.cpp:spark", "5d0b", True, _gpu_check())
    build, label = host.commands
    assert build == ops.build_command("/ctx", "gpufleet/llama.cpp:spark", "5d0b", cuda=True)
    assert label == ops.label_command("/ctx", "gpufleet/llama.cpp:spark", {
        "gpufleet.inputs": "5d0b", "gpufleet.cuda.sm": "sm_86,sm_120a,sm_121a",
        "gpufleet.cuda.ptx": "compute_90"})  # fmt: skip
    assert state._gpufleet_builds_done["5d0b"].get() == "spark-01"
    assert state._gpufleet_tallies == {"builds": {"spark-01": 1}}


def test_a_cuda_build_without_code_for_the_gpu_fails_the_host_in_one_line():
    host = _Host(["sha256:1111", *LISTING_OBJECT.splitlines()], ["sha256:2222"])  # sm_120a
    state = _state()
    with pytest.raises(OperationError) as err:
        ops._docker_build(state, host, "/ctx", "gpufleet/llama.cpp:spark", "5d0b", True,
                          _gpu_check())  # fmt: skip
    assert str(err.value) == (
        "services.llama: image gpufleet/llama.cpp:spark has sm_120a, compute_120a; this GPU is "
        '12.1 (NVIDIA GB10): rebuild with cuda_archs ["121"]'
    )
    assert len(host.commands) == 2  # labelled all the same: the next plan refuses it again
    # the image itself is whole: a host with a GPU it runs on may receive it
    assert state._gpufleet_builds_done["5d0b"].get() == "spark-01"


def test_a_cuda_build_whose_listing_holds_no_code_is_not_labelled_current():
    host = _Host(["sha256:1111"])
    state = _state()
    with pytest.raises(OperationError, match="no device code"):
        ops._docker_build(state, host, "/ctx", "gpufleet/llama.cpp:spark", "5d0b", True, None)
    assert len(host.commands) == 1  # never labelled gpufleet.inputs: the next run builds again
    with pytest.raises(OperationError):
        state._gpufleet_builds_done["5d0b"].get()


def test_a_pulled_image_is_checked_in_the_same_command():
    labels = json.dumps({"gpufleet.cuda.sm": "sm_87"})
    host = _Host([labels])
    pulled = "dustynv/llama_cpp:r36.4.0"
    ops._pull_image(_state(), host, pulled, (_gpu_check("8.7", "Orin", pulled),))
    assert host.commands == [
        "docker pull -q dustynv/llama_cpp:r36.4.0 >/dev/null && docker image inspect "
        "--format '{{json .Config.Labels}}' dustynv/llama_cpp:r36.4.0"
    ]
    with pytest.raises(OperationError) as err:
        ops._pull_image(_state(), _Host([labels]), "x:y", (_gpu_check(ref="x:y"),))
    assert str(err.value) == (
        "services.llama: image x:y has sm_87; this GPU is 12.1 (NVIDIA GB10): "
        "use an image built for sm_121"
    )
    ops._pull_image(_state(), _Host(["null"]), "x:y", (_gpu_check(),))  # no labels: not checked


def test_the_operations_carry_the_checks_to_the_host():
    check = _gpu_check()
    (pull,) = ops.image._inner("x:y", source="pull", checks=[check])
    assert pull.function.__wrapped__ is ops._pull_image and pull.args == ("x:y", (check,))
    (sent,) = ops.image._inner("x:y", source="transfer", checks=[check])
    assert sent.function.__wrapped__ is ops._transfer_image and sent.args == ("x:y", (check,))
    (build,) = ops.build_image._inner("/ctx", "gpufleet/llama.cpp:spark", inputs="5d0b",
                                      cuda=True, check=check)  # fmt: skip
    assert build.function.__wrapped__ is ops._docker_build and build.args[-2:] == (True, check)
    (received,) = ops.build_image._inner("/ctx", "gpufleet/llama.cpp:spark", inputs="5d0b",
                                         receive_from="spark-02", check=check)  # fmt: skip
    assert received.function.__wrapped__ is ops._receive_image and received.args[-1] is check
