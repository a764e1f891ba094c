"""Preflight: read the whole host in one command and refuse it before any change."""

from __future__ import annotations

from pyinfra import host, logger

from deploys._config import fail_host
from facts.identity import HostIdentity
from gpufleet.gate import check_host
from gpufleet.schema import HostConfig


def preflight(
    config: HostConfig, *, model_bytes: int = 0, cuda_archs: tuple[str, ...] = ()
) -> dict | None:
    """Gate this host on its group's minimums before anything else runs on it.

    + config: the host's validated config
    + model_bytes: bytes of every model file the host will serve (fit check)
    + cuda_archs: CUDA architectures the host's llama.cpp build targets, e.g. ("121",)

    Returns the host's identity (facts.identity.HostIdentity), or None after marking the host
    failed with one line that says what was found and what is required.
    """
    identity = host.get_fact(HostIdentity, models_dir=config.layout.models_dir)
    result = check_host(
        config.gpu,
        identity,
        group=config.group,
        model_bytes=model_bytes,
        cuda_archs=list(cuda_archs),
    )
    for warning in result.warnings:
        logger.warning(f"{host.print_prefix}{warning}")
    if result.failures:
        fail_host("; ".join(result.failures))
        return None
    return identity
