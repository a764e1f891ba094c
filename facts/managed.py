"""The files gpufleet manages, read in one command: content hash, mode and owner of each."""

from __future__ import annotations

from typing import TypedDict

from pyinfra.api import FactBase, FactProcessError, QuoteString, StringCommand


class ManagedFile(TypedDict):
    sha256: str
    mode: str
    owner: str
    group: str


class ManagedFiles(FactBase[dict[str, ManagedFile | None]]):
    """Hash (``"dir"`` for a directory), mode and owner of each path; None where absent.

    .. code:: python

        {
            "/etc/apt/sources.list.d/nvidia-container-toolkit.list": {
                "sha256": "9f86d0...", "mode": "644", "owner": "root", "group": "root",
            },
            "/opt/gpufleet/.env": None,
        }

    A no-change run compares these with what it would write, so it issues no per-file
    commands at all.
    """

    @staticmethod
    def default() -> dict:
        return {}

    def command(self, paths: list[str] | tuple[str, ...]) -> StringCommand:
        # One line per path: "<path>\t<sha256, dir or ->\t<mode> <owner> <group>".
        return StringCommand(
            "for p in",
            *[QuoteString(path) for path in paths],
            '; do if [ -f "$p" ]; then d=$(sha256sum < "$p" | cut -d\' \' -f1);'
            ' elif [ -d "$p" ]; then d=dir; else printf \'%s\\t-\\t-\\n\' "$p"; continue; fi;'
            ' printf \'%s\\t%s\\t%s\\n\' "$p" "$d" "$(stat -c \'%a %U %G\' "$p")"; done',
        )

    def process(self, output: list[str]) -> dict[str, ManagedFile | None]:
        result: dict[str, ManagedFile | None] = {}
        for line in output:
            try:
                path, digest, meta = line.split("\t")
            except ValueError as exc:
                raise FactProcessError(f"unexpected line: {line!r}") from exc
            if digest == "-":
                result[path] = None
                continue
            mode, owner, group = meta.split()
            result[path] = ManagedFile(sha256=digest, mode=mode, owner=owner, group=group)
        return result
