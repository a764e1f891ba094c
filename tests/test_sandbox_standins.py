"""The sandbox stand-ins (nvidia-smi, the toolkit programs), their packages and apt repositories.

Expected outputs are the captured samples in ``tests/data/standins`` (copies of
``shared/reference/samples``; first line ``# source: ...``). The stand-ins run as the sandbox
hosts run them: with the system ``python3``, in a subprocess.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from gpufleet.core import gpu as gpu_mod
from gpufleet.core.known import TOOLKIT_PACKAGES
from gpufleet.sandbox import aptrepo, debs, gnupg, profiles

DATA = Path(__file__).parent / "data" / "standins"
ASSETS = Path(debs.__file__).parent / "assets"
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else shutil.which("python3")
TIMESTAMP = re.compile(r"^[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}( {7})?$")
needs_dpkg = pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="needs dpkg-deb")
needs_gpg = pytest.mark.skipif(
    not (shutil.which("gpg") and shutil.which("gpgv")), reason="needs gpg and gpgv"
)


def sample(name: str, skip: int = 0) -> list[str]:
    """A sample's lines without its ``# source:`` line and ``skip`` echoed command lines."""
    lines = (DATA / name).read_text().splitlines()
    assert lines[0].startswith("# source:")
    return lines[1 + skip :]


# ---------------------------------------------------------------- nvidia-smi


