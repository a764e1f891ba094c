"""The one converge every group runs: read the host once, plan it, apply the plan.

    snapshot = one remote command (facts.snapshot.HostSnapshot)
    plan     = gpufleet.plan.host.plan_host(config, snapshot, control inputs)   # pure
    apply    = the steps below, each issuing operations only for the changes the plan lists

The entry files (``deploys/spark.py`` ...) only pick the group. With ``GPUFLEET_REPORT`` set
(``gpufleet drift``/``status`` set it) each host's plan is also written there as JSON.
"""

from __future__ import annotations

import atexit
import sys
import time

from pyinfra import host, logger
from pyinfra.api.exceptions import PyinfraError
from pyinfra.context import ctx_host, ctx_state, state

from deploys import _fleet, _report
from deploys._config import Stop, fail_host, host_config, run_options
from deploys.container_toolkit import container_toolkit
from deploys.docker_engine import docker_engine
from deploys.gpu_probe import gpu_probe
from deploys.layout import layout
from deploys.metrics import host_metrics, host_metrics_applied
from deploys.models import models
from deploys.release import record_release
from deploys.services import services
from facts.aptrepo import FlatRepoVersions
from facts.modelfiles import ModelFiles
from facts.snapshot import HostSnapshot
from facts.statedir import ReleaseRecord
from gpufleet.control import inputs as control
from gpufleet.control.inputs import ControlInputs
from gpufleet.core import gpu, known
from gpufleet.core.render import plain_names
from gpufleet.core.schema import HostConfig, LlamaServer, Ollama
from gpufleet.core.snapshot import Snapshot
from gpufleet.core.wire import STEPS, Failure
from gpufleet.fleet.pyinfra_main import Recorder, cache_argument_types
from gpufleet.ops.operations import (
    failure_lines,
    keep_alive,
    run_state,
    start_engine_now,
    summary_lines,
)
from gpufleet.plan import models as models_plan
from gpufleet.plan import restore
from gpufleet.plan.container_toolkit import toolkit_repo_url, toolkit_unavailable
from gpufleet.plan.host import built_here, current_images, plan_host
from gpufleet.plan.refusals import refused
from gpufleet.plan.types import HostPlan, PlanOptions


def managed_paths(config: HostConfig) -> list[str]:
    """Every path whose state a plan compares, read together in the snapshot."""
    paths = [
        config.toolkit.keyring,
        config.toolkit.list_path,
        config.docker.keyring,
        known.DOCKER_LIST,
        known.CDI_SPEC,
        config.layout.stack_dir,
        config.layout.hf_home,
        config.layout.env_path,
        config.layout.compose_path,
        known.FETCH_MODEL,
    ]
    if config.monitor.textfile:
        paths.append(config.monitor.textfile_path)
    for name, svc in config.enabled_services.items():
        if isinstance(svc, LlamaServer) and svc.image.source == "build":
            paths.append(f"{config.layout.build_context(name)}/Dockerfile")
        if isinstance(svc, Ollama):
            paths.append(svc.models_dir)
            paths += [known.ollama_manifest(svc.models_dir, m) for m in svc.models]
    return paths


def image_refs(config: HostConfig) -> list[str]:
    refs = [config.probe.image.ref]
    for svc in config.enabled_services.values():
        refs.append(svc.image.ref)
        if isinstance(svc, LlamaServer) and svc.build and svc.build.base_source == "transfer":
            refs += [svc.build.devel_image, svc.build.runtime_image]
    return list(dict.fromkeys(refs))


def probes(config: HostConfig, *, chat: bool = False) -> dict[str, tuple]:
    """Each service's health probe: its address as the host reaches it, and its API key's
    place in the ``.env`` when it has one (for the chat a gate asks)."""
    out = {}
    for name, svc in config.enabled_services.items():
        key = getattr(svc, "api_key_secret", None)
        out[name] = (
            svc.probe_address,
            svc.port,
            known.HEALTH_PATHS[svc.kind],
            chat and svc.chats,
            (config.layout.env_path, key) if key else None,
            config.chat_model(name),
        )
    return out


class Unread(Exception):
    """pyinfra failed this host while reading it: a read past its bound, a link that dropped."""


def read_fact(fact, **kwargs):
    """A fact of this host. Unread when pyinfra failed the host reading it (it printed why):
    the fact's value is then only its default, and nothing may be decided from it."""
    value = host.get_fact(fact, **kwargs)
    if ctx_host.get() in state.failed_hosts:
        raise Unread(fact.__name__)
    return value


def status_textfile(config: HostConfig, options) -> str | None:
    """The metrics textfile a status run reads the last converge time of (it may rewrite it)."""
    return config.monitor.textfile_path if options.status and config.monitor.textfile else None


