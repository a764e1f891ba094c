"""Reaching a host for a bench: OpenSSH's own port forward per service, and the GPU sampler
streaming over a second ``ssh`` while the load runs.

Both use what the inventory gives pyinfra (host name, port, user, key, the pinned known_hosts
file) and refuse a host key they do not know (``StrictHostKeyChecking=yes``): no trust on first
use here either. ``BatchMode`` keeps ssh from ever asking for a password.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import dataclass

from gpufleet.core import gpu as gpu_mod


class Unreachable(RuntimeError):
    """The host cannot be reached over SSH (its message is ssh's own last line)."""


@dataclass(frozen=True, kw_only=True)
class SshTarget:
    """How to reach a host over SSH, as the inventory says (no password ever comes here).

    + name: the inventory name; hostname/port/user: where to connect
    + key: a private key file; known_hosts: the file that pins host keys
    + sudo: commands need ``sudo -n`` (a non-root inventory user)
    """

    name: str
    hostname: str
    port: int = 22
    user: str | None = None
    key: str | None = None
    known_hosts: str | None = None
    sudo: bool = False


def ssh_argv(target: SshTarget, *extra: str, timeout: int = 15) -> list[str]:
    """The ``ssh`` command line that reaches ``target`` (options only, then ``extra``)."""
    options = [
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        f"ConnectTimeout={timeout}",
        "ServerAliveInterval=5",
        "ServerAliveCountMax=3",
    ]
    argv = ["ssh", "-p", str(target.port), *(arg for o in options for arg in ("-o", o))]
    if target.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={target.known_hosts}"]
    if target.key:
        argv += ["-i", target.key, "-o", "IdentitiesOnly=yes"]
    if target.user:
        argv += ["-l", target.user]
    return [*argv, *extra, target.hostname]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Forward:
    """A local port that reaches ``remote_host:remote_port`` as the SSH host sees it.

    .. code:: python

        with Forward(target, "127.0.0.1", 8000) as port:
            requests.get(f"http://127.0.0.1:{port}/health")
    """

    def __init__(
        self, target: SshTarget, remote_host: str, remote_port: int, *, timeout: float = 20
    ) -> None:
        self.target, self.remote_host, self.remote_port = target, remote_host, remote_port
        self.timeout = timeout
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> int:
        port = _free_port()
        spec = f"127.0.0.1:{port}:{self.remote_host}:{self.remote_port}"
        argv = ssh_argv(self.target, "-N", "-o", "ExitOnForwardFailure=yes", "-L", spec)
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                lines = (self._proc.stderr.read() if self._proc.stderr else "").strip()
                raise Unreachable(lines.splitlines()[-1] if lines else "ssh exited")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise Unreachable(f"no forward to {self.target.hostname} after {self.timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            _end(self._proc)


def _end(proc: subprocess.Popen) -> None:
    """Stop an ssh started here: SIGTERM, then SIGKILL after 5 s; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Sampler:
    """The GPU sampler (``gpufleet.core.gpu.sampler_command``) running on the host while a
    bench runs, its lines collected as they arrive."""

    def __init__(self, target: SshTarget, *, sources, seconds: int) -> None:
        command = gpu_mod.sampler_command(sources=sources, seconds=seconds, sudo=target.sudo)
        self._proc = subprocess.Popen(
            [*ssh_argv(target), command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> list[gpu_mod.GpuSample]:
        """End the sampler (the connection closes: the loop on the host stops) and parse."""
        _end(self._proc)
        self._thread.join(timeout=5)
        return gpu_mod.parse_sampler_output(self.lines)
