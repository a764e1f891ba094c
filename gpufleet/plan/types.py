"""What a plan is made of: its changes, the apt sources, fetches and builds it carries, the
``HostPlan`` the deploys apply, and the ``PlanOptions`` a run plans with.

Pure data: the decisions that fill it live in one module per step (``docker_engine``,
``container_toolkit``, ``gpu_probe``, ``layout``, ``models``, ``services``, ``release``), put
together by ``gpufleet.plan.host.plan_host``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpufleet.core.hubcache import CachedFile
from gpufleet.core.release import Release
from gpufleet.core.schema import LlamaBuild
from gpufleet.core.wire import Op
from gpufleet.plan.gate import ImageCheck


@dataclass(frozen=True)
class Change:
    """One difference between the host and its declared state, and what applying it does.

    + step: one of ``STEPS``
    + resource: what it touches (a path, a package set, a service, an image)
    + reason: one line, what was found and what is declared
    + action: what applying it does, in words for people (``drift`` prints it)
    + op: what applying it does, as the deploys dispatch on it (``Op.INSTALL``, ...)
    + expected/found: the two sides, short and secret-free (None where there is nothing)
    + recreates: services recreated because of it; restarts: system services restarted
    """

    step: str
    resource: str
    reason: str
    action: str
    op: Op
    expected: str | None = None
    found: str | None = None
    recreates: tuple[str, ...] = ()
    restarts: tuple[str, ...] = ()

    def as_item(self) -> dict:
        """The change as ``gpufleet drift --json`` prints it."""
        shown = ("step", "resource", "reason", "expected", "found", "action")
        return {name: getattr(self, name) for name in shown} | {"op": self.op.value}


@dataclass(frozen=True)
class AptSource:
    """A signed apt repository: its key (fetched by the host) and its list file."""

    title: str
    key_url: str
    keyring: str
    list_path: str
    line: str


@dataclass(frozen=True)
class ModelFetch:
    """A model file to download into its blob, verify, stamp and link into its snapshot."""

    model: str
    file: CachedFile
    url: str
    known_bad: bool = False  # hashed in this run and it differs: neither trust nor hash it again

    @property
    def size(self) -> int:
        return self.file.size


@dataclass(frozen=True)
class ModelMove:
    """A verified file where gpufleet kept models before the Hub cache, moved into its blob (a
    rename on one filesystem): no byte downloaded."""

    model: str
    legacy: str
    file: CachedFile


@dataclass(frozen=True)
class SnapshotLinks:
    """A snapshot made whole: each file linked to its blob, the ref of a branch or tag written,
    gpufleet's record that it placed the snapshot (what pruning may remove)."""

    repo: str
    commit: str
    files: tuple[CachedFile, ...]
    ref: str | None  # the ref file's path, for a revision that is not a commit sha
    placed: str


@dataclass(frozen=True)
class BuildPlan:
    """How a service's image is made on this host: built here, or received from a host that
    builds the same inputs in this run (``receive_from``)."""

    service: str
    ref: str
    context: str
    dockerfile: str
    inputs: str
    build: LlamaBuild
    receive_from: str | None = None
    receive_ref: str | None = None  # the builder's tag for the same image
    source_builds: bool = False  # the source host builds it in this run: wait for it


@dataclass(frozen=True)
class HostPlan:
    """What a host needs, in order, and the release it runs afterwards."""

    host: str
    group: str
    refusal: str | None = None
    warnings: tuple[str, ...] = ()
    changes: tuple[Change, ...] = ()
    release: Release | None = None
    apt_sources: dict[str, AptSource] = field(default_factory=dict)
    fetches: dict[str, ModelFetch] = field(default_factory=dict)
    # containers of the project that nothing declares: service -> container id, removed by id
    orphans: dict[str, str] = field(default_factory=dict)
    # blob -> its file: hashed in this run and whole, its stamp written again
    stamps: dict[str, CachedFile] = field(default_factory=dict)
    moves: dict[str, ModelMove] = field(default_factory=dict)  # blob -> the file moved into it
    snapshots: dict[str, SnapshotLinks] = field(default_factory=dict)  # snapshot dir -> links
    builds: dict[str, BuildPlan] = field(default_factory=dict)
    compose: str = ""
    gate_seconds: dict[str, int] = field(default_factory=dict)
    pulls: dict[str, tuple[str, ...]] = field(default_factory=dict)  # Ollama: service -> models
    # the state directory once the release is recorded or made current: its history (oldest
    # first) and the kept releases that fall out of it (removed); ids checked, never raw lines
    history: tuple[str, ...] = ()
    pruned: tuple[str, ...] = ()
    # a rollback: the kept release's public .env, rendered again with today's secrets
    restore_env: str = ""
    # kept releases whose whole .env (secret values) is rewritten to its public part
    migrate: tuple[str, ...] = ()
    # service -> the check its image passes once built or delivered in this run, before compose
    # starts anything from it (an image the host has now is checked by the plan itself)
    image_checks: dict[str, ImageCheck] = field(default_factory=dict)

    @property
    def in_sync(self) -> bool:
        return self.refusal is None and not self.changes

    def of(self, step: str) -> list[Change]:
        return [c for c in self.changes if c.step == step]

    def touches(self, step: str, resource: str | None = None) -> bool:
        return any(resource is None or c.resource == resource for c in self.of(step))

    @property
    def recreated(self) -> tuple[str, ...]:
        return tuple(c.resource for c in self.of("recreate") if c.op is Op.RECREATE)


@dataclass(frozen=True)
class PlanOptions:
    """How this run plans: which lease it holds, when it runs, which builds others make.

    + lease_id: the lease this run holds (a rollout's); another live lease refuses the host;
      ``*`` ignores leases (a rollout's first look, ``--dry``, which changes nothing)
    + now: epoch seconds, for lease expiry
    + builders: build inputs -> (host, image ref, whether that host builds it in this run):
      where every host needing those inputs gets the image (build once per fleet)
    """

    lease_id: str | None = None
    now: float = 0.0
    builders: dict[str, tuple[str, str, bool]] = field(default_factory=dict)
