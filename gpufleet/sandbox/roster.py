"""Who is in the sandbox: its hosts, their profiles, groups and ports, and where it keeps state.

The base fleet is the three demo hosts (spark, rtx5090, jetson), two that fail the preflight
gate (``broken``) and one fresh workstation for ``gpufleet bootstrap``. Extra hosts of a group
(``gpufleet sandbox up --extra rtx5090=4``) are light: they ship Docker and receive the
llama.cpp image from the control machine instead of building it, so a rollout has batches to
walk through at little cost.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# name, profile, groups: the broken hosts also sit in the group whose minimums they fail, so the
# gate message names that group; `--exclude broken` leaves the demo fleet.
BASE = (
    ("sandbox-spark", "spark", ("spark",)),
    ("sandbox-rtx5090", "rtx5090", ("rtx5090",)),
    ("sandbox-jetson", "jetson", ("jetson",)),
    ("sandbox-old-driver", "old-driver", ("spark", "broken")),
    ("sandbox-no-driver", "no-driver", ("rtx5090", "broken")),
    ("sandbox-fresh", "fresh", ("fresh",)),
)
# The profile an extra host of each group gets: the group's identity, Docker already there.
LIGHT_PROFILE = {"spark": "spark", "rtx5090": "rtx5090-light", "jetson": "jetson"}
MAX_EXTRA = 13  # 3 demo hosts + 13 extras = 16 serving hosts


@dataclass(frozen=True)
class HostSpec:
    name: str
    profile: str
    groups: tuple[str, ...]
    port: int
    light: bool = False

    @property
    def container(self) -> str:
        return f"gpufleet-{self.name}"

    @property
    def bootstrap(self) -> bool:
        return self.profile == "fresh"


def parse_extras(text: str) -> dict[str, int]:
    """``"rtx5090=4,spark=1"`` -> ``{"rtx5090": 4, "spark": 1}``; ValueError names the part."""
    extras: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(spark|rtx5090|jetson)=(\d+)", part)
        if not match:
            raise ValueError(f"{part!r}: write GROUP=COUNT with GROUP spark, rtx5090 or jetson")
        extras[match[1]] = int(match[2])
    if sum(extras.values()) > MAX_EXTRA:
        raise ValueError(f"at most {MAX_EXTRA} extra hosts (16 serving hosts in all)")
    return extras


@dataclass
class Sandbox:
    """Where the sandbox keeps its state, which ports it publishes, and its hosts."""

    state: Path = field(
        default_factory=lambda: Path(os.environ.get("GPUFLEET_SANDBOX_DIR", ".sandbox")).resolve()
    )
    port_base: int = int(os.environ.get("GPUFLEET_SANDBOX_PORT_BASE", "2221"))
    mirror_port: int = int(os.environ.get("GPUFLEET_SANDBOX_MIRROR_PORT", "8780"))
    log: Callable[[str], None] = field(
        default=lambda msg: print(f"sandbox: {msg}", file=sys.stderr)
    )

    @property
    def extras_file(self) -> Path:
        return self.state / "extras.json"

    @property
    def extras(self) -> dict[str, int]:
        """Extra hosts per group, as the last ``up --extra`` asked (kept until ``down``)."""
        try:
            return {k: int(v) for k, v in json.loads(self.extras_file.read_text()).items()}
        except (OSError, ValueError):
            return {}

    def set_extras(self, extras: dict[str, int]) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.extras_file.write_text(json.dumps(extras, sort_keys=True) + "\n")

    @property
    def hosts(self) -> list[HostSpec]:
        specs = [HostSpec(n, p, g, self.port_base + i) for i, (n, p, g) in enumerate(BASE)]
        for group in ("spark", "rtx5090", "jetson"):
            for k in range(2, 2 + self.extras.get(group, 0)):
                name, port = f"sandbox-{group}-{k}", self.port_base + len(specs)
                specs.append(HostSpec(name, LIGHT_PROFILE[group], (group,), port, light=True))
        return specs

    @property
    def ssh_dir(self) -> Path:
        return self.state / "ssh"

    @property
    def token_file(self) -> Path:
        return self.state / "hf_token"

    @property
    def password_file(self) -> Path:
        return self.state / "bootstrap_password"

    @property
    def hosts_file(self) -> Path:
        return self.state / "hosts.json"
