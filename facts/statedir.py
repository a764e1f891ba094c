"""gpufleet's own directory on a host: the current release, the kept ones, the lease."""

from __future__ import annotations

import json

from pydantic import ValidationError
from pyinfra.api import FactBase, FactProcessError, QuoteString, StringCommand

from facts._sections import Section, excerpt, get_section, mark, split_sections
from gpufleet.core import render
from gpufleet.core.known import STATE_DIR
from gpufleet.core.release import is_release_id, read_manifest
from gpufleet.core.snapshot import KeptRelease, Lease, StateDir


def script(root: str = STATE_DIR) -> StringCommand:
    """``state.current``: the current release id; ``state.history``: kept ids, oldest first;
    ``state.models``: models the kept releases use; ``state.secretcopies``: kept releases that
    still hold a whole ``.env`` (secret values: written by gpufleet before it kept only the
    public part); ``state.lease``: the lease, if any."""

    def at(path: str) -> StringCommand:
        return StringCommand(QuoteString(root), path, _separator="")

    return StringCommand(
        *(f"{mark('state.current')}; cat", at("/current")),
        *(f"2>/dev/null; echo; {mark('state.history')}; cat", at("/history")),
        *(f"2>/dev/null; echo; {mark('state.models')}; cat", at("/releases/*/models")),
        *(f"2>/dev/null; {mark('state.secretcopies')}; for f in", at("/releases/*/env")),
        '; do [ -f "$f" ] || continue; f=${f%/env}; printf \'%s\\n\' "${f##*/}"; done;',
        *("if [ -f", at("/lease.json"), f"]; then {mark('state.lease')}; cat"),
        *(at("/lease.json"), "; echo; fi"),
    )


def extras_script(
    root: str = STATE_DIR, *, releases: bool = False, audit: int = 0
) -> StringCommand:
    """Optional sections: ``state.kept`` (each kept release: id, time, its manifest on one line)
    for ``gpufleet releases``; ``state.audit`` (the last ``audit`` lines of the audit log)."""
    statements: list[StringCommand] = []
    if releases:
        statements.append(
            StringCommand(
                f"{mark('state.kept')}; for d in",
                StringCommand(QuoteString(root), "/releases/*/", _separator=""),
                "; do [ -f \"$d/manifest.json\" ] || continue; printf '%s\\t%s\\t' "
                '"$(basename "$d")" "$(stat -c %Y "$d")"; tr -d \'\\n\' < "$d/manifest.json"; echo;'
                " done",
            )
        )
    if audit:
        statements.append(
            StringCommand(
                f"{mark('state.audit')}; tail -n {int(audit)}",
                StringCommand(QuoteString(root), "/audit.jsonl", _separator=""),
                "2>/dev/null",
            )
        )
    return StringCommand(*statements, _separator="; ") if statements else StringCommand("true")


def release_ids(lines: list[str], where: str, problems: list[str]) -> list[str]:
    """The release ids among ``lines`` (blank lines skipped); anything else is reported in
    ``problems`` (the file and the line) and left out: it never reaches a path or a command."""
    ids = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        if is_release_id(text):
            ids.append(text)
        else:
            problems.append(
                f"{where} line {number} is not a release id ({excerpt(text, 40)}): ignored; "
                "remove that line"
            )
    return ids


def from_sections(sections: dict[str, Section]) -> StateDir:
    problems: list[str] = []
    current = release_ids(
        get_section(sections, "state.current").lines, f"{STATE_DIR}/current", problems
    )
    history = release_ids(
        get_section(sections, "state.history").lines, f"{STATE_DIR}/history", problems
    )
    models = sorted({line.strip() for line in get_section(sections, "state.models").lines} - {""})
    copies = []
    if "state.secretcopies" in sections:  # a directory not named as a release is not one
        copies = [
            c
            for c in (line.strip() for line in sections["state.secretcopies"].lines)
            if is_release_id(c)
        ]
    lease, error = None, None
    if "state.lease" in sections:
        text = "\n".join(sections["state.lease"].lines).strip()
        try:
            lease = Lease.model_validate(json.loads(text))
        except (ValueError, RecursionError, ValidationError):
            # a half-written or hand-edited lease: shown, and treated as held until broken
            error = f"{STATE_DIR}/lease.json is not a lease: {text[:200]!r}"
    kept = {}
    for line in sections["state.kept"].lines if "state.kept" in sections else []:
        rid, _, rest = line.partition("\t")
        stamp, _, manifest = rest.partition("\t")
        if not is_release_id(rid):
            problems.append(
                f"{STATE_DIR}/releases/{excerpt(rid, 40)} is not named as a release: ignored"
            )
            continue
        at = int(stamp) if stamp.isascii() and stamp.isdigit() else 0
        where = f"{STATE_DIR}/releases/{rid}/manifest.json"
        try:
            kept[rid] = KeptRelease(
                at=at, manifest=read_manifest(manifest, release_id=rid, where=where)
            )
        except ValueError as exc:
            problems.append(str(exc))
            kept[rid] = KeptRelease(at=at, manifest=None)
    audit = (
        [line for line in sections["state.audit"].lines if line.strip()]
        if ("state.audit" in sections)
        else []
    )
    return StateDir(
        current=current[0] if current else None,
        releases=tuple(dict.fromkeys(history)),
        kept_models=tuple(models),
        secret_copies=tuple(copies),
        problems=tuple(problems),
        lease=lease,
        lease_error=error,
        kept=kept,
        audit=tuple(audit),
    )


