"""
Facts about the NVIDIA driver and GPUs, read through ``nvidia-smi``.
"""

from __future__ import annotations

import csv
import re

from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

from facts._sections import MARKER, Section, excerpt, get_section, split_sections
from gpufleet.core.gpu import smi_unsupported
from gpufleet.core.snapshot import Gpu, NvidiaInfo, NvidiaStatus

QUERY_FIELDS = (
    "index",
    "name",
    "uuid",
    "compute_cap",
    "memory.total",
    "driver_version",
    "pci.bus_id",
)
# drivers older than R510 reject the compute_cap field and the whole query with it
LEGACY_FIELDS = tuple(field for field in QUERY_FIELDS if field != "compute_cap")

# Prints the nvidia.* sections: the CSV query (retried with the legacy fields), then, if it
# worked, the default table, whose header alone carries the CUDA version. Exits 0.
_QUERY = "q=$(nvidia-smi --query-gpu=$f --format=csv,noheader,nounits 2>&1); rc=$?"
SCRIPT = (
    "if command -v nvidia-smi >/dev/null 2>&1; then"
    f" f={','.join(QUERY_FIELDS)}; {_QUERY};"
    f" case $q in *'\"compute_cap\"'*) f={','.join(LEGACY_FIELDS)}; {_QUERY};; esac;"
    f' printf "\\n%s\\n%s\\n" "{MARKER}nvidia.query rc=$rc fields=$f" "$q";'
    " if [ $rc -eq 0 ]; then t=$(nvidia-smi 2>&1);"
    f' printf "\\n%s\\n%s\\n" "{MARKER}nvidia.table rc=$?" "$t"; fi;'
    f" else echo; echo '{MARKER}nvidia.absent'; fi"
)

# NVML return codes nvidia-smi exits with: 9 driver not loaded, 12 NVML library not found,
# 18 kernel module / library version mismatch
_NO_DRIVER_CODES = {"9", "12"}
_MISMATCH_CODES = {"18"}
# ASCII digits only: "\d" also takes other scripts' digits, which no version parser reads
_VERSION = re.compile(r"\d+(?:\.\d+)+$", re.ASCII)
_COMPUTE_CAP = re.compile(r"\d+\.\d+$", re.ASCII)


def _value(cell: str) -> str | None:
    cell = cell.strip()
    return None if smi_unsupported(cell) else cell


def _version(value: str | None, what: str) -> str | None:
    if value is None or value == "N/A":
        return None
    if not _VERSION.match(value):
        raise FactProcessError(f"{what} {excerpt(value)} is not a version")
    return value


def parse_query_csv(lines: list[str], fields: list[str]) -> tuple[list[Gpu], str | None]:
    """
    Parse ``nvidia-smi --query-gpu=<fields> --format=csv[,noheader][,nounits]`` output.

    + lines: the CSV lines
    + fields: the queried fields, in order; fields other than ``QUERY_FIELDS`` are ignored

    Returns the GPUs and the driver version the first GPU reports.
    """

    try:
        rows = [row for row in csv.reader(lines, skipinitialspace=True) if row]
    except csv.Error as error:  # a stray carriage return or NUL inside a line
        raise FactProcessError(f"unreadable CSV from nvidia-smi: {error}") from None
    # without noheader the first row names the fields, with units unless nounits
    if rows and [re.sub(r"\s*\[.*\]$", "", cell) for cell in rows[0]] == fields:
        rows = rows[1:]

    gpus: list[Gpu] = []
    driver_version = None
    for position, row in enumerate(rows):
        if len(row) != len(fields):
            got = excerpt(", ".join(row))
            raise FactProcessError(f"expected {len(fields)} CSV fields, got {len(row)}: {got}")
        values = {field: _value(cell) for field, cell in zip(fields, row, strict=True)}
        memory = values.get("memory.total")
        if memory is not None:
            match = re.match(r"(\d+)\s*(?:MiB)?$", memory)
            if not match:
                raise FactProcessError(f"memory.total {excerpt(memory)} is not MiB")
            memory = int(match.group(1))
        compute_cap = values.get("compute_cap")
        if compute_cap is not None and not _COMPUTE_CAP.match(compute_cap):
            raise FactProcessError(f"compute_cap {excerpt(compute_cap)} is not like 12.1")
        index = values.get("index")
        if index is not None and not re.fullmatch(r"[0-9]+", index):
            raise FactProcessError(f"index {excerpt(index)} is not a GPU index")
        gpus.append(
            Gpu(
                index=int(index) if index is not None else position,
                name=row[fields.index("name")].strip() if "name" in fields else "",
                uuid=values.get("uuid"),
                compute_cap=compute_cap,
                memory_total_mib=memory,
                bus_id=values.get("pci.bus_id"),
            )
        )
        driver_version = driver_version or _version(values.get("driver_version"), "driver")
    return gpus, driver_version


