"""What every group-data model shares: strictness, and the one-pattern check."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors (a misspelt key never passes silently); values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def must_match(value: str, pattern: str, what: str) -> str:
    """``value`` if ``pattern`` matches all of it; else a ValueError "<value> is not <what>"."""
    if not re.fullmatch(pattern, value):
        raise ValueError(f"{value!r} is not {what}")
    return value