class GpufleetState(FactBase[StateDir]):
    """gpufleet's state directory (``/var/lib/gpufleet``): releases and the lease.

    + root: the state directory

    .. code:: python

        StateDir(current="3f9c2a1b7d0e", releases=("a1b2c3d4e5f6", "3f9c2a1b7d0e"),
                 lease=Lease(id="...", holder="ops@control-1", ...), lease_error=None)

    A host gpufleet never converged gives ``StateDir()``.
    """

    @staticmethod
    def default() -> StateDir:
        return StateDir()

    def command(self, root: str = STATE_DIR) -> StringCommand:
        return script(root)

    def process(self, output: list[str]) -> StateDir:
        return from_sections(split_sections(output))


def parse_images(lines: list[str]) -> dict[str, tuple[str, str]]:
    """``releases/<id>/images``: service -> (image ref, image id it ran)."""
    images = {}
    for line in lines:
        parts = line.split("\t")
        if len(parts) != 3:
            raise FactProcessError(f"unexpected release images line: {excerpt(line)}")
        images[parts[0]] = (parts[1], parts[2])
    return images


class ReleaseRecord(FactBase[dict | None]):
    """A kept release: its manifest and the image ids it ran, or None when not kept.

    + release_id: the release's id (12 hex digits: anything else is refused before it reaches
      the host)
    + root: the state directory
    + plain: the ``.env`` names declared plain now (``gpufleet.core.render.plain_names``)

    .. code:: python

        {"manifest": Release(...), "images": {"llama": ("gpufleet/llama.cpp:spark", "sha256:...")},
         "env": "# Managed by gpufleet ...\\nLOG='1'\\n# secret HF_TOKEN\\n"}

    ``env`` is the ``.env``'s public part (an older release's whole copy is stripped on the
    host, keeping only ``plain`` names' values). The manifest is checked against its
    directory (``gpufleet.core.release.read_manifest``): a manifest naming another release is a
    ``FactProcessError`` naming the file.
    """

    @staticmethod
    def default() -> None:
        return None

    def command(
        self, release_id: str, root: str = STATE_DIR, plain: tuple[str, ...] = ()
    ) -> StringCommand:
        if not is_release_id(release_id):
            raise ValueError(f"not a release id: {release_id[:40]!r}")
        rel = StringCommand(QuoteString(root), "/releases/", QuoteString(release_id), _separator="")

        def at(name: str) -> StringCommand:
            return StringCommand(rel, name, _separator="")

        return StringCommand(
            "if [ -f",
            at("/manifest.json"),
            "]; then",
            f"{mark(f'release.manifest id={release_id}')}; cat",
            at("/manifest.json"),
            f"; {mark('release.images')}; cat",
            at("/images"),
            "2>/dev/null;",
            # its .env's public part; an older release's whole copy is stripped here, on the host
            f"{mark('release.env')}; if [ -f",
            at("/env.public"),
            "]; then cat",
            at("/env.public"),
            "; elif [ -f",
            at("/env"),
            "]; then",
            render.public_env_awk(tuple(plain)),
            at("/env"),
            f"; fi; else {mark('release.absent')}; fi",
        )

    def process(self, output: list[str]) -> dict | None:
        sections = split_sections(output)
        if "release.absent" in sections:
            return None
        section = get_section(sections, "release.manifest")
        rid = section.args.get("id", "")
        try:
            manifest = read_manifest(
                "\n".join(section.lines),
                release_id=rid,
                where=f"{STATE_DIR}/releases/{rid}/manifest.json",
            )
        except ValueError as exc:
            raise FactProcessError(str(exc)) from None
        env = sections["release.env"].lines if "release.env" in sections else []
        return {
            "manifest": manifest,
            "images": parse_images(get_section(sections, "release.images").lines),
            "env": "\n".join(env) + "\n" if env else None,
        }
