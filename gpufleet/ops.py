"""gpufleet's own pyinfra operations, for what pyinfra's cannot do safely.

Each takes the state it compares against as an argument (read once per run by a fact), yields
only the difference and says ``host.noop(...)`` otherwise.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess

from pyinfra import host
from pyinfra.api import FunctionCommand, OperationError, StringCommand, operation

from facts.managed import ManagedFile

NVIDIA_RUNTIME = {"args": [], "path": "nvidia-container-runtime"}


class Secret:
    """A value that prints as ``<secret>``: pyinfra logs operation arguments at debug level."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


def _exec_with_stdin(state, host, command: str, feed) -> None:
    """Run ``command`` on the host over the existing SSH connection, writing ``feed`` to stdin.

    Nothing sent this way reaches a command line, a log or a temporary file.
    """
    if host.data.get("_sudo") or state.config.SUDO:
        command = "sudo -H -n sh -c " + shlex.quote(command)
    client = getattr(host.connector, "client", None)
    if client is None:
        raise OperationError(f"{host.name}: streaming needs an SSH connection")
    stdin, stdout, stderr = client.exec_command(command)
    feed(stdin)
    stdin.channel.shutdown_write()
    status = stdout.channel.recv_exit_status()
    if status != 0:
        err = stderr.read().decode(errors="replace").strip()
        raise OperationError(f"remote command failed ({status}): {err[-500:]}")


def _write_secret_file(state, host, path: str, content: Secret, owner: str, group: str) -> None:
    # mktemp beside the target under umask 077: the file is 0600 from the moment it exists,
    # and mv replaces the old one atomically (same filesystem).
    script = (
        f'set -e; umask 077; p={shlex.quote(path)}; d=$(dirname "$p"); mkdir -p "$d"; '
        f't=$(mktemp "$d/.gpufleet.XXXXXX"); trap \'rm -f "$t"\' EXIT; cat > "$t"; '
        f'chown {shlex.quote(owner)}:{shlex.quote(group)} "$t"; chmod 600 "$t"; '
        f'mv -f "$t" "$p"; trap - EXIT'
    )

    def feed(stdin):
        stdin.write(content.reveal().encode())

    _exec_with_stdin(state, host, script, feed)


@operation()
def secret_file(
    path: str,
    content: Secret,
    *,
    current: ManagedFile | None,
    owner: str = "root",
    group: str = "root",
):
    """Keep a file of secrets (a ``.env``) at ``path``, mode 0600, never showing its content.

    + path: remote path
    + content: the whole file, wrapped in ``Secret``
    + current: the file's hash/mode/owner from ``facts.managed.ManagedFiles`` (None: absent)
    + owner/group: who owns it

    The content travels on the SSH channel's stdin: never on a command line, in ``--diff``
    or in a temporary file readable by others.

    **Example:**

    .. code:: python

        secret_file("/opt/gpufleet/.env", Secret(text), current=files["/opt/gpufleet/.env"])
    """
    digest = hashlib.sha256(content.reveal().encode()).hexdigest()
    if current and (current["sha256"], current["mode"], current["owner"], current["group"]) == (
        digest,
        "600",
        owner,
        group,
    ):
        host.noop(f"{path} is up to date")
        return
    yield FunctionCommand(_write_secret_file, (path, content, owner, group), {})


def _transfer_image(state, host, ref: str) -> None:
    save = subprocess.Popen(["docker", "save", ref], stdout=subprocess.PIPE)
    assert save.stdout is not None

    def feed(stdin):
        while chunk := save.stdout.read(1 << 20):
            stdin.write(chunk)

    try:
        _exec_with_stdin(state, host, "docker load -q", feed)
    finally:
        if save.wait() != 0:
            raise OperationError(f"docker save {ref} failed on the control machine")


@operation()
def image(ref: str, *, source: str, present_id: str | None, local_id: str | None = None):
    """Make a container image present on the host.

    + ref: image reference, e.g. ``nvidia/cuda:12.8.1-base-ubuntu24.04``
    + source: ``pull`` from its registry, or ``transfer`` from the control machine's Docker
      (``docker save`` streamed into ``docker load`` over SSH) for air-gapped hosts
    + present_id: the image id on the host now (None: absent)
    + local_id: for ``transfer``, the id on the control machine; a different id re-sends it
    """
    if present_id and (source == "pull" or present_id == local_id):
        host.noop(f"image {ref} is present")
        return
    if source == "pull":
        yield StringCommand("docker", "pull", "-q", ref)
    else:
        if local_id is None:
            raise OperationError(f"image {ref} is not on the control machine to transfer")
        yield FunctionCommand(_transfer_image, (ref,), {})


def owned_daemon_keys(daemon: dict | None, *, set_default: bool, cdi: bool) -> list[str]:
    """The keys of daemon.json that gpufleet owns and that differ from what it wants."""
    daemon = daemon or {}
    drift = []
    if (daemon.get("runtimes") or {}).get("nvidia") != NVIDIA_RUNTIME:
        drift.append("runtimes.nvidia")
    if set_default and daemon.get("default-runtime") != "nvidia":
        drift.append("default-runtime")
    if cdi and (daemon.get("features") or {}).get("cdi") is not True:
        drift.append("features.cdi")
    return drift


@operation()
def nvidia_runtime(*, daemon_json: dict | None, set_default: bool = False, cdi: bool = False):
    """Wire the NVIDIA runtime into Docker with ``nvidia-ctk``, only when its keys differ.

    + daemon_json: /etc/docker/daemon.json as it is now (None: absent)
    + set_default: make ``nvidia`` the default runtime (Jetson)
    + cdi: enable CDI in Docker

    ``nvidia-ctk`` merges into the existing file, so every key gpufleet does not own stays.
    """
    drift = owned_daemon_keys(daemon_json, set_default=set_default, cdi=cdi)
    if not drift:
        host.noop("Docker's NVIDIA runtime is configured")
        return
    args = ["nvidia-ctk", "runtime", "configure", "--runtime=docker"]
    if set_default:
        args.append("--set-as-default")
    if cdi:
        args.append("--cdi.enabled")
    yield StringCommand(*args)
