"""The model store on a host: blobs, their stamps, snapshot links and refs, without re-hashing.

What it reads is named by ``gpufleet.core.hubcache`` from the control machine's resolution: a
file the plan does not know of is never looked at, except for the names of the snapshots in
the cache and of those gpufleet placed (what pruning chooses among).
"""

from __future__ import annotations

from typing import NamedTuple

from pyinfra.api import FactBase, FactProcessError, QuoteString, StringCommand

from facts._sections import Section, excerpt, get_section, mark, split_sections
from gpufleet.core.hubcache import PLACED_DIR, hash_kind
from gpufleet.core.snapshot import ModelFileState, ModelsState

SECTION = "models.files"

# kind path stamp hash: one line for a file, hashed (sha256, or git's blob sha1) when asked
_STAT = (
    'gf_m() { if [ -f "$2" ]; then case $4 in'
    " sha256) d=$(sha256sum < \"$2\" | cut -d' ' -f1) ;;"
    ' sha1) d=$({ printf \'blob %s\\0\' "$(stat -Lc %s "$2")"; cat "$2"; } | sha1sum'
    " | cut -d' ' -f1) ;; *) d=- ;; esac;"
    ' printf \'%s\\t%s\\t%s\\t%s\\t%s\\t%s\\n\' "$1" "$2" "$(stat -Lc \'%s %Y\' "$2")"'
    ' "$(head -n1 "$3" 2>/dev/null | tr -d \'\\t\')" "$(stat -c %Y "$3" 2>/dev/null)" "$d";'
    ' else printf \'%s\\t%s\\t-\\t\\t\\t-\\n\' "$1" "$2"; fi; }'
)


# folder, snapshot path, kind: one line for a snapshot key, only when both names are ones a
# repository folder and a commit can be (a name with a line break in it never reaches a line)
_KEY = (
    "gf_k() { f=${1##*/} c=${2##*/}; case $f in models--*) ;; *) return ;; esac;"
    " case $f in *[!A-Za-z0-9._-]*) return ;; esac;"
    " case $c in *[!0-9a-f]*) return ;; esac; [ ${#c} -eq 40 ] || return 0;"
    ' printf \'%s\\t%s/%s\\n\' "$3" "$f" "$c"; }'
)


class Entry(NamedTuple):
    """One file of a served model: its blob, the blob's stamp, its snapshot link, and where
    gpufleet kept it before the Hub layout ("" for none)."""

    blob: str
    stamp: str
    link: str
    legacy: str = ""


def _hash(blob: str, deep: bool) -> str:
    return hash_kind(blob.rsplit("/", 1)[-1]) if deep else "-"


def script(
    hub: str,
    entries: list[Entry] | tuple[Entry, ...],
    refs: list[str] | tuple[str, ...] = (),
    *,
    deep: bool = False,
) -> StringCommand:
    """Tab-separated lines: ``snap``/``placed`` per snapshot, then per entry ``blob``,
    ``part`` (an ``.incomplete`` beside it), ``link`` and ``legacy``; ``ref`` per ref.

    + deep: also hash each blob (slow on big models: ``drift --deep`` and targeted re-reads)
    """
    q = QuoteString
    parts: list = [
        f"{mark(SECTION)}; {_STAT}; {_KEY}; for d in",
        StringCommand(q(hub), "/models--*/snapshots/*", _separator=""),
        '; do [ -d "$d" ] || continue; r=${d%/snapshots/*}; gf_k "$r" "$d" snap; done; for d in',
        f"{PLACED_DIR}/models--*/*",
        '; do [ -f "$d" ] || continue; gf_k "${d%/*}" "$d" placed; done',
    ]
    for e in entries:
        parts += [
            "; gf_m blob",
            q(e.blob),
            q(e.stamp),
            _hash(e.blob, deep),
            "; [ ! -f",
            q(e.blob + ".incomplete"),
            "] || printf 'part\\t%s\\t%s\\n'",
            q(e.blob),
            '"$(stat -c %s',
            q(e.blob + ".incomplete"),
            ")\"; printf 'link\\t%s\\t%s\\n'",
            q(e.link),
            '"$(readlink',
            q(e.link),
            '2>/dev/null || echo -)"',
        ]
        if e.legacy:
            parts += ["; gf_m legacy", q(e.legacy), q(e.legacy + ".verified"), "-"]
    for ref in refs:
        parts += ["; printf 'ref\\t%s\\t%s\\n'", q(ref), '"$(cat', q(ref)]
        parts += ['2>/dev/null || echo -)"']
    return StringCommand(*parts)


