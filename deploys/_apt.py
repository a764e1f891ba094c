"""A signed apt source: keyring and list file, the way vendor install guides lay them down."""

from __future__ import annotations

import hashlib
from io import StringIO

from pyinfra.api.deploy import deploy
from pyinfra.operations import files, server

from facts.managed import ManagedFile


def source_line(*, keyring: str, url: str, dist: str) -> str:
    return f"deb [signed-by={keyring}] {url} {dist}\n"


@deploy("Signed apt source")
def apt_source(
    *,
    title: str,
    key_url: str,
    keyring: str,
    list_path: str,
    line: str,
    current: dict[str, ManagedFile | None],
):
    """Install a repository's signing key (dearmored) and its list file with ``signed-by``.

    + title: what the repository is, for operation names
    + key_url: ASCII-armored key URL, fetched by the host itself (mirrors may be host-local)
    + keyring/list_path: where key and list go
    + line: the list file's content
    + current: ``facts.managed.ManagedFiles`` for keyring and list_path

    Nothing is issued for a part that is already as declared.
    """
    if current.get(keyring) is None:
        server.shell(
            name=f"Install the {title} signing key",
            commands=[
                f"install -d -m 0755 \"$(dirname '{keyring}')\" && "
                f"curl -fsSL '{key_url}' | gpg --batch --yes --dearmor -o '{keyring}'"
                f" && chmod 0644 '{keyring}'"
            ],
        )
    listed = current.get(list_path)
    if listed is None or listed["sha256"] != hashlib.sha256(line.encode()).hexdigest():
        files.put(
            name=f"Add the {title} apt source", src=StringIO(line), dest=list_path, mode="644"
        )
