"""Host data for the deploys: every targeted host validated once, before any host is touched."""

from __future__ import annotations

from pyinfra import host, logger
from pyinfra.api.exceptions import PyinfraError
from pyinfra.context import ctx_host, state

from gpufleet.schema import ConfigError, HostConfig, host_group, parse, resolve_secrets


class HostDataError(PyinfraError):
    """Invalid host data somewhere in the run: nothing is changed on any host."""


def _validate_all() -> dict[str, tuple[HostConfig, dict[str, str]]]:
    configs, errors = {}, []
    for target in state.inventory.iter_activated_hosts():
        try:
            group = host_group(target.name, target.groups, target.data.dict())
            config = parse(target.name, group, target.data.dict())
            configs[target.name] = (config, resolve_secrets(config))
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise HostDataError("invalid host data, no host was changed:\n" + "\n".join(errors))
    return configs


def host_config() -> tuple[HostConfig, dict[str, str]]:
    """This host's validated config and resolved secrets (validated for all hosts at once)."""
    cache = getattr(state, "_gpufleet_configs", None)
    if cache is None:
        cache = _validate_all()
        state._gpufleet_configs = cache
    return cache[host.name]


def fail_host(message: str) -> None:
    """Mark this host failed with one line; it gets no operations, the others go on."""
    logger.error(f"{host.print_prefix}{message}")
    # The Host itself, not the context proxy: pyinfra reads failed hosts after the context ends.
    state.fail_hosts({ctx_host.get()})