def read_snapshot(
    config: HostConfig, inputs: ControlInputs, *, deep: bool = False, chat: bool = False
) -> Snapshot:
    """The host, read in one remote command.

    + inputs: the control machine's (its resolved models name the blobs read)
    + deep: hash model files; chat: each chat-serving service must also answer one token
    """
    options = run_options()
    sources = ()
    if options.status:
        jetson, unified = config.gpu.min_l4t is not None, config.gpu.unified_memory
        sources = gpu.default_sources(jetson=jetson, unified_memory=unified)
    snap = read_fact(
        HostSnapshot,
        models_dir=config.layout.hf_home,
        paths=managed_paths(config),
        model_reads=models_plan.store_reads(config, inputs),
        project=config.project,
        images=image_refs(config),
        probes=probes(config, chat=chat),
        deep=deep,
        gpu_now=sources,
        releases=options.releases,
        audit=options.audit,
        docker_known=control.docker_versions(host.name),
        textfile=status_textfile(config, options),
        _timeout=config.read_timeout_seconds,
    )
    control.remember_docker(host.name, snap.identity.docker)
    return snap


def rehashed(config: HostConfig, snap: Snapshot, inputs: ControlInputs) -> Snapshot:
    """The snapshot with the blobs ``rehash_paths`` names hashed (one more read, only when a
    blob is dated ahead of its stamp or a server fails)."""
    blobs = set(models_plan.rehash_paths(config, snap, inputs))
    if not blobs:
        return snap
    reads = models_plan.store_reads(config, inputs)
    entries = [e for e in reads["entries"] if e[0] in blobs]
    hashed = read_fact(ModelFiles, hub=reads["hub"], entries=entries, deep=True)
    files = {**snap.models.files, **hashed.files}
    return snap.model_copy(update={"models": snap.models.model_copy(update={"files": files})})


def restore_plan(config: HostConfig, secrets: dict[str, str], wanted: str) -> HostPlan:
    """A rollback's plan: back to the kept release ``wanted`` (an id, or ``previous``)."""
    options = run_options()
    # the release names its own model files (read below): today's resolution is not needed
    snap = read_snapshot(config, control.ControlInputs(), chat=options.chat)
    target = restore.resolve_target(wanted, snap)
    if target is None:
        kept = ", ".join(snap.state.releases) or "none"
        result = refused(config, f"release {wanted} is not kept here (kept: {kept})")
    else:
        record = read_fact(ReleaseRecord, release_id=target, plain=plain_names(config))
        if record is None:
            result = refused(config, f"release {target} has no manifest on this host")
        else:
            manifest = record["manifest"]
            models = read_fact(ModelFiles, **restore.store_reads(manifest, config))
            inputs = control.gather(config, secrets)
            opts = PlanOptions(lease_id=options.lease_id, now=time.time())
            env = restore.kept_env(
                record["env"], secrets, where=f"{known.STATE_DIR}/releases/{target}/env.public"
            )
            result = restore.plan_restore(
                config, snap, manifest, record["images"], models, inputs, opts, env=env
            )
    _fleet.registry().register(config.host, [], [])
    _report.add(config, result, snap)
    host_metrics(config, result, snap)
    return result


def plan_this_host(config: HostConfig, secrets: dict[str, str]) -> HostPlan:
    options = run_options()
    builds = _fleet.registry()
    result: HostPlan | None = None
    reads = {"deep": options.deep, "chat": options.chat}
    try:
        inputs = control.gather(config, secrets)
        snap = rehashed(config, read_snapshot(config, inputs, **reads), inputs)
        opts = PlanOptions(lease_id=options.lease_id, now=time.time())
        result = plan_host(config, snap, inputs, opts)
        if result.touches("engine", "docker.service") and "--dry" not in sys.argv:
            # a stopped engine hid the images: start it now, then read the host and decide
            if why := start_engine_now(state, host):
                result = refused(config, why, result.warnings)
            else:
                snap = rehashed(config, read_snapshot(config, inputs, **reads), inputs)
                result = plan_host(config, snap, inputs, opts)
        if result.touches("toolkit", "nvidia-container-toolkit"):
            # Only when an install is planned: is the pinned version in the repository at all?
            url = toolkit_repo_url(config, snap)
            offered = read_fact(FlatRepoVersions, url=url)
            if why := toolkit_unavailable(config, offered, url):
                result = refused(config, why, result.warnings)
    finally:
        # every host registers, even one whose snapshot failed, so no other host waits on it
        needed = [(b.inputs, b.ref) for b in built_here(result)] if result else []
        have = [(b.inputs, b.ref) for b in current_images(result)] if result else []
        builds.register(config.host, needed, have, from_control=config.builds_from_control)
    if needed:
        builders = builds.builders()
        if any(builders[inputs][0] != config.host for inputs, _ in needed):
            opts = PlanOptions(lease_id=options.lease_id, now=opts.now, builders=builders)
            result = plan_host(config, snap, inputs, opts)
    _report.add(config, result, snap)
    host_metrics(config, result, snap)
    return result


