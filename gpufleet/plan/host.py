"""A host's plan: the declared state compared with one snapshot, as data.

``plan_host(config, snapshot, control)`` is pure: the validated host config, the typed host
snapshot (``gpufleet.core.snapshot``, one remote command) and the control machine's inputs
(``gpufleet.control.inputs``) in, a ``HostPlan`` out. Every decision gpufleet makes about a host is
made here, once per host per run; ``deploys/`` only apply what a plan lists, and ``gpufleet
drift``, ``status`` and ``rollout`` print or sequence the same plans.

A plan is an ordered list of changes, each with its step, the resource it touches, a reason
that says what was found and what is declared, and what it restarts or recreates::

    Change(step="toolkit", resource="nvidia-container-toolkit", action="install",
           reason="toolkit 1.17.8-1 installed, 1.18.0-1 declared", ...)

and the ``Release`` the host runs once the plan is applied. A host that must not be changed
(the GPU gate, an unreadable daemon.json, a lease held by another run, a model that does not
fit, an image whose binary holds no code for the host's GPU) gets a plan that is only its
refusal. Secret values never enter a plan: the ``.env`` is compared by the hash of what would
be written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.control.inputs import ControlInputs
from gpufleet.core import known
from gpufleet.core.duration import parse_duration
from gpufleet.core.release import ModelFileRelease, Release, ServiceRelease
from gpufleet.core.render import (
    FETCH_SCRIPT,
    build_inputs,
    render_compose,
    render_dockerfile,
)
from gpufleet.core.schema import HostConfig, LlamaBuild, LlamaServer, Ollama, Service
from gpufleet.core.snapshot import Container, FileState, ModelFileState, Snapshot
from gpufleet.core.wire import STEPS, Op
from gpufleet.plan.gate import GateResult, ImageCheck, check_host, image_check

MIB = 1024**2


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
    """A model file to download and verify."""

    model: str
    dest: str
    url: str
    sha256: str
    size: int
    known_bad: bool = False  # hashed in this run and it differs: neither trust nor hash it again


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
    # model file -> "<sha256> <size>": hashed in this run and whole, its stamp written again
    stamps: dict[str, str] = field(default_factory=dict)
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


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _short(digest: str | None) -> str:
    return f"sha256:{digest[:12]}" if digest else "absent"


class _Builder:
    """Collects changes in step order while a plan is made."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.apt: dict[str, AptSource] = {}

    def add(self, step: str, resource: str, reason: str, action: str, *, op: Op, **kw) -> Change:
        change = Change(step=step, resource=resource, reason=reason, action=action, op=op, **kw)
        self.changes.append(change)
        return change

    def has(self, step: str, resource: str) -> bool:
        return any(c.step == step and c.resource == resource for c in self.changes)

    def ordered(self) -> tuple[Change, ...]:
        return tuple(sorted(self.changes, key=lambda c: STEPS.index(c.step)))

    def plan(self, config: HostConfig, warnings: tuple[str, ...], **fields) -> HostPlan:
        """The plan of the changes collected so far, in step order."""
        return HostPlan(
            host=config.host,
            group=config.group,
            warnings=warnings,
            changes=self.ordered(),
            apt_sources=dict(self.apt),
            **fields,
        )


# --- refusals: found before the first change --------------------------------------------


def lease_refusal(snap: Snapshot, options: PlanOptions) -> str | None:
    """Why another run's lease keeps this host from being changed, or None."""
    state = snap.state
    if options.lease_id == "*":  # a look that changes nothing: any lease may stand
        return None
    if state.lease_error:
        return f"{state.lease_error}; break it with `gpufleet lock break` if no rollout runs"
    lease = state.lease
    if lease is None or lease.id == options.lease_id or lease.expires <= options.now:
        return None
    left = int(lease.expires - options.now)
    if lease.message:
        return (
            f"held by {lease.holder} for maintenance: {lease.message!r} ({left}s left); "
            "`gpufleet lock release` ends it"
        )
    return (
        f"leased by {lease.holder} on {lease.control} for a rollout"
        f"{f' of release {lease.release}' if lease.release else ''} ({left}s left); wait for it, "
        "or `gpufleet lock break` if that run is gone"
    )


def space_refusal(fetches: list[ModelFetch], snap: Snapshot) -> str | None:
    """Why the files still to fetch cannot fit, checked before any byte is fetched."""
    missing = sum(f.size for f in fetches)
    host = snap.identity.host
    if missing and host.disk_free_bytes is not None and missing > host.disk_free_bytes:
        return (
            f"models need {missing / 2**30:.1f} GiB more in {host.disk_path}, "
            f"which has {host.disk_free_bytes / 2**30:.1f} GiB free"
        )
    return None


def toolkit_unavailable(config: HostConfig, offered: dict[str, list[str]], url: str) -> str | None:
    """Why the pinned toolkit cannot be installed from the repository that offers ``offered``.

    + offered: ``facts.aptrepo.FlatRepoVersions`` of the repository (``{"": [why]}`` when
      unreachable)
    """
    if "" in offered:
        return f"cannot read the toolkit repository {url}: {offered[''][0]}"
    have = offered.get(known.TOOLKIT_PACKAGES[0], [])
    if config.toolkit.version not in have:
        return (
            f"NVIDIA Container Toolkit {config.toolkit.version} is not in {url} "
            f"(it has {', '.join(have) or 'no nvidia-container-toolkit'}); "
            "set toolkit_version to one of those"
        )
    return None