def _state(line: str, parts: list[str]) -> tuple[str, ModelFileState | None]:
    path, stat, stamp, stamp_mtime, digest = parts
    if stat == "-":
        return path, None
    try:
        size, mtime = (int(n) for n in stat.split())
        stamp_time = int(stamp_mtime) if stamp_mtime else None
    except ValueError:
        raise FactProcessError(f"unexpected model-file line: {excerpt(line)}") from None
    state = ModelFileState(
        size=size,
        mtime=mtime,
        stamp=stamp or None,
        stamp_mtime=stamp_time,
        digest=None if digest == "-" else digest,
    )
    return path, state


def parse_lines(lines: list[str]) -> ModelsState:
    found: dict[str, dict] = {
        "files": {}, "incomplete": {}, "links": {}, "legacy": {}, "refs": {}
    }  # fmt: skip
    snapshots: list[str] = []
    placed: list[str] = []
    for line in lines:
        if not line:
            continue
        kind, _, rest = line.partition("\t")
        parts = rest.split("\t")
        if kind in ("snap", "placed") and len(parts) == 1:
            (snapshots if kind == "snap" else placed).append(rest)
        elif kind in ("blob", "legacy") and len(parts) == 5:
            path, state = _state(line, parts)
            found["files" if kind == "blob" else "legacy"][path] = state
        elif kind == "part" and len(parts) == 2 and parts[1].isdigit():
            found["incomplete"][parts[0]] = int(parts[1])
        elif kind in ("link", "ref") and len(parts) == 2:
            found["links" if kind == "link" else "refs"][parts[0]] = (
                None if parts[1] in ("-", "") else parts[1]
            )
        else:
            raise FactProcessError(f"unexpected model-file line: {excerpt(line)}")
    return ModelsState(**found, snapshots=tuple(snapshots), placed=tuple(placed))


def from_sections(sections: dict[str, Section]) -> ModelsState:
    return parse_lines(get_section(sections, SECTION).lines)


class ModelFiles(FactBase[ModelsState]):
    """The model store: each served file's blob, stamp, link (and old place), the refs, and
    the snapshots present and placed.

    + hub: the Hub cache (``<hf_home>/hub``)
    + entries: ``Entry`` per file (``gpufleet.core.hubcache.CachedFile`` names them)
    + refs: ``refs/<revision>`` files to read
    + deep: hash every blob present (``gpufleet drift --deep``, a targeted re-read)

    .. code:: python

        ModelsState(
            files={".../blobs/<sha256>": ModelFileState(size=11624759488, mtime=1732390000,
                   stamp="<sha256> 11624759488", stamp_mtime=1732390001, digest=None)},
            links={".../snapshots/<commit>/gpt-oss-20b-Q4_K_M.gguf": "../../blobs/<sha256>"},
            snapshots=("models--unsloth--gpt-oss-20b-GGUF/<commit>",),
            placed=("models--unsloth--gpt-oss-20b-GGUF/<commit>",),
        )

    A stamp (``<state>/verified/models--Org--Repo/<etag>``) is written only after the blob's
    size and hash were checked, so a blob whose size matches and whose stamp is not older is
    verified, at the cost of a ``stat``.
    """

    @staticmethod
    def default() -> ModelsState:
        return ModelsState()

    def command(self, hub: str, entries=(), refs=(), deep: bool = False):
        return script(hub, [Entry(*e) for e in entries], refs, deep=deep)

    def process(self, output: list[str]) -> ModelsState:
        return from_sections(split_sections(output))
