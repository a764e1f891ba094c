"""A signed apt source: keyring and list file, the way vendor install guides lay them down."""

from __future__ import annotations

from io import StringIO

from pyinfra.operations import files, server

from gpufleet.plan import HostPlan


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
            commands=[
                f"install -d -m 0755 \"$(dirname '{source.keyring}')\" && "
                f"curl -fsSL '{source.key_url}' | gpg --batch --yes --dearmor -o "
                f"'{source.keyring}' && chmod 0644 '{source.keyring}'"
            ],
        )
    if plan.touches(step, source.list_path):
        files.put(
            name=f"Add the {source.title} apt source",
            src=StringIO(source.line),
            dest=source.list_path,
            mode="644",
        )
