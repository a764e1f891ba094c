"""The files gpufleet manages, read in one command: content hash, mode and owner of each."""

from __future__ import annotations

from pyinfra.api import FactBase, FactProcessError, QuoteString, StringCommand

from facts._sections import Section, excerpt, get_section, mark, split_sections
from gpufleet.core.snapshot import FileState

SECTION = "managed.files"


def script(paths: list[str] | tuple[str, ...]) -> StringCommand:
    """One line per path: ``<path>\\t<sha256, dir or ->\\t<mode> <owner> <group>``."""
    return StringCommand(
        f"{mark(SECTION)}; for p in",
        *[QuoteString(path) for path in paths] or ["''"],
        '; do [ -n "$p" ] || continue; if [ -f "$p" ]; then'
        " d=$(sha256sum < \"$p\" | cut -d' ' -f1);"
        ' elif [ -d "$p" ]; then d=dir; else printf \'%s\\t-\\t-\\n\' "$p"; continue; fi;'
        ' printf \'%s\\t%s\\t%s\\n\' "$p" "$d" "$(stat -c \'%a %U %G\' "$p")"; done',
    )


def parse_lines(lines: list[str]) -> dict[str, FileState | None]:
    result: dict[str, FileState | None] = {}
    for line in lines:
        parts = line.split("\t")
        if len(parts) != 3:
            raise FactProcessError(f"unexpected managed-file line: {excerpt(line)}")
        path, digest, meta = parts
        if digest == "-":
            result[path] = None
            continue
        words = meta.split()
        if len(words) != 3 or not (digest == "dir" or len(digest) == 64):
            raise FactProcessError(f"unexpected managed-file line: {excerpt(line)}")
        mode, owner, group = words
        result[path] = FileState(
            kind="dir" if digest == "dir" else "file",
            sha256=None if digest == "dir" else digest,
            mode=mode,
            owner=owner,
            group=group,
        )
    return result


def from_sections(sections: dict[str, Section]) -> dict[str, FileState | None]:
    return parse_lines(get_section(sections, SECTION).lines)


class ManagedFiles(FactBase[dict[str, FileState | None]]):
    """Hash, mode and owner of each path; None where absent.

    + paths: absolute paths (files or directories)

    .. code:: python

        {
            "/etc/apt/sources.list.d/nvidia-container-toolkit.list": FileState(
                kind="file", sha256="9f86d0...", mode="644", owner="root", group="root"),
            "/opt/gpufleet/models": FileState(kind="dir", sha256=None, mode="755", ...),
            "/opt/gpufleet/.env": None,
        }

    A no-change run compares these with what it would write, so it issues no per-file
    commands at all.
    """

    @staticmethod
    def default() -> dict:
        return {}

    def command(self, paths: list[str] | tuple[str, ...]) -> StringCommand:
        return script(paths)

    def process(self, output: list[str]) -> dict[str, FileState | None]:
        return from_sections(split_sections(output))
