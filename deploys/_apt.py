"""A signed apt source: keyring and list file, the way vendor install guides lay them down."""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra.operations import files, server

from gpufleet.plan.types import HostPlan


def key_command(url: str, keyring: str) -> str:
    """Fetch an ASCII-armored key from ``url`` and store it dearmored at ``keyring``.

    Both are quoted, and ``--`` ends curl's options: the URL is data (its ``{os_id}`` comes
    from the host's os-release), never a flag or shell syntax.
    """
    q = shlex.quote
    return (
        f'install -d -m 0755 "$(dirname -- {q(keyring)})" && '
        f"curl -fsSL -- {q(url)} | gpg --batch --yes --dearmor -o {q(keyring)} && "
        f"chmod 0644 {q(keyring)}"
    )


def apt_source(plan: HostPlan, step: str) -> None:
    """Install a repository's signing key (dearmored) and its list file with ``signed-by``,
    each only where the plan lists it.

    + step: the plan step whose source it is (``engine``, ``toolkit``)
    """
    source = plan.apt_sources.get(step)
    if source is None:
        return
    if plan.touches(step, source.keyring):
        server.shell(
            name=f"Install the {source.title} signing key",
            commands=[key_command(source.key_url, source.keyring)],
        )
    if plan.touches(step, source.list_path):
        files.put(
            name=f"Add the {source.title} apt source",
            src=StringIO(source.line),
            dest=source.list_path,
            mode="644",
        )
