"""
Facts about the host itself: CPU architecture, OS release, memory and free disk space.
"""

from __future__ import annotations

import re
import shlex

from pyinfra.api import FactBase, QuoteString, StringCommand
from pyinfra.api.exceptions import FactProcessError

from facts._sections import Section, excerpt, get_section, mark, split_sections
from gpufleet.core.gpu import meminfo_line
from gpufleet.core.snapshot import HostInfo


def script(path: str = "/") -> StringCommand:
    """
    POSIX sh that prints the ``host.*`` sections; exits 0.

    + path: the directory whose free space is wanted (or its nearest existing parent)
    """

    return StringCommand(
        f"{mark('host.arch')}; uname -m",
        f"{mark('host.os-release')}; cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release",
        f"{mark('host.meminfo')}; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo",
        StringCommand("p=", QuoteString(path), _separator=""),
        'while [ ! -e "$p" ]; do p=$(dirname "$p"); done',
        f'{mark("host.df")}; echo "$p"; df -Pk "$p" 2>/dev/null || true',
        _separator="; ",
    )


def parse_os_release(lines: list[str]) -> dict[str, str]:
    """
    ``/etc/os-release`` as a dict; values are shell-quoted in the file.
    """

    release = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            release[key.strip()] = _os_release_value(value)
    return release


# the two shapes nearly every line has, read without shlex (a third of a snapshot's parse)
_PLAIN = re.compile(r"[^\s\"'\\]*")
_DOUBLE_QUOTED = re.compile(r'"([^"\\]*)"')


def _os_release_value(value: str) -> str:
    if _PLAIN.fullmatch(value):
        return value
    if match := _DOUBLE_QUOTED.fullmatch(value):
        return match[1]
    try:
        return " ".join(shlex.split(value))
    except ValueError:  # an unbalanced quote: keep the text, as systemd does
        return value.strip().strip("'\"")


def parse_meminfo(lines: list[str]) -> dict[str, int]:
    """
    ``/proc/meminfo`` lines as bytes per key (the kernel prints kB, meaning KiB).
    """

    memory = {}
    for line in lines:
        if (parsed := meminfo_line(line)) is None:
            raise FactProcessError(f"unexpected /proc/meminfo line: {excerpt(line)}")
        memory[parsed[0]] = parsed[1]
    return memory


# what os-release(5) allows in ID and VERSION_CODENAME; they become part of Docker's apt URL,
# key URL and list line, so anything else would write what the host chose into them
_OS_WORD = re.compile(r"[0-9a-z._-]+")


def _os_word(release: dict[str, str], *keys: str) -> str | None:
    for key in keys:
        if value := release.get(key):
            if not _OS_WORD.fullmatch(value):
                raise FactProcessError(
                    f"/etc/os-release: {key}={excerpt(value)} is not an os-release word "
                    "(0-9, a-z, '.', '_', '-')"
                )
            return value
    return None


_DF_ROW = re.compile(r"^(.*?)\s+(\d+)\s+(\d+)\s+(\d+)\s+\d+%\s+(.*)$")


def parse_df(lines: list[str]) -> int | None:
    """
    Free bytes from ``df -Pk`` (None when df printed no data row).
    """

    for line in lines[1:]:
        match = _DF_ROW.match(line)
        if match:
            return int(match.group(4)) * 1024
    return None


def from_sections(sections: dict[str, Section]) -> HostInfo:
    """
    Parse the ``host.*`` sections printed by ``script``.
    """

    arch = get_section(sections, "host.arch").lines
    release = parse_os_release(get_section(sections, "host.os-release").lines)
    memory = parse_meminfo(get_section(sections, "host.meminfo").lines)
    disk = get_section(sections, "host.df").lines
    if len(arch) != 1 or not disk:
        raise FactProcessError("host sections lack the architecture or the disk path")
    try:
        mem_total, mem_available = memory["MemTotal"], memory["MemAvailable"]
    except KeyError as e:
        raise FactProcessError(f"/proc/meminfo has no {e.args[0]}") from None
    return HostInfo(
        arch=arch[0].strip(),
        os_id=_os_word(release, "ID"),
        os_version=release.get("VERSION_ID"),
        os_pretty=release.get("PRETTY_NAME"),
        os_codename=_os_word(release, "VERSION_CODENAME", "UBUNTU_CODENAME"),
        mem_total_bytes=mem_total,
        mem_available_bytes=mem_available,
        disk_path=disk[0],
        disk_free_bytes=parse_df(disk[1:]),
    )


class HostResources(FactBase[HostInfo]):
    """
    Returns the CPU architecture, OS release, memory and free disk space of the host.

    + path: report free space of this path, or of its nearest existing parent

    On unified-memory hosts (DGX Spark, Jetson) ``mem_total_bytes`` is also the GPU's memory.

    .. code:: python

        HostInfo(
            arch="aarch64",
            os_id="ubuntu",
            os_version="24.04",
            os_pretty="Ubuntu 24.04.3 LTS",
            os_codename="noble",
            mem_total_bytes=130668924928,
            mem_available_bytes=121436798976,
            disk_path="/srv",
            disk_free_bytes=3624987799552,
        )
    """

    def command(self, path: str = "/") -> StringCommand:
        return script(path)

    def process(self, output: list[str]) -> HostInfo:
        return from_sections(split_sections(output))
