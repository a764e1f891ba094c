"""
Section markers shared by the gpufleet facts, and the decoding of what a host prints.

A fact script prints ``##gpufleet:<nonce>:<section> [key=value ...]`` on a line of its own
before each probe, so one remote command can carry several probes, and several facts
(``facts.identity.HostIdentity``), and the parsers can tell their outputs apart. Section names
start with their module (``nvidia.query``).

What a probe prints comes from the host: a file's content, a directory's name, a container's
status. None of it can start a section: a marker counts only at the start of a line, and
only with this run's nonce (random, made once per process), which no file on the host holds.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import NamedTuple

from pyinfra.api import StringCommand
from pyinfra.api.exceptions import FactProcessError

NONCE = secrets.token_hex(8)
MARKER = f"##gpufleet:{NONCE}:"
# the first line of output that ``encoded`` wraps: what follows is base64
ENCODED = "##gpufleet-base64"


class Section(NamedTuple):
    args: dict[str, str]
    lines: list[str]


def excerpt(text: str, limit: int = 200) -> str:
    """
    ``text`` quoted for an error message, cut after ``limit`` characters.
    """

    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def mark(section: str) -> str:
    """
    Shell statement that prints the marker line of ``section``.
    """

    # the empty line first: a file printed without its final newline would otherwise hold
    # the marker at the end of its last line, where it does not count
    return f"echo; echo '{MARKER}{section}'"


def encoded(command: StringCommand) -> StringCommand:
    """``command`` with its output sent as base64, for ``decoded`` to read back byte for byte.

    pyinfra reads a command's output as UTF-8 text (paramiko's strict decoding): one byte that
    is not UTF-8 (a Latin-1 file name, a binary in a file) ends the read there, silently, and
    the fact is parsed from what came before it.
    """
    return StringCommand(f"echo '{ENCODED}'; (", command, ") | base64", _separator=" ")


def decoded(output: list[str]) -> list[str]:
    """The lines an ``encoded`` command printed, decoded as UTF-8 with every other byte kept
    as a surrogate escape (``surrogateescape``); output that is not encoded is returned as it
    is (a fixture of captured text)."""
    if not output or output[0] != ENCODED:
        return output
    try:
        raw = base64.b64decode("".join(output[1:]), validate=True)
    except (binascii.Error, ValueError):
        shown = excerpt("".join(output[1:]), 80)
        raise FactProcessError(
            f"the host's output is not the base64 it should be: {shown}"
        ) from None
    return raw.decode("utf-8", "surrogateescape").split("\n")


def split_sections(output: list[str]) -> dict[str, Section]:
    """
    Split fact output into its sections, keyed by name, trailing blank lines dropped.

    + output: the stdout lines of a fact command
    """

    sections: dict[str, Section] = {}
    current: list[str] | None = None
    for line in output:
        if not line.startswith(MARKER):
            if current is not None:
                current.append(line)
            continue
        rest = line.removeprefix(MARKER)
        if not rest.split():  # a marker line cut short
            raise FactProcessError(f"a section marker without a name: {excerpt(line)}")
        name, *words = rest.split()
        if name in sections:
            raise FactProcessError(f"section {name} appears twice in the output")
        args = dict(word.partition("=")[::2] for word in words)
        current = []
        sections[name] = Section(args, current)

    for section in sections.values():
        while section.lines and not section.lines[-1].strip():
            section.lines.pop()
    return sections


def get_section(sections: dict[str, Section], name: str) -> Section:
    """
    The section called ``name``; its absence means the output is not what the script prints.
    """

    try:
        return sections[name]
    except KeyError:
        raise FactProcessError(f"no {name} section in the output") from None
