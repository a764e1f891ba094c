"""gpufleet's own directory on a host: the current release, the kept ones, the lease."""

from __future__ import annotations

import json

from pydantic import ValidationError
from pyinfra.api import FactBase, QuoteString, StringCommand

from facts._sections import Section, get_section, mark, split_sections
from gpufleet.known import STATE_DIR
from gpufleet.snapshot import Lease, StateDir


def script(root: str = STATE_DIR) -> StringCommand:
    """``state.current``: the current release id; ``state.history``: kept ids, oldest first;
    ``state.models``: models the kept releases use; ``state.lease``: the lease, if any."""

    def at(path: str) -> StringCommand:
        return StringCommand(QuoteString(root), path, _separator="")

    return StringCommand(
        f"{mark('state.current')}; cat", at("/current"),
        f"2>/dev/null; echo; {mark('state.history')}; cat", at("/history"),
        f"2>/dev/null; echo; {mark('state.models')}; cat", at("/releases/*/models"),
        "2>/dev/null; if [ -f", at("/lease.json"), f"]; then {mark('state.lease')}; cat",
        at("/lease.json"), "; echo; fi",
    )  # fmt: skip


def from_sections(sections: dict[str, Section]) -> StateDir:
    current = [line.strip() for line in get_section(sections, "state.current").lines]
    history = [line.strip() for line in get_section(sections, "state.history").lines]
    models = sorted({line.strip() for line in get_section(sections, "state.models").lines} - {""})
    lease, error = None, None
    if "state.lease" in sections:
        text = "\n".join(sections["state.lease"].lines).strip()
        try:
            lease = Lease.model_validate(json.loads(text))
        except (ValueError, ValidationError):
            # a half-written or hand-edited lease: shown, and treated as held until broken
            error = f"{STATE_DIR}/lease.json is not a lease: {text[:200]!r}"
    return StateDir(
        current=next((c for c in current if c), None),
        releases=tuple(h for h in history if h),
        kept_models=tuple(models),
        lease=lease,
        lease_error=error,
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