def toolkit_repo_url(config: HostConfig, snap: Snapshot) -> str:
    return config.toolkit.repo_url.replace("$(ARCH)", known.deb_arch(snap.identity.host.arch))


# --- host setup -------------------------------------------------------------------------


def engine_packages(config: HostConfig, snap: Snapshot) -> list[str]:
    """Packages this host lacks: the engine where none is present, else only the plugin."""
    docker = snap.identity.docker
    wanted = []
    if not docker.present:
        engine = list(config.docker.engine_packages)
        if config.docker.version:
            engine[0] = f"{engine[0]}={config.docker.version}"
        wanted += engine
    if not docker.present or not docker.compose_version:
        wanted += config.docker.compose_packages
    return wanted


def apt_line(*, keyring: str, url: str, dist: str) -> str:
    return f"deb [signed-by={keyring}] {url} {dist}\n"


def docker_source(config: HostConfig, snap: Snapshot) -> AptSource:
    """Docker's repository (``{os_id}``/``{codename}`` come from the host)."""
    fmt = {"os_id": snap.identity.host.os_id, "codename": snap.identity.host.os_codename}
    settings = config.docker
    line = apt_line(
        keyring=settings.keyring,
        url=(settings.repo_url or "").format(**fmt),
        dist=settings.repo_dist.format(**fmt),
    )
    key_url = settings.key_url.format(**fmt)
    return AptSource("Docker", key_url, settings.keyring, known.DOCKER_LIST, line)


def toolkit_source(config: HostConfig) -> AptSource:
    tk = config.toolkit
    line = apt_line(keyring=tk.keyring, url=tk.repo_url, dist="/")
    return AptSource("NVIDIA Container Toolkit", tk.key_url, tk.keyring, tk.list_path, line)


def _write(b: _Builder, step: str, path: str, state: FileState | None, text: str, why: str) -> None:
    """A file gpufleet writes whole: a change when it is absent or its bytes are not ``text``."""
    wanted = _sha(text)
    if state is None or state.sha256 != wanted:
        found = _short(state.sha256) if state else "absent"
        b.add(step, path, why, "write", expected=_short(wanted), found=found, op=Op.WRITE)


def _apt_source(b: _Builder, snap: Snapshot, step: str, source: AptSource) -> None:
    b.apt[step] = source
    if snap.files.get(source.keyring) is None:
        why = f"{source.title} signing key absent"
        b.add(
            step,
            source.keyring,
            why,
            "install key",
            expected="present",
            found="absent",
            op=Op.INSTALL_KEY,
        )
    listed = snap.files.get(source.list_path)
    why = f"{source.title} apt source {'absent' if listed is None else 'differs'}"
    _write(b, step, source.list_path, listed, source.line, why)


def _engine(b: _Builder, config: HostConfig, snap: Snapshot) -> None:
    docker = snap.identity.docker
    packages = engine_packages(config, snap)
    if packages:
        if config.docker.repo_url:
            _apt_source(b, snap, "engine", docker_source(config, snap))
        why = "no Docker engine found" if not docker.present else "no Compose v2 plugin found"
        b.add(
            "engine",
            " ".join(packages),
            why,
            "install and start",
            expected="installed",
            found="absent",
            op=Op.INSTALL,
        )
    elif not docker.active:
        b.add(
            "engine",
            "docker.service",
            "the Docker engine is not running; images and services are planned once it runs",
            "start",
            expected="active",
            found="inactive",
            op=Op.START,
        )


def engine_stopped(snap: Snapshot) -> bool:
    """Installed but not running: the snapshot could not see images, containers or health,
    so nothing that depends on them can be decided from it (a converge starts the engine,
    reads the host again and plans from that: ``deploys/_converge.py``)."""
    docker = snap.identity.docker
    return docker.present and not docker.active


def owned_daemon_keys(daemon: dict | None, *, set_default: bool, cdi: bool) -> list[str]:
    """The keys of daemon.json that gpufleet owns and that differ from what it wants."""
    daemon = daemon or {}
    drift = []
    if (daemon.get("runtimes") or {}).get("nvidia") != known.NVIDIA_RUNTIME:
        drift.append("runtimes.nvidia")
    if set_default and daemon.get("default-runtime") != "nvidia":
        drift.append("default-runtime")
    if cdi and (daemon.get("features") or {}).get("cdi") is not True:
        drift.append("features.cdi")
    return drift


def toolkit_mismatch(config: HostConfig, snap: Snapshot) -> dict[str, str | None]:
    """Toolkit packages whose installed version (None: absent) differs from the pin."""
    installed = snap.identity.docker.toolkit_packages
    versions = {p: installed.get(p) for p in known.TOOLKIT_PACKAGES}
    return {p: v for p, v in versions.items() if v != config.toolkit.version}


