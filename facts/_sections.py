"""
Section markers shared by the gpufleet facts.

A fact script prints ``##gpufleet:<section> [key=value ...]`` before each probe, so one remote
command can carry several probes, and several facts (``facts.identity.HostIdentity``), and the
parsers can tell their outputs apart. Section names start with their module (``nvidia.query``).
"""

from __future__ import annotations

from typing import NamedTuple

from pyinfra.api.exceptions import FactProcessError

MARKER = "##gpufleet:"


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

    return f"echo '{MARKER}{section}'"


def split_sections(output: list[str]) -> dict[str, Section]:
    """
    Split fact output into its sections, keyed by name, trailing blank lines dropped.

    + output: the stdout lines of a fact command
    """

    sections: dict[str, Section] = {}
    current: list[str] | None = None
    for line in output:
        before, marker, rest = line.partition(MARKER)
        if not marker:
            if current is not None:
                current.append(line)
            continue
        # a file printed without its final newline glues the next marker to its last line
        if before and current is not None:
            current.append(before)
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
