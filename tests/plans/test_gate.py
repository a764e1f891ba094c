from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from packaging.version import Version
from pydantic import ValidationError

from gpufleet.core.cuda import runs_on
from gpufleet.core.schema import GpuRequirements
from gpufleet.core.snapshot import Gpu, Identity
from gpufleet.plan import gate
from gpufleet.plan.gate import GIB, effective_min_driver

IDENTITIES = Path(__file__).parents[1] / "facts" / "identity.HostIdentity"
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)

SPARK = GpuRequirements(min_cuda="13.0", compute_caps=["12.1"], unified_memory=True)
RTX5090 = GpuRequirements(min_cuda="12.8", compute_caps=["12.0"], arch="x86_64")
JETSON = GpuRequirements(
    driver_floor=None, min_l4t="36.0", min_cuda="12.6", compute_caps=["8.7"], unified_memory=True
)


def identity(profile: str) -> dict:
    """The HostIdentity fact of a sandbox profile, from its fixture, as a dict to vary."""
    path = IDENTITIES / f"sandbox_{profile.replace('-', '_')}.json"
    return copy.deepcopy(json.loads(path.read_text())["fact"])


def check_host(req: GpuRequirements, data: dict, **kwargs) -> gate.GateResult:
    return gate.check_host(req, Identity.model_validate(data), **kwargs)


def detect_group(data: dict) -> str | None:
    return gate.detect_group(Identity.model_validate(data))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("field", ["min_driver", "driver_floor", "min_cuda", "min_l4t"])
def test_version_fields_must_be_versions(field: str) -> None:
    with pytest.raises(ValidationError, match="580.x is not a version"):
        GpuRequirements(**{field: "580.x"})


def test_compute_caps_must_look_like_compute_caps() -> None:
    with pytest.raises(ValidationError, match="sm_121 is not a compute capability"):
        GpuRequirements(compute_caps=["12.1", "sm_121"])


