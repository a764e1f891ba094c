"""A private GnuPG home with its own agent, and the signing keys of the sandbox's repositories.

The agent runs in systemd's supervised mode on a socket passed as fd 3, so it stays a child of
this process and is stopped and reaped here rather than left daemonized.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TOOLKIT_KEY_UID = "gpufleet sandbox libnvidia-container <libnvidia-container@gpufleet.invalid>"
DOCKER_KEY_UID = "gpufleet sandbox docker <docker@gpufleet.invalid>"


def gpg(home: Path, *args: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--yes",
            "--no-tty",
            "--no-autostart",
            "--quiet",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            *args,
        ],
        input=stdin,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"gpg {' '.join(args)} failed: {proc.stderr.decode().strip()}")
    return proc.stdout


_AGENT = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="std")
os.execvp("gpg-agent", ["gpg-agent", "--homedir", sys.argv[2], "--supervised"])
"""


@contextmanager
def private_home(home: Path) -> Iterator[Path]:
    """
    A private GnuPG home with its own gpg-agent for the duration of the block.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    with tempfile.TemporaryDirectory(prefix="gpufleet-gpg-") as short:
        # The agent's socket goes in the home, and a socket path has ~107 bytes at most:
        # a deep home (a state directory in a long checkout path) is reached through a link.
        link = Path(short) / "home"
        link.symlink_to(home.resolve())
        with _agent(link) as used:
            yield used


@contextmanager
def _agent(home: Path) -> Iterator[Path]:
    path = subprocess.run(
        ["gpgconf", "--homedir", str(home), "--list-dirs", "agent-socket"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The socket lives in the home, or under /run/user/<uid>/gnupg where that exists.
    subprocess.run(
        ["gpgconf", "--homedir", str(home), "--create-socketdir"], capture_output=True, check=False
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        Path(path).unlink(missing_ok=True)
        listener.bind(path)
        listener.listen(16)
        fd = listener.fileno()
        agent = subprocess.Popen(
            [sys.executable, "-c", _AGENT, str(fd), str(home)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    try:
        yield home
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        Path(path).unlink(missing_ok=True)


def _secret_fingerprints(home: Path) -> list[str]:
    out = gpg(home, "--list-secret-keys", "--with-colons").decode()
    fprs, after_sec = [], False
    for line in out.splitlines():
        kind = line.split(":", 1)[0]
        if kind == "sec":
            after_sec = True
        elif kind == "fpr" and after_sec:
            fprs.append(line.split(":")[9])
            after_sec = False
    return fprs


def make_signing_key(gnupg_home: Path, uid: str = TOOLKIT_KEY_UID) -> str:
    """
    Create (or reuse) the repository signing key in ``gnupg_home``; returns its fingerprint.

    + gnupg_home: private GnuPG home (created, mode 0700); an existing secret key is reused
    + uid: user id for a new key (ed25519, signing only, no passphrase, no expiry)
    """
    with private_home(gnupg_home) as home:
        fprs = _secret_fingerprints(home)
        if not fprs:
            gpg(home, "--quick-generate-key", uid, "ed25519", "sign", "never")
            fprs = _secret_fingerprints(home)
        return fprs[0]


def export_public_key(gnupg_home: Path, path: Path) -> None:
    """
    Write the ASCII-armored public key of ``gnupg_home`` to ``path`` (like upstream ``gpgkey``).
    """
    fingerprint = make_signing_key(gnupg_home)
    with private_home(gnupg_home) as home:
        armored = gpg(home, "--armor", "--export", fingerprint)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_if_changed(path, armored)


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` atomically unless ``path`` already holds it; True when written."""
    if path.exists() and path.read_bytes() == data:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True
