"""Inventories made from the sandbox's for one test: the same hosts, some data changed.

An inventory is Python, so a variant is the sandbox inventory plus a loop that patches host
data by path, exactly what a user does who copies ``inventory/sandbox.py`` and edits a value.
"""

from __future__ import annotations

import pprint
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TEMPLATE = """\
exec(open({base!r}).read())
_PATCHES = {patches}


def _set(data, path, value):
    *head, last = path.split(".")
    for key in head:
        data[key] = dict(data.get(key) or {{}})
        data = data[key]
    data[last] = value


for _group, _patch in _PATCHES.items():
    for _name, _data in globals().get(_group, []):
        for _path, _value in _patch.items():
            _set(_data, _path, _value)
"""


def variant(path: Path, patches: dict[str, dict]) -> str:
    """Write an inventory at ``path``: the sandbox's, with ``{group: {"a.b": value}}`` set."""
    path.write_text(TEMPLATE.format(base=str(ROOT / "inventory" / "sandbox.py"),
                                    patches=pprint.pformat(patches)))  # fmt: skip
    return str(path)
