"""Model files on a host: size, mtime and the verification stamp, without re-hashing."""

from __future__ import annotations

from pyinfra.api import FactBase, FactProcessError, QuoteString, StringCommand

from facts._sections import Section, excerpt, get_section, mark, split_sections
from gpufleet.core.snapshot import ModelFileState, ModelsState

SECTION = "models.files"


def script(root: str, paths: list[str] | tuple[str, ...], *, deep: bool = False) -> StringCommand:
    """``dir\\t<name>`` per directory under ``root``, then one ``file`` line per path.

    A name is printed as ``ls -b`` escapes it (``\\n``, ``\\303``, ``\\ ``): a name the host
    holds, with a line break in it, stays one line.

    + deep: also hash each file (``sha256sum``: slow on big models, for ``drift --deep``)
    """
    digest = '"$(sha256sum < "$p" | cut -d\' \' -f1)"' if deep else "-"
    return StringCommand(
        f"{mark(SECTION)}; ls -1b",
        QuoteString(root),
        "2>/dev/null | sed 's/^/dir\t/'; for p in",
        *[QuoteString(p) for p in paths] or ["''"],
        '; do [ -n "$p" ] || continue; if [ -f "$p" ]; then'
        ' printf \'file\\t%s\\t%s\\t%s\\t%s\\t%s\\n\' "$p" "$(stat -c \'%s %Y\' "$p")"'
        ' "$(cat "$p.verified" 2>/dev/null)" "$(stat -c %Y "$p.verified" 2>/dev/null)"'
        f" {digest};"
        " else printf 'file\\t%s\\t-\\t\\t\\t-\\n' \"$p\"; fi; done",
    )


def parse_lines(lines: list[str]) -> ModelsState:
    dirs: list[str] = []
    files: dict[str, ModelFileState | None] = {}
    for line in lines:
        kind, _, rest = line.partition("\t")
        if kind == "dir":
            dirs.append(rest)
            continue
        parts = rest.split("\t")
        if kind != "file" or len(parts) != 5:
            raise FactProcessError(f"unexpected model-file line: {excerpt(line)}")
        path, stat, stamp, stamp_mtime, digest = parts
        if stat == "-":
            files[path] = None
            continue
        try:
            size, mtime = (int(n) for n in stat.split())
            stamp_time = int(stamp_mtime) if stamp_mtime else None
        except ValueError:
            raise FactProcessError(f"unexpected model-file line: {excerpt(line)}") from None
        files[path] = ModelFileState(
            size=size,
            mtime=mtime,
            stamp=stamp or None,
            stamp_mtime=stamp_time,
            sha256=None if digest == "-" else digest,
        )
    return ModelsState(dirs=tuple(dirs), files=files)


def from_sections(sections: dict[str, Section]) -> ModelsState:
    return parse_lines(get_section(sections, SECTION).lines)


class ModelFiles(FactBase[ModelsState]):
    """State of each model file, and the model directories present under ``root``.

    + root: the models directory
    + paths: model files (absolute)
    + deep: hash every file present (``gpufleet drift --deep``)

    .. code:: python

        ModelsState(
            dirs=("gpt-oss-20b",),
            files={
                "/opt/gpufleet/models/gpt-oss-20b/gpt-oss-20b-Q4_K_M.gguf": ModelFileState(
                    size=11624759488, mtime=1732390000,
                    stamp="<sha256> 11624759488", stamp_mtime=1732390001, sha256=None),
                "/opt/gpufleet/models/gpt-oss-120b/...-00001-of-00003.gguf": None,
            },
        )

    ``fetch-model`` writes the stamp (``<file>.verified``) only after checking size and
    sha256, so a file whose size matches and whose stamp is newer is verified, at the cost
    of a ``stat``.
    """

    @staticmethod
    def default() -> ModelsState:
        return ModelsState()

    def command(self, root: str, paths: list[str] | tuple[str, ...], deep: bool = False):
        return script(root, paths, deep=deep)

    def process(self, output: list[str]) -> ModelsState:
        return from_sections(split_sections(output))
