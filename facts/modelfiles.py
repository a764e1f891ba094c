"""Model files on a host: size, mtime and the verification stamp, without re-hashing."""

from __future__ import annotations

from typing import TypedDict

from pyinfra.api import FactBase, FactProcessError, QuoteString, StringCommand


class ModelFileState(TypedDict):
    size: int
    mtime: int
    stamp: str | None
    stamp_mtime: int | None


class ModelFiles(FactBase[dict]):
    """State of each model file, and the model directories present under ``root``.

    + root: the models directory
    + paths: model files (absolute)

    .. code:: python

        {
            "dirs": ["gpt-oss-20b"],
            "files": {
                "/opt/gpufleet/models/gpt-oss-20b/gpt-oss-20b-Q4_K_M.gguf": {
                    "size": 11624759488, "mtime": 1732390000,
                    "stamp": "<sha256> 11624759488", "stamp_mtime": 1732390001,
                },
                "/opt/gpufleet/models/gpt-oss-120b/...-00001-of-00003.gguf": None,
            },
        }

    ``fetch-model`` writes the stamp (``<file>.verified``) only after checking size and
    sha256, so a file whose size matches and whose stamp is newer is verified, at the cost
    of a ``stat``.
    """

    @staticmethod
    def default() -> dict:
        return {"dirs": [], "files": {}}

    def command(self, root: str, paths: list[str] | tuple[str, ...]) -> StringCommand:
        return StringCommand(
            "ls -1",
            QuoteString(root),
            "2>/dev/null | sed 's/^/dir\t/'; for p in",
            *[QuoteString(p) for p in paths] or ["''"],
            '; do [ -n "$p" ] || continue; if [ -f "$p" ]; then'
            ' printf \'file\\t%s\\t%s\\t%s\\t%s\\n\' "$p" "$(stat -c \'%s %Y\' "$p")"'
            ' "$(cat "$p.verified" 2>/dev/null)" "$(stat -c %Y "$p.verified" 2>/dev/null)";'
            " else printf 'file\\t%s\\t-\\t\\t\\n' \"$p\"; fi; done",
        )

    def process(self, output: list[str]) -> dict:
        result: dict = {"dirs": [], "files": {}}
        for line in output:
            kind, _, rest = line.partition("\t")
            if kind == "dir":
                result["dirs"].append(rest)
                continue
            parts = rest.split("\t")
            if kind != "file" or len(parts) != 4:
                raise FactProcessError(f"unexpected line: {line!r}")
            path, stat, stamp, stamp_mtime = parts
            if stat == "-":
                result["files"][path] = None
                continue
            size, mtime = stat.split()
            result["files"][path] = ModelFileState(
                size=int(size),
                mtime=int(mtime),
                stamp=stamp or None,
                stamp_mtime=int(stamp_mtime) if stamp_mtime else None,
            )
        return result


def is_verified(state: ModelFileState | None, *, sha256: str, size: int) -> bool:
    """True when the file is whole and was verified after its last change."""
    return bool(
        state
        and state["size"] == size
        and state["stamp"] == f"{sha256} {size}"
        and state["stamp_mtime"] is not None
        and state["stamp_mtime"] >= state["mtime"]
    )
