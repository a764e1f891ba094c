"""The fleet as the inventory and group data declare it, read without connecting to a host.

``load`` builds each host's ``HostConfig`` the way a converge does (pyinfra's own inventory
loader, so group data, ``gpufleet_group`` and per-host overrides merge exactly as in
``pyinfra inventory/hosts.py deploys/fleet.py``; then ``gpufleet.core.schema.parse``), without
pyinfra's run and without reading a secret's value::

    hosts = load("inventory/hosts.py", limit=("spark",))
    hosts[0].config.services["llama"].port      # 8000
    hosts[0].address                            # where Prometheus reaches it
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from gpufleet.core.schema import ConfigError, HostConfig, host_group, parse
from gpufleet.fleet.runner import UsageError


@dataclass(frozen=True)
class FleetHost:
    """One host: its validated config, the address Prometheus scrapes, and its inventory
    groups (for ``--limit``)."""

    config: HostConfig
    address: str
    groups: tuple[str, ...]


def _selected(name: str, groups: tuple[str, ...], names: list[str]) -> bool:
    return name in names or any(g in names for g in groups)


def _names(values: tuple[str, ...]) -> list[str]:
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def load(
    inventory: str,
    *,
    limit: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    cwd: str | None = None,
) -> list[FleetHost]:
    """Every selected host of ``inventory``, validated; ConfigError names each bad field.

    + inventory: a pyinfra inventory file
    + limit/exclude: host or group names, as pyinfra's ``--limit``/``--exclude`` take them
    + cwd: the project directory holding ``group_data/`` (default: the current one)
    """
    from pyinfra.api import State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    if not Path(inventory).is_file():
        raise UsageError(f"inventory {inventory} not found (run from the project directory)")
    cwd = cwd or os.getcwd()
    with ctx_state.use(State(check_for_changes=False)):
        inv = make_inventory(inventory, cwd=cwd)
    chosen, dropped = _names(limit), _names(exclude)
    hosts, errors = [], []
    for target in inv:
        groups = tuple(target.groups)
        if chosen and not _selected(target.name, groups, chosen):
            continue
        if dropped and _selected(target.name, groups, dropped):
            continue
        data = target.data.dict()
        try:
            config = parse(target.name, host_group(target.name, groups, data), data)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        address = config.monitor.address or data.get("ssh_hostname") or target.name
        hosts.append(FleetHost(config=config, address=str(address), groups=groups))
    if errors:
        raise ConfigError("\n".join(sorted(errors)))
    return hosts


def releases_from_report(path: str | None) -> dict[str, dict]:
    """host -> what a ``gpufleet status --json`` or ``drift --json`` document says of it:
    ``{"release": id or None, "gpu": the first GPU's name or None}``.

    + path: the document; None gives {} (then targets carry no release label)
    """
    if path is None:
        return {}
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"report {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") not in (
        "gpufleet.status/1",
        "gpufleet.drift/1",
    ):
        raise UsageError(f"report {path}: not a gpufleet.status/1 or gpufleet.drift/1 document")
    out = {}
    for entry in doc.get("hosts") or []:
        release = (entry.get("release") or {}).get("current")
        gpus = entry.get("gpus") or []
        out[entry["host"]] = {"release": release, "gpu": (gpus[0].get("name") if gpus else None)}
    return out