def parse_smi_header(lines: list[str]) -> tuple[str | None, str | None]:
    """
    The driver version and the highest CUDA it supports, from the default ``nvidia-smi`` table.

    + lines: the table; its header is ``Driver Version: X  CUDA Version: Y`` up to R595 and
      ``KMD Version: X  CUDA UMD Version: Y`` from R610 on

    ``N/A`` values give None.
    """

    for line in lines:
        if "NVIDIA-SMI " not in line:
            continue
        driver = re.search(r"(?:Driver|KMD) Version:\s*(\S+)", line)
        cuda = re.search(r"CUDA (?:UMD )?Version:\s*(\S+)", line)
        if driver and cuda:
            return _version(driver.group(1), "driver"), _version(cuda.group(1), "CUDA")
    raise FactProcessError("no NVIDIA-SMI header line with driver and CUDA versions")


def classify_failure(rc: str, lines: list[str]) -> tuple[NvidiaStatus, str]:
    """
    Status and message for a failed ``nvidia-smi``: its exit code and the first line it printed.
    """

    message = next((line.strip() for line in lines if line.strip()), f"nvidia-smi exited {rc}")
    lowered = message.lower()
    if rc in _MISMATCH_CODES or "version mismatch" in lowered:
        return "mismatch", message
    if rc in _NO_DRIVER_CODES or "couldn't communicate with the nvidia driver" in lowered:
        return "no-driver", message
    return "error", message


def from_sections(sections: dict[str, Section]) -> NvidiaInfo:
    """
    Parse the ``nvidia.*`` sections printed by ``SCRIPT``.
    """

    if "nvidia.absent" in sections:
        return NvidiaInfo(
            status="absent", driver_version=None, cuda_version=None, gpus=(), message=None
        )

    query = get_section(sections, "nvidia.query")
    rc = query.args.get("rc", "")
    if rc != "0":
        status, message = classify_failure(rc, query.lines)
        return NvidiaInfo(
            status=status, driver_version=None, cuda_version=None, gpus=(), message=message
        )

    fields = query.args.get("fields", "").split(",")
    gpus, driver_version = parse_query_csv(query.lines, fields)
    cuda_version = None
    table = sections.get("nvidia.table")
    if table is not None and table.args.get("rc") == "0":
        driver, cuda_version = parse_smi_header(table.lines)
        driver_version = driver_version or driver
    return NvidiaInfo(
        status="ok",
        driver_version=driver_version,
        cuda_version=cuda_version,
        gpus=tuple(gpus),
        message=None,
    )


class NvidiaGpus(FactBase[NvidiaInfo]):
    """
    Returns the NVIDIA driver state, the highest CUDA version it supports and its GPUs.

    ``status`` is ``ok``, ``absent`` (no nvidia-smi, as on JetPack 5), ``no-driver`` (kernel
    module not loaded), ``mismatch`` (driver/library version mismatch) or ``error``; ``message``
    is the first line nvidia-smi printed when it failed. Values nvidia-smi reports as N/A are None.

    .. code:: python

        NvidiaInfo(
            status="ok",
            driver_version="580.95.05",
            cuda_version="13.0",
            gpus=(
                Gpu(index=0, name="NVIDIA GB10", uuid="GPU-...", compute_cap="12.1",
                    memory_total_mib=None, bus_id="0000000F:01:00.0"),
            ),
            message=None,
        )
    """

    def command(self) -> str:
        return SCRIPT

    def process(self, output: list[str]) -> NvidiaInfo:
        return from_sections(split_sections(output))
