"""Durations as people write them: ``90``, ``90s``, ``5m``, ``1h``, one parser for all."""

from __future__ import annotations

import re

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smh]?)")
UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str, *, error: type[Exception] = ValueError) -> float:
    """``"90"``, ``"90s"``, ``"5m"``, ``"1h"`` -> seconds; ``error`` (ValueError unless the
    caller names its own, a command's UsageError say) for anything else.

    .. code:: python

        parse_duration("5m")  # 300.0
    """
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise error(f"{text!r} is not a duration like 30s, 5m or 1h")
    return float(match[1]) * UNIT_SECONDS[match[2]]
