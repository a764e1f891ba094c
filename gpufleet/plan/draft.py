"""A plan in the making: the changes collected in step order, and the comparisons more than one
step makes (a file gpufleet writes whole, a directory, a signed apt source, an image the host
must have).

.. code:: python

    draft = PlanDraft()
    draft.write("compose", path, snap.files.get(path), text, "compose file differs")
    draft.plan(config, warnings)  # a HostPlan, its changes in ``STEPS`` order
"""

from __future__ import annotations

import hashlib

from gpufleet.core.schema import HostConfig
from gpufleet.core.snapshot import FileState, Snapshot
from gpufleet.core.wire import STEPS, Op
from gpufleet.plan.types import AptSource, Change, HostPlan


def apt_line(*, keyring: str, url: str, dist: str) -> str:
    return f"deb [signed-by={keyring}] {url} {dist}\n"


def image_missing(snap: Snapshot, ref: str, source: str, local_id: str | None) -> str | None:
    """Why an image must be delivered, or None when the host has it (the same id if sent)."""
    present = snap.compose.images.get(ref)
    if present is None:
        return "absent"
    if source == "transfer" and present.id != local_id:
        return f"id {present.id[:19]} differs from the control machine's {str(local_id)[:19]}"
    return None


def _dir_matches(state: FileState | None, mode: str, owner: str, group: str) -> bool:
    return (
        state is not None
        and state.kind == "dir"
        and (state.mode, state.owner, state.group) == (mode.lstrip("0") or "0", owner, group)
    )


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def short(digest: str | None) -> str:
    return f"sha256:{digest[:12]}" if digest else "absent"


class PlanDraft:
    """Collects changes in step order while a plan is made, with the comparisons several
    steps share: a file gpufleet writes whole, a directory, a signed apt source."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.apt: dict[str, AptSource] = {}

    def add(self, step: str, resource: str, reason: str, action: str, *, op: Op, **kw) -> Change:
        change = Change(step=step, resource=resource, reason=reason, action=action, op=op, **kw)
        self.changes.append(change)
        return change

    def has(self, step: str, resource: str) -> bool:
        return any(c.step == step and c.resource == resource for c in self.changes)

    def ordered(self) -> tuple[Change, ...]:
        return tuple(sorted(self.changes, key=lambda c: STEPS.index(c.step)))

    def plan(self, config: HostConfig, warnings: tuple[str, ...], **fields) -> HostPlan:
        """The plan of the changes collected so far, in step order."""
        return HostPlan(
            host=config.host,
            group=config.group,
            warnings=warnings,
            changes=self.ordered(),
            apt_sources=dict(self.apt),
            **fields,
        )

    def write(self, step: str, path: str, state: FileState | None, text: str, why: str) -> None:
        """A file gpufleet writes whole: a change when it is absent or its bytes are not
        ``text``."""
        wanted = sha(text)
        if state is None or state.sha256 != wanted:
            found = short(state.sha256) if state else "absent"
            self.add(step, path, why, "write", expected=short(wanted), found=found, op=Op.WRITE)

    def apt_source(self, snap: Snapshot, step: str, source: AptSource) -> None:
        """A signed apt repository: its key installed when absent, its list file written."""
        self.apt[step] = source
        if snap.files.get(source.keyring) is None:
            why = f"{source.title} signing key absent"
            self.add(
                step,
                source.keyring,
                why,
                "install key",
                expected="present",
                found="absent",
                op=Op.INSTALL_KEY,
            )
        listed = snap.files.get(source.list_path)
        why = f"{source.title} apt source {'absent' if listed is None else 'differs'}"
        self.write(step, source.list_path, listed, source.line, why)

    def directory(
        self, snap: Snapshot, step: str, path: str, mode: str, owner: str, group: str
    ) -> None:
        """A directory with its mode and owner: created when absent, fixed when it differs."""
        state = snap.files.get(path)
        if not _dir_matches(state, mode, owner, group):
            expected = f"dir {mode.lstrip('0')} {owner}:{group}"
            self.add(
                step,
                path,
                f"directory {state.describe() if state else 'absent'}, {expected} declared",
                "create" if state is None else "fix",
                expected=expected,
                found=state.describe() if state else "absent",
                op=Op.CREATE if state is None else Op.FIX,
            )
