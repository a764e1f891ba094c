"""What crosses the boundary between a ``gpufleet`` command and the pyinfra run it starts.

A fleet command (drift, status, rollout, ...) starts ``pyinfra`` as a child process. Two things
cross between them, and both are typed here, once:

- **down**, the options the command asks the deploy for (``RunOptions``), as environment
  variables whose names are written only in this module;
- **up**, one ``HostReport`` per host (``RunReport``): the plan with typed changes, the
  snapshot, the step a host failed at and why, a lease another run holds, whether the host
  could be reached at all. The deploy fills it in; ``gpufleet.fleet.pyinfra_main`` writes it when
  the run ends, however it ends. No fleet decision reads pyinfra's console output.

Every change a plan makes carries an ``Op``: what applying it does, which the deploys dispatch
on. Its ``action`` sentence is for people (``drift`` prints it) and nothing branches on it.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from pydantic import Field

from gpufleet.core.model import FrozenModel
from gpufleet.core.release import Release
from gpufleet.core.snapshot import Lease, Snapshot


class _Wire(FrozenModel):
    """What crosses from a deploy to the fleet side: strict and frozen."""


# --- the plan-to-apply contract -----------------------------------------------------------


class Op(StrEnum):
    """What applying a change does: the deploys dispatch on this, never on the sentence."""

    INSTALL_KEY = "install-key"  # an apt signing key
    WRITE = "write"  # a file rendered from the plan
    INSTALL = "install"  # packages (the engine: installed and started)
    START = "start"  # a system service that is installed but not running
    CONFIGURE = "configure"  # keys gpufleet owns in a file another tool writes
    GENERATE = "generate"  # the CDI spec
    CREATE = "create"  # a directory
    FIX = "fix"  # a directory's mode or owner
    PULL = "pull"  # an image from its registry
    TRANSFER = "transfer"  # an image sent from the control machine
    BUILD = "build"  # an image built from source on the host
    RECEIVE = "receive"  # an image sent by the host that builds the same inputs
    PROBE = "probe"  # start a container with the GPU request
    FETCH = "fetch"  # a model file, downloaded and verified
    MOVE = "move"  # a verified model file, moved into the Hub cache (no download)
    LINK = "link"  # a model's snapshot: its links to the blobs, its ref, gpufleet's record
    REMOVE = "remove"  # a model directory or a container no longer declared
    RECREATE = "recreate"  # a service's container
    GATE = "gate"  # health and a chat, after a recreate or a pull
    RECORD = "record"  # a new release in the host's state directory
    # a rollback's own: everything comes back from what the release kept on the host
    RETAG = "retag"  # the image the release ran, kept by a tag
    RESTORE = "restore"  # a file from the release's copy
    MAKE_CURRENT = "make-current"  # the release becomes the current one again


# The order changes are applied in; each step's changes follow the previous step's. The
# converge applies the steps in this order and a unit test holds it to this tuple.
STEPS = (
    "engine",
    "toolkit",
    "daemon",
    "cdi",
    "probe",
    "layout",
    "env",
    "model",
    "image",
    "build",
    "compose",
    "recreate",
    "gate",
    "release",
)


class ChangeRecord(_Wire):
    """A planned change as a report carries it (``gpufleet.plan.types.Change``, as data)."""

    step: str
    op: Op
    resource: str
    reason: str
    action: str
    expected: str | None = None
    found: str | None = None
    recreates: tuple[str, ...] = ()
    restarts: tuple[str, ...] = ()


# --- down: the options a command gives the deploy -----------------------------------------

_ENV = {
    "deep": "GPUFLEET_DEEP",
    "lease_id": "GPUFLEET_LEASE",
    "chat": "GPUFLEET_CHAT",
    "restore": "GPUFLEET_RESTORE",
    "status": "GPUFLEET_STATUS",
    "releases": "GPUFLEET_RELEASES",
    "audit": "GPUFLEET_AUDIT_TAIL",
    "lease_action": "GPUFLEET_LEASE_ACTION",
    "lease": "GPUFLEET_LEASE_DOCUMENT",
    "audit_lines": "GPUFLEET_AUDIT",
    "now": "GPUFLEET_NOW",
}
ENV_NAMES = frozenset(_ENV.values())
REPORT_ENV = "GPUFLEET_REPORT"  # where the run writes its ``RunReport``
ALL_LEASES = "*"  # ``lease_id`` that reads past every lease: a first look, --dry only


class RunOptions(_Wire):
    """What a fleet command asks of the pyinfra run it starts.

    + deep: re-hash model files (``gpufleet drift --deep``)
    + lease_id: the rollout lease this run holds; ``*`` reads past any lease (dry runs only)
    + chat: health probes also ask each chat service for one token (a rollout's gate)
    + restore: host (or ``*``) -> a kept release to go back to (a rollback)
    + status/releases/audit: also read a GPU sample, the kept releases, the audit log's last
      ``audit`` lines (``gpufleet status``, ``releases``, ``audit``)
    + lease_action/lease/now/audit_lines: for ``deploys/lease.py`` only: take, release or
      break the lease document ``lease`` at epoch ``now``, appending host -> audit line

    .. code:: python

        env = RunOptions(deep=True).to_env()        # {"GPUFLEET_DEEP": "1"}
        RunOptions.from_env(os.environ).deep        # True, in the deploy
    """

    deep: bool = False
    lease_id: str | None = None
    chat: bool = False
    restore: dict[str, str] | None = None
    status: bool = False
    releases: bool = False
    audit: int = 0
    lease_action: str | None = None
    lease: dict[str, Any] | None = None
    now: float = 0.0
    audit_lines: dict[str, str] = Field(default_factory=dict)

    def to_env(self) -> dict[str, str]:
        """The options as environment variables; defaults are left out."""
        env = {}
        for name, value in self.model_dump(exclude_defaults=True).items():
            if isinstance(value, bool):
                value = "1" if value else "0"
            elif isinstance(value, dict):
                value = json.dumps(value, sort_keys=True)
            env[_ENV[name]] = str(value)
        return env

    @classmethod
    def from_env(cls, environ) -> RunOptions:
        """The options a command set (``environ``: ``os.environ`` or a dict). A value that
        does not parse raises ValueError naming the variable."""
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = environ.get(_ENV[name])
            if raw in (None, ""):
                continue
            try:
                if field.annotation in (bool, "bool"):
                    values[name] = raw == "1"
                elif name in ("restore", "lease", "audit_lines"):
                    values[name] = json.loads(raw)
                else:
                    values[name] = raw
            except ValueError:
                raise ValueError(f"{_ENV[name]}={raw[:60]!r} is not valid JSON") from None
        try:
            return cls.model_validate(values)
        except ValueError as exc:
            raise ValueError(f"gpufleet run options: {exc}") from None


# --- up: what the run reports per host ------------------------------------------------------


class ServiceRecord(_Wire):
    """An enabled service as the fleet commands need it without its group data."""

    kind: str
    port: int
    # llama-server's model name, else what a chat asks for (vLLM's id, Ollama's first
    # model); None: an Ollama with nothing to pull
    model: str | None
    image: str
    address: str  # where the host itself reaches it


class SshRecord(_Wire):
    """How pyinfra reaches the host (for bench's port forward)."""

    hostname: str
    port: int = 22
    user: str | None = None
    key: str | None = None
    known_hosts: str | None = None
    sudo: bool = False


class Failure(_Wire):
    """Why a host failed in this run: the operation (or read) it failed at, and gpufleet's
    reason where it gave one (a health gate's, a download's), with the log lines it showed."""

    step: str
    why: str
    log: tuple[str, ...] = ()


class HostReport(_Wire):
    """One host's part of a run, written by the deploy, read by every fleet command.

    A host is exactly one of: ``unreachable`` (no connection, or it stopped answering before
    its plan), planned (``snapshot`` set; ``refusal`` when its gate refused it), or failed
    before its plan (``failed`` set, no snapshot). A planned host may also have ``failed``:
    applying its plan broke at that step.
    """

    host: str
    group: str | None = None
    unreachable: str | None = None
    refusal: str | None = None
    warnings: tuple[str, ...] = ()
    changes: tuple[ChangeRecord, ...] = ()
    release: Release | None = None
    release_id: str | None = None
    snapshot: Snapshot | None = None
    services: dict[str, ServiceRecord] = {}
    # every setting of each service (secret names, never values), for gpufleet bench
    settings: dict[str, dict[str, Any]] = {}
    secret_sources: dict[str, str] = {}  # where each secret is read on the control machine
    unified_memory: bool = False
    jetson: bool = False
    ssh: SshRecord | None = None
    failed: Failure | None = None
    lease_held: Lease | None = None  # another run's lease that refused a take
    lease_error: str | None = None  # a lease file that is not a lease: one line, what to do
    seconds: float | None = None  # from connecting to the end of its plan

    @property
    def planned(self) -> bool:
        return self.snapshot is not None

    @property
    def current(self) -> str | None:
        """The release the host runs now (None before its first converge)."""
        return self.snapshot.state.current if self.snapshot else None


class RunReport(_Wire):
    """A whole run: each host's report in inventory order, and what ended the run, if
    anything did (invalid host data, no host left)."""

    hosts: dict[str, HostReport] = {}
    order: tuple[str, ...] = ()
    fatal: str | None = None

    def ordered(self) -> list[HostReport]:
        seen = [self.hosts[h] for h in self.order if h in self.hosts]
        return seen + [r for h, r in sorted(self.hosts.items()) if h not in self.order]