def _toolkit(b: _Builder, config: HostConfig, snap: Snapshot) -> bool:
    tk = config.toolkit
    _apt_source(b, snap, "toolkit", toolkit_source(config))
    mismatch = toolkit_mismatch(config, snap)
    install = bool(mismatch)
    if install:
        found = sorted({v or "absent" for v in mismatch.values()})
        if set(mismatch) == set(known.TOOLKIT_PACKAGES) and len(found) == 1:
            what = "not installed" if found == ["absent"] else f"{found[0]} installed"
            reason = f"toolkit {what}, {tk.version} declared"
        else:
            parts = ", ".join(f"{p} {v or 'absent'}" for p, v in mismatch.items())
            reason = f"toolkit packages differ ({parts}), {tk.version} declared"
        b.add(
            "toolkit",
            "nvidia-container-toolkit",
            reason,
            "install",
            expected=tk.version,
            found=", ".join(found),
            op=Op.INSTALL,
        )
    daemon = snap.identity.docker.daemon_json
    keys = owned_daemon_keys(daemon, set_default=tk.set_default_runtime, cdi=tk.cdi)
    if keys:
        b.add(
            "daemon",
            known.DAEMON_JSON,
            f"{', '.join(keys)} not as gpufleet sets them",
            "configure the nvidia runtime",
            expected=", ".join(keys) + " set",
            found="absent" if daemon is None else "different",
            restarts=("docker",),
            op=Op.CONFIGURE,
        )
    if tk.cdi and (snap.files.get(known.CDI_SPEC) is None or install):
        why = "toolkit changes" if install else "no CDI spec"
        b.add("cdi", known.CDI_SPEC, why, "generate", op=Op.GENERATE)
    # the probe proves GPU containers start: worth running when anything between them changed
    return bool(install or keys or not snap.identity.docker.present)


def _image_present(snap: Snapshot, ref: str, source: str, local_id: str | None) -> str | None:
    """Why an image must be delivered, or None when the host has it (the same id if sent)."""
    present = snap.compose.images.get(ref)
    if present is None:
        return "absent"
    if source == "transfer" and present.id != local_id:
        return f"id {present.id[:19]} differs from the control machine's {str(local_id)[:19]}"
    return None


def _probe(b: _Builder, config: HostConfig, snap: Snapshot, control: ControlInputs) -> None:
    probe = config.probe
    ref = probe.image.ref
    why = _image_present(snap, ref, probe.image.source, control.local_images.get(ref))
    if why:
        how = probe.image.source
        b.add("probe", ref, f"probe image {why}", how, expected="present", found=why, op=Op(how))
    why = "the GPU plumbing changed: a container with the GPU request must start"
    b.add("probe", "gpu", why, "run the GPU probe", expected="exit 0", op=Op.PROBE)


def _dir_matches(state: FileState | None, mode: str, owner: str, group: str) -> bool:
    return (
        state is not None
        and state.kind == "dir"
        and (state.mode, state.owner, state.group) == (mode.lstrip("0") or "0", owner, group)
    )


def _directory(
    b: _Builder, snap: Snapshot, step: str, path: str, mode: str, owner: str, group: str
) -> None:
    state = snap.files.get(path)
    if not _dir_matches(state, mode, owner, group):
        expected = f"dir {mode.lstrip('0')} {owner}:{group}"
        b.add(
            step,
            path,
            f"directory {state.describe() if state else 'absent'}, {expected} declared",
            "create" if state is None else "fix",
            expected=expected,
            found=state.describe() if state else "absent",
            op=Op.CREATE if state is None else Op.FIX,
        )


def _layout(b: _Builder, config: HostConfig, snap: Snapshot, control: ControlInputs) -> None:
    lay = config.layout
    _directory(b, snap, "layout", lay.stack_dir, "755", "root", "root")
    access = (lay.models_mode, lay.models_owner, lay.models_group)
    _directory(b, snap, "layout", lay.models_dir, *access)
    env = snap.files.get(lay.env_path)
    wanted = "file 600 root:root"
    # a service reads its secrets from the .env when it is created: new values need a new
    # container (the inputs label holds no secret, so it does not say so itself)
    readers = secret_readers(config)
    if env is None:
        b.add(
            "env",
            lay.env_path,
            "absent",
            "write (0600, atomically)",
            expected=wanted,
            found="absent",
            op=Op.WRITE,
            recreates=readers,
        )
    elif env.sha256 != control.env_sha256 or env.describe() != wanted:
        why = []
        if env.describe() != wanted:
            why.append(f"{env.describe()} found, {wanted} declared")
        if env.sha256 != control.env_sha256:
            why.append("content differs")  # never a value, nor its hash: secrets live here
        b.add(
            "env",
            lay.env_path,
            "; ".join(why),
            "write (0600, atomically)",
            expected=wanted,
            found=env.describe(),
            op=Op.WRITE,
            recreates=readers if env.sha256 != control.env_sha256 else (),
        )


def secret_readers(config: HostConfig) -> tuple[str, ...]:
    """Enabled services that are given a secret from the ``.env`` (an API key, a Hub token)."""
    return tuple(
        name
        for name, svc in config.enabled_services.items()
        if getattr(svc, "api_key_secret", None) or getattr(svc, "hf_token_secret", None)
    )


# --- models -----------------------------------------------------------------------------


def unverified_reason(state: ModelFileState | None, *, sha256: str, size: int) -> str | None:
    """Why a model file cannot be trusted as it is, or None when it is whole and verified.

    A stamp (``<file>.verified``, written by fetch-model after hashing) newer than the file
    and naming this sha256 and size means verified, at the cost of a ``stat``; a deep check's
    hash overrides it.
    """
    if state is None:
        return "absent"
    if state.size != size:
        return f"size {state.size} found, {size} declared"
    if state.sha256 is not None and state.sha256 != sha256:
        return f"sha256 {state.sha256[:12]} found, {sha256[:12]} declared"
    if state.sha256 == sha256:
        return None  # hashed in this read: whatever its stamp says (see ``stale_stamp``)
    if state.stamp is None or state.stamp_mtime is None:
        return "never verified (no stamp)"
    if state.stamp != f"{sha256} {size}":
        return "verified as another file (stamp differs)"
    if state.stamp_mtime < state.mtime:
        return "changed since it was verified"
    return None


