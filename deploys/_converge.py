"""The steps every group runs, in order; the entry files only pick the group."""

from __future__ import annotations

from pyinfra import host, logger

from deploys import container_toolkit as toolkit
from deploys import models, services
from deploys._config import fail_host, host_config
from deploys.docker_engine import docker_engine, engine_packages
from deploys.gpu_probe import gpu_probe
from deploys.layout import env_path, layout
from deploys.preflight import preflight
from facts.managed import ManagedFiles
from gpufleet import hf, ops
from gpufleet.schema import HostConfig


def managed_paths(config: HostConfig) -> list[str]:
    """Every path whose state the steps compare, read together in one command."""
    return [
        config.toolkit.keyring,
        config.toolkit.list_path,
        config.docker.keyring,
        "/etc/apt/sources.list.d/docker.list",
        "/etc/cdi/nvidia.yaml",
        config.layout.stack_dir,
        config.layout.models_dir,
        env_path(config),
        services.compose_path(config),
        models.FETCH,
    ]


def _unfit_to_change(identity: dict) -> str | None:
    """What on the host would make a change unsafe, found before the first change."""
    error = identity["docker"]["daemon_json_error"]
    if error:
        return f"{error}; gpufleet merges its keys into that file: fix or remove it"
    return None


def converge(group: str | None = None) -> None:
    """Bring this host to its group's declared state.

    + group: converge only hosts of this group (``deploys/spark.py``); None takes every group
      (``deploys/fleet.py``)
    """
    config, secrets = host_config()
    if group is not None and config.group != group:
        logger.info(f"{host.print_prefix}not a {group} host ({config.group}): skipped")
        return
    served = config.served_models().values()
    identity = preflight(
        config,
        model_bytes=sum(spec.size_bytes or 0 for spec in served),
        cuda_archs=config.cuda_archs(),
    )
    if identity is None:
        return
    # Everything that could stop the run is found here, before the host's first change.
    try:
        planned, model_state = models.plan(config, secrets)
    except hf.HubError as exc:
        fail_host(str(exc))
        return
    problem = (
        _unfit_to_change(identity)
        or toolkit.unavailable(config, identity)
        or models.short_of_space(planned, identity)
    )
    if problem:
        fail_host(problem)
        return
    service_plan = services.Plan(config, secrets, planned)
    current = host.get_fact(ManagedFiles, paths=managed_paths(config))
    # Decided from what was read: the probe runs only when GPU plumbing may have changed.
    plumbing_changes = bool(
        engine_packages(config, identity)
        or toolkit.needs_install(config, identity)
        or ops.owned_daemon_keys(
            identity["docker"]["daemon_json"],
            set_default=config.toolkit.set_default_runtime,
            cdi=config.toolkit.cdi,
        )
    )
    docker_engine(config, identity, current)
    toolkit.container_toolkit(config, identity, current)
    if plumbing_changes:
        gpu_probe(config)
    layout(config, secrets, current)
    models.models(config, planned, model_state, current)
    services.services(config, secrets, service_plan, current)
