"""``gpufleet init DIR``: a starter ops directory, holding only what is yours.

    DIR/inventory.py          your hosts, by group (commented examples)
    DIR/group_data/*.py       the group data gpufleet ships (all, spark, rtx5090, jetson),
                              copied to be edited: models, services, bind, API keys

gpufleet's deploys, facts and templates stay in the installed package; ``gpufleet drift
inventory.py`` and ``gpufleet converge inventory.py`` from DIR read the group data beside the
inventory.
"""

from __future__ import annotations

from pathlib import Path

from gpufleet import paths
from gpufleet.fleet.runner import UsageError

INVENTORY = """\
# Your hosts, by group: each group reads group_data/<group>.py (and group_data/all.py).
# pyinfra reads this file: https://docs.pyinfra.com/en/3.x/inventory-data.html
#
# Every host is checked before anything changes: driver, CUDA (or L4T on Jetson), CPU arch
# and memory; a host below its group's minimums is refused and left as it is. gpufleet never
# installs or upgrades drivers, CUDA or JetPack.
#
#   ssh_user: the login (root, or a user with passwordless sudo and "_sudo": True)
#   ssh_known_hosts_file: pin host keys (ssh-keyscan once, check the fingerprints)

spark = [
    # ("spark-01.lab.example", {"ssh_user": "root"}),
]

rtx5090 = [
    # ("ws-5090-a.lab.example", {"ssh_user": "ops", "_sudo": True}),
]

jetson = [
    # ("orin-01.lab.example", {"ssh_user": "ops", "_sudo": True}),
]
"""

HEADER = (
    "# Copied by `gpufleet init` from gpufleet's shipped group data: yours to edit.\n"
    '# Before the first converge: set each service\'s "bind" ("127.0.0.1" keeps it off the\n'
    '# network) and "api_key_secret", and pin model revisions to commits.\n'
)


def files() -> dict[str, str]:
    """Relative path -> text of every file ``init`` writes."""
    out = {"inventory.py": INVENTORY}
    for source in sorted((paths.project_root() / "group_data").glob("*.py")):
        out[f"group_data/{source.name}"] = HEADER + source.read_text()
    return out


def write(directory: Path, *, force: bool = False) -> list[Path]:
    """Write the starter files under ``directory``; UsageError (exit 64) if one is there."""
    todo = {directory / rel: text for rel, text in files().items()}
    there = [str(p) for p in todo if p.exists()]
    if there and not force:
        raise UsageError(f"{there[0]} is there already (--force overwrites)")
    for path, text in todo.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(todo)