def _models(
    b: _Builder,
    config: HostConfig,
    snap: Snapshot,
    control: ControlInputs,
    users: dict[str, list[str]],
) -> tuple[dict[str, ModelFetch], dict[str, str]]:
    fetches: dict[str, ModelFetch] = {}
    stamps: dict[str, str] = {}
    changes: list[Change] = []
    for name, resolved in control.models.items():
        for item in resolved.files:
            dest = f"{config.layout.models_dir}/{name}/{item.path}"
            state = snap.models.files.get(dest)
            why = unverified_reason(state, sha256=item.sha256, size=item.size)
            if why is None:
                if state is not None and stale_stamp(state, sha256=item.sha256, size=item.size):
                    # hashed in this read and whole: only its stamp is behind (a clock stepped
                    # back, a stamp lost); the next run sees it verified, nothing is recreated
                    stamps[dest] = f"{item.sha256} {item.size}"
                    changes.append(_stamp_change(dest))
                continue
            url = known.hub_file_url(config.hf_endpoint, resolved.repo, resolved.commit, item.path)
            known_bad = state is not None and state.sha256 is not None
            fetches[dest] = ModelFetch(
                model=name,
                dest=dest,
                url=url,
                sha256=item.sha256,
                size=item.size,
                known_bad=known_bad,
            )
            # a file a running service has mapped is replaced under it: recreate the service
            replaced = tuple(users.get(name, ())) if state is not None else ()
            changes.append(_fetch_change(fetches[dest], state, why, replaced))
    if fetches:
        script = snap.files.get(known.FETCH_MODEL)
        why = "fetch script absent" if script is None else "fetch script differs"
        _write(b, "model", known.FETCH_MODEL, script, FETCH_SCRIPT.read_text(), why)
    b.changes += changes
    if not config.models_keep_unused:
        _unused_models(b, config, snap)
    return fetches, stamps


def _stamp_change(dest: str) -> Change:
    """A file hashed in this read that matches, its stamp behind: the stamp written again."""
    return Change(
        "model",
        f"{dest}.verified",
        f"{Path(dest).name} was hashed again and matches; its stamp is older than the file "
        "or absent",
        "refresh the stamp",
        Op.WRITE,
        expected="stamp not older than the file",
        found="older or absent",
    )


def _fetch_change(
    fetch: ModelFetch, state: ModelFileState | None, why: str, recreates: tuple[str, ...]
) -> Change:
    """A model file fetched and verified, and the services recreated because it is replaced."""
    return Change(
        "model",
        fetch.dest,
        why,
        "fetch and verify",
        Op.FETCH,
        recreates=recreates,
        expected=f"{_short(fetch.sha256)}, {fetch.size} bytes",
        found="absent" if state is None else f"{state.size} bytes",
    )


def _unused_models(b: _Builder, config: HostConfig, snap: Snapshot) -> None:
    """Model directories that no enabled service and no kept release uses: removed."""
    in_use = set(config.served_models()) | set(snap.state.kept_models)
    for name in sorted(set(snap.models.dirs) & set(config.models) - in_use):
        b.add(
            "model",
            f"{config.layout.models_dir}/{name}",
            "no enabled service and no kept release uses it",
            "remove",
            found="present",
            expected="absent",
            op=Op.REMOVE,
        )


def stale_stamp(state: ModelFileState, *, sha256: str, size: int) -> bool:
    """A file hashed in this read that matches, whose stamp would not say so next time."""
    return state.sha256 == sha256 and (
        state.stamp != f"{sha256} {size}"
        or state.stamp_mtime is None
        or state.stamp_mtime < state.mtime
    )


def rehash_paths(config: HostConfig, snap: Snapshot) -> list[str]:
    """Model files to hash before planning, read again in the same run (a targeted deep read):

    - a file whose mtime is ahead of its stamp, its size and stamp right: hashed once, its
      stamp refreshed when the bytes match (a clock stepped back), else it is fetched;
    - every file of a llama-server whose container is not running, or does not answer its
      health endpoint: a crash loop's cause is often its model, changed in place with its
      mtime kept, which only a hash finds.

    Files hashed in this read already (``--deep``), absent, or of the wrong size are left out:
    the plan decides on them without a hash.
    """
    wanted: list[str] = []
    for name, svc in config.enabled_services.items():
        if not isinstance(svc, LlamaServer):
            continue
        container = snap.compose.containers.get(name)
        health = snap.health.get(name)
        failing = (
            container is None
            or container.state != "running"
            or container.health == "unhealthy"
            or (
                health is not None
                and (health.hung or (not health.ok and container.health != "starting"))
            )
        )
        spec = config.models.get(svc.model)
        for path in spec.files if spec else ():
            dest = f"{config.layout.models_dir}/{svc.model}/{path}"
            state = snap.models.files.get(dest)
            if state is None or state.sha256 is not None or dest in wanted:
                continue
            ahead = state.stamp_mtime is not None and state.stamp_mtime < state.mtime
            if (failing and container is not None) or ahead:
                wanted.append(dest)
    return wanted