@pytest.fixture
def smi(tmp_path: Path):
    """Run the nvidia-smi stand-in against a profile dict."""

    def run(profile: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "gpu.json"
        path.write_text(json.dumps(profile))
        env = {**os.environ, "GPUFLEET_SANDBOX_GPU_PROFILE": str(path),
               "GPUFLEET_SANDBOX_SMI_STATE": str(tmp_path / "smi-state.json")}  # fmt: skip
        return subprocess.run(
            [PYTHON, str(ASSETS / "nvidia-smi"), *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    return run


def gpu_of(key: str) -> dict[str, Any]:
    """A sandbox host's GPU profile without its load source: the fixed numbers it starts from
    (the load tests below give it processes to follow)."""
    return {k: v for k, v in profiles.PROFILES[key].gpu.items() if k != "load_from"}


BURNER = "gpufleet-burner"  # at most 15 characters: /proc/<pid>/stat's comm


@pytest.fixture
def busy(tmp_path: Path):
    """A serving process of its own name that burns one CPU until the test ends (a name no
    sandbox container runs: this machine's /proc shows their llama-servers too)."""
    exe = tmp_path / BURNER
    exe.symlink_to(PYTHON)
    proc = subprocess.Popen([str(exe), "-c", "while True: pass"])
    yield proc
    proc.kill()
    proc.wait()


LOAD_FIELDS = "utilization.gpu,memory.used,power.draw"


def test_load_follows_the_serving_processes(smi, busy) -> None:
    profile = {**gpu_of("rtx5090"), "load_from": [BURNER]}
    first = smi(profile, f"--query-gpu={LOAD_FIELDS}", "--format=csv,noheader,nounits").stdout
    assert first.split(", ")[0] == "0"  # no earlier reading to compare with
    time.sleep(1.0)
    util, used, power = smi(profile, f"--query-gpu={LOAD_FIELDS}",
                            "--format=csv,noheader,nounits").stdout.split(", ")  # fmt: skip
    assert 15 <= int(util) <= 100  # one CPU, shared with whatever else this machine runs
    assert int(used) > 2  # the interpreter's resident memory
    assert float(power) > 1.0


def test_load_without_serving_processes_stays_idle(smi, busy) -> None:
    profile = {**gpu_of("rtx5090"), "load_from": ["gpufleet-idle"]}  # not the busy one
    smi(profile, f"--query-gpu={LOAD_FIELDS}", "--format=csv")
    time.sleep(0.5)
    out = smi(profile, f"--query-gpu={LOAD_FIELDS}", "--format=csv,noheader,nounits").stdout
    assert out == "0, 2, 1.00\n"


def test_tegrastats_reports_the_load_in_gr3d(tmp_path, busy) -> None:
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({**gpu_of("jetson"), "load_from": [BURNER]}))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvidia-smi").symlink_to(ASSETS / "nvidia-smi")
    env = {**os.environ, "GPUFLEET_SANDBOX_GPU_PROFILE": str(path),
           "PATH": f"{bindir}:{os.environ['PATH']}"}  # fmt: skip
    proc = subprocess.Popen([PYTHON, str(ASSETS / "tegrastats"), "--interval", "500"], env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
    finally:
        proc.kill()
        proc.wait()
    sample = gpu_mod.parse_tegrastats(lines[-1], t=0.0)
    assert sample.util_pct is not None and sample.util_pct >= 15  # a shared CPU: not all of it
    assert sample.power_rail == "VDD_CPU_GPU_CV" and sample.power_w > 0.5
    assert sample.memory_total_mib and sample.memory_used_mib


def rtx5090_x2() -> dict[str, Any]:
    """The two-board workstation of the RTX 5090 sample (475 W boards)."""
    return profiles.smi_profile(
        "570.133.07",
        "12.8",
        [
            profiles.gpu(
                "ws",
                "NVIDIA GeForce RTX 5090",
                compute_cap="12.0",
                memory_total_mib=32607,
                power_limit_w=475,
            ),
            profiles.gpu(
                "ws",
                "NVIDIA GeForce RTX 5090",
                index=1,
                bus_id="00000000:81:00.0",
                compute_cap="12.0",
                memory_total_mib=32607,
                power_limit_w=475,
                power_draw_w=8,
                temperature_c=36,
            ),
        ],
    )


def test_table_gb10_matches_sample(smi) -> None:
    profile = {**gpu_of("spark"), "driver": "580.126.09"}
    out = smi(profile).stdout.splitlines()
    expected = sample("nvidia-smi__dgx-spark-gb10__580.126.09-cuda13.0.txt")
    assert TIMESTAMP.match(out[0])
    assert out[1 : 1 + len(expected)] == expected


def test_table_rtx5090_pair_matches_sample(smi) -> None:
    out = smi(rtx5090_x2()).stdout.splitlines()
    expected = sample("nvidia-smi__rtx-5090-x2__570.133.07-cuda12.8.txt")
    assert out[1 : 1 + len(expected)] == expected


def test_table_jetson_matches_full_sample(smi) -> None:
    result = smi(gpu_of("jetson"))
    expected = sample("nvidia-smi__jetson-orin__540.4.0-cuda12.6__full.txt", skip=1)
    out = result.stdout.splitlines()
    assert result.returncode == 0
    assert re.fullmatch(r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}", out[0])
    assert out[1:] == expected[1:]
    assert result.stdout.endswith("+\n")


# The header lines of public captures of these driver versions, verbatim.
HEADERS = {
    "spark": "580.95.05              Driver Version: 580.95.05      CUDA Version: 13.0",
    "rtx5090": "570.133.07             Driver Version: 570.133.07     CUDA Version: 12.8",
    "old-driver": "550.54.14              Driver Version: 550.54.14      CUDA Version: 12.4",
    "jetson": "540.4.0                Driver Version: 540.4.0      CUDA Version: 12.6",
}


@pytest.mark.parametrize(
    ("key", "width", "under", "pid_head"),
    [
        ("spark", 91, "+", "CI              PID"),
        ("rtx5090", 91, "|", "CI              PID"),
        ("old-driver", 91, "|", "CI        PID"),
        ("jetson", 89, "|", "CI        PID"),
    ],
)
def test_table_shape_per_profile(smi, key, width, under, pid_head) -> None:
    out = smi(gpu_of(key)).stdout.splitlines()
    assert out[2] == f"| NVIDIA-SMI {HEADERS[key]}     |"
    assert out[3].startswith(under + "-----")
    table = [line for line in out[1:] if line.strip()]
    assert {len(line) for line in table} == {width}
    assert any(pid_head in line for line in table)
    assert f"|  {'No running processes found':<{width - 4}}|" in out


def test_table_rows_for_rtx5090_and_old_driver(smi) -> None:
    rtx = smi(gpu_of("rtx5090")).stdout
    assert "|  0%   29C    P8              1W /  575W |       2MiB /  32607MiB |" in rtx
    old = smi(gpu_of("old-driver")).stdout
    assert "|   0  NVIDIA GeForce RTX 4090        Off |   00000000:01:00.0 Off |" in old
    assert "|       1MiB /  24564MiB |" in old


def test_table_process_rows(smi) -> None:
    profile = rtx5090_x2()
    profile["processes"] = [
        {"gpu": 0, "pid": 3094, "type": "G", "name": "/usr/lib/xorg/Xorg", "used_memory_mib": 43},
        {
            "gpu": 1,
            "pid": 22976,
            "type": "C",
            "used_memory_mib": 9170,
            "name": "/home/user/ml/tf_2.20/tf_2.20/bin/python",
        },
    ]
    out = smi(profile).stdout.splitlines()
    # Both rows as real R570 prints them (same PIDs and names in public captures).
    assert (
        "|    0   N/A  N/A            3094      G   /usr/lib/xorg/Xorg"
        "                       43MiB |"
    ) in out
    assert (
        "|    1   N/A  N/A           22976      C   ...ml/tf_2.20/tf_2.20/bin/python"
        "       9170MiB |"
    ) in out


def test_query_gb10_matches_sample(smi) -> None:
    result = smi(
        gpu_of("spark"),
        "--query-gpu=index,name,memory.total,memory.used,memory.free",
        "--format=csv,noheader,nounits",
    )
    assert result.stdout.splitlines() == sample(
        "nvidia-smi-query-gpu-csv__dgx-spark-gb10__580.95.05.txt"
    )


def test_query_rtx5090_matches_sample(smi) -> None:
    profile = gpu_of("rtx5090")
    profile = {**profile, "gpus": [{**profile["gpus"][0], "memory_used_mib": 30234}]}
    result = smi(profile, "--query-gpu=name,memory.total,memory.used", "--format=csv")
    assert result.stdout.splitlines() == sample("nvidia-smi-query-gpu-csv__rtx-5090.txt")


ALL_FIELDS = (
    "index,name,uuid,compute_cap,memory.total,memory.used,memory.free,driver_version,"
    "pci.bus_id,power.limit,temperature.gpu,utilization.gpu,utilization.memory,"
    "persistence_mode,count"
)


def test_query_all_fields_with_and_without_units(smi) -> None:
    profile = gpu_of("rtx5090")
    uuid = profile["gpus"][0]["uuid"]
    header, row = smi(profile, f"--query-gpu={ALL_FIELDS}", "--format=csv").stdout.splitlines()
    assert header == (
        "index, name, uuid, compute_cap, memory.total [MiB], memory.used [MiB], "
        "memory.free [MiB], driver_version, pci.bus_id, power.limit [W], temperature.gpu, "
        "utilization.gpu [%], utilization.memory [%], persistence_mode, count"
    )
    assert row == (
        f"0, NVIDIA GeForce RTX 5090, {uuid}, 12.0, 32607 MiB, 2 MiB, 32605 MiB, 570.133.07, "
        "00000000:01:00.0, 575.00 W, 29, 0 %, 0 %, Disabled, 1"
    )
    bare = smi(profile, f"--query-gpu={ALL_FIELDS}", "--format=csv,noheader,nounits").stdout
    assert bare == (
        f"0, NVIDIA GeForce RTX 5090, {uuid}, 12.0, 32607, 2, 32605, 570.133.07, "
        "00000000:01:00.0, 575.00, 29, 0, 0, Disabled, 1\n"
    )


def test_query_na_fields_on_gb10_and_jetson(smi) -> None:
    fields = "name,memory.total,memory.used,power.limit,utilization.memory,compute_cap"
    spark = smi(gpu_of("spark"), f"--query-gpu={fields}", "--format=csv,noheader").stdout
    assert spark == "NVIDIA GB10, [N/A], [N/A], [N/A], 0 %, 12.1\n"
    jetson = smi(gpu_of("jetson"), f"--query-gpu={ALL_FIELDS}", "--format=csv,noheader").stdout
    cells = jetson.strip().split(", ")
    assert cells[:2] == ["0", "Orin (nvgpu)"]
    assert cells[4:7] == ["[N/A]"] * 3
    assert cells[7] == "540.4.0"
    assert cells[8:14] == ["[N/A]"] * 6
    assert cells[14] == "1"


@pytest.mark.parametrize("select", [("-i", "1"), ("--id=1",), ("--id", "1"), ("-i1",)])
def test_query_selects_gpu_by_index(smi, select) -> None:
    out = smi(rtx5090_x2(), "--query-gpu=index,pci.bus_id", "--format=csv,noheader", *select)
    assert out.stdout == "1, 00000000:81:00.0\n"


def test_query_selects_gpu_by_uuid(smi) -> None:
    profile = rtx5090_x2()
    uuid = profile["gpus"][1]["uuid"]
    assert (
        smi(profile, f"--id={uuid}", "--query-gpu=index", "--format=csv,noheader").stdout == "1\n"
    )


def test_query_errors(smi) -> None:
    bad_field = smi(gpu_of("rtx5090"), "--query-gpu=index,bogus.field", "--format=csv")
    assert (bad_field.returncode, bad_field.stdout) == (
        2,
        'Field "bogus.field" is not a valid field to query.\n',
    )
    missing_gpu = smi(gpu_of("rtx5090"), "-i", "3", "--query-gpu=index", "--format=csv")
    assert (missing_gpu.returncode, missing_gpu.stdout) == (6, "No devices were found\n")
    assert smi(gpu_of("rtx5090"), "--bogus").returncode == 2
    assert smi(gpu_of("rtx5090"), "--query-gpu=index").returncode == 2


def test_list_and_version(smi) -> None:
    spark = gpu_of("spark")
    assert smi(spark, "-L").stdout == f"GPU 0: NVIDIA GB10 (UUID: {spark['gpus'][0]['uuid']})\n"
    assert smi(spark, "--version").stdout == (
        "NVIDIA-SMI version  : 580.95.05\n"
        "NVML version        : 580.95\n"
        "DRIVER version      : 580.95.05\n"
        "CUDA Version        : 13.0\n"
    )


def test_query_compute_apps(smi) -> None:
    profile = gpu_of("spark")
    profile = {
        **profile,
        "processes": [
            {
                "gpu": 0,
                "pid": 4242,
                "type": "C",
                "name": "/app/llama-server",
                "used_memory_mib": 700,
            },
        ],
    }
    out = smi(profile, "--query-compute-apps=pid,process_name,used_memory", "--format=csv")
    assert out.stdout == "pid, process_name, used_memory [MiB]\n4242, /app/llama-server, 700 MiB\n"


@pytest.mark.parametrize(
    "args", [(), ("-L",), ("--version",), ("--query-gpu=index", "--format=csv"), ("--help",)]
)
def test_no_driver_fails_every_invocation(smi, args) -> None:
    result = smi(gpu_of("no-driver"), *args)
    assert result.returncode == 9
    assert result.stdout.splitlines() == sample("nvidia-smi__driver-missing.txt", skip=1)


def test_driver_library_mismatch(smi) -> None:
    profile = profiles.smi_profile(
        "570.133.07", "12.8", [], failure="mismatch", nvml_version="570.124"
    )
    result = smi(profile, "--query-gpu=driver_version", "--format=csv")
    assert result.returncode == 18
    assert result.stdout == (
        "Failed to initialize NVML: Driver/library version mismatch\n"
        "NVML library version: 570.124\n"
    )


def test_missing_profile_looks_like_missing_driver(tmp_path: Path) -> None:
    env = {**os.environ, "GPUFLEET_SANDBOX_GPU_PROFILE": str(tmp_path / "absent.json")}
    result = subprocess.run(
        [PYTHON, str(ASSETS / "nvidia-smi")], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 9


# ---------------------------------------------------------------- profiles


def test_profiles_data() -> None:
    assert set(profiles.PROFILES) == {"spark", "rtx5090", "jetson", "old-driver", "no-driver"}
    p = profiles.PROFILES
    assert {k: v.hostname for k, v in p.items()} == {k: f"sandbox-{k}" for k in p}
    assert [k for k, v in p.items() if v.docker_preinstalled] == ["spark", "jetson"]
    assert {k: v.toolkit_preinstalled for k, v in p.items() if v.toolkit_preinstalled} == {
        "spark": "1.17.8-1",
        "jetson": "1.17.8-1",
    }
    assert p["spark"].daemon_json == {
        "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}
    }
    assert p["jetson"].daemon_json == {**p["spark"].daemon_json, "default-runtime": "nvidia"}
    facts = {
        k: (v.gpu["driver"], v.gpu["cuda"], [g["compute_cap"] for g in v.gpu["gpus"]])
        for k, v in p.items()
    }
    assert facts == {
        "spark": ("580.95.05", "13.0", ["12.1"]),
        "rtx5090": ("570.133.07", "12.8", ["12.0"]),
        "jetson": ("540.4.0", "12.6", ["8.7"]),
        "old-driver": ("550.54.14", "12.4", ["8.9"]),
        "no-driver": (None, None, []),
    }
    assert p["no-driver"].gpu["failure"] == "no-driver"
    uuids = [g["uuid"] for v in p.values() for g in v.gpu["gpus"]]
    assert len(set(uuids)) == len(uuids) == 4
    assert all(re.fullmatch(r"GPU-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", u) for u in uuids)
    assert profiles.gpu_uuid("sandbox-spark") == p["spark"].gpu["gpus"][0]["uuid"]


def test_render_profile_files() -> None:
    spark = profiles.render_profile_files(profiles.PROFILES["spark"])
    assert set(spark) == {"/etc/gpufleet-sandbox/gpu.json", "/etc/docker/daemon.json"}
    assert json.loads(spark["/etc/gpufleet-sandbox/gpu.json"]) == profiles.PROFILES["spark"].gpu
    expected_daemon = (
        "\n".join(sample("etc-docker-daemon.json__after-nvidia-ctk-runtime-configure.txt")) + "\n"
    )
    assert spark["/etc/docker/daemon.json"].decode() == expected_daemon
    assert set(profiles.render_profile_files(profiles.PROFILES["rtx5090"])) == {
        "/etc/gpufleet-sandbox/gpu.json"
    }

    jetson = profiles.render_profile_files(profiles.PROFILES["jetson"])
    assert jetson["/etc/nv_tegra_release"].decode().splitlines() == sample(
        "nv_tegra_release__r36.4.7__jp6.2.1.txt"
    )
    version_json = jetson["/usr/local/cuda/version.json"].decode()
    assert json.loads(version_json)["cuda_nvcc"]["version"] == "12.6.68"
    # Same bytes as the captured file as far as the capture goes (it is cut mid-entry).
    captured = sample("cuda-version-json__jetson-orin-nano__jp6.2.1__partial.txt", skip=1)
    assert version_json.splitlines()[: len(captured) - 1] == captured[:-1]
    assert json.loads(jetson["/etc/docker/daemon.json"])["default-runtime"] == "nvidia"


# ---------------------------------------------------------------- toolkit programs


@pytest.fixture
def tools(tmp_path: Path) -> Path:
    """The toolkit stand-ins rendered for 1.18.0-1, plus nvidia-smi, in one directory."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in (
        "nvidia-ctk",
        "nvidia-container-cli",
        "nvidia-container-runtime",
        "nvidia-container-runtime-hook",
    ):
        (bindir / name).write_bytes(debs.render_asset(f"toolkit/{name}", "1.18.0-1"))
        (bindir / name).chmod(0o755)
    shutil.copy(ASSETS / "nvidia-smi", bindir / "nvidia-smi")
    return bindir


def run_tool(
    bindir: Path, name: str, *args: str, profile: str = "rtx5090", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    gpu_json = bindir.parent / f"{profile}.json"
    gpu_json.write_text(json.dumps(gpu_of(profile)))
    full_env = {
        **os.environ,
        "GPUFLEET_SANDBOX_GPU_PROFILE": str(gpu_json),
        "GPUFLEET_SANDBOX_NVIDIA_SMI": str(bindir / "nvidia-smi"),
        **(env or {}),
    }
    cmd = (
        [PYTHON, str(bindir / name)]
        if name in ("nvidia-ctk", "nvidia-container-cli")
        else [str(bindir / name)]
    )
    return subprocess.run([*cmd, *args], env=full_env, capture_output=True, text=True, check=False)


def test_ctk_version(tools: Path) -> None:
    out = run_tool(tools, "nvidia-ctk", "--version").stdout
    commit = debs.upstream_commit("1.18.0")
    assert out == f"NVIDIA Container Toolkit CLI version 1.18.0\ncommit: {commit}\n"
    assert re.fullmatch(r"[0-9a-f]{40}", debs.upstream_commit("1.18.0-1"))
    assert (
        debs.render_asset("toolkit/nvidia-ctk", "1.17.8-1").count(
            b"f202b80a9b9d0db00d9b1d73c0128c8962c55f4d"
        )
        == 1
    )
    assert sample("nvidia-ctk-version__1.17.8.txt", skip=1) == [
        "NVIDIA Container Toolkit CLI version 1.17.8",
        "commit: f202b80a9b9d0db00d9b1d73c0128c8962c55f4d",
    ]


def test_ctk_configure_merges_and_is_idempotent(tools: Path, tmp_path: Path) -> None:
    config = tmp_path / "daemon.json"
    config.write_text(
        '{"log-opts": {"max-size": "10m"}, "data-root": "/srv/docker",\n'
        ' "runtimes": {"nvidia": {"path": "nvidia-container-runtime",'
        ' "runtimeArgs": []}, "crun": {"path": "/usr/bin/crun"}}}'
    )
    first = run_tool(
        tools, "nvidia-ctk", "runtime", "configure", "--runtime=docker", f"--config={config}"
    )
    assert first.returncode == 0, first.stderr
    written = config.read_bytes()
    assert json.loads(written) == {
        "data-root": "/srv/docker",
        "log-opts": {"max-size": "10m"},
        "runtimes": {
            "crun": {"path": "/usr/bin/crun"},
            "nvidia": {"args": [], "path": "nvidia-container-runtime"},
        },
    }
    assert written.decode() == json.dumps(json.loads(written), indent=4, sort_keys=True) + "\n"
    assert [line.split("msg=")[1] for line in first.stderr.splitlines()] == [
        f'"Loading config from {config}"',
        f'"Wrote updated config to {config}"',
        '"It is recommended that docker daemon be restarted."',
    ]
    again = run_tool(
        tools, "nvidia-ctk", "runtime", "configure", "--runtime=docker", "--config", str(config)
    )
    assert again.returncode == 0
    assert config.read_bytes() == written


def test_ctk_configure_new_file_matches_sample(tools: Path, tmp_path: Path) -> None:
    config = tmp_path / "etc" / "docker" / "daemon.json"
    result = run_tool(
        tools, "nvidia-ctk", "runtime", "configure", "--runtime=docker", f"--config={config}"
    )
    assert "Config file does not exist; using empty config" in result.stderr
    assert config.read_text().splitlines() == sample(
        "etc-docker-daemon.json__after-nvidia-ctk-runtime-configure.txt"
    )


def test_ctk_configure_default_cdi_and_dry_run(tools: Path, tmp_path: Path) -> None:
    config = tmp_path / "daemon.json"
    config.write_text('{"features": {"buildkit": true}}\n')
    before = config.read_bytes()
    dry = run_tool(
        tools,
        "nvidia-ctk",
        "runtime",
        "configure",
        "--runtime=docker",
        f"--config={config}",
        "--set-as-default",
        "--cdi.enabled",
        "--dry-run",
    )
    assert config.read_bytes() == before
    assert json.loads(dry.stdout) == {
        "default-runtime": "nvidia",
        "features": {"buildkit": True, "cdi": True},
        "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}},
    }
    run_tool(
        tools,
        "nvidia-ctk",
        "runtime",
        "configure",
        "--runtime=docker",
        f"--config={config}",
        "--nvidia-set-as-default",
        "--cdi.enabled",
    )
    assert config.read_text() == dry.stdout


def test_ctk_configure_rejects_broken_json(tools: Path, tmp_path: Path) -> None:
    config = tmp_path / "daemon.json"
    config.write_text("{not json")
    result = run_tool(tools, "nvidia-ctk", "runtime", "configure", f"--config={config}")
    assert result.returncode == 1
    assert "unable to load config" in result.stderr
    assert config.read_text() == "{not json"


def test_ctk_cdi_generate_and_list(tools: Path, tmp_path: Path) -> None:
    spec = tmp_path / "cdi" / "nvidia.yaml"
    gen = run_tool(tools, "nvidia-ctk", "cdi", "generate", f"--output={spec}")
    assert gen.returncode == 0, gen.stderr
    uuid = gpu_of("rtx5090")["gpus"][0]["uuid"]
    text = spec.read_text()
    assert text.startswith("---\ncdiVersion: 0.5.0\n")
    assert text.endswith("kind: nvidia.com/gpu\n")
    assert re.findall(r"^  name: (.*)$", text, re.M) == ['"0"', uuid, "all"]
    listed = run_tool(tools, "nvidia-ctk", "cdi", "list", "--spec-dir", str(spec.parent))
    assert listed.stdout.splitlines() == [
        "nvidia.com/gpu=0",
        f"nvidia.com/gpu={uuid}",
        "nvidia.com/gpu=all",
    ]
    assert "Found 3 CDI devices" in listed.stderr


def test_ctk_cdi_generate_fails_without_driver(tools: Path, tmp_path: Path) -> None:
    spec = tmp_path / "nvidia.yaml"
    result = run_tool(
        tools, "nvidia-ctk", "cdi", "generate", f"--output={spec}", profile="no-driver"
    )
    assert result.returncode == 1
    assert "failed to generate CDI spec" in result.stderr
    assert "couldn't communicate with the NVIDIA driver" in result.stderr
    assert not spec.exists()


def test_container_cli(tools: Path) -> None:
    version = run_tool(tools, "nvidia-container-cli", "--version").stdout
    assert version.startswith("cli-version: 1.18.0\nlib-version: 1.18.0\n")
    info = run_tool(tools, "nvidia-container-cli", "info", profile="spark").stdout
    assert "NVRM version:   580.95.05\nCUDA version:   13.0\n" in info
    assert "Model:          NVIDIA GB10\n" in info
    assert "Architecture:   12.1\n" in info
    failed = run_tool(tools, "nvidia-container-cli", "info", profile="no-driver")
    assert failed.returncode == 1
    assert "driver not loaded" in failed.stderr


def test_runtime_hands_over_to_runc(tools: Path, tmp_path: Path) -> None:
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    (fakebin / "runc").write_text('#!/bin/sh\necho "runc $*"\n')
    (fakebin / "runc").chmod(0o755)
    env = {"PATH": f"{fakebin}:{os.environ['PATH']}"}
    out = run_tool(tools, "nvidia-container-runtime", "run", "--bundle", "/b", "ctr", env=env)
    assert (out.returncode, out.stdout) == (0, "runc run --bundle /b ctr\n")
    version = run_tool(tools, "nvidia-container-runtime", "--version", env=env).stdout
    assert version.startswith("NVIDIA Container Runtime version 1.18.0\ncommit: ")
    assert version.endswith("\n\nrunc --version\n")
    hook = run_tool(tools, "nvidia-container-runtime-hook", "prestart")
    assert (hook.returncode, hook.stdout) == (0, "")


# ---------------------------------------------------------------- packages


@pytest.fixture(scope="module")
def toolkit_debs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    if not shutil.which("dpkg-deb"):
        pytest.skip("needs dpkg-deb")
    return debs.build_toolkit_debs(tmp_path_factory.mktemp("debs"))


def deb_field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], check=True, capture_output=True, text=True
    ).stdout.strip()


def deb_files(deb: Path) -> dict[str, str]:
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], check=True, capture_output=True, text=True
    ).stdout
    files = {}
    for line in listing.splitlines():
        mode, owner, *_, path = line.split(None, 5)
        files[path.split(" -> ")[0].lstrip(".")] = f"{mode} {owner}"
    return files


@needs_dpkg
def test_toolkit_debs_names_versions_depends(toolkit_debs: list[Path]) -> None:
    assert [d.name for d in toolkit_debs] == [
        f"{name}_{v}_all.deb"
        for v in debs.TOOLKIT_VERSIONS
        for name in (
            "libnvidia-container1",
            "libnvidia-container-tools",
            "nvidia-container-toolkit-base",
            "nvidia-container-toolkit",
        )
    ]
    for deb in toolkit_debs:
        info = subprocess.run(
            ["dpkg-deb", "-I", str(deb)], check=True, capture_output=True, text=True
        ).stdout
        name, version = deb.name.split("_")[:2]
        assert f" Package: {name}\n" in info
        assert f" Version: {version}\n" in info
        depends = {
            "libnvidia-container1": "",
            "libnvidia-container-tools": f"libnvidia-container1 (= {version}), python3",
            "nvidia-container-toolkit-base": "python3",
            "nvidia-container-toolkit": f"nvidia-container-toolkit-base (= {version}), "
            f"libnvidia-container-tools (= {version})",
        }[name]
        assert deb_field(deb, "Depends") == depends


@needs_dpkg
def test_toolkit_debs_carry_upstream_paths(toolkit_debs: list[Path], tmp_path: Path) -> None:
    by_name = {d.name.split("_")[0]: d for d in toolkit_debs if "1.18.0" in d.name}
    base = deb_files(by_name["nvidia-container-toolkit-base"])
    for path in (
        "/usr/bin/nvidia-ctk",
        "/usr/bin/nvidia-container-runtime",
        "/usr/bin/nvidia-cdi-hook",
    ):
        assert base[path] == "-rwxr-xr-x root/root"
    assert "/etc/nvidia-container-runtime/config.toml" in base
    toolkit = deb_files(by_name["nvidia-container-toolkit"])
    assert toolkit["/usr/bin/nvidia-container-runtime-hook"] == "-rwxr-xr-x root/root"
    assert toolkit["/usr/bin/nvidia-container-toolkit"].startswith("lrwxrwxrwx")
    assert "/usr/bin/nvidia-container-cli" in deb_files(by_name["libnvidia-container-tools"])

    subprocess.run(
        ["dpkg-deb", "-x", str(by_name["nvidia-container-toolkit-base"]), str(tmp_path)], check=True
    )
    out = subprocess.run(
        [PYTHON, str(tmp_path / "usr/bin/nvidia-ctk"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("NVIDIA Container Toolkit CLI version 1.18.0\ncommit: ")


@needs_dpkg
def test_debs_are_reproducible_and_not_rebuilt(toolkit_debs: list[Path], tmp_path: Path) -> None:
    again = debs.build_toolkit_debs(toolkit_debs[0].parent)
    assert [d.stat().st_mtime_ns for d in again] == [d.stat().st_mtime_ns for d in toolkit_debs]
    fresh = debs.build_toolkit_debs(tmp_path)
    assert [d.read_bytes() for d in fresh] == [d.read_bytes() for d in toolkit_debs]


@needs_dpkg
def test_compose_plugin_deb(tmp_path: Path) -> None:
    binary = tmp_path / "docker-compose"
    shutil.copy("/bin/true", binary)  # any ELF stands in for the 76 MB compose binary
    deb = debs.build_compose_plugin_deb(tmp_path / "out", binary)
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert deb.name == f"docker-compose-plugin_2.40.3-1~debian.12~bookworm_{arch}.deb"
    assert deb_field(deb, "Package") == "docker-compose-plugin"
    files = deb_files(deb)
    assert files["/usr/libexec/docker/cli-plugins/docker-compose"] == "-rwxr-xr-x root/root"
    with pytest.raises(ValueError, match="not an ELF"):
        debs.build_compose_plugin_deb(tmp_path / "out", DATA / "nvidia-ctk-version__1.17.8.txt")


# ---------------------------------------------------------------- signed repositories


def dearmor(armored: Path, out: Path, home: Path) -> Path:
    home.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--yes",
            "--dearmor",
            "-o",
            str(out),
            str(armored),
        ],
        check=True,
        capture_output=True,
    )
    return out


def gpgv(keyring: Path, *files: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["gpgv", "--keyring", str(keyring), *map(str, files)], capture_output=True, check=False
    )


@pytest.fixture(scope="module")
def signed_repo(toolkit_debs: list[Path], tmp_path_factory: pytest.TempPathFactory):
    if not (shutil.which("gpg") and shutil.which("gpgv")):
        pytest.skip("needs gpg and gpgv")
    base = tmp_path_factory.mktemp("repo")
    # A home deeper than a unix socket path may be (108 bytes): the agent still starts.
    home, repo = base / ("checkout-" * 12) / "g", base / "amd64"
    assert len(str(home / "S.gpg-agent")) > 108
    fingerprint = gnupg.make_signing_key(home)
    aptrepo.build_flat_repo(repo, toolkit_debs, home)
    gnupg.export_public_key(home, base / "gpgkey")
    return {
        "base": base,
        "home": home,
        "repo": repo,
        "fingerprint": fingerprint,
        "keyring": dearmor(base / "gpgkey", base / "key.gpg", base / "g2"),
    }


@needs_gpg
def test_flat_repo_index_and_release(signed_repo, toolkit_debs: list[Path]) -> None:
    repo: Path = signed_repo["repo"]
    packages = (repo / "Packages").read_bytes()
    assert gzip.decompress((repo / "Packages.gz").read_bytes()) == packages
    release = (repo / "Release").read_text()
    for name in ("Packages", "Packages.gz"):
        data = (repo / name).read_bytes()
        assert f" {hashlib.sha256(data).hexdigest()} {len(data):>16} {name}\n" in release
        assert f" {hashlib.md5(data).hexdigest()} {len(data):>16} {name}\n" in release
    assert "Date: Wed, 01 Jan 2025 00:00:00 UTC\n" in release
    stanzas = packages.decode().split("\n\n")
    assert len(stanzas) == len(toolkit_debs)
    for deb in toolkit_debs:
        stanza = next(s for s in stanzas if f"Filename: ./{deb.name}\n" in s)
        assert f"SHA256: {hashlib.sha256(deb.read_bytes()).hexdigest()}\n" in stanza
        assert f"Size: {deb.stat().st_size}\n" in stanza
        assert (repo / deb.name).read_bytes() == deb.read_bytes()


@needs_gpg
def test_flat_repo_signatures_verify_only_with_its_key(signed_repo, tmp_path: Path) -> None:
    repo: Path = signed_repo["repo"]
    assert gpgv(signed_repo["keyring"], repo / "InRelease").returncode == 0
    assert gpgv(signed_repo["keyring"], repo / "Release.gpg", repo / "Release").returncode == 0
    assert (repo / "Release.gpg").read_text().startswith("-----BEGIN PGP SIGNATURE-----")
    assert (
        (signed_repo["base"] / "gpgkey")
        .read_text()
        .startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    )

    other_home = tmp_path / "o"
    assert gnupg.make_signing_key(other_home) != signed_repo["fingerprint"]
    gnupg.export_public_key(other_home, tmp_path / "other.asc")
    other = dearmor(tmp_path / "other.asc", tmp_path / "other.gpg", tmp_path / "o2")
    assert gpgv(other, repo / "InRelease").returncode != 0
    assert gpgv(other, repo / "Release.gpg", repo / "Release").returncode != 0


@needs_gpg
def test_signing_key_is_reused_and_repo_not_resigned(signed_repo, toolkit_debs) -> None:
    assert gnupg.make_signing_key(signed_repo["home"]) == signed_repo["fingerprint"]
    repo: Path = signed_repo["repo"]
    before = {n: (repo / n).read_bytes() for n in ("Release", "InRelease", "Release.gpg")}
    aptrepo.build_flat_repo(repo, toolkit_debs, signed_repo["home"])
    assert {n: (repo / n).read_bytes() for n in before} == before


@needs_gpg
def test_flat_repo_drops_packages_not_listed(toolkit_debs, tmp_path: Path) -> None:
    repo = tmp_path / "r"
    aptrepo.build_flat_repo(repo, toolkit_debs, tmp_path / "g")
    aptrepo.build_flat_repo(repo, toolkit_debs[:4], tmp_path / "g")
    assert sorted(p.name for p in repo.glob("*.deb")) == sorted(d.name for d in toolkit_debs[:4])
    assert (repo / "Packages").read_text().count("Package: ") == 4


@needs_gpg
def test_mirror_tree_layout_and_apt_accepts_it(tmp_path: Path) -> None:
    binary = tmp_path / "docker-compose"
    shutil.copy("/bin/true", binary)
    root = tmp_path / "www"
    kwargs = {"compose_binary": binary, "base_url": "http://mirror/", "gnupg_home": tmp_path / "g"}
    aptrepo.build_mirror_tree(root, **kwargs)
    tree = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    )
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    toolkit = [
        f"libnvidia-container/stable/deb/amd64/{d}"
        for d in ("InRelease", "Packages", "Packages.gz", "Release", "Release.gpg")
    ]
    toolkit += [
        f"libnvidia-container/stable/deb/amd64/{n}_{v}_all.deb"
        for n in TOOLKIT_PACKAGES
        for v in debs.TOOLKIT_VERSIONS
    ]
    assert tree == sorted(
        [
            "docker/gpgkey",
            "libnvidia-container/gpgkey",
            "libnvidia-container/stable/deb/nvidia-container-toolkit.list",
            f"docker/deb/docker-compose-plugin_2.40.3-1~debian.12~bookworm_{arch}.deb",
            *(
                f"docker/deb/{n}"
                for n in ("InRelease", "Packages", "Packages.gz", "Release", "Release.gpg")
            ),
            *toolkit,
        ]
    )
    listed = (root / aptrepo.TOOLKIT_LIST_PATH).read_text()
    upstream = "\n".join(sample("nvidia-container-toolkit.list__upstream-raw.txt")) + "\n"
    assert listed == upstream.replace("https://nvidia.github.io", "http://mirror")
    assert (root / "docker/gpgkey").read_bytes() != (
        root / "libnvidia-container/gpgkey"
    ).read_bytes()

    snapshot = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    aptrepo.build_mirror_tree(root, **kwargs)
    assert {
        p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
    } == snapshot

    if shutil.which("apt-get") and arch == "amd64":
        apt_install_simulation(root, tmp_path / "apt", arch)


def apt_install_simulation(root: Path, work: Path, arch: str) -> None:
    """Point a private apt configuration at the tree (file: URIs) and resolve an install."""
    for d in ("lists/partial", "cache/archives/partial", "etc"):
        (work / d).mkdir(parents=True)
    keys = {
        name: dearmor(root / name / "gpgkey", work / f"{name}.gpg", work / "g")
        for name in ("libnvidia-container", "docker")
    }
    (work / "etc/sources.list").write_text(
        f"deb [signed-by={keys['libnvidia-container']}] "
        f"file:{root}/libnvidia-container/stable/deb/$(ARCH) /\n"
        f"deb [signed-by={keys['docker']}] file:{root}/docker/deb /\n"
    )
    opts = [
        f"-oDir::Etc::SourceList={work}/etc/sources.list",
        f"-oDir::Etc::SourceParts={work}/etc/none",
        f"-oDir::State::Lists={work}/lists",
        f"-oDir::Cache={work}/cache",
        "-oAPT::Sandbox::User=root",
        "-oDebug::NoLocking=1",
        f"-oAPT::Architecture={arch}",
    ]
    update = subprocess.run(
        ["apt-get", *opts, "update"], capture_output=True, text=True, check=False
    )
    assert update.returncode == 0 and "W:" not in update.stdout + update.stderr, update.stderr
    pins = [f"{name}=1.17.8-1" for name in TOOLKIT_PACKAGES]
    sim = subprocess.run(
        ["apt-get", *opts, "-s", "install", *pins, "docker-compose-plugin"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert sim.returncode == 0, sim.stdout + sim.stderr
    for name in TOOLKIT_PACKAGES:
        assert f"Inst {name} (1.17.8-1 " in sim.stdout
    assert "Inst docker-compose-plugin (2.40.3-1~debian.12~bookworm " in sim.stdout


# ---------------------------------------------------------------- llama.cpp source archive


def test_llama_source_archive_is_the_vendored_tree_and_reproducible(tmp_path: Path) -> None:
    from gpufleet.sandbox.images import llama_source_archive

    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in {
            "llama_cpp_python-0.3.36/llama_cpp/__init__.py": b"",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/CMakeLists.txt": b"project(llama)\n",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/tools/server/server.cpp": b"int main(){}\n",
            "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab.gguf": b"GGUF",
        }.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.uid = len(data), 1_700_000_000, 1000
            tar.addfile(info, io.BytesIO(data))

    first = llama_source_archive(sdist, tmp_path / "a" / "llama.cpp-src.tar.gz")
    time.sleep(1.1)  # a gzip header would carry the second it was written
    second = llama_source_archive(sdist, tmp_path / "b" / "other-name.tar.gz")
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == ["llama.cpp/CMakeLists.txt", "llama.cpp/tools/server/server.cpp"]
    assert {(m.uid, m.uname, m.mtime) for m in members.values()} == {(0, "root", 1_700_000_000)}
