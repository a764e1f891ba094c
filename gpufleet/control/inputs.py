"""What the control machine contributes to a plan: Hub metadata, build sources, local images.

A plan is computed from a host's config, its snapshot and these inputs; this module is where
the control machine's side is read, once per run whatever the number of hosts:

- each served model resolved on the Hub (or mirror) to a commit, with sizes and etags (the
  sha256 of an LFS file, else its git blob sha1: ``gpufleet.control.hf``; pinned revisions are
  cached on disk);
- each llama.cpp build's source identity: ``<git url>@<ref>``, or an archive's sha256, cached
  on disk by path, size and mtime so an unchanged 50 MB archive is not hashed on every run;
- the id of each image sent from this machine (``source: transfer``), from its Docker;
- an image this machine's Docker already holds for a llama.cpp build's inputs, sent to the
  hosts that would otherwise build it (``builds_from_control``);
- each image sent from here, saved and gzipped once into a file all its hosts read;
- what each host's docker CLI printed last time, so an unchanged host is not asked again;
- the hash of the ``.env`` that will be written (secrets go in, only the hash comes out), and
  of its public part (``gpufleet.core.render.public_env``: no secret value goes in).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.control import hf
from gpufleet.core.render import public_env, render_env
from gpufleet.core.schema import HostConfig, LlamaServer
from gpufleet.core.snapshot import DockerInfo


@dataclass(frozen=True)
class ControlInputs:
    """The control machine's part of a host's plan.

    + models: served model name -> its resolution on the Hub
    + hub_error: why a model could not be resolved (the plan then refuses the host)
    + sources: build service name -> source identity (``git@ref`` or an archive's sha256)
    + local_images: image ref -> its id in this machine's Docker (None: not there)
    + env_sha256: sha256 of the ``.env`` the host should have (compared with the host's file)
    + env_public_sha256: sha256 of its public part: what a release and a service's inputs hold,
      so a rotated secret alone is neither a new release nor new inputs
    + version: gpufleet's version, recorded in the release
    """

    models: dict[str, hf.ResolvedModel] = field(default_factory=dict)
    hub_error: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    local_images: dict[str, str | None] = field(default_factory=dict)
    env_sha256: str = ""
    env_public_sha256: str = ""
    version: str = "0"


@functools.cache
def version() -> str:
    try:
        return importlib.metadata.version("gpufleet")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# --- models -----------------------------------------------------------------------------


_resolved: dict[tuple, hf.ResolvedModel] = {}


def _resolve(spec: hf.ModelSpec, endpoint: str, token: str | None) -> hf.ResolvedModel:
    key = (endpoint, spec.repo, spec.revision, tuple(spec.files), tuple(spec.patterns), token)
    if key not in _resolved:
        _resolved[key] = hf.resolve(spec, endpoint=endpoint, token=token)
    return _resolved[key]


def resolve_models(config: HostConfig, token: str | None) -> dict[str, hf.ResolvedModel]:
    """Served model name -> resolution; one lookup per model per run, whatever the hosts.

    Raises ``hf.HubError`` (one line, never the token).
    """
    endpoint = (config.hf_control_endpoint or config.hf_endpoint).rstrip("/")
    return {name: _resolve(spec, endpoint, token) for name, spec in config.served_models().items()}


# --- build sources ----------------------------------------------------------------------


def cache_dir() -> Path:
    root = os.environ.get("GPUFLEET_CACHE") or Path.home() / ".cache" / "gpufleet"
    return Path(root)


@functools.cache
def archive_sha256(path: str) -> str:
    """sha256 of a source archive, remembered by path, size and mtime across runs."""
    stat = Path(path).stat()
    key = f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index = cache_dir() / "archives.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    this_file = f"{Path(path).resolve()}|"  # its entries for an older size or mtime go
    previous = known if isinstance(known, dict) else {}
    known = {k: v for k, v in previous.items() if not k.startswith(this_file)}
    known[key] = sha
    _write_cache(index, known)  # one that cannot be written costs one hash next time
    return sha


def _write_cache(path: Path, data: dict) -> None:
    """``data`` as ``path``'s JSON, replaced whole; a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
            json.dump(data, tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, path)
    except OSError:
        pass


def build_sources(config: HostConfig) -> dict[str, str]:
    """Build service name -> what its source tree is (the archive's sha256, or git@ref)."""
    sources = {}
    for name, svc in config.services.items():
        if not (isinstance(svc, LlamaServer) and svc.enabled and svc.image.source == "build"):
            continue
        build = svc.build
        assert build is not None  # the schema requires it for source build
        if build.source_archive:
            sources[name] = archive_sha256(build.source_archive)
        else:
            sources[name] = f"{build.source_git}@{build.source_ref}"
    return sources


# --- images on this machine -------------------------------------------------------------


def _docker(args: list[str]) -> subprocess.CompletedProcess | None:
    try:
        argv = ["docker", *args]
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _asked_once(fn):
    """``functools.cache``, and callers that ask while the first call runs wait for its answer:
    every host plans at once (one greenlet each), so a plain cache let each host of the run
    start its own ``docker`` process for the same question. Each question has its own lock:
    a slow answer (an image being saved) keeps waiting only those who asked the same."""
    cached = functools.cache(fn)
    locks: dict[tuple, threading.Lock] = {}
    guard = threading.Lock()  # gevent's, in a pyinfra run: waiting yields to the other hosts

    @functools.wraps(fn)
    def wrapper(*args):
        with guard:
            lock = locks.setdefault(args, threading.Lock())
        with lock:
            return cached(*args)

    def cache_clear() -> None:
        cached.cache_clear()
        locks.clear()

    wrapper.cache_clear = cache_clear
    return wrapper


@_asked_once
def local_image_id(ref: str) -> str | None:
    """The image's id in this machine's Docker (``sha256:...``), for images sent from here."""
    proc = _docker(["image", "inspect", "--format", "{{.Id}}", ref])
    return (proc.stdout.strip() or None) if proc else None


@_asked_once
def image_built_from(inputs: str) -> str | None:
    """A tag in this machine's Docker for an image built from ``inputs`` (its ``gpufleet.inputs``
    label, as ``gpufleet.core.render.build_inputs`` made it), or None."""
    label = f"label=gpufleet.inputs={inputs}"
    proc = _docker(["image", "ls", "--filter", label, "--format", "{{.Repository}}:{{.Tag}}"])
    if proc is None or proc.returncode != 0:
        return None
    tags = sorted(t for t in proc.stdout.split() if "<none>" not in t)
    return tags[0] if tags else None


class SaveError(Exception):
    """``docker save`` failed on this machine; the message is its own last words."""


IMAGES_KEPT_BYTES = 4 * 2**30  # gzipped saves kept for later runs, the most recently sent first
_fallback_dir: list[Path] = []  # where saves go when the cache cannot be written: this run's


def _images_dir() -> Path:
    root = cache_dir() / "images"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK | os.X_OK):
            return root
    except OSError:
        pass
    if not _fallback_dir:
        _fallback_dir.append(Path(tempfile.mkdtemp(prefix="gpufleet-images-")))
        atexit.register(shutil.rmtree, _fallback_dir[0], True)
    return _fallback_dir[0]


def _prune(folder: Path, keep: Path) -> None:
    """Keep the most recently sent saves up to ``IMAGES_KEPT_BYTES``, and no partial file a
    killed run left (a day old)."""
    now, total = time.time(), 0
    try:
        for partial in folder.glob("*.partial"):
            if now - partial.stat().st_mtime > 24 * 3600:
                partial.unlink(missing_ok=True)
        saves = [(f.stat(), f) for f in folder.glob("*.tar.gz")]
        saves.sort(key=lambda stat_and_save: stat_and_save[0].st_mtime, reverse=True)
        for stat, save in saves:
            if save != keep and total + stat.st_size > IMAGES_KEPT_BYTES:
                save.unlink(missing_ok=True)
            else:
                total += stat.st_size
    except OSError:
        pass  # another run pruned it first


@_asked_once
def saved_image(ref: str) -> Path:
    """``docker save`` of ``ref`` on this machine, gzipped, as a file every host receiving the
    image reads: saved and compressed once per image (its id and tag), then kept for later
    runs (``IMAGES_KEPT_BYTES``), and each host is sent the compressed bytes (the llama.cpp CPU
    image: 319 MiB, 138 MiB gzipped). Raises ``SaveError``."""
    image_id = local_image_id(ref)
    if image_id is None:
        raise SaveError(f"this machine's Docker has no image {ref}")
    folder = _images_dir()
    path = folder / f"{hashlib.sha256(f'{image_id} {ref}'.encode()).hexdigest()[:32]}.tar.gz"
    try:
        os.utime(path)  # sent again: kept longest
        return path
    except OSError:
        pass
    partial = ""
    try:
        fd, partial = tempfile.mkstemp(dir=folder, suffix=".partial")
        with os.fdopen(fd, "wb") as out:
            save = subprocess.Popen(
                ["docker", "save", ref], stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            assert save.stdout is not None and save.stderr is not None
            gz = subprocess.Popen(["gzip", "-1"], stdin=save.stdout, stdout=out)
            save.stdout.close()  # gzip holds it: docker save sees a closed pipe if gzip goes
            error = save.stderr.read().decode(errors="replace").strip()
            saved, zipped = save.wait(), gz.wait()
        if saved != 0 or zipped != 0:
            raise SaveError(error[-300:] or f"exit status {saved or zipped} (is {folder} full?)")
        os.replace(partial, path)
    except OSError as exc:
        raise SaveError(f"cannot write {partial or folder}: {exc.strerror or exc}") from None
    finally:
        if partial:
            Path(partial).unlink(missing_ok=True)
    _prune(folder, keep=path)
    return path


def transfer_refs(config: HostConfig) -> list[str]:
    """Every image this host receives from the control machine."""
    refs = []
    if config.probe.image.source == "transfer":
        refs.append(config.probe.image.ref)
    for svc in config.services.values():
        if not svc.enabled:
            continue
        if svc.image.source == "transfer":
            refs.append(svc.image.ref)
        build = svc.build if isinstance(svc, LlamaServer) else None
        if svc.image.source == "build" and build and build.base_source == "transfer":
            refs += [build.devel_image, build.runtime_image]
    return list(dict.fromkeys(refs))


# --- what each host's docker CLI printed ------------------------------------------------


_versions: dict[str, list] = {}  # host -> [binaries, version, compose version]; loaded once
_versions_lock = threading.Lock()
_versions_unsaved: list[Path] = []  # the file the changes since the last write belong in


def _versions_file() -> Path:
    return cache_dir() / "docker-versions.json"


def _versions_entry_ok(entry) -> bool:
    """``[binaries, version, compose version]``, each a string or None."""
    return (
        isinstance(entry, list)
        and len(entry) == 3
        and all(isinstance(v, str | None) for v in entry)
    )


def _load_versions() -> dict[str, list]:
    if not _versions:
        try:
            known = json.loads(_versions_file().read_text())
        except (OSError, ValueError):
            known = {}
        if isinstance(known, dict):
            _versions.update({h: e for h, e in known.items() if _versions_entry_ok(e)})
        _versions.setdefault("", [])  # loaded, even when empty
    return _versions


def docker_versions(host: str) -> tuple[str, str, str | None] | None:
    """What the host's docker CLI printed last time and the binaries that printed it, for its
    next snapshot to reuse (``facts.docker.script``): the two version commands are a fifth of a
    no-change snapshot's CPU on the host."""
    with _versions_lock:
        entry = _load_versions().get(host)
    return (entry[0], entry[1], entry[2]) if entry and entry[0] and entry[1] else None


def remember_docker(host: str, docker: DockerInfo) -> None:
    """Keep what this snapshot read; the cache file is written once, when the run ends
    (``save_docker_versions``), and only when something changed."""
    entry = [docker.binaries, docker.version, docker.compose_version]
    if not docker.binaries or not docker.version:
        entry = []
    with _versions_lock:
        known = _load_versions()
        if known.get(host, []) == entry:
            return
        known[host] = entry
        if not _versions_unsaved:
            # a write per host re-encoded the whole file each time (json.dump with indent,
            # the pure-Python encoder): quadratic in a fleet whose hosts all changed. The
            # file is the one this run reads, named now, not whatever the environment says
            # at exit.
            _versions_unsaved.append(_versions_file())
            atexit.register(save_docker_versions)


def save_docker_versions() -> None:
    """Write what the run's snapshots read, if anything changed (at exit, or when asked)."""
    with _versions_lock:
        if not _versions_unsaved:
            return
        path = _versions_unsaved.pop()
        atexit.unregister(save_docker_versions)
        # one that cannot be written costs the version commands next time
        _write_cache(path, {h: e for h, e in _load_versions().items() if h and e})


# --- all of it --------------------------------------------------------------------------


def gather(config: HostConfig, secrets: dict[str, str]) -> ControlInputs:
    """Everything the control machine contributes to this host's plan."""
    try:
        models, error = resolve_models(config, secrets.get("HF_TOKEN")), None
    except hf.HubError as exc:
        models, error = {}, str(exc)
    env = render_env(config, secrets)
    return ControlInputs(
        models=models,
        hub_error=error,
        sources=build_sources(config),
        local_images={ref: local_image_id(ref) for ref in transfer_refs(config)},
        env_sha256=hashlib.sha256(env.encode()).hexdigest(),
        env_public_sha256=hashlib.sha256(public_env(config).encode()).hexdigest(),
        version=version(),
    )
