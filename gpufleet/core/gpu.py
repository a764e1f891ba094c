"""
The GPU while a bench runs: one remote command that samples every second, its parser, a summary.

``sampler_command`` builds a POSIX shell loop to run on a host over SSH. It prints one line per
source per second, each ``@<SOURCE> <epoch seconds> <payload>``:

- ``@SMI``: a row of ``nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total,
  power.draw --format=csv,noheader,nounits`` (one per GPU). Any field may be ``[N/A]``,
  ``[Not Supported]`` or ``N/A``: that field is unsupported, never zero. GB10 prints ``[N/A]``
  for memory (gpu-facts.md section 2).
- ``@MEM``: ``MemTotal`` and ``MemAvailable`` from ``/proc/meminfo`` in kB; used = total -
  available. This is the memory figure on unified-memory hosts (GB10), as gpud and nvtop do.
- ``@TEGRA``: a ``tegrastats`` line (Jetson): ``RAM used/totalMB``, ``GR3D_FREQ`` in its
  forms ``45%``, ``45%@1300``, ``12%@[1300,1300]`` (JetPack 7; per-GPC clocks) and
  ``@[1000,1000]`` (Thor: clocks only, so utilisation is unsupported), older ``GR3D 3%@76``,
  and a GPU power rail (``VDD_GPU_SOC``, ``VDD_GPU``, ``POM_5V_GPU``, ``VDD_SYS_GPU``,
  ``VDD_CPU_GPU_CV``; ``5139mW/5139mW[/5139mW]`` or bare ``0/0`` on Nano).

Timestamps come from the host's clock (``date +%s.%N``); splitting samples by level assumes the
host and the control machine agree on the time (NTP), which every fleet host should.

``summarize_gpu`` reports, per GPU: mean and peak utilisation, the idle fraction (samples under
10%), peak memory used and power mean and peak. A field no sample had a value for is listed in
``unsupported`` and left None, never printed as 0.

.. code:: python

    command = sampler_command(sources=("nvidia-smi", "meminfo"), seconds=120)
    samples = parse_sampler_output(remote_stdout)
    report = summarize_gpu(samples)
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Source = Literal["nvidia-smi", "meminfo", "tegrastats"]
SOURCES: tuple[Source, ...] = ("nvidia-smi", "meminfo", "tegrastats")
SMI_QUERY = "index,utilization.gpu,memory.used,memory.total,power.draw"
SMI_COMMAND = f"nvidia-smi --query-gpu={SMI_QUERY} --format=csv,noheader,nounits"
IDLE_BELOW_PCT = 10.0
_MARKERS = {"@SMI": "nvidia-smi", "@MEM": "meminfo", "@TEGRA": "tegrastats"}
# nvidia-smi's words for a value it cannot give (GB10's memory, nearly every field on Jetson):
# N/A, Not Supported, and in brackets those and others ([N/A], [Unknown Error], ...)
SMI_UNSUPPORTED = ("n/a", "not supported")
# GPU power rails in tegrastats, most specific first (jetson_stats; NVIDIA's tegrastats docs).
TEGRA_GPU_RAILS = ("VDD_GPU_SOC", "VDD_GPU", "POM_5V_GPU", "VDD_SYS_GPU", "VDD_CPU_GPU_CV", "GPU")
FIELDS = ("utilization", "memory_used", "power")


class GpuParseError(ValueError):
    """A sampler line that has a marker but cannot be read."""


@dataclass(frozen=True, kw_only=True)
class GpuSample:
    """
    One reading of one GPU (or of the host's memory, for ``meminfo``).

    + t: epoch seconds on the host
    + source: which tool it came from
    + index: the GPU index (0 for tegrastats; None for meminfo, which is host-wide)
    + util_pct / memory_used_mib / memory_total_mib / power_w: None where unsupported
    + power_rail: the tegrastats rail the power came from
    """

    t: float
    source: Source
    index: int | None
    util_pct: float | None = None
    memory_used_mib: float | None = None
    memory_total_mib: float | None = None
    power_w: float | None = None
    power_rail: str | None = None


def smi_unsupported(cell: str) -> bool:
    """True for an ``nvidia-smi`` cell that holds no value: empty, bracketed or a word of
    ``SMI_UNSUPPORTED`` (such a field is unsupported, never zero)."""
    cell = cell.strip()
    return not cell or cell.startswith("[") or cell.lower() in SMI_UNSUPPORTED


def _value(text: str) -> float | None:
    text = text.strip()
    if smi_unsupported(text):
        return None
    try:
        value = float(text)
    except ValueError:
        raise GpuParseError(f"not a number: {text!r}") from None
    return value if math.isfinite(value) else None


def parse_smi_row(line: str, *, t: float) -> GpuSample:
    """
    One row of ``SMI_COMMAND`` output: ``0, 45, 1024, 32607, 250.12``.

    + line: the row (``nounits``: no ``MiB``/``W``/``%``)
    + t: its timestamp
    """
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 5:
        raise GpuParseError(f"expected 5 comma-separated fields ({SMI_QUERY}), got {line!r}")
    try:
        index = int(parts[0])
    except ValueError:
        raise GpuParseError(f"GPU index is not a number: {parts[0]!r}") from None
    util, used, total, power = (_value(p) for p in parts[1:])
    return GpuSample(
        t=t,
        source="nvidia-smi",
        index=index,
        util_pct=util,
        memory_used_mib=used,
        memory_total_mib=total,
        power_w=power,
    )


def parse_meminfo_pair(payload: str, *, t: float) -> GpuSample:
    """``<MemTotal kB> <MemAvailable kB>`` as the sampler prints them, as host memory in MiB."""
    parts = payload.split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise GpuParseError(f"expected '<MemTotal kB> <MemAvailable kB>', got {payload!r}")
    total, available = (int(p) / 1024 for p in parts)
    return GpuSample(
        t=t, source="meminfo", index=None, memory_used_mib=total - available, memory_total_mib=total
    )


_MEMINFO_LINE = re.compile(r"(\w+):\s+(\d+)( kB)?$")


def meminfo_line(line: str) -> tuple[str, int] | None:
    """One ``/proc/meminfo`` line as ``(key, bytes)`` (the kernel prints kB, meaning KiB);
    None for a line that is not ``Key: N [kB]``."""
    match = _MEMINFO_LINE.match(line.strip())
    if not match:
        return None
    key, value, kib = match.groups()
    return key, int(value) * (1024 if kib else 1)


def parse_meminfo(text: str) -> tuple[float, float]:
    """``(used_mib, total_mib)`` from ``/proc/meminfo`` text: MemTotal - MemAvailable."""
    values = {}
    for line in text.splitlines():
        if line.partition(":")[0] in ("MemTotal", "MemAvailable"):
            if (parsed := meminfo_line(line)) is None:
                raise GpuParseError(f"unexpected /proc/meminfo line: {line!r}")
            values[parsed[0]] = parsed[1] / (1024 * 1024)
    if len(values) != 2:
        raise GpuParseError("/proc/meminfo without MemTotal and MemAvailable")
    return values["MemTotal"] - values["MemAvailable"], values["MemTotal"]


_RAM = re.compile(r"\bRAM (\d+)/(\d+)([kMG])B\b")
_GR3D = re.compile(r"\bGR3D(?:_FREQ)? (?:(\d+)%)?(?:@\[?[\d,]*\]?)?(?=\s|$)")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/\d+(?:mW)?)?\b")
_TO_MIB = {"k": 1 / 1024, "M": 1.0, "G": 1024.0}


def parse_tegrastats(line: str, *, t: float) -> GpuSample:
    """
    One ``tegrastats`` line: GPU load from ``GR3D_FREQ``, RAM, and a GPU power rail.

    + line: e.g. ``RAM 2113/7620MB (lfb 1x512kB) ... GR3D_FREQ 45%@[305] ... VDD_GPU_SOC
      1234mW/1234mW``
    + t: its timestamp
    """
    ram = _RAM.search(line)
    gr3d = _GR3D.search(line)
    if ram is None and gr3d is None:
        raise GpuParseError(f"not a tegrastats line (no RAM or GR3D field): {line[:80]!r}")
    used = total = None
    if ram is not None:
        scale = _TO_MIB[ram.group(3)]
        used, total = int(ram.group(1)) * scale, int(ram.group(2)) * scale
    util = None
    if gr3d is not None and gr3d.group(1) is not None:
        util = float(gr3d.group(1))
    rails = {m.group(1): int(m.group(2)) for m in _RAIL.finditer(line)}
    rail = next((r for r in TEGRA_GPU_RAILS if r in rails), None)
    power = None if rail is None else rails[rail] / 1000
    return GpuSample(
        t=t,
        source="tegrastats",
        index=0,
        util_pct=util,
        memory_used_mib=used,
        memory_total_mib=total,
        power_w=power,
        power_rail=rail,
    )


def parse_sampler_output(text: str | Iterable[str], *, strict: bool = False) -> list[GpuSample]:
    """
    Samples from the output of ``sampler_command``; lines without a marker are skipped.

    + text: the remote command's stdout (a string, or lines as they stream in)
    + strict: raise ``GpuParseError`` on a bad marked line instead of skipping it (a tool that
      prints an error instead of a row, such as nvidia-smi without a driver, is skipped)
    """
    lines = text.splitlines() if isinstance(text, str) else text
    samples = []
    for line in lines:
        try:
            sample = parse_sampler_line(line)
        except GpuParseError:
            if strict:
                raise
            continue
        if sample is not None:
            samples.append(sample)
    return samples


def parse_sampler_line(line: str) -> GpuSample | None:
    """One sampler line as a sample; None for a line without a marker."""
    marker, _, rest = line.strip().partition(" ")
    if marker not in _MARKERS:
        return None
    stamp, _, payload = rest.partition(" ")
    try:
        t = float(stamp)
    except ValueError:
        raise GpuParseError(f"bad timestamp in {line[:80]!r}") from None
    source = _MARKERS[marker]
    if source == "nvidia-smi":
        return parse_smi_row(payload, t=t)
    if source == "meminfo":
        return parse_meminfo_pair(payload, t=t)
    return parse_tegrastats(payload, t=t)


def sampler_command(
    *, sources: Sequence[Source], seconds: int, interval_s: int = 1, sudo: bool = False
) -> str:
    """
    A POSIX shell command that prints sampler lines every ``interval_s`` for ``seconds``.

    + sources: which tools to read; a missing tool prints nothing for its source
    + seconds: how long to run at most (it also ends when the SSH channel closes: the next
      write fails)
    + interval_s: seconds between samples
    + sudo: run tegrastats through ``sudo -n`` (some boards need root for GPU rails)

    The command holds no secret and changes nothing on the host.
    """
    unknown = set(sources) - set(SOURCES)
    if unknown or not sources:
        raise ValueError(f"sources must be some of {', '.join(SOURCES)}, got {list(sources)}")
    if seconds < 1 or interval_s < 1:
        raise ValueError("seconds and interval_s must be at least 1")
    # busybox date has no %N: fall back to whole seconds.
    stamp = "t=$(date +%s.%N); case $t in *N*) t=$(date +%s);; esac"
    script = [
        # A closed SSH channel makes the next write fail: stop then, and take tegrastats along.
        "trap 'exit 0' PIPE HUP INT TERM",
        "tp=",
        "trap '[ -n \"$tp\" ] && kill $tp 2>/dev/null' EXIT",
    ]
    if "tegrastats" in sources:
        run = "sudo -n tegrastats" if sudo else "tegrastats"
        script.append(
            f"{run} --interval {interval_s * 1000} 2>/dev/null | while IFS= read -r l; do "
            f'{stamp}; echo "@TEGRA $t $l" || exit 0; done & tp=$!'
        )
    tick = [stamp, 'echo "@T $t" || exit 0']
    if "nvidia-smi" in sources:
        tick.append(f'{SMI_COMMAND} 2>/dev/null | while IFS= read -r l; do echo "@SMI $t $l"; done')
    if "meminfo" in sources:
        tick.append(
            'awk -v t="$t" \'/^MemTotal:/{m=$2} /^MemAvailable:/{a=$2} '
            'END{print "@MEM " t " " m " " a}\' /proc/meminfo'
        )
    script.append(
        f"i=0; while [ $i -lt {max(1, seconds // interval_s)} ]; do "
        + "; ".join(tick)
        + f"; i=$((i+1)); sleep {interval_s}; done"
    )
    return "sh -c " + shlex.quote("; ".join(script))


@dataclass(frozen=True, kw_only=True)
class GpuStat:
    """
    One GPU over a window of samples; None fields are in ``unsupported``.

    + util_mean_pct / util_peak_pct / idle_fraction: over samples with a utilisation
    + memory_used_peak_mib / memory_total_mib / memory_source: where memory came from
    + power_mean_w / power_peak_w / power_source: ``nvidia-smi`` or a tegrastats rail
    """

    index: int
    samples: int
    util_mean_pct: float | None
    util_peak_pct: float | None
    idle_fraction: float | None
    memory_used_peak_mib: float | None
    memory_total_mib: float | None
    memory_source: str | None
    power_mean_w: float | None
    power_peak_w: float | None
    power_source: str | None
    unsupported: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _stat(index: int, samples: list[GpuSample], host_memory: list[GpuSample]) -> GpuStat:
    utils = [s.util_pct for s in samples if s.util_pct is not None]
    used = [s.memory_used_mib for s in samples if s.memory_used_mib is not None]
    totals = [s.memory_total_mib for s in samples if s.memory_total_mib is not None]
    memory_source = samples[0].source if used else None
    if not used and host_memory:
        # Unified memory (GB10): nvidia-smi has none, the host's MemTotal - MemAvailable is it.
        used = [s.memory_used_mib for s in host_memory if s.memory_used_mib is not None]
        totals = [s.memory_total_mib for s in host_memory if s.memory_total_mib is not None]
        memory_source = "meminfo"
    powers = [s.power_w for s in samples if s.power_w is not None]
    rails = {s.power_rail for s in samples if s.power_w is not None}
    power_source = None
    if powers:
        power_source = samples[0].source if rails == {None} else ", ".join(sorted(rails - {None}))
    unsupported = []
    if not utils:
        unsupported.append("utilization")
    if not used:
        unsupported.append("memory_used")
    if not powers:
        unsupported.append("power")
    return GpuStat(
        index=index,
        samples=len(samples),
        util_mean_pct=math.fsum(utils) / len(utils) if utils else None,
        util_peak_pct=max(utils) if utils else None,
        idle_fraction=sum(u < IDLE_BELOW_PCT for u in utils) / len(utils) if utils else None,
        memory_used_peak_mib=max(used) if used else None,
        memory_total_mib=max(totals) if totals else None,
        memory_source=memory_source if used else None,
        power_mean_w=math.fsum(powers) / len(powers) if powers else None,
        power_peak_w=max(powers) if powers else None,
        power_source=power_source,
        unsupported=tuple(unsupported),
    )


def summarize_gpu(
    samples: Iterable[GpuSample], *, window: tuple[float, float] | None = None
) -> list[GpuStat]:
    """
    Per-GPU figures over the samples, optionally only those inside ``window``.

    + samples: parsed sampler output of one host
    + window: ``(start, end)`` epoch seconds, inclusive (a level's ``started_at``/``ended_at``)

    GPUs come from nvidia-smi rows, or from tegrastats on Jetson (GPU 0). Host memory from
    ``meminfo`` stands in for a GPU's memory only on a host with exactly one GPU and no memory
    figure of its own (unified memory). Returns one ``GpuStat`` per GPU index, sorted.
    """
    chosen = [s for s in samples if window is None or window[0] <= s.t <= window[1]]
    host_memory = [s for s in chosen if s.source == "meminfo"]
    per_gpu: dict[int, list[GpuSample]] = {}
    for s in chosen:
        if s.index is not None:
            per_gpu.setdefault(s.index, []).append(s)
    if not per_gpu:
        if not host_memory:
            return []
        per_gpu[0] = []  # only host memory answered: every GPU field is unsupported
    shared = host_memory if len(per_gpu) == 1 else []
    return [_stat(index, per_gpu[index], shared) for index in sorted(per_gpu)]


def default_sources(*, jetson: bool, unified_memory: bool) -> tuple[Source, ...]:
    """
    What to sample on a host: tegrastats on Jetson; nvidia-smi, plus meminfo where GPU memory
    is the host's (GB10).

    + jetson: the host runs L4T (nvidia-smi there reports nearly every field N/A)
    + unified_memory: GPU and CPU share memory
    """
    if jetson:
        return ("tegrastats",)
    return ("nvidia-smi", "meminfo") if unified_memory else ("nvidia-smi",)


def series(samples: Iterable[GpuSample]) -> list[dict[str, float | int | None]]:
    """GPU samples as plain rows ``{t, index, util_pct, memory_used_mib, power_w}``, by time."""
    rows = [
        {
            "t": s.t,
            "index": s.index,
            "util_pct": s.util_pct,
            "memory_used_mib": s.memory_used_mib,
            "power_w": s.power_w,
        }
        for s in samples
        if s.index is not None
    ]
    return sorted(rows, key=lambda r: (r["t"], r["index"]))
