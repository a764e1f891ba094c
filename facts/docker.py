"""
Facts about the Docker engine and the NVIDIA Container Toolkit that wires GPUs into it.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any, NamedTuple

from pyinfra.api import FactBase

from facts._sections import Section, get_section, mark, split_sections
from gpufleet.core.known import DAEMON_JSON, TOOLKIT_PACKAGES
from gpufleet.core.snapshot import DockerInfo

_DPKG_FORMAT = "'${Package} ${Version} ${Status}\\n'"
# where the docker CLI finds its compose plugin (docs.docker.com/compose/install/linux)
COMPOSE_PLUGINS = tuple(
    f"{root}/docker-compose"
    for root in (
        "$HOME/.docker/cli-plugins",
        "/usr/local/lib/docker/cli-plugins",
        "/usr/local/libexec/docker/cli-plugins",
        "/usr/lib/docker/cli-plugins",
        "/usr/libexec/docker/cli-plugins",
    )
)
_BINARIES = (
    'b=$(stat -L -c "%n %i %s %Y" "$(command -v docker)" '
    + " ".join(f'"{path}"' for path in COMPOSE_PLUGINS)
    + " 2>/dev/null)"
)
_VERSIONS = (
    f"{mark('docker.version')}; docker --version 2>/dev/null; "
    f"{mark('docker.compose')}; docker compose version --short 2>/dev/null"
)
_REST = "; ".join(
    (
        f"{mark('docker.active')}; systemctl is-active docker 2>/dev/null",
        f"if [ -f {DAEMON_JSON} ]; then {mark('docker.daemon-json')}; cat {DAEMON_JSON}",
        f"else {mark('docker.daemon-json missing=1')}; fi",
        f"{mark('docker.packages')}; dpkg-query -W -f={_DPKG_FORMAT} {' '.join(TOOLKIT_PACKAGES)}"
        " 2>/dev/null || true",
    )
)


class KnownVersions(NamedTuple):
    """What ``docker --version`` and ``docker compose version`` printed last time, and the
    binaries (path, inode, size, mtime) that printed it."""

    binaries: str
    version: str
    compose_version: str | None


def script(known: KnownVersions | None = None) -> str:
    """The ``docker.*`` sections. Running the two version commands costs a host about 110 ms of
    CPU (the sandbox's, measured) on every read; with ``known``, the host prints those versions
    back instead, while the binaries that printed them are the same."""
    binaries = f"{_BINARIES}; {mark('docker.binaries')}; printf '%s\\n' \"$b\""
    if known is None:
        return f"{binaries}; {_VERSIONS}; {_REST}"
    printed = [
        mark("docker.version"),
        f"echo {shlex.quote(f'Docker version {known.version}')}",
        mark("docker.compose"),
    ]
    if known.compose_version:
        printed.append(f"echo {shlex.quote(known.compose_version)}")
    return (
        f'{binaries}; if [ -n "$b" ] && [ "$b" = {shlex.quote(known.binaries)} ]; '
        f"then {'; '.join(printed)}; else {_VERSIONS}; fi; {_REST}"
    )


SCRIPT = script()


def _first_match(pattern: str, lines: list[str]) -> str | None:
    match = next((m for line in lines if (m := re.search(pattern, line))), None)
    return match.group(1) if match else None


def parse_daemon_json(lines: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """
    ``/etc/docker/daemon.json`` as a dict, or None and the reason it is not a JSON object.
    """

    try:
        data = json.loads("\n".join(lines))
    except json.JSONDecodeError as e:
        return None, f"{DAEMON_JSON} is not valid JSON: {e}"
    except (ValueError, RecursionError):  # a number past 4300 digits, arrays nested too deep
        return None, f"{DAEMON_JSON} is JSON gpufleet cannot read (too large or too deep)"
    if not isinstance(data, dict):
        return None, f"{DAEMON_JSON} is not a JSON object"
    # the keys gpufleet merges into: another shape there is a file it cannot merge into
    for key, kind, what in _OWNED:
        if key in data and not isinstance(data[key], kind):
            found = json.dumps(data[key])
            found = found if len(found) <= 80 else f"{found[:80]}..."
            return None, f'{DAEMON_JSON}: "{key}" is {found}, not {what}'
    return data, None


_OWNED = (
    ("runtimes", dict, "an object"),
    ("features", dict, "an object"),
    ("default-runtime", str, "a string"),
)


def parse_dpkg_status(lines: list[str]) -> dict[str, str]:
    """
    Installed packages and their versions from
    ``dpkg-query -W -f='${Package} ${Version} ${Status}\\n'``.
    """

    packages = {}
    for line in lines:
        name, _, rest = line.partition(" ")
        version, _, status = rest.partition(" ")
        if status == "install ok installed":
            packages[name] = version
    return packages


def from_sections(sections: dict[str, Section]) -> DockerInfo:
    """
    Parse the ``docker.*`` sections printed by ``SCRIPT``.
    """

    version = _first_match(
        r"^Docker version ([^,\s]+)", get_section(sections, "docker.version").lines
    )
    compose = _first_match(r"^v?(\d+\.\d+\S*)$", get_section(sections, "docker.compose").lines)
    daemon = get_section(sections, "docker.daemon-json")
    daemon_json, error = (
        (None, None) if "missing" in daemon.args else parse_daemon_json(daemon.lines)
    )
    runtimes = (daemon_json or {}).get("runtimes")
    default_runtime = (daemon_json or {}).get("default-runtime")
    return DockerInfo(
        present=version is not None,
        version=version,
        compose_version=compose,
        binaries="\n".join(get_section(sections, "docker.binaries").lines) or None,
        active=get_section(sections, "docker.active").lines == ["active"],
        daemon_json=daemon_json,
        daemon_json_error=error,
        runtimes=tuple(sorted(runtimes)) if isinstance(runtimes, dict) else (),
        default_runtime=default_runtime if isinstance(default_runtime, str) else None,
        toolkit_packages=parse_dpkg_status(get_section(sections, "docker.packages").lines),
    )


class DockerEngine(FactBase[DockerInfo]):
    """
    Returns the Docker engine, Compose and NVIDIA Container Toolkit state of the host.

    ``daemon_json`` is None when the file is absent, or when it does not parse
    (``daemon_json_error`` then says why); ``toolkit_packages`` lists installed packages only.

    .. code:: python

        DockerInfo(
            present=True,
            version="28.3.3",
            compose_version="2.39.1",
            active=True,
            daemon_json={"runtimes": {"nvidia": {...}}},
            daemon_json_error=None,
            runtimes=("nvidia",),
            default_runtime=None,
            toolkit_packages={"nvidia-container-toolkit": "1.17.8-1", ...},
        )
    """

    def command(self) -> str:
        return SCRIPT

    def process(self, output: list[str]) -> DockerInfo:
        return from_sections(split_sections(output))