def _print_summary(run_state) -> None:
    lines = summary_lines(getattr(run_state, "_gpufleet_tallies", None) or {})
    if lines:
        print("--> gpufleet: " + "; ".join(lines), file=sys.stderr)
    # the last word of a run whose hosts failed (after pyinfra's "No hosts remaining!")
    failed = failure_lines(
        getattr(run_state, "_gpufleet_failed_at", None) or {},
        getattr(run_state, "_gpufleet_failures", None) or {},
    )
    for line in failed:
        print(f"--> gpufleet: {line}", file=sys.stderr)


# Which deploy applies which of a plan's steps. They run in the order of the steps
# (gpufleet.core.wire.STEPS, the order a plan lists its changes in), the one place it is written.
APPLIERS = {
    docker_engine: ("engine",),
    container_toolkit: ("toolkit", "daemon", "cdi"),
    gpu_probe: ("probe",),
    layout: ("layout", "env"),
    models: ("model",),
    services: ("image", "build", "compose", "recreate", "gate"),
    record_release: ("release",),
}
NEEDS_SECRETS = {layout, services}
# The bound on each remote command a deploy runs (``HostConfig.timeouts``); the services
# deploy bounds its builds, transfers and gates apart (deploys/services.py).
BOUNDS = {
    docker_engine: "apt_seconds",
    container_toolkit: "apt_seconds",
    gpu_probe: "transfer_seconds",
    layout: "command_seconds",
    models: "download_seconds",
    services: "command_seconds",
    record_release: "command_seconds",
}


def bound(apply, config: HostConfig) -> int:
    """Seconds one remote command of the deploy ``apply`` may take on this host."""
    return getattr(config.timeouts, BOUNDS[apply])


def appliers() -> list:
    """The deploys in the order of the first step each applies."""
    return sorted(APPLIERS, key=lambda apply: STEPS.index(APPLIERS[apply][0]))


def converge(group: str | None = None) -> None:
    """Bring this host to its group's declared state.

    + group: converge only hosts of this group (``deploys/spark.py``); None takes every group
      (``deploys/fleet.py``)
    """
    if not getattr(state, "_gpufleet_summary", False):
        state._gpufleet_summary = True
        cache_argument_types()  # a plain pyinfra run too
        atexit.register(_print_summary, ctx_state.get())
        run = ctx_state.get()
        if not any(isinstance(h, Recorder) for h in run.callback_handlers):
            run.add_callback_handler(Recorder())  # a plain pyinfra run: for the last lines
    config, secrets = host_config()
    keep_alive(host, answer_within=config.ssh_liveness_seconds)
    if group is not None and config.group != group:
        _fleet.registry().register(config.host, [], [])
        logger.info(f"{host.print_prefix}not a {group} host ({config.group}): skipped")
        return
    wanted = run_options().restore
    wanted = wanted.get(config.host) or wanted.get("*") if wanted else None
    try:
        if wanted:
            result = restore_plan(config, secrets, wanted)
        else:
            result = plan_this_host(config, secrets)
    except Unread as exc:
        why = (
            f"could not be read ({exc}): no answer within its bound (read_timeout_seconds, "
            f"{config.read_timeout_seconds}s), or its connection dropped; nothing was changed"
        )
        logger.error(f"{host.print_prefix}{why}")
        run_state(state, "failures").setdefault(host.name, Failure(step="read", why=why))
        _fleet.registry().register(config.host, [], [])  # no host waits for its builds
        return
    except PyinfraError as exc:
        # a host whose snapshot cannot be read fails alone (pyinfra says why above); when it
        # was the last one left, the run ends with one line instead of "No hosts remaining!"
        if "No hosts remaining" not in str(exc):
            raise
        raise Stop("no host could be read or converged; each one's reason is above") from None
    for warning in result.warnings:
        logger.warning(f"{host.print_prefix}{warning}")
    if result.refusal:
        fail_host(result.refusal)
        return
    if result.in_sync:
        return
    for apply in host.loop(appliers()):  # pyinfra orders each pass's operations apart
        seconds = bound(apply, config)
        if apply in NEEDS_SECRETS:
            apply(config, secrets, result, _timeout=seconds)
        else:
            apply(config, result, _timeout=seconds)
    host_metrics_applied(config, result, _timeout=config.timeouts.command_seconds)
