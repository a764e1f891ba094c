"""Host data for the deploys: every targeted host validated once, before any host is touched."""

from __future__ import annotations

import os
import sys

import click
from pyinfra import host, logger
from pyinfra.api.exceptions import PyinfraError
from pyinfra.context import ctx_host, state
from pyinfra_cli.exceptions import CliError

from gpufleet.core.schema import ConfigError, HostConfig, host_group, parse, resolve_secrets
from gpufleet.core.wire import ALL_LEASES, RunOptions
from gpufleet.ops.operations import run_state


class Stop(CliError, PyinfraError):
    """Ends the run with gpufleet's own message: no "error in <file> line N", no traceback."""

    def show(self, file=None):
        logger.warning(f"--> {click.style('gpufleet', 'red', bold=True)}: {self}")


def run_options() -> RunOptions:
    """What the gpufleet command that started this run asked for (``gpufleet.core.wire``)."""
    options = getattr(state, "_gpufleet_options", None)
    if options is None:
        try:
            options = RunOptions.from_env(os.environ)
        except ValueError as exc:
            raise Stop(str(exc)) from None
        if options.lease_id == ALL_LEASES and "--dry" not in sys.argv:
            raise Stop("GPUFLEET_LEASE=* reads past every lease: allowed with --dry only")
        state._gpufleet_options = options
    return options


def _validate_all() -> dict[str, tuple[HostConfig, dict[str, str]]] | Stop:
    configs, errors = {}, []
    for target in state.inventory.iter_activated_hosts():
        try:
            group = host_group(target.name, target.groups, target.data.dict())
            config = parse(target.name, group, target.data.dict())
            configs[target.name] = (config, resolve_secrets(config))
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        return Stop("invalid host data, no host was changed:\n" + "\n".join(sorted(errors)))
    return configs


def host_config() -> tuple[HostConfig, dict[str, str]]:
    """This host's validated config and resolved secrets (validated for all hosts at once)."""
    cache = getattr(state, "_gpufleet_configs", None)
    if cache is None:
        cache = state._gpufleet_configs = _validate_all()
    if isinstance(cache, Stop):  # every host's deploy stops on the same message
        raise Stop(str(cache))
    return cache[host.name]


def fail_host(message: str) -> None:
    """Mark this host failed with one line; it gets no operations, the others go on.

    When it was the last host left, the run ends here with one summary of every refusal
    (pyinfra would otherwise end on "No hosts remaining!", which reads like a crash).
    """
    logger.error(f"{host.print_prefix}{message}")
    refusals = run_state(state, "refusals")
    refusals[host.name] = message
    try:
        # The Host itself, not the context proxy: pyinfra reads failed hosts after the context.
        state.fail_hosts({ctx_host.get()})
    except PyinfraError as exc:
        if "No hosts remaining" not in str(exc):
            raise
        lines = "\n".join(f"  {name}: {why}" for name, why in sorted(refusals.items()))
        raise Stop(
            f"no host can be converged, nothing was changed; {len(refusals)} refused:\n{lines}"
        ) from None
