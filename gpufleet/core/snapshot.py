"""The typed snapshot of a host: what the facts read, as values, kept typed to the end.

Facts (``facts/``) parse remote output into these models; the gate and the plan read them.
Nothing here does I/O. Every model is frozen and strict, so a parser that forgets a field or
invents one fails in its unit test rather than on a host::

    snapshot.identity.nvidia.driver_version   # "580.95.05"
    snapshot.files["/opt/gpufleet/.env"]      # FileState(kind="file", sha256=..., mode="600", ...)
    snapshot.compose.containers["llama"]      # Container(state="running", inputs=..., ...)
    snapshot.health["llama"].ok               # the service answered its health endpoint

A missing program yields the empty value (no Docker: ``DockerInfo.present`` is False), never an
error: "absent" is a state like any other.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from gpufleet.core.model import FrozenModel


class Model(FrozenModel):
    def to_json(self) -> dict:
        """The value as JSON data (pyinfra's ``fact`` command prints facts with this)."""
        return self.model_dump(mode="json")


# --- identity: the host, its NVIDIA stack, Jetson, Docker ---------------------------------


class HostInfo(Model):
    arch: str
    os_id: str | None
    os_version: str | None
    os_pretty: str | None
    os_codename: str | None
    mem_total_bytes: int
    mem_available_bytes: int
    disk_path: str
    disk_free_bytes: int | None


class Gpu(Model):
    index: int
    name: str
    uuid: str | None
    compute_cap: str | None
    memory_total_mib: int | None
    bus_id: str | None


NvidiaStatus = Literal["ok", "absent", "no-driver", "mismatch", "error"]


class NvidiaInfo(Model):
    status: NvidiaStatus
    driver_version: str | None
    cuda_version: str | None
    gpus: tuple[Gpu, ...]
    message: str | None


class L4tInfo(Model):
    l4t: str
    major: int
    revision: str
    board: str | None
    jetpack: str | None
    cuda: str | None


class DockerInfo(Model):
    present: bool
    version: str | None
    compose_version: str | None
    binaries: str | None = None  # the docker CLI and compose plugin as stat saw them
    active: bool
    daemon_json: dict[str, Any] | None
    daemon_json_error: str | None
    runtimes: tuple[str, ...]
    default_runtime: str | None
    toolkit_packages: dict[str, str]


class Identity(Model):
    host: HostInfo
    nvidia: NvidiaInfo
    jetson: L4tInfo | None
    docker: DockerInfo


# --- what gpufleet manages --------------------------------------------------------------


class FileState(Model):
    """A managed path as found: a file (with its content hash) or a directory."""

    kind: Literal["file", "dir"]
    sha256: str | None
    mode: str
    owner: str
    group: str

    def describe(self) -> str:
        return f"{self.kind} {self.mode} {self.owner}:{self.group}"


class ModelFileState(Model):
    """A blob in the Hub cache (or a file where gpufleet kept models before), and its stamp."""

    size: int
    mtime: int
    stamp: str | None  # "<etag> <size>", written by gpufleet after hashing
    stamp_mtime: int | None
    digest: str | None = Field(
        None, description="Hashed now (sha256, or git blob sha1 for a blob so named); deep only"
    )


class ModelsState(Model):
    """The model store as the plan needs it (``gpufleet.core.hubcache`` names the paths).

    + files: blob path -> its state (None: absent)
    + incomplete: blob path -> bytes in its ``.incomplete`` (a download under way or stopped)
    + links: snapshot path -> where its symlink points (None: absent or not a link)
    + legacy: a file where gpufleet kept models before the Hub layout -> its state (migrated)
    + refs: ``refs/<revision>`` path -> the commit it holds
    + snapshots: every ``models--Org--Repo/<commit>`` in the cache, whoever placed it
    + placed: the snapshots gpufleet placed (only these are ever pruned)
    """

    files: dict[str, ModelFileState | None] = {}
    incomplete: dict[str, int] = {}
    links: dict[str, str | None] = {}
    legacy: dict[str, ModelFileState | None] = {}
    refs: dict[str, str | None] = {}
    snapshots: tuple[str, ...] = ()
    placed: tuple[str, ...] = ()


class Container(Model):
    id: str
    state: str
    inputs: str | None
    health: Literal["healthy", "unhealthy", "starting"] | None
    status: str = ""
    restarts: int = 0  # Docker's restart count: a crash loop caught between two restarts


class LocalImage(Model):
    id: str
    inputs: str | None
    labels: dict[str, str] = {}


class ComposeState(Model):
    containers: dict[str, Container] = {}
    images: dict[str, LocalImage | None] = {}


class Probe(Model):
    """A service's health endpoint, asked from the host itself."""

    port: int
    path: str
    status: int | None  # HTTP status, None when nothing answered
    error: str | None = None  # then why: "timeout" (hung), "refused", "reset", ...
    chat: bool | None = None  # a one-token chat completion answered (None: not asked)

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def hung(self) -> bool:
        """Something holds the port but never answers: a frozen or deadlocked server."""
        return self.status is None and self.error == "timeout"

    def describe(self) -> str:
        return f"HTTP {self.status}" if self.status else f"no answer ({self.error or 'none'})"


class Lease(Model):
    """Who holds the host for a rollout, until when (epoch seconds)."""

    id: str
    holder: str
    control: str
    pid: int | None = None
    release: str | None = None
    started: float
    expires: float
    message: str | None = None  # a maintenance window's reason (``gpufleet lock acquire``)


class KeptRelease(Model):
    at: int  # when it was recorded (epoch seconds, the directory's mtime)
    manifest: Any = None  # gpufleet.core.release.Release; None when its manifest does not parse


class StateDir(Model):
    """gpufleet's own directory on the host: releases kept for rollback, the lease."""

    current: str | None = None
    releases: tuple[str, ...] = ()  # kept, oldest first
    kept_models: tuple[str, ...] = ()  # models the kept releases use: never pruned
    secret_copies: tuple[str, ...] = ()  # kept releases still holding a whole .env (to migrate)
    problems: tuple[str, ...] = ()  # state that is not gpufleet's (a bad history line): ignored
    lease: Lease | None = None
    lease_error: str | None = None
    kept: dict[str, KeptRelease] = {}  # read for `gpufleet releases` only
    audit: tuple[str, ...] = ()  # the audit log's last lines, for `gpufleet audit` only


class Snapshot(Model):
    """Everything a plan needs from one host, read in one remote command."""

    identity: Identity
    files: dict[str, FileState | None] = {}
    models: ModelsState = ModelsState()
    compose: ComposeState = ComposeState()
    health: dict[str, Probe] = {}
    state: StateDir = StateDir()
    gpu_now: tuple[str, ...] = ()  # one GPU sample (gpufleet.core.gpu), for `gpufleet status`
    # the metrics textfile's last converge time (`gpufleet status` rewrites the file as found)
    metrics_converged_at: float | None = None
    deep: bool = False
