"""What every group-data model shares: strictness, printable text, and the one-pattern check."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

# C0 and C1 controls, DEL and Unicode's line and paragraph separators: a line break in a value
# ends a line of .env, a Dockerfile or a shell command it reaches; no setting needs one
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _texts(value: Any):
    """The strings a field's value holds: itself, its items, its keys and values (models held
    inside check their own fields)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _texts(key)
            yield from _texts(item)


def printable(value: Any) -> Any:
    """``value`` if no string in it holds a control character (a line break, a tab, NUL)."""
    for text in _texts(value):
        if CONTROL_RE.search(text):
            shown = repr(text) if len(text) <= 60 else f"{text[:60]!r}..."
            raise ValueError(f"{shown} holds a line break or another control character")
    return value


class FrozenModel(BaseModel):
    """Unknown keys are errors (a misspelt key never passes silently) and values are frozen:
    the one strict base every gpufleet model builds on (host data, snapshots, releases, the
    wire types, bench expectations, the sandbox's state)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StrictModel(FrozenModel):
    """Unknown keys are errors (a misspelt key never passes silently); values are frozen; no
    string anywhere in the data holds a control character.

    The last is checked here, for every field of every model, rather than by a type each field
    must remember to use: a field added tomorrow is covered without a word."""

    @field_validator("*", mode="after")
    @classmethod
    def _printable(cls, value: Any) -> Any:
        return printable(value)


def must_match(value: str, pattern: str, what: str) -> str:
    """``value`` if ``pattern`` matches all of it; else a ValueError "<value> is not <what>"."""
    if not re.fullmatch(pattern, value):
        raise ValueError(f"{value!r} is not {what}")
    return value