@pytest.mark.parametrize(
    ("cuda", "message"),
    [("13.3", "newer than the driver table's newest toolkit"), ("12.7", "not a toolkit")],
)
def test_min_cuda_must_be_in_the_table(cuda: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GpuRequirements(min_cuda=cuda)


def test_group_minimum_below_the_cuda_minimum_is_a_conflict() -> None:
    with pytest.raises(ValidationError) as error:
        GpuRequirements(min_driver="550", min_cuda="13.0")
    assert error.value.errors()[0]["msg"] == (
        "Value error, min_driver: 550 is below 580.65.06, the minimum NVIDIA driver for CUDA 13.0"
    )


def test_fleet_floor_below_the_cuda_minimum_is_no_conflict() -> None:
    assert GpuRequirements(driver_floor="550", min_cuda="13.0").driver_floor == "550"


@pytest.mark.parametrize("data", [{"min_drivr": "580"}, {"kv_allowance_gib": -1}])
def test_unknown_fields_and_negative_allowance_are_rejected(data: dict) -> None:
    with pytest.raises(ValidationError):
        GpuRequirements(**data)


# ---------------------------------------------------------------- effective minimum


@pytest.mark.parametrize(
    ("req", "expected"),
    [
        (SPARK, ("580.65.06", "the minimum for CUDA 13.0")),
        (RTX5090, ("570.26", "the minimum for CUDA 12.8")),
        (GpuRequirements(), ("570", "the fleet-wide floor")),
        (
            GpuRequirements(min_driver="580.95.05", min_cuda="13.0"),
            ("580.95.05", "the group minimum"),
        ),
        (GpuRequirements(driver_floor="590", min_cuda="13.0"), ("590", "the fleet-wide floor")),
        (
            GpuRequirements(min_driver="580.65.06", min_cuda="13.0"),
            ("580.65.06", "the minimum for CUDA 13.0"),
        ),
        (GpuRequirements(min_driver="575"), ("575", "the group minimum")),
    ],
    ids=["spark", "rtx5090", "floor", "group", "floor-wins", "tie-names-cuda", "group-over-floor"],
)
def test_effective_min_driver(req: GpuRequirements, expected: tuple[str, str]) -> None:
    version, reason = effective_min_driver(req)
    assert (str(version), reason) == expected
    assert version == Version(expected[0])


def test_no_effective_min_driver_without_rules() -> None:
    assert effective_min_driver(GpuRequirements(driver_floor=None, min_l4t="36.0")) is None


# ---------------------------------------------------------------- check_host: sandbox profiles


@pytest.mark.parametrize(
    ("req", "profile"), [(SPARK, "spark"), (RTX5090, "rtx5090"), (JETSON, "jetson")]
)
def test_sandbox_profiles_pass_their_group(req: GpuRequirements, profile: str) -> None:
    result = check_host(req, identity(profile), group=profile, model_bytes=GIB)
    assert result.ok, result.failures
    assert result.warnings == []


def test_old_driver_fails_spark() -> None:
    result = check_host(SPARK, identity("old-driver"), group="spark")
    assert result.failures == [
        "NVIDIA driver 550.54.14 is older than 580.65.06, the minimum for CUDA 13.0 (spark)",
        "NVIDIA GeForce RTX 4090 has compute capability 8.9, not 12.1 (spark)",
    ]


def test_old_driver_against_the_fleet_floor() -> None:
    result = check_host(GpuRequirements(), identity("old-driver"), group="generic")
    assert result.failures == [
        "NVIDIA driver 550.54.14 is older than 570, the fleet-wide floor (generic)"
    ]


def test_no_driver_fails_with_what_nvidia_smi_said() -> None:
    result = check_host(SPARK, identity("no-driver"), group="spark")
    assert result.failures == [
        f"NVIDIA driver not usable: {NO_DRIVER} (spark needs driver >= 580.65.06, "
        "the minimum for CUDA 13.0)"
    ]


def test_nvidia_smi_absent() -> None:
    host = identity("rtx5090")
    host["nvidia"] = {**host["nvidia"], "status": "absent", "gpus": [], "message": None}
    assert check_host(RTX5090, host, group="rtx5090").failures == [
        "NVIDIA driver not usable: nvidia-smi not found "
        "(rtx5090 needs driver >= 570.26, the minimum for CUDA 12.8)"
    ]


@pytest.mark.parametrize(
    ("changes", "failure"),
    [
        (
            {"driver_version": "590.44.01", "cuda_version": "12.8"},
            "NVIDIA driver 590.44.01 supports CUDA up to 12.8, older than 13.0 (spark)",
        ),
        (
            {"cuda_version": None},
            "CUDA version unknown: driver 580.95.05 reports CUDA Version N/A "
            "(spark needs CUDA >= 13.0)",
        ),
        (
            {"driver_version": None},
            "NVIDIA driver version unknown: nvidia-smi reports N/A "
            "(spark needs driver >= 580.65.06, the minimum for CUDA 13.0)",
        ),
        ({"gpus": []}, "No NVIDIA GPU: nvidia-smi lists none (spark)"),
    ],
    ids=["cuda-too-low", "cuda-na", "driver-na", "no-gpu"],
)
def test_driver_and_cuda_failures(changes: dict, failure: str) -> None:
    host = identity("spark")
    host["nvidia"].update(changes)
    assert check_host(SPARK, host, group="spark").failures == [failure]


def test_wrong_cpu_arch() -> None:
    req = SPARK.model_copy(update={"arch": "aarch64"})
    assert check_host(req, identity("spark"), group="spark").failures == [
        "CPU architecture is x86_64, not aarch64 (spark)"
    ]


# ---------------------------------------------------------------- check_host: Jetson


def test_jetson_without_l4t() -> None:
    result = check_host(JETSON, identity("rtx5090"), group="jetson")
    assert result.failures == [
        "No L4T release: no /etc/nv_tegra_release (jetson needs L4T >= 36.0)",
        "NVIDIA GeForce RTX 5090 has compute capability 12.0, not 8.7 (jetson)",
    ]
    assert result.warnings == ["This host looks like a rtx5090 host, not jetson"]


def test_jetpack5_is_too_old() -> None:
    host = identity("jetson")
    host["jetson"].update(l4t="35.4.1", major=35, revision="4.1", jetpack="5.1.2", cuda=None)
    assert check_host(JETSON, host, group="jetson").failures == [
        "L4T 35.4.1 is older than 36.0 (jetson)",
        "CUDA version unknown: no /usr/local/cuda/version.json and no default for L4T 35.4.1 "
        "(jetson needs CUDA >= 12.6)",
    ]


def test_jetson_cuda_comes_from_l4t_and_driver_is_not_checked() -> None:
    host = identity("jetson")
    host["jetson"]["cuda"] = "12.2"
    req = JETSON.model_copy(update={"driver_floor": "570"})
    assert check_host(req, host, group="jetson").failures == [
        "CUDA 12.2 is older than 12.6 (jetson)"
    ]


def test_unknown_compute_cap_is_a_warning() -> None:
    host = identity("jetson")
    host["nvidia"]["gpus"][0]["compute_cap"] = None
    result = check_host(JETSON, host, group="jetson")
    assert result.ok
    assert result.warnings == [
        "Compute capability of Orin (nvgpu) unknown (nvidia-smi reports N/A); not checked"
    ]


# ---------------------------------------------------------------- check_host: build archs


@pytest.mark.parametrize("archs", [["121"], ["120a-real", "121a-real"], ["sm_121"]])
def test_build_targets_the_gpu(archs: list[str]) -> None:
    assert check_host(SPARK, identity("spark"), group="spark", cuda_archs=archs).ok


def test_build_misses_the_gpu_arch() -> None:
    result = check_host(SPARK, identity("spark"), group="spark", cuda_archs=["120", "90"])
    assert result.failures == ["NVIDIA GB10 is sm_121, the build targets sm_120, sm_90 (spark)"]


def test_build_cuda_too_old_for_the_gpu_arch() -> None:
    req = SPARK.model_copy(update={"min_cuda": "12.8"})
    result = check_host(req, identity("spark"), group="spark", cuda_archs=["121"])
    assert result.failures == [
        "sm_121 (NVIDIA GB10) needs CUDA >= 12.9, the build uses CUDA 12.8 (spark)"
    ]


# ---------------------------------------------------------------- check_host: fit


def test_fit_on_discrete_memory() -> None:
    host = identity("rtx5090")  # 32607 MiB, about 31.8 GiB
    assert check_host(RTX5090, host, group="rtx5090", model_bytes=17 * GIB).ok
    assert check_host(RTX5090, host, group="rtx5090", model_bytes=30 * GIB).failures == [
        "Model needs 32.0 GiB (30.0 GiB + 2 GiB KV allowance), more than the 31.8 GiB "
        "of GPU memory (rtx5090)"
    ]


def test_fit_sums_every_gpu() -> None:
    host = identity("rtx5090")
    host["nvidia"]["gpus"] *= 2
    assert check_host(RTX5090, host, group="rtx5090", model_bytes=60 * GIB).ok


def test_fit_on_unified_memory_uses_host_memory() -> None:
    host = identity("spark")  # the sandbox machine's 23.5 GiB MemTotal
    assert check_host(SPARK, host, group="spark", model_bytes=16 * GIB).ok
    assert check_host(SPARK, host, group="spark", model_bytes=63 * GIB).failures == [
        "Model needs 65.0 GiB (63.0 GiB + 2 GiB KV allowance), more than the 23.5 GiB "
        "of host memory (spark)"
    ]


def test_fit_uses_host_memory_when_gpu_memory_is_unknown() -> None:
    req = SPARK.model_copy(update={"unified_memory": False, "kv_allowance_gib": 0.5})
    result = check_host(req, identity("spark"), group="spark", model_bytes=int(23.2 * GIB))
    assert result.failures == [
        "Model needs 23.7 GiB (23.2 GiB + 0.5 GiB KV allowance), more than the 23.5 GiB "
        "of host memory (spark)"
    ]


# ---------------------------------------------------------------- detect_group


@pytest.mark.parametrize(
    ("profile", "group"),
    [
        ("spark", "spark"),
        ("rtx5090", "rtx5090"),
        ("jetson", "jetson"),
        ("old-driver", None),
        ("no-driver", None),
    ],
)
def test_detect_group(profile: str, group: str | None) -> None:
    assert detect_group(identity(profile)) == group


def test_rtx5090_compute_cap_on_arm_is_no_workstation() -> None:
    host = identity("rtx5090")
    host["host"]["arch"] = "aarch64"
    assert detect_group(host) is None


def test_group_mismatch_is_a_warning() -> None:
    req = RTX5090.model_copy(update={"compute_caps": []})
    result = check_host(req, identity("rtx5090"), group="spark")
    assert result.ok
    assert result.warnings == ["This host looks like a rtx5090 host, not spark"]


# ---------------------------------------------------------------- the image's binary


@pytest.mark.parametrize(
    ("code", "cc", "runs"),
    [
        ("sm_121a", "12.1", True),  # architecture-specific: exactly its own GPU
        ("sm_121a", "12.0", False),
        ("sm_120a", "12.1", False),  # the Spark's failure: a 5090's cubin on a GB10
        ("sm_120a", "12.0", True),
        ("sm_120", "12.1", True),  # plain cubin: later minors of its major
        ("sm_121", "12.0", False),  # never an older minor
        ("sm_86", "12.0", False),  # never another major
        ("sm_86", "8.7", True),
        ("sm_90", "9.0", True),
        ("sm_120f", "12.1", True),  # family-specific: its family, from its minor on
        ("sm_121f", "12.0", False),
        ("sm_100f", "12.0", False),
        ("compute_80", "12.1", True),  # plain PTX: JIT-compiled for any newer GPU
        ("compute_90", "8.7", False),  # not an older one
        ("compute_121a", "12.1", True),
        ("compute_120a", "12.1", False),  # architecture-specific PTX is not forward-compatible
        ("compute_100f", "10.3", True),
        ("compute_100f", "12.0", False),
    ],
)
def test_device_code_runs_on(code: str, cc: str, runs: bool) -> None:
    assert runs_on(code, cc) is runs


@pytest.mark.parametrize(
    ("code", "cc", "message"),
    [
        ("sm121", "12.1", "sm121 is not CUDA device code"),
        ("lto_121", "12.1", "lto_121 is not CUDA device code"),
        ("sm_121", "12", "12 is not a compute capability"),
    ],
)
def test_runs_on_needs_device_code_and_a_compute_capability(code, cc, message) -> None:
    with pytest.raises(ValueError, match=message):
        runs_on(code, cc)


def _gpus(profile: str, *caps: str) -> tuple[Gpu, ...]:
    base = identity(profile)["nvidia"]["gpus"][0]
    return tuple(Gpu.model_validate({**base, "index": i, "compute_cap": cc})
                 for i, cc in enumerate(caps or [base["compute_cap"]]))  # fmt: skip


def test_image_check_refuses_in_one_line_and_says_what_to_rebuild() -> None:
    check = gate.image_check("llama", "gpufleet/llama.cpp:spark", _gpus("spark"), built=True)
    assert check is not None
    labels = {"gpufleet.cuda.sm": "sm_120a", "gpufleet.cuda.ptx": ""}
    assert check.refusal(labels) == (
        "services.llama: image gpufleet/llama.cpp:spark has sm_120a; this GPU is 12.1 "
        '(NVIDIA GB10): rebuild with cuda_archs ["121"]'
    )
    assert check.refusal({"gpufleet.cuda.sm": "sm_120a,sm_121a"}) is None
    assert check.refusal({"gpufleet.cuda.sm": "", "gpufleet.cuda.ptx": "compute_90"}) is None


def test_image_without_the_label_is_not_checked() -> None:
    check = gate.image_check("llama", "gpufleet/llama.cpp:spark", _gpus("spark"), built=True)
    assert check is not None
    assert check.refusal({}) is None
    assert check.refusal({"gpufleet.build.cuda_archs": "120"}) is None  # the flags prove nothing


def test_image_with_an_unreadable_or_empty_label_runs_nowhere() -> None:
    check = gate.image_check("llama", "x:y", _gpus("spark"), built=False)
    assert check is not None
    assert check.refusal({"gpufleet.cuda.sm": "sm_12x"}) == (
        "services.llama: image x:y has sm_12x; this GPU is 12.1 (NVIDIA GB10): "
        "use an image built for sm_121"
    )
    assert check.refusal({"gpufleet.cuda.sm": ""}) == (
        "services.llama: image x:y has no device code; this GPU is 12.1 (NVIDIA GB10): "
        "use an image built for sm_121"
    )


def test_image_check_on_several_gpus_names_the_one_it_cannot_run_on() -> None:
    gpus = _gpus("rtx5090", "12.0", "8.6")
    check = gate.image_check("llama", "gpufleet/llama.cpp:rtx5090", gpus, built=True)
    assert check is not None
    assert check.refusal({"gpufleet.cuda.sm": "sm_86,sm_120a"}) is None
    assert check.refusal({"gpufleet.cuda.sm": "sm_120a"}) == (
        "services.llama: image gpufleet/llama.cpp:rtx5090 has sm_120a; GPU 1 is 8.6 "
        '(NVIDIA GeForce RTX 5090): rebuild with cuda_archs ["120", "86"]'
    )


def test_no_image_check_without_a_known_compute_capability() -> None:
    gpus = tuple(g.model_copy(update={"compute_cap": None}) for g in _gpus("spark"))
    assert gate.image_check("llama", "x:y", gpus, built=True) is None