# --- services ---------------------------------------------------------------------------


def _seconds(duration: str) -> int:
    return int(parse_duration(duration))


def gate_seconds(svc: Service, model_bytes: int) -> int:
    """How long a service may take to answer after it is (re)created.

    A minute plus the time to read its model at 100 MiB/s (a slow disk), capped by the
    service's ``start_period``: a 0.5 MB test model gets 60 s, a 63 GB one about 11 minutes.
    """
    return min(_seconds(svc.start_period), 60 + model_bytes // (100 * MIB))


def service_labels(
    config: HostConfig, control: ControlInputs, identity: dict[str, str]
) -> dict[str, dict[str, str]]:
    """Per service, everything that should recreate it when it changes, as one label: compose
    compares its config hash (which includes labels) with the running container's."""
    env_digest = control.env_public_sha256  # no secret value: a rotation recreates by its change
    labels = {}
    for name, svc in config.enabled_services.items():
        files = []
        if isinstance(svc, LlamaServer) and svc.model in control.models:
            folder = f"{config.layout.models_dir}/{svc.model}"
            files = sorted(
                (f"{folder}/{f.path}", f.sha256) for f in control.models[svc.model].files
            )
        payload = [svc.model_dump(mode="json"), identity.get(name, ""), files, env_digest]
        labels[name] = {"gpufleet.inputs": _sha(json.dumps(payload))}
    return labels


def _build_plans(
    config: HostConfig, snap: Snapshot, control: ControlInputs, options: PlanOptions
) -> dict[str, BuildPlan]:
    plans = {}
    arch = snap.identity.host.arch
    for name, svc in config.enabled_services.items():
        if not (isinstance(svc, LlamaServer) and svc.image.source == "build" and svc.build):
            continue
        source_id = control.sources[name]
        dockerfile = render_dockerfile(svc.build, source_id if svc.build.source_archive else None)
        inputs = build_inputs(svc.build, dockerfile, source_id, arch=arch)
        builder, builder_ref, building = options.builders.get(inputs, (None, None, False))
        other = builder is not None and builder != config.host
        plans[name] = BuildPlan(
            service=name,
            ref=svc.image.ref,
            context=config.layout.build_context(name),
            dockerfile=dockerfile,
            inputs=inputs,
            build=svc.build,
            receive_from=builder if other else None,
            receive_ref=builder_ref if other else None,
            source_builds=other and building,
        )
    return plans


def check_images(
    config: HostConfig, snap: Snapshot, changes: list[Change]
) -> tuple[str | None, dict[str, ImageCheck]]:
    """Can each enabled service's image run on this host's GPUs? By the image's labels
    (``gpufleet.cuda.sm``, what cuobjdump found in its binary), never by the build flags.

    An image the host has, and keeps in this run, is checked now: a mismatch is the host's
    refusal, before any change. An image built, received, pulled or sent in this run has no
    labels to read yet: its check is returned, for the operation that makes the image present
    to run before compose starts anything from it.

    Returns ``(refusal or None, service -> deferred check)``.
    """
    delivered = {c.resource for c in changes if c.step == "image"}
    rebuilt = {c.resource for c in changes if c.step == "build"}
    deferred: dict[str, ImageCheck] = {}
    for name, svc in config.enabled_services.items():
        ref = svc.image.ref
        built = svc.image.source == "build"
        check = image_check(name, ref, snap.identity.nvidia.gpus, built=built)
        if check is None:
            continue
        if name in rebuilt or ref in delivered:
            deferred[name] = check
            continue
        image = snap.compose.images.get(ref)
        if image is not None and (why := check.refusal(image.labels)):
            return why, {}
    return None, deferred


def _container_reason(container: Container | None, wanted: str, health) -> str | None:
    if container is None:
        return "no container"
    if container.state != "running":
        return f"container {container.state}"
    if container.inputs != wanted:
        return "its inputs changed (config, image, model files or .env)"
    # a loading server answers 503 (llama-server) or not yet at all (vLLM): left to load, unless
    # it holds the port without ever answering (frozen), or Docker's own check gave up on it
    if health is not None and (health.hung or (not health.ok and container.health != "starting")):
        return f"running but its health endpoint gave {health.describe()}"
    if health is not None and health.chat is False:
        return "healthy, but a one-token chat completion failed"
    return None


def _services(
    b: _Builder,
    config: HostConfig,
    snap: Snapshot,
    control: ControlInputs,
    options: PlanOptions,
    replaced: dict[str, list[str]],
) -> tuple[dict[str, BuildPlan], str, dict[str, dict[str, str]]]:
    """Images, the compose file and the containers: ``(builds, compose text, labels)``."""
    compose_state = snap.files.get(config.layout.compose_path)
    if not config.enabled_services and compose_state is None:
        return {}, "", {}
    builds = _build_plans(config, snap, control, options)
    identity: dict[str, str] = {}
    rebuilt: set[str] = set()
    for name, svc in config.enabled_services.items():
        if name in builds:
            identity[name] = builds[name].inputs
            if _build(b, snap, control, builds[name]):
                rebuilt.add(name)
        else:
            identity[name] = _image(b, snap, control, name, svc)
        if isinstance(svc, Ollama):
            _directory(b, snap, "layout", svc.models_dir, "755", "root", "root")
    labels = service_labels(config, control, identity)
    text = _compose(b, config, labels, compose_state)
    _recreate(b, config, snap, labels, rebuilt, replaced)
    return builds, text, labels


def _build(b: _Builder, snap: Snapshot, control: ControlInputs, plan: BuildPlan) -> bool:
    """Build or receive the service's image when the host has none from these inputs, and
    send the build's base images; else keep its build context's Dockerfile. True: rebuilt."""
    name = plan.service
    image = snap.compose.images.get(plan.ref)
    if image is not None and image.inputs == plan.inputs:
        path = f"{plan.context}/Dockerfile"
        kept = snap.files.get(path)
        state = "is absent" if kept is None else "was edited"
        why = f"the build context's Dockerfile {state}; the image is current"
        _write(b, "build", path, kept, plan.dockerfile, why)
        return False
    found = "no image" if image is None else f"built from {str(image.inputs)[:12]}"
    how = f"receive from {plan.receive_from}" if plan.receive_from else "build from source"
    b.add(
        "build",
        name,
        f"{found}, inputs {plan.inputs[:12]} declared",
        how,
        expected=plan.inputs[:12],
        found=found,
        recreates=(name,),
        op=Op.RECEIVE if plan.receive_from else Op.BUILD,
    )
    if plan.build.base_source == "transfer" and not plan.receive_from:
        for base in (plan.build.devel_image, plan.build.runtime_image):
            why = _image_present(snap, base, "transfer", control.local_images.get(base))
            if why and not b.has("image", base):
                b.add(
                    "image",
                    base,
                    f"build base {why}",
                    "transfer",
                    expected="present",
                    found=why,
                    op=Op.TRANSFER,
                )
    return True


def _image(b: _Builder, snap: Snapshot, control: ControlInputs, name: str, svc: Service) -> str:
    """Pull or send the service's image when the host lacks it; returns what identifies the
    image in the service's inputs (the control machine's id for a sent one, else its ref)."""
    ref, source = svc.image.ref, svc.image.source
    local = control.local_images.get(ref)
    why = _image_present(snap, ref, source, local)
    if why:
        b.add(
            "image",
            ref,
            f"image {why}",
            source,
            expected="present",
            found=why,
            recreates=(name,),
            op=Op(source),
        )
    return (local or "absent") if source == "transfer" else ref


def _compose(
    b: _Builder,
    config: HostConfig,
    labels: dict[str, dict[str, str]],
    state: FileState | None,
) -> str:
    """The compose file of the enabled services, written when it differs; returns its text."""
    enabled = config.enabled_services
    model_paths = {
        name: config.model_path(svc.model)
        for name, svc in enabled.items()
        if isinstance(svc, LlamaServer)
    }
    text = render_compose(
        project=config.project,
        services=enabled,
        model_paths=model_paths,
        models_dir=config.layout.models_dir,
        labels=labels,
        hf_endpoint=config.hf_endpoint,
    )
    why = "compose file absent" if state is None else "compose file differs"
    _write(b, "compose", config.layout.compose_path, state, text, why)
    return text


def _recreate(
    b: _Builder,
    config: HostConfig,
    snap: Snapshot,
    labels: dict[str, dict[str, str]],
    rebuilt: set[str],
    replaced: dict[str, list[str]],
) -> None:
    """Recreate each service whose container is not what it declares; remove the orphans."""
    for name in config.enabled_services:
        container = snap.compose.containers.get(name)
        wanted = labels[name]["gpufleet.inputs"]
        why = _container_reason(container, wanted, snap.health.get(name))
        if why is None and name in rebuilt:
            why = "its image is rebuilt"
        if replaced.get(name):
            also = replaced_reason(replaced[name], config.layout.env_path)
            why = also if why is None else f"{why}; {also}"
        if why:
            found = container.state if container else "absent"
            b.add(
                "recreate",
                name,
                why,
                "recreate",
                expected="running, healthy",
                found=found,
                op=Op.RECREATE,
            )
    for name in orphans(snap, set(config.enabled_services)):
        found = snap.compose.containers[name].state
        b.add(
            "recreate",
            name,
            "no longer declared",
            "remove",
            expected="absent",
            found=found,
            op=Op.REMOVE,
        )


def orphans(snap: Snapshot, declared: set[str]) -> dict[str, str]:
    """Containers in the compose project that no declared service owns (left by a service
    since disabled, or started by hand with the project's labels): service -> container id.
    Removed by id (``docker rm -f``): compose's ``--remove-orphans`` misses a container it did
    not create itself."""
    return {
        name: snap.compose.containers[name].id
        for name in sorted(set(snap.compose.containers) - declared)
    }


def replaced_reason(resources: list[str], env_path: str) -> str:
    """Why a service is recreated for what changed under it: its model files or its secrets."""
    files = [Path(r).name for r in resources if r != env_path]
    if files:
        return f"its model file is replaced ({', '.join(files)})"
    return "the secrets it is given from .env changed"


def _model_files(
    config: HostConfig, control: ControlInputs, model: str | None
) -> tuple[ModelFileRelease, ...]:
    """A served model's files as a release records them: where each came from, its hash."""
    if not model or model not in control.models:
        return ()
    resolved = control.models[model]
    hub = (config.hf_endpoint, resolved.repo, resolved.commit)
    return tuple(
        ModelFileRelease(
            path=f"{model}/{f.path}",
            sha256=f.sha256,
            size=f.size,
            url=known.hub_file_url(*hub, f.path),
        )
        for f in resolved.files
    )


def _build_record(plan: BuildPlan | None, source: str) -> dict | None:
    """What a built image was built from, as a release records it (None: not built)."""
    if plan is None:
        return None
    build = plan.build
    return {
        "inputs": plan.inputs,
        "source": source,
        "cuda": build.cuda,
        "cuda_version": build.cuda_version if build.cuda else None,
        "cuda_archs": list(build.cuda_archs),
    }


def release_of(
    config: HostConfig,
    snap: Snapshot,
    control: ControlInputs,
    compose: str,
    builds: dict[str, BuildPlan],
    labels: dict[str, dict[str, str]],
) -> Release:
    """What the host serves once its plan is applied (hashes, never secret values)."""
    services = {}
    for name, svc in config.enabled_services.items():
        model = svc.model if isinstance(svc, LlamaServer) else None
        services[name] = ServiceRelease(
            kind=svc.kind,
            port=svc.port,
            image=svc.image.ref,
            image_source=svc.image.source,
            image_id=control.local_images.get(svc.image.ref),
            build=_build_record(builds.get(name), control.sources.get(name, "")),
            model=model,
            model_files=_model_files(config, control, model),
            inputs=labels[name]["gpufleet.inputs"],
        )
    identity = snap.identity
    return Release(
        gpufleet=control.version,
        driver=identity.nvidia.driver_version,
        cuda=identity.nvidia.cuda_version,
        l4t=identity.jetson.l4t if identity.jetson else None,
        toolkit=config.toolkit.version,
        services=services,
        compose_sha256=_sha(compose) if compose else None,
        env_sha256=control.env_public_sha256,
    )


# --- the plan ---------------------------------------------------------------------------


def next_history(
    kept: tuple[str, ...], rid: str, keep: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The history once ``rid`` is the current release (it moves to the end), and the releases
    beyond the newest ``keep`` that leave it. ``kept`` holds checked ids only
    (``facts.statedir.release_ids``)."""
    order = [h for h in kept if h != rid] + [rid]
    return tuple(order[-keep:]), tuple(order[:-keep])


def secret_copies(snap: Snapshot) -> list[Change]:
    """Kept releases that still hold a whole ``.env`` (gpufleet kept one before it kept only
    the public part): each is rewritten without its secret values on the next converge."""
    return [
        Change(
            "release",
            f"{known.STATE_DIR}/releases/{rid}/env",
            f"release {rid} keeps a copy of .env with secret values",
            "rewrite without secret values",
            Op.WRITE,
            expected="names only",
            found="values",
        )
        for rid in snap.state.secret_copies
    ]


def refused(config: HostConfig, why: str, warnings: tuple[str, ...] = ()) -> HostPlan:
    return HostPlan(host=config.host, group=config.group, refusal=why, warnings=warnings)


def _gate(config: HostConfig, snap: Snapshot) -> GateResult:
    """The GPU gate: driver, CUDA, architectures and memory for what the host serves."""
    served = config.served_models()
    return check_host(
        config.gpu,
        snap.identity,
        group=config.group,
        model_bytes=sum(spec.size_bytes or 0 for spec in served.values()),
        cuda_archs=config.cuda_archs(),
    )


def _first_refusal(
    gate_failures: list[str],
    config: HostConfig,
    snap: Snapshot,
    control: ControlInputs,
    options: PlanOptions,
) -> str | None:
    """Why the host must not be changed at all, found before the first change, or None."""
    if gate_failures:
        return "; ".join(gate_failures)
    daemon_error = snap.identity.docker.daemon_json_error
    if daemon_error:
        daemon_error += "; gpufleet merges its keys into that file: fix or remove it"
    reasons = (lease_refusal(snap, options), daemon_error, control.hub_error)
    return next((why for why in reasons if why), None)


def model_users(config: HostConfig) -> dict[str, list[str]]:
    """Model -> the enabled llama-server services that serve it."""
    users: dict[str, list[str]] = {}
    for name, svc in config.enabled_services.items():
        if isinstance(svc, LlamaServer):
            users.setdefault(svc.model, []).append(name)
    return users


def replaced_under(changes: list[Change]) -> dict[str, list[str]]:
    """Service -> the resources changed under it that recreate it (model files, the .env)."""
    found: dict[str, list[str]] = {}
    for change in changes:
        for name in change.recreates:
            found.setdefault(name, []).append(change.resource)
    return found


def _missing_pulls(svc: Service, snap: Snapshot) -> tuple[str, ...]:
    """An Ollama service's models with no manifest on the host (nothing for other kinds)."""
    if not isinstance(svc, Ollama):
        return ()
    return tuple(
        m for m in svc.models if snap.files.get(known.ollama_manifest(svc.models_dir, m)) is None
    )


def _gates(
    b: _Builder, config: HostConfig, snap: Snapshot, control: ControlInputs
) -> tuple[dict[str, int], dict[str, tuple[str, ...]]]:
    """A gate for each service recreated or with models to pull: it must answer in time.

    Returns ``(service -> seconds it is given, service -> models to pull first)``.
    """
    gates, pulls = {}, {}
    recreated = {c.resource for c in b.changes if c.step == "recreate" and c.op is Op.RECREATE}
    for name, svc in config.enabled_services.items():
        missing = _missing_pulls(svc, snap)
        if name not in recreated and not missing:
            continue
        model_bytes = 0
        if isinstance(svc, LlamaServer) and svc.model in control.models:
            model_bytes = control.models[svc.model].total_size
        gates[name] = seconds = gate_seconds(svc, model_bytes)
        what = f"health within {seconds}s"
        if svc.chats:
            what = f"health and a one-token chat within {seconds}s"
        if missing:
            pulls[name] = missing
            what = f"pull {', '.join(missing)}, then {what}"
        why = f"{name} is recreated"
        if name not in recreated:
            why = f"{', '.join(missing)} not pulled into {svc.models_dir}"
        b.add("gate", name, why, what, expected="answers", op=Op.GATE)
    return gates, pulls


def _record(
    b: _Builder, config: HostConfig, snap: Snapshot, release: Release
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Record the release when it is not the current one: the history and pruned releases."""
    current = snap.state.current
    if release.id == current:
        return (), ()
    recorded = current or "none"
    why = f"release {recorded} recorded, {release.id} declared"
    b.add("release", release.id, why, "record", expected=release.id, found=recorded, op=Op.RECORD)
    return next_history(snap.state.releases, release.id, config.releases_keep)


def plan_host(
    config: HostConfig,
    snap: Snapshot,
    control: ControlInputs,
    options: PlanOptions | None = None,
) -> HostPlan:
    """The changes that bring this host to its declared state, and the release it then runs.

    + config: the host's validated config
    + snap: the host as one ``facts.snapshot.HostSnapshot`` read it
    + control: the control machine's inputs (``gpufleet.control.inputs.gather``)
    + options: the run's lease, clock and fleet-wide build assignments

    .. code:: python

        plan = plan_host(config, snapshot, control)
        plan.refusal      # None, or one line: what was found and what is required
        plan.changes      # (Change(step="env", resource="/opt/gpufleet/.env", ...), ...)
        plan.release.id   # "3f9c2a1b7d0e"
    """
    options = options or PlanOptions()
    gate = _gate(config, snap)
    warnings = tuple(gate.warnings) + snap.state.problems
    if why := _first_refusal(gate.failures, config, snap, control, options):
        return refused(config, why, warnings)
    b = _Builder()
    _engine(b, config, snap)
    if engine_stopped(snap):  # only the start: an image it cannot see is not one it lacks
        return b.plan(config, warnings)
    if _toolkit(b, config, snap):
        _probe(b, config, snap, control)
    _layout(b, config, snap, control)
    fetches, stamps = _models(b, config, snap, control, model_users(config))
    if why := space_refusal(list(fetches.values()), snap):
        return refused(config, why, warnings)
    replaced = replaced_under(b.changes)
    builds, compose, labels = _services(b, config, snap, control, options, replaced)
    refusal, checks = check_images(config, snap, b.changes)
    if refusal:
        return refused(config, refusal, warnings)
    gates, pulls = _gates(b, config, snap, control)
    release = release_of(config, snap, control, compose, builds, labels)
    history, pruned = _record(b, config, snap, release)
    b.changes += secret_copies(snap)
    return b.plan(
        config,
        warnings,
        release=release,
        fetches=fetches,
        builds=builds,
        compose=compose,
        gate_seconds=gates,
        pulls=pulls,
        image_checks=checks,
        history=history,
        pruned=pruned,
        migrate=snap.state.secret_copies,
        stamps=stamps,
        orphans=orphans(snap, set(config.enabled_services)),
    )


def choose_builders(
    order: list[str],
    needs: dict[str, list[tuple[str, str]]],
    haves: dict[str, list[tuple[str, str]]],
    control: dict[str, str] | None = None,
) -> dict[str, tuple[str, str, bool]]:
    """Build inputs -> the (host, image ref, builds it now) every host needing them gets them from.

    A host that already has the image sends it; else the control machine sends one it holds
    (``known.CONTROL_MACHINE``); else the first host in inventory ``order`` that needs it builds
    it, and the others receive it: at most one build per set of inputs per run.

    + order: host names in inventory order
    + needs/haves: host -> the ``(inputs, ref)`` it would build / already has
    + control: inputs -> the tag of an image built from them in the control machine's Docker
    """
    chosen: dict[str, tuple[str, str, bool]] = {}
    for name in sorted(haves, key=order.index):
        for inputs, ref in haves[name]:
            chosen.setdefault(inputs, (name, ref, False))
    for inputs, ref in (control or {}).items():
        chosen.setdefault(inputs, (known.CONTROL_MACHINE, ref, False))
    for name in sorted(needs, key=order.index):
        for inputs, ref in needs[name]:
            chosen.setdefault(inputs, (name, ref, True))
    return chosen


def current_images(plan: HostPlan) -> list[BuildPlan]:
    """Builds whose image this host already has: it can send them to hosts that need them."""
    if plan.refusal:
        return []
    return [p for name, p in plan.builds.items() if not plan.touches("build", name)]


def built_here(plan: HostPlan) -> list[BuildPlan]:
    """Builds this host makes itself in this run (hosts planned later may receive them)."""
    own = {name: p for name, p in plan.builds.items() if p.receive_from is None}
    return [p for name, p in own.items() if plan.touches("build", name)]
