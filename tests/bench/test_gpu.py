"""GPU sampling: the remote command, the nvidia-smi / meminfo / tegrastats parsers, the summary."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from gpufleet.core.gpu import (
    SMI_COMMAND,
    GpuParseError,
    GpuSample,
    default_sources,
    parse_meminfo,
    parse_sampler_output,
    parse_smi_row,
    parse_tegrastats,
    sampler_command,
    series,
    summarize_gpu,
)

# Lines as the real tools print them (gpu-facts.md section 2; jetson_stats' test lines).
TEGRA_JP6 = "RAM 4722/7844MB (lfb 1x512kB) EMC_FREQ 2%@1866 GR3D_FREQ 10%@1300 APE 150"
TEGRA_JP7 = (
    "07-25-2026 09:08:28 RAM 20642/62817MB (lfb 1x2MB) CPU [23%@2201,10%@2201] "
    "EMC_FREQ 3%@3199 GR3D_FREQ 12%@[1300,1300] NVENC0 off VIC off APE 174 "
    "cpu@52.968C/52.968C gpu@47.625C/47.625C "
    "VDD_GPU_SOC 5139mW/5139mW/5139mW VDD_CPU_CV 3268mW/3268mW/3268mW "
    "VIN_SYS_5V0 5500mW/5500mW/5500mW"
)
TEGRA_ORIN_NX = (
    "RAM 2113/7620MB (lfb 5x4MB) SWAP 0/3810MB (cached 0MB) CPU [1%@729,0%@729] "
    "EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305] VIC_FREQ 729 APE 200 CPU@47.5C GPU@45.8C "
    "VDD_IN 4835mW/4835mW VDD_CPU_GPU_CV 603mW/603mW VDD_SOC 1448mW/1448mW"
)
TEGRA_THOR = "RAM 4722/7844MB (lfb 1x512kB) EMC_FREQ 2%@1866 GR3D_FREQ @[1000,1000,1000] APE 150"
TEGRA_NANO = (
    "RAM 1766/3964MB (lfb 197x4MB) SWAP 0/2048MB (cached 0MB) CPU [24%@1224,15%@1224] "
    "EMC_FREQ 0% GR3D_FREQ 0% PLL@21C GPU@23.5C POM_5V_IN 2545/2547 POM_5V_GPU 0/0 "
    "POM_5V_CPU 549/529"
)
TEGRA_TX1 = "RAM 3468/3983MB (lfb 48x4MB) cpu [17%,13%,29%,5%]@408 EMC 1%@408 APE 25 GR3D 39%@76"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("0, 45, 1024, 32607, 250.12", (0, 45.0, 1024.0, 32607.0, 250.12)),
        # GB10: memory is [N/A] in --query-gpu (gpu-facts.md section 2)
        ("0, 96, [N/A], [N/A], 11.21", (0, 96.0, None, None, 11.21)),
        ("1, 0, 512, 81559, [Not Supported]", (1, 0.0, 512.0, 81559.0, None)),
        # Jetson's nvidia-smi: nearly every field N/A
        ("0, N/A, N/A, N/A, N/A", (0, None, None, None, None)),
        ("0, [Unknown Error], 1, 2, 3", (0, None, 1.0, 2.0, 3.0)),
    ],
)
def test_smi_rows(row, expected):
    s = parse_smi_row(row, t=5.0)
    assert (s.index, s.util_pct, s.memory_used_mib, s.memory_total_mib, s.power_w) == expected
    assert (s.t, s.source) == (5.0, "nvidia-smi")


@pytest.mark.parametrize(
    "row", ["0, 45, 1024, 32607", "GPU-0, 1, 2, 3, 4", "0, 45 %, 1, 2, 3", "0, 1, 2, 3, 4, 5"]
)
def test_bad_smi_rows(row):
    with pytest.raises(GpuParseError):
        parse_smi_row(row, t=0.0)


@pytest.mark.parametrize(
    ("line", "util", "used", "total", "power", "rail"),
    [
        (TEGRA_JP6, 10.0, 4722.0, 7844.0, None, None),
        (TEGRA_JP7, 12.0, 20642.0, 62817.0, 5.139, "VDD_GPU_SOC"),
        (TEGRA_ORIN_NX, 0.0, 2113.0, 7620.0, 0.603, "VDD_CPU_GPU_CV"),
        (TEGRA_THOR, None, 4722.0, 7844.0, None, None),  # clocks only: no utilisation
        (TEGRA_NANO, 0.0, 1766.0, 3964.0, 0.0, "POM_5V_GPU"),
        (TEGRA_TX1, 39.0, 3468.0, 3983.0, None, None),
        ("RAM 2/3GB GR3D_FREQ 45%", 45.0, 2048.0, 3072.0, None, None),
    ],
)
def test_tegrastats_lines(line, util, used, total, power, rail):
    s = parse_tegrastats(line, t=1.0)
    assert s.util_pct == util
    assert s.memory_used_mib == used and s.memory_total_mib == total
    assert s.power_w == (None if power is None else pytest.approx(power))
    assert s.power_rail == rail
    assert (s.index, s.source) == (0, "tegrastats")


def test_tegrastats_zero_is_zero_not_unsupported():
    s = parse_tegrastats("GR3D_FREQ 0%@[1300,1300]", t=0.0)
    assert s.util_pct == 0.0
    assert s.memory_used_mib is None


def test_not_a_tegrastats_line():
    with pytest.raises(GpuParseError):
        parse_tegrastats("tegrastats: command not found", t=0.0)


def test_meminfo():
    text = "MemTotal:       127601232 kB\nMemFree:         1000 kB\nMemAvailable:   118000000 kB\n"
    used, total = parse_meminfo(text)
    assert total == pytest.approx(127601232 / 1024)
    assert used == pytest.approx((127601232 - 118000000) / 1024)
    with pytest.raises(GpuParseError):
        parse_meminfo("MemTotal: 1 kB\n")


SAMPLER_OUTPUT = f"""\
@T 100.0
@SMI 100.0 0, 0, [N/A], [N/A], 10.0
@MEM 100.0 8388608 4194304
@T 101.0
@SMI 101.0 0, 5, [N/A], [N/A], 20.0
@MEM 101.0 8388608 2097152
@SMI 102.0 NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.
@SMI 102.5 0, 50, [N/A], [N/A], 30.0
@SMI 103.0 0, 100, [N/A], [N/A], [N/A]
noise from the login shell
@TEGRA 103.0 {TEGRA_JP6}
"""


def test_sampler_output_parsed_and_bad_lines_skipped():
    samples = parse_sampler_output(SAMPLER_OUTPUT)
    assert [s.source for s in samples] == [
        "nvidia-smi",
        "meminfo",
        "nvidia-smi",
        "meminfo",
        "nvidia-smi",
        "nvidia-smi",
        "tegrastats",
    ]
    mem = samples[1]
    assert mem.index is None
    assert mem.memory_used_mib == 4096.0 and mem.memory_total_mib == 8192.0
    with pytest.raises(GpuParseError):
        parse_sampler_output(SAMPLER_OUTPUT, strict=True)
    assert parse_sampler_output(iter(SAMPLER_OUTPUT.splitlines())) == samples


def test_summary_gb10_memory_from_meminfo_and_idle_fraction():
    samples = [s for s in parse_sampler_output(SAMPLER_OUTPUT) if s.source != "tegrastats"]
    [gpu] = summarize_gpu(samples)
    assert gpu.index == 0 and gpu.samples == 4
    assert gpu.util_mean_pct == pytest.approx((0 + 5 + 50 + 100) / 4)
    assert gpu.util_peak_pct == 100.0
    assert gpu.idle_fraction == pytest.approx(0.5)  # 0% and 5% are under 10%
    # nvidia-smi has no memory on GB10: MemTotal - MemAvailable, peak 6 GiB of 8 GiB
    assert gpu.memory_used_peak_mib == 6144.0 and gpu.memory_total_mib == 8192.0
    assert gpu.memory_source == "meminfo"
    assert gpu.power_mean_w == pytest.approx(20.0) and gpu.power_peak_w == 30.0
    assert gpu.power_source == "nvidia-smi"
    assert gpu.unsupported == ()


def test_summary_marks_fields_unsupported_never_zero():
    samples = [parse_smi_row("0, N/A, N/A, N/A, N/A", t=float(t)) for t in range(3)]
    [gpu] = summarize_gpu(samples)
    assert gpu.unsupported == ("utilization", "memory_used", "power")
    assert gpu.util_mean_pct is None and gpu.idle_fraction is None
    assert gpu.memory_used_peak_mib is None and gpu.power_mean_w is None


def test_summary_two_gpus_do_not_borrow_host_memory():
    samples = [
        parse_smi_row("0, 90, 1000, 32607, 400", t=1.0),
        parse_smi_row("1, 10, [N/A], [N/A], 100", t=1.0),
        GpuSample(t=1.0, source="meminfo", index=None, memory_used_mib=5.0, memory_total_mib=9.0),
    ]
    gpus = summarize_gpu(samples)
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].memory_used_peak_mib == 1000.0 and gpus[0].memory_source == "nvidia-smi"
    assert gpus[1].memory_used_peak_mib is None and "memory_used" in gpus[1].unsupported


def test_summary_window_and_jetson():
    samples = [
        parse_tegrastats(TEGRA_JP7.replace("12%", f"{u}%"), t=float(t))
        for t, u in enumerate([0, 40, 80, 20])
    ]
    [gpu] = summarize_gpu(samples, window=(1.0, 2.0))
    assert gpu.samples == 2
    assert gpu.util_mean_pct == pytest.approx(60.0)
    assert gpu.idle_fraction == 0.0
    assert gpu.memory_source == "tegrastats" and gpu.power_source == "VDD_GPU_SOC"
    assert summarize_gpu(samples, window=(10.0, 11.0)) == []


def test_summary_only_host_memory():
    [gpu] = summarize_gpu(parse_sampler_output("@MEM 1.0 2048 1024\n"))
    assert gpu.samples == 0 and gpu.memory_used_peak_mib == 1.0
    assert gpu.unsupported == ("utilization", "power")


def test_series_rows():
    rows = series(parse_sampler_output(SAMPLER_OUTPUT))
    assert [r["t"] for r in rows] == [100.0, 101.0, 102.5, 103.0, 103.0]
    assert rows[0] == {
        "t": 100.0,
        "index": 0,
        "util_pct": 0.0,
        "memory_used_mib": None,
        "power_w": 10.0,
    }


def test_default_sources():
    assert default_sources(jetson=True, unified_memory=True) == ("tegrastats",)
    assert default_sources(jetson=False, unified_memory=True) == ("nvidia-smi", "meminfo")
    assert default_sources(jetson=False, unified_memory=False) == ("nvidia-smi",)


def test_sampler_command_checks_its_arguments():
    with pytest.raises(ValueError):
        sampler_command(sources=(), seconds=5)
    with pytest.raises(ValueError):
        sampler_command(sources=("dcgm",), seconds=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sampler_command(sources=("meminfo",), seconds=0)
    command = sampler_command(sources=("nvidia-smi",), seconds=5)
    assert command.startswith("sh -c ") and SMI_COMMAND in command
    assert "tegrastats" not in command and "/proc/meminfo" not in command
    assert "sudo -n tegrastats" in sampler_command(sources=("tegrastats",), seconds=5, sudo=True)


@pytest.fixture
def fake_tools(tmp_path: Path) -> dict[str, str]:
    """nvidia-smi and tegrastats stand-ins on PATH that answer like GB10 and an Orin."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "0, 37, [N/A], [N/A], 4.5"\n')
    tegra = bin_dir / "tegrastats"
    tegra.write_text(
        f"#!/bin/sh\necho $$ > {tmp_path}/tegra.pid\n"
        f'while :; do echo "{TEGRA_JP7}"; sleep 0.2; done\n'
    )
    for tool in (smi, tegra):
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_sampler_command_runs_and_parses(fake_tools):
    command = sampler_command(sources=("nvidia-smi", "meminfo", "tegrastats"), seconds=2)
    done = subprocess.run(
        command, shell=True, env=fake_tools, capture_output=True, text=True, timeout=10, check=True
    )
    samples = parse_sampler_output(done.stdout, strict=True)
    sources = [s.source for s in samples]
    assert sources.count("nvidia-smi") == 2 and sources.count("meminfo") == 2
    assert sources.count("tegrastats") >= 1
    smi = next(s for s in samples if s.source == "nvidia-smi")
    assert smi.util_pct == 37.0 and smi.memory_used_mib is None
    now = time.time()
    assert all(now - 30 < s.t <= now + 1 for s in samples)  # the host's epoch clock


def test_sampler_stops_when_the_reader_goes_away(fake_tools, tmp_path: Path):
    command = sampler_command(sources=("nvidia-smi", "tegrastats"), seconds=60)
    proc = subprocess.Popen(command, shell=True, env=fake_tools, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(b"@")
    proc.stdout.close()  # the SSH channel closes
    assert proc.wait(timeout=5) is not None
    pid = int((tmp_path / "tegra.pid").read_text())
    deadline = time.monotonic() + 5
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pid), "tegrastats outlived the sampler"


def _running(pid: int) -> bool:
    """Whether the process runs: a zombie (exited, its new parent has not reaped it yet, as
    under a PID 1 that reaps nothing) has stopped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_idle_means_under_ten_percent_not_at_it():
    samples = [parse_smi_row(f"0, {u}, 1, 2, 3", t=float(i)) for i, u in enumerate([9, 10, 11])]
    [gpu] = summarize_gpu(samples)
    assert gpu.idle_fraction == pytest.approx(1 / 3)
