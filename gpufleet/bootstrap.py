"""``gpufleet bootstrap``: take over a machine that knows only its installer user's password.

    gpufleet bootstrap ws-01 --user ubuntu --group rtx5090 --passwordless-sudo \\
        --inventory inventory/hosts.py

The steps, each printed as one line, each a no-op when already done:

1. the host key, read before anything is sent: it must equal ``--host-key`` or an entry of the
   known_hosts file (never trust on first use: a refusal prints the fingerprint it saw and how
   to read the real one on the host's console);
2. the password login (the password from ``--password-file``, ``$GPUFLEET_BOOTSTRAP_PASSWORD``
   or a prompt); then, read-only, the OS (Ubuntu or Debian) and ``sudo -v``;
3. the control machine's public key in the user's ``authorized_keys`` (or a new ``--ops-user``
   with it), a sudoers drop-in checked by ``visudo`` (``--passwordless-sudo``; an ops user
   always gets one), the host key recorded in known_hosts;
4. the host added to the ``--inventory`` file, then the group's converge, as pyinfra runs it.

A refusal (wrong host key, wrong password, no sudo, an unsupported OS) is one line that says
what to do, and comes before the first change. The password is never part of a command line,
a file or the output: each ``sudo -S -p ''`` reads it from the SSH channel's stdin, and every
script run under sudo starts with ``exec </dev/null``, so a sudo that needs no password leaves
it unread, not handed to a command. File contents travel base64-encoded in the command (only
the public key and the drop-in, neither secret).

Why no converge without passwordless sudo: pyinfra's ``_sudo_password`` puts the password on
the remote command line (``env SUDO_ASKPASS=... PYINFRA_SUDO_PASSWORD=<password> sudo -H -A
-k ...``: ``make_unix_command``, ``pyinfra/connectors/util.py`` line 453 in 3.10), where every
user of the host reads it in the process list for as long as the command runs. So bootstrap
converges only as a user whose sudo needs no password, and without ``--passwordless-sudo`` or
``--ops-user`` it stops after installing the key and says so.

The inventory: ``--inventory`` edits only a file of plain lists (``group = [("name",
{...}), ...]``, as ``inventory/hosts.py``), created when absent. A generated inventory (the
sandbox's) reads such a file with ``read_inventory`` and is named with ``--converge-inventory``.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import hashlib
import logging
import os
import re
import shlex
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import paramiko
from pydantic import SecretStr

from gpufleet.fleet import runner
from gpufleet.fleet.runner import UsageError

PASSWORD_ENV = "GPUFLEET_BOOTSTRAP_PASSWORD"
DEFAULT_KEY = "~/.ssh/id_ed25519"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
SUDOERS_DIR = "/etc/sudoers.d"
SUPPORTED_OS = ("ubuntu", "debian")
TIMEOUT = 10  # seconds to connect and to finish the handshake
COMMAND_TIMEOUT = 300  # seconds a remote step may take (useradd on a slow disk)
# Debian's NAME_REGEX (adduser.conf), without the trailing $ of machine accounts: no dot, so
# sudo never skips the drop-in (it ignores names in sudoers.d that contain one).
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
GROUP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
# The algorithms that present a known_hosts key of each type (RSA has three names).
_KEY_ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}
_CONSOLE_FILE = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}


class Refused(Exception):
    """A check failed or a step could not be done: one line, exit status 1."""


class InventoryError(Exception):
    """An inventory file bootstrap cannot edit, or that has the host with other data."""


# --- the host key -----------------------------------------------------------------------------


def fingerprint(key: paramiko.PKey) -> str:
    """The key's fingerprint as OpenSSH prints it: ``SHA256:`` + unpadded base64 of the blob."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    """``host`` on port 22, else ``[host]:port``: the name OpenSSH looks up and records."""
    return host if port == 22 else f"[{host}]:{port}"


def console_command(key_type: str) -> str:
    """What to run on the host's console to read the fingerprint of its key of this type."""
    kind = _CONSOLE_FILE.get(key_type, "ecdsa" if key_type.startswith("ecdsa") else "ed25519")
    return f"ssh-keygen -lf /etc/ssh/ssh_host_{kind}_key.pub"


@dataclass(frozen=True)
class HostKeyCheck:
    """The decision on the key a host showed.

    + ok: bootstrap may go on and send the password
    + line: what to print: the match, or the one-line refusal
    + record: the key is not in known_hosts yet (it is added once the host is bootstrapped)
    """

    ok: bool
    line: str
    record: bool = False


def check_host_key(
    name: str,
    key: paramiko.PKey,
    *,
    known: paramiko.HostKeys,
    known_path: str,
    expected: str | None,
    revoked: frozenset[str] = frozenset(),
) -> HostKeyCheck:
    """Accept ``key`` only if it is the ``expected`` fingerprint or the known_hosts entry.

    A known_hosts entry of the same type with another key refuses, whatever ``expected`` says:
    the host was reinstalled, or someone is in the middle, and a person must tell which.
    """
    seen, kind = fingerprint(key), key.get_name()
    check = console_command(kind)
    if key.get_base64() in revoked:
        return HostKeyCheck(
            False,
            f"{name}: host key {seen} is @revoked in {known_path}: do not use this host until "
            "its key is replaced (nothing was sent)",
        )
    pinned = (known.lookup(name) or {}).get(kind)
    if pinned is not None and pinned.asbytes() != key.asbytes():
        return HostKeyCheck(
            False,
            f"{name}: WARNING: HOST KEY CHANGED: it shows {seen} ({kind}) but {known_path} has "
            f"{fingerprint(pinned)}: someone may be in the middle, or the host was reinstalled; "
            f"compare with `{check}` on its console, and only if they match remove the old "
            f"entry (`ssh-keygen -R '{name}' -f {known_path}`) and run again (nothing was sent)",
        )
    if expected is not None and seen != expected:
        return HostKeyCheck(
            False,
            f"{name}: host key {seen} ({kind}) is not the --host-key {expected}: compare with "
            f"`{check}` on the host's console (nothing was sent)",
        )
    if pinned is not None:
        return HostKeyCheck(True, f"host key {seen} matches {known_path}")
    if expected is not None:
        return HostKeyCheck(True, f"host key {seen} matches --host-key", record=True)
    return HostKeyCheck(
        False,
        f"{name}: host key {seen} ({kind}) is not in {known_path}: check it on the host's "
        f"console with `{check}`, then pass --host-key SHA256:... (nothing was sent)",
    )


def preferred_key_types(known_types: list[str], defaults: tuple[str, ...]) -> list[str]:
    """The host key algorithms to offer: those of keys known_hosts has for the host first, so
    the host shows one of them (as OpenSSH orders HostKeyAlgorithms)."""
    first = [a for t in known_types for a in _KEY_ALGORITHMS.get(t, (t,)) if a in defaults]
    return list(dict.fromkeys([*first, *defaults]))


class KnownHosts(NamedTuple):
    keys: paramiko.HostKeys
    revoked: frozenset[str]  # base64 blobs of the ``@revoked`` lines


def load_known_hosts(path: Path) -> KnownHosts:
    """The known_hosts file as OpenSSH reads it; empty if absent.

    Hashed ``|1|`` names match (paramiko); ``@revoked`` keys are kept apart, so a host showing
    one is refused; ``@cert-authority`` lines and lines no parser understands are skipped.
    """
    keys, revoked = paramiko.HostKeys(), set()
    try:
        text = path.read_text() if path.exists() else ""
    except OSError as exc:
        raise UsageError(f"--known-hosts {path}: {exc.strerror}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line.startswith("@"):
            fields = line.split()
            if fields[0] == "@revoked" and len(fields) >= 4:
                revoked.add(fields[3])
            continue
        if not line or line.startswith("#"):
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
        except (paramiko.hostkeys.InvalidHostKey, paramiko.SSHException, ValueError):
            continue
        for name in entry.hostnames if entry else ():
            keys.add(name, entry.key.get_name(), entry.key)
    return KnownHosts(keys, frozenset(revoked))


def known_hosts_line(name: str, key: paramiko.PKey) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}"


def record_host_key(path: Path, name: str, key: paramiko.PKey) -> bool:
    """Append the host's key to known_hosts (made 0600, its directory 0700) unless it is there."""
    if (load_known_hosts(path).keys.lookup(name) or {}).get(key.get_name()) is not None:
        return False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    before = path.read_bytes() if path.exists() else b""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(
            ("\n" if before and not before.endswith(b"\n") else "")
            + known_hosts_line(name, key)
            + "\n"
        )
    return True


# --- the password -----------------------------------------------------------------------------


def read_password(
    password_file: str | None, env: Mapping[str, str]
) -> tuple[SecretStr | None, str]:
    """The password and where it came from: the file's first line, then the environment.

    None: neither has it (the caller asks for it). The value is held as a ``SecretStr``, which
    prints as stars.
    """
    if password_file:
        try:
            text = Path(password_file).expanduser().read_text()
        except OSError as exc:
            raise UsageError(f"--password-file {password_file}: {exc.strerror}") from None
        first = text.split("\n", 1)[0].removesuffix("\r")
        if not first:
            raise UsageError(f"--password-file {password_file}: its first line is empty")
        return SecretStr(first), password_file
    if env.get(PASSWORD_ENV):
        return SecretStr(env[PASSWORD_ENV]), f"${PASSWORD_ENV}"
    return None, "the prompt"


def mask(text: str, password: SecretStr | None) -> str:
    """``text`` with the password replaced: remote error lines pass through here to be shown."""
    value = password.get_secret_value() if password else ""
    return text.replace(value, "<password>") if value else text


# --- the remote commands: pure functions, so a test sees every command line -------------------


def sh(script: str) -> str:
    """``sh -c SCRIPT``: the same shell whatever the user's login shell is."""
    return "sh -c " + shlex.quote(script)


def sudo_command(script: str) -> str:
    """``script`` as root: sudo reads the password from stdin (no prompt, nothing echoed) and
    the script reads nothing from it, so a sudo that needs no password leaves it unread."""
    return "sudo -S -p '' " + sh("exec </dev/null; " + script)


SUDO_VALIDATE = "sudo -S -p '' -v"
OS_RELEASE = sh('. /etc/os-release && printf "%s\\n" "$ID" "${ID_LIKE:-}" "${PRETTY_NAME:-$ID}"')
_NEWLINE = 'if [ -s "$f" ] && [ -n "$(tail -c1 "$f")" ]; then echo >> "$f"; fi; '


def authorized_key_script(pubkey: str, *, dry: bool) -> str:
    """Add ``pubkey`` to the login user's ``~/.ssh/authorized_keys`` unless the line is there.

    Prints ``unchanged``, ``changed`` or (dry) ``would``.
    """
    key = shlex.quote(pubkey)
    return (
        'set -e; exec </dev/null; umask 077; d="$HOME/.ssh"; f="$d/authorized_keys"; '
        f'if [ -f "$f" ] && grep -qxF -- {key} "$f"; then echo unchanged; exit 0; fi; '
        + ("echo would; exit 0; " if dry else "")
        + 'mkdir -p "$d"; chmod 700 "$d"; '
        + _NEWLINE
        + f'printf "%s\\n" {key} >> "$f"; chmod 600 "$f"; echo changed'
    )


CREATE_USER = "useradd -m -s /bin/bash -G sudo -p '*' \"$u\"; made=created; "


def ops_user_script(user: str, pubkey: str, *, dry: bool) -> str:
    """(As root) create ``user`` (home, bash, group sudo, no password) unless it exists, and
    add ``pubkey`` to its authorized_keys unless the line is there.

    Prints ``unchanged``, ``changed`` (key added), ``created`` (user and key), or (dry)
    ``would-create`` / ``would``.
    """
    key = shlex.quote(pubkey)
    return (
        f"set -e; umask 077; u={shlex.quote(user)}; made=; "
        'if ! getent passwd "$u" >/dev/null; then '
        + ("echo would-create; exit 0; " if dry else CREATE_USER)
        + "fi; "
        'h=$(getent passwd "$u" | cut -d: -f6); g=$(id -gn "$u"); d="$h/.ssh"; '
        'f="$d/authorized_keys"; '
        f'if [ -f "$f" ] && grep -qxF -- {key} "$f"; then echo "${{made:-unchanged}}"; exit 0; fi; '
        + ("echo would; exit 0; " if dry else "")
        + 'install -d -m 700 -o "$u" -g "$g" "$d"; '
        + _NEWLINE
        + f'printf "%s\\n" {key} >> "$f"; chown "$u:$g" "$f"; chmod 600 "$f"; '
        'echo "${made:-changed}"'
    )


def sudoers_path(user: str, directory: str = SUDOERS_DIR) -> str:
    return f"{directory}/gpufleet-{user}"


def sudoers_content(user: str) -> str:
    """The drop-in that lets ``user`` sudo without a password (what pyinfra's ``_sudo`` needs)."""
    return (
        f"# gpufleet bootstrap: {user} converges this host with pyinfra, whose sudo can take no\n"
        "# password without putting it on a command line. Remove this file to undo.\n"
        f"{user} ALL=(ALL) NOPASSWD:ALL\n"
    )


def sudoers_script(user: str, *, dry: bool, directory: str = SUDOERS_DIR) -> str:
    """(As root) install the drop-in, mode 0440, unless the same file is there.

    The content travels base64-encoded; it goes to a temporary file that ``visudo -cf`` must
    accept before ``install`` puts it in place, and the whole configuration is checked again
    after (a failure removes the file). Prints ``unchanged``, ``changed``, ``invalid`` (exit
    3) or (dry) ``would``.
    """
    body = base64.b64encode(sudoers_content(user).encode()).decode()
    return (
        f"set -e; p={shlex.quote(sudoers_path(user, directory))}; "
        f"want() {{ printf %s {body} | base64 -d; }}; "
        'if [ -f "$p" ] && want | cmp -s - "$p" && [ "$(stat -c %a "$p")" = 440 ]; then '
        "echo unchanged; exit 0; fi; "
        + ("echo would; exit 0; " if dry else "")
        + 't=$(mktemp); trap \'rm -f "$t"\' EXIT; want > "$t"; '
        'visudo -cqf "$t" >/dev/null || { echo invalid; exit 3; }; '
        'install -m 0440 "$t" "$p"; '
        'visudo -cq >/dev/null || { rm -f "$p"; echo invalid; exit 3; }; '
        "echo changed"
    )


def parse_os_release(text: str) -> tuple[str, str, str]:
    """``ID``, ``ID_LIKE``, ``PRETTY_NAME`` from ``OS_RELEASE``'s three lines."""
    lines = [*text.splitlines(), "", "", ""]
    return lines[0].strip(), lines[1].strip(), lines[2].strip() or lines[0].strip()


def supported_os(os_id: str, id_like: str) -> bool:
    return any(x in SUPPORTED_OS for x in (os_id, *id_like.split()))


# --- the inventory ----------------------------------------------------------------------------


def literal(value: Any) -> str:
    """``value`` as Python source: dicts with quoted keys, True/False/None."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool | int | float) or value is None:
        return repr(value)
    raise TypeError(f"no literal for {type(value).__name__}")


def host_entry(name: str, data: dict) -> str:
    """``("name", {...})``: one host of a group list."""
    return f"({literal(name)}, {literal(data)})"


def _host_of(node: ast.expr) -> tuple[str, dict] | None:
    """A group list's element as (name, data), if it is a plain ``"name"`` or ``("name", {})``."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None
    if isinstance(value, str):
        return value, {}
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], dict)
    ):
        return value
    return None


def _groups(text: str, path: str) -> dict[str, ast.List]:
    """The group lists of a file in the simple format; InventoryError for anything else."""
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as exc:
        raise InventoryError(f"{path} line {exc.lineno}: not valid Python: {exc.msg}") from None
    groups: dict[str, ast.List] = {}
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        one = isinstance(node, ast.Assign) and len(node.targets) == 1
        target = node.targets[0] if one else None
        if (
            isinstance(target, ast.Name)
            and isinstance(node.value, ast.List)
            and target.id not in groups
            and all(_host_of(e) is not None for e in node.value.elts)
        ):
            groups[target.id] = node.value
            continue
        raise InventoryError(
            f'{path} line {node.lineno} is not a plain `group = [("host", {{...}}), ...]` '
            "list, so bootstrap does not edit this file"
        )
    return groups


def read_inventory(path: str | Path) -> dict[str, list[tuple[str, dict]]]:
    """A simple-format inventory file's groups, read without running it; empty if absent.

    For generated inventories that take in the hosts bootstrap added:

    .. code:: python

        for group, hosts in read_inventory(".sandbox/bootstrapped.py").items(): ...
    """
    path = Path(path)
    return read_inventory_text(path.read_text(), str(path)) if path.exists() else {}


def read_inventory_text(text: str, path: str = "inventory") -> dict[str, list[tuple[str, dict]]]:
    return {g: [_host_of(e) for e in node.elts] for g, node in _groups(text, path).items()}


NEW_INVENTORY = '"""Hosts `gpufleet bootstrap` took over: plain lists, as inventory/hosts.py."""\n'


def add_host(
    text: str | None, group: str, name: str, data: dict, *, path: str = "inventory"
) -> tuple[str, bool]:
    """The inventory with ``(name, data)`` in ``group``, and whether that changed it.

    ``text`` None: a new file. The host already in the group with the same data: unchanged;
    with other data: InventoryError (a person decides which is right). Everything else in the
    file stays as it was written, comments included.
    """
    entry = host_entry(name, data)
    if text is None:
        return f"{NEW_INVENTORY}\n{group} = [\n    {entry},\n]\n", True
    groups = _groups(text, path)
    node = groups.get(group)
    if node is None:
        head = text.rstrip("\n")
        block = f"{group} = [\n    {entry},\n]\n"
        return (f"{head}\n\n{block}" if head else block), True
    for elt in node.elts:
        there, there_data = _host_of(elt)
        if there == name:
            if there_data == data:
                return text, False
            raise InventoryError(
                f"{path}: {name} is already in {group} as {host_entry(there, there_data)}: "
                f"make it {entry} by hand, or pass the options that match it"
            )
    lines = text.encode().splitlines(keepends=True)  # \n, \r\n, \r: the lines ast counts
    last, close = node.end_lineno - 1, node.end_col_offset - 1  # the `]`, in UTF-8 bytes
    if node.elts and node.lineno != node.end_lineno and not lines[last][:close].strip():
        tail = node.elts[-1]
        after = lines[tail.end_lineno - 1]
        between = b"".join(
            [after[tail.end_col_offset :], *lines[tail.end_lineno : last], lines[last][:close]]
        )
        if b"," not in re.sub(rb"#[^\n]*", b"", between):
            cut = tail.end_col_offset
            lines[tail.end_lineno - 1] = after[:cut] + b"," + after[cut:]
        first = lines[node.elts[0].lineno - 1]
        indent = first[: len(first) - len(first.lstrip())] or b"    "
        lines.insert(last, indent + entry.encode() + b",\n")
        new = b"".join(lines).decode()
    else:
        elements = [ast.get_source_segment(text, e) for e in node.elts] + [entry]
        start = sum(len(x) for x in lines[: node.lineno - 1]) + node.col_offset
        end = sum(len(x) for x in lines[: node.end_lineno - 1]) + node.end_col_offset
        raw = b"".join(lines)
        body = "[\n" + "".join(f"    {e},\n" for e in elements) + "]"
        new = (raw[:start] + body.encode() + raw[end:]).decode()
    added = _groups(new, path)[group].elts[-1]
    if _host_of(added) != (name, data):  # an edit this function cannot make: never write it
        raise InventoryError(f"{path}: could not add {name} to {group}: add {entry} by hand")
    return new, True


def write_atomically(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    tmp = path.with_name(f".{path.name}.gpufleet-tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    os.chmod(tmp, mode)
    tmp.replace(path)


def host_data(
    *, user: str, host: str, name: str, port: int, key: str | None, known_hosts: str | None
) -> dict:
    """The host's inventory data: its user with ``_sudo``, and only the settings that differ
    from pyinfra's defaults."""
    data: dict[str, Any] = {"ssh_user": user, "_sudo": True}
    if name != host:
        data["ssh_hostname"] = host
    if port != 22:
        data["ssh_port"] = port
    if key:
        data["ssh_key"] = key
    if known_hosts:
        data["ssh_known_hosts_file"] = known_hosts
    return data


def converge_command(inventory: str, group: str, name: str) -> list[str]:
    return [runner.pyinfra_bin(), "-y", inventory, f"deploys/{group}.py", "--limit", name]


# --- the plan: every option checked and every local file read before connecting --------------


@dataclass(frozen=True)
class Plan:
    """What one bootstrap will do, decided before anything is sent.

    + name: the host's inventory name (``--name``, else HOST)
    + target: the user the key is for and pyinfra converges as (the login user or ops user)
    + sudoers: write a drop-in for ``target`` (``--passwordless-sudo``, or an ops user)
    + data: the host's inventory data, when it can be converged
    + add: the ``--inventory`` file does not have the host yet
    """

    host: str
    port: int
    user: str
    name: str
    group: str | None
    pubkey: str
    key_path: Path
    known_hosts: Path
    expected: str | None
    ops_user: str | None
    sudoers: bool
    dry: bool
    password: SecretStr | None = field(repr=False)
    password_source: str
    data: dict | None = None
    inventory: Path | None = None
    add: bool = False
    converge_inventory: str | None = None

    @property
    def target(self) -> str:
        return self.ops_user or self.user

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def known_name(self) -> str:
        return known_hosts_name(self.host, self.port)


def _public_key(key_path: Path) -> str:
    pub = key_path.with_name(key_path.name + ".pub")
    try:
        line = pub.read_text().strip().splitlines()[0] if pub.exists() else ""
    except (OSError, IndexError):
        line = ""
    if not re.fullmatch(r"(ssh-|ecdsa-|sk-)\S+ [A-Za-z0-9+/=]+( [^\n]*)?", line):
        raise UsageError(
            f"no public key in {pub}: make the pair with `ssh-keygen -t ed25519 "
            f"-f {key_path}`, or name yours with --key"
        )
    return line


def _check_names(
    *, user: str, ops_user: str | None, group: str | None, host_key: str | None
) -> None:
    """Each name an option gives has the shape it must have."""
    for option, value in (("--user", user), ("--ops-user", ops_user)):
        if value is not None and not USER_NAME.fullmatch(value):
            raise UsageError(
                f"{option} {value!r}: a user name is lower case letters, digits, "
                "_ and -, starting with a letter or _"
            )
    if group is not None and not GROUP_NAME.fullmatch(group):
        raise UsageError(f"--group {group!r}: a group is a name like rtx5090 or spark")
    if host_key is not None and not FINGERPRINT.fullmatch(host_key):
        raise UsageError(
            f"--host-key {host_key!r}: give it as `ssh-keygen -lf` prints it, "
            "SHA256: and 43 characters"
        )


def _check_together(
    *, inventory: str | None, converge_inventory: str | None, group: str | None, sudoers: bool
) -> None:
    """The options that only make sense with others are given with them."""
    if inventory and not group:
        raise UsageError("--inventory needs --group: the group to add the host to")
    if converge_inventory and not inventory:
        raise UsageError("--converge-inventory needs --inventory: the file the host is added to")
    if inventory and not sudoers:
        raise UsageError(
            "--inventory converges the host, which needs --passwordless-sudo or --ops-user: "
            "pyinfra puts a sudo password on the remote command line, visible in the process list"
        )


def _would_add(
    inventory: Path, group: str, name: str, data: dict, converge_inventory: str | None
) -> bool:
    """Whether adding the host changes ``inventory``; the files a converge needs must exist."""
    for what, path in (
        ("deploy file", f"deploys/{group}.py"),
        ("--converge-inventory", converge_inventory),
    ):
        if path and not Path(path).is_file():
            raise UsageError(f"{what} {path} not found (run from the project directory)")
    old = inventory.read_text() if inventory.exists() else None
    try:
        return add_host(old, group, name, data, path=str(inventory))[1]
    except InventoryError as exc:
        raise UsageError(str(exc)) from None


def make_plan(
    *,
    host: str,
    user: str,
    port: int = 22,
    name: str | None = None,
    group: str | None = None,
    password_file: str | None = None,
    host_key: str | None = None,
    known_hosts: str | None = None,
    key: str | None = None,
    ops_user: str | None = None,
    passwordless_sudo: bool = False,
    inventory: str | None = None,
    converge_inventory: str | None = None,
    dry: bool = False,
    env: Mapping[str, str] = os.environ,
) -> Plan:
    """Check every option and read every local file; UsageError (exit 64) names the first
    problem. Nothing is sent."""
    _check_names(user=user, ops_user=ops_user, group=group, host_key=host_key)
    sudoers = passwordless_sudo or ops_user is not None
    _check_together(
        inventory=inventory, converge_inventory=converge_inventory, group=group, sudoers=sudoers
    )
    name = name or host
    key_path = Path(key or DEFAULT_KEY).expanduser()
    known_path = Path(known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()
    pubkey = _public_key(key_path)
    password, source = read_password(password_file, env)
    data = None
    if sudoers:
        data = host_data(
            user=ops_user or user,
            host=host,
            name=name,
            port=port,
            key=str(key_path.resolve()) if key else None,
            known_hosts=str(known_path.resolve()) if known_hosts else None,
        )
    inventory_path, add = (Path(inventory) if inventory else None), False
    if inventory_path is not None:
        assert group is not None and data is not None
        add = _would_add(inventory_path, group, name, data, converge_inventory)
    return Plan(
        host=host,
        port=port,
        user=user,
        name=name,
        group=group,
        pubkey=pubkey,
        key_path=key_path,
        known_hosts=known_path,
        expected=host_key,
        ops_user=ops_user,
        sudoers=sudoers,
        dry=dry,
        password=password,
        password_source=source,
        data=data,
        inventory=inventory_path,
        add=add,
        converge_inventory=converge_inventory,
    )


# --- the SSH session --------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def word(self) -> str:
        """The last line a step script printed (``changed``, ``unchanged``, ...)."""
        lines = self.stdout.strip().splitlines()
        return lines[-1].strip() if lines else ""


def connect(host: str, port: int, *, where: str, prefer: Sequence[str] = ()) -> paramiko.Transport:
    """An SSH transport with the handshake done and nothing else sent (no user, no password).

    + prefer: key types to ask the host for first (those known_hosts has for it)
    """
    try:
        sock = socket.create_connection((host, port), timeout=TIMEOUT)
    except socket.gaierror:
        raise Refused(f"{where}: no such host; check its name (nothing was changed)") from None
    except ConnectionRefusedError:
        raise Refused(
            f"{where}: connection refused: is sshd running and is this its port? "
            "(nothing was changed)"
        ) from None
    except TimeoutError:
        raise Refused(
            f"{where}: no answer within {TIMEOUT}s: check the address, the port and "
            "the firewall (nothing was changed)"
        ) from None
    except OSError as exc:
        raise Refused(f"{where}: cannot connect: {exc.strerror} (nothing was changed)") from None
    transport = paramiko.Transport(sock)
    options = transport.get_security_options()
    options.key_types = preferred_key_types(list(prefer), tuple(options.key_types))
    try:
        transport.start_client(timeout=TIMEOUT)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        transport.close()
        raise Refused(
            f"{where}: the SSH handshake failed ({exc}): is this an SSH server? "
            "(nothing was changed)"
        ) from None
    return transport


def execute(
    transport: paramiko.Transport,
    command: str,
    *,
    stdin: bytes = b"",
    timeout: float = COMMAND_TIMEOUT,
) -> Result:
    """Run ``command`` on its own channel, no terminal, ``stdin`` then end of input."""
    channel = transport.open_session(timeout=TIMEOUT)
    try:
        channel.settimeout(timeout)
        channel.exec_command(command)
        if stdin:
            channel.sendall(stdin)
        channel.shutdown_write()
        out = b"".join(iter(lambda: channel.recv(65536), b""))
        err = b"".join(iter(lambda: channel.recv_stderr(65536), b""))
        return Result(
            channel.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace")
        )
    finally:
        channel.close()


class Session:
    """The password session: commands as the login user, and as root with ``sudo -S``."""

    def __init__(self, plan: Plan, transport: paramiko.Transport) -> None:
        self.plan = plan
        self.transport = transport

    def run(self, command: str) -> Result:
        try:
            return execute(self.transport, command)
        except (TimeoutError, paramiko.SSHException, EOFError, OSError) as exc:
            raise self._lost(exc) from None

    def sudo(self, command: str) -> Result:
        """``command`` (built with ``sudo_command`` or ``SUDO_VALIDATE``), the password on stdin."""
        assert command.startswith("sudo -S -p '' ")
        password = self.plan.password
        assert password is not None
        stdin = password.get_secret_value().encode() + b"\n"
        try:
            return execute(self.transport, command, stdin=stdin)
        except (TimeoutError, paramiko.SSHException, EOFError, OSError) as exc:
            raise self._lost(exc) from None

    def _lost(self, exc: Exception) -> Refused:
        return Refused(
            f"{self.plan.where}: the connection failed during a step ({exc}); "
            "run bootstrap again: the steps done are kept"
        )

    def step(self, what: str, result: Result) -> str:
        if result.rc != 0 or not result.word:
            said = result.stderr.strip() or result.stdout.strip() or "no output"
            why = mask(said, self.plan.password).splitlines()[-1]
            raise Refused(
                f"{self.plan.name}: {what} failed (exit {result.rc}: {why}); "
                "fix it and run bootstrap again: the steps done are kept"
            )
        return result.word


def authenticate(plan: Plan, transport: paramiko.Transport) -> None:
    assert plan.password is not None
    try:
        transport.auth_password(plan.user, plan.password.get_secret_value())
    except paramiko.BadAuthenticationType as exc:
        allowed = ", ".join(exc.allowed_types) or "nothing"
        raise Refused(
            f"{plan.where}: the host takes no password logins (it allows {allowed}): "
            "enable PasswordAuthentication in its sshd on the console "
            "(nothing was changed)"
        ) from None
    except paramiko.AuthenticationException:
        raise Refused(
            f"{plan.where}: the password was refused; check it (nothing was changed)"
        ) from None
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise Refused(f"{plan.where}: the login failed ({exc}) (nothing was changed)") from None


def preflight(plan: Plan, session: Session) -> str:
    """Read-only: the OS must be Ubuntu or Debian, and the user's sudo must work."""
    os_id, id_like, pretty = parse_os_release(session.run(OS_RELEASE).stdout)
    if not supported_os(os_id, id_like):
        raise Refused(
            f"{plan.name}: unsupported OS {pretty or 'without /etc/os-release'}: "
            "gpufleet bootstraps Ubuntu and Debian (nothing was changed)"
        )
    sudo = session.sudo(SUDO_VALIDATE)
    if sudo.rc == 127 or "command not found" in sudo.stderr:
        raise Refused(
            f"{plan.name}: sudo is not installed: install it on the console "
            "(`apt-get install sudo`) (nothing was changed)"
        )
    if sudo.rc != 0:
        why = mask(sudo.stderr.strip(), plan.password).splitlines()
        raise Refused(
            f"{plan.user} cannot use sudo on {plan.name}"
            + (f" ({why[-1]})" if why else "")
            + f": add it to the sudo group on the console (`usermod -aG sudo {plan.user}`) "
            "(nothing was changed)"
        )
    return pretty


_INSTALLED = {
    "unchanged": "key already installed for {u}",
    "changed": "key installed for {u}",
    "created": "user {u} created, key installed",
    "would": "would install key for {u}",
    "would-create": "would create user {u} with the key",
}
_SUDOERS = {
    "unchanged": "sudoers drop-in {path} already in place",
    "changed": "sudoers drop-in {path} written (visudo accepted it)",
    "would": "would write sudoers drop-in {path}",
}


def change_host(plan: Plan, session: Session, echo: Callable[..., None]) -> None:
    """The key, then the sudoers drop-in: each step's script decides and reports."""
    if plan.ops_user:
        script = ops_user_script(plan.ops_user, plan.pubkey, dry=plan.dry)
        word = session.step(f"creating {plan.ops_user}", session.sudo(sudo_command(script)))
    else:
        script = authorized_key_script(plan.pubkey, dry=plan.dry)
        word = session.step("installing the key", session.run(sh(script)))
    echo(_INSTALLED.get(word, "key step said {w}").format(u=plan.target, w=word))
    if plan.sudoers:
        path = sudoers_path(plan.target)
        script = sudoers_script(plan.target, dry=plan.dry)
        word = session.step(f"writing {path}", session.sudo(sudo_command(script)))
        echo(_SUDOERS[word].format(path=path) if word in _SUDOERS else word)


def check_key_login(plan: Plan, server_key: paramiko.PKey) -> str:
    """Log in again, with the key this time, and (when converging) run ``sudo -n true``."""
    try:
        pkey = paramiko.PKey.from_path(plan.key_path)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        # a key with a passphrase, or one only an agent holds: the agent's copy, if it has one
        agent = [k for k in paramiko.Agent().get_keys() if k.get_base64() == plan.pubkey.split()[1]]
        if not agent:
            return f"key login not checked: {plan.key_path}: {exc}, and no agent has the key"
        pkey = agent[0]
    where = f"{plan.target}@{plan.host}:{plan.port}"
    transport = connect(plan.host, plan.port, where=where, prefer=[server_key.get_name()])
    try:
        if transport.get_remote_server_key().asbytes() != server_key.asbytes():
            raise Refused(
                f"{where}: the host key changed between two connections; check the "
                "network (the key was installed)"
            )
        try:
            transport.auth_publickey(plan.target, pkey)
        except paramiko.AuthenticationException:
            raise Refused(
                f"{where}: the key was installed but the login with it was refused: check "
                "sshd's PubkeyAuthentication and AuthorizedKeysFile"
            ) from None
        if not plan.sudoers:
            return f"key login works for {plan.target}"
        result = execute(transport, "sudo -n true", timeout=60)
        if result.rc != 0:
            raise Refused(
                f"{where}: sudo still asks {plan.target} for a password: another sudoers rule "
                "overrides the drop-in (check `sudo -l` on the host)"
            )
        return f"key login and passwordless sudo work for {plan.target}"
    finally:
        transport.close()


NOT_CONVERGED = (
    "not converged: gpufleet converges only as a user whose sudo needs no password (pyinfra's "
    "sudo password goes on the remote command line, where the host's process list shows it): "
    "run again with --passwordless-sudo, or --ops-user ops"
)


def _prompt(text: str) -> str:
    import click

    return click.prompt(text, hide_input=True, prompt_suffix=": ")


def run_converge(command: list[str], env: Mapping[str, str]) -> int:
    """pyinfra, its output passed through."""
    return subprocess.run(command, env=dict(env), check=False).returncode


def apply(
    plan: Plan,
    *,
    echo: Callable[..., None],
    prompt: Callable[[str], str] = _prompt,
    converge: Callable[[list[str], Mapping[str, str]], int] = run_converge,
    env: Mapping[str, str] = os.environ,
) -> int:
    """Bootstrap the host as ``plan`` says; each refusal is raised as ``Refused``."""
    plan, check, server_key = _take_over(plan, echo=echo, prompt=prompt)
    _record_host_key(plan, check, server_key, echo)
    if not plan.dry:
        echo(check_key_login(plan, server_key))
    if plan.data is None:
        echo(NOT_CONVERGED)
        return 0
    if not plan.group:
        echo(f"add it to a group of your inventory: {host_entry(plan.name, plan.data)}")
        return 0
    if plan.inventory is None:
        echo(f"add it to your inventory: {plan.group} += [{host_entry(plan.name, plan.data)}]")
        echo(f"then converge it: pyinfra -y INVENTORY deploys/{plan.group}.py --limit {plan.name}")
        return 0
    _add_to_inventory(plan, echo)
    return _converge(plan, echo=echo, converge=converge, env=env)


def _take_over(
    plan: Plan, *, echo: Callable[..., None], prompt: Callable[[str], str]
) -> tuple[Plan, HostKeyCheck, paramiko.PKey]:
    """One SSH session with the password: the host key checked, the OS and sudo checked, the
    key (and the sudoers drop-in) installed. The plan comes back with the password asked for."""
    known, revoked = load_known_hosts(plan.known_hosts)
    known_types = list((known.lookup(plan.known_name) or {}).keys())
    transport = connect(plan.host, plan.port, where=plan.where, prefer=known_types)
    try:
        server_key = transport.get_remote_server_key()
        check = check_host_key(
            plan.known_name,
            server_key,
            known=known,
            known_path=str(plan.known_hosts),
            expected=plan.expected,
            revoked=revoked,
        )
        if not check.ok:
            raise Refused(check.line)
        echo(check.line)
        if plan.password is None:
            value = prompt(f"password for {plan.where}")
            if not value:
                raise Refused(f"{plan.where}: no password given (nothing was changed)")
            plan = dataclasses.replace(plan, password=SecretStr(value))
        authenticate(plan, transport)
        echo(f"password accepted for {plan.user} (from {plan.password_source})")
        session = Session(plan, transport)
        pretty = preflight(plan, session)
        echo(f"{pretty}, sudo works for {plan.user}")
        change_host(plan, session, echo)
    finally:
        transport.close()
    return plan, check, server_key


def _record_host_key(
    plan: Plan, check: HostKeyCheck, server_key: paramiko.PKey, echo: Callable[..., None]
) -> None:
    if not check.record:
        echo(f"host key already in {plan.known_hosts}")
    elif plan.dry:
        echo(f"would record the host key in {plan.known_hosts}")
    else:
        record_host_key(plan.known_hosts, plan.known_name, server_key)
        echo(f"host key recorded in {plan.known_hosts}")


def _add_to_inventory(plan: Plan, echo: Callable[..., None]) -> None:
    """The host in its group of the plan's inventory, unless it is there already."""
    assert plan.inventory is not None and plan.group and plan.data is not None
    if not plan.add:
        echo(f"{plan.name} already in {plan.group} in {plan.inventory}")
    elif plan.dry:
        echo(f"would add {plan.name} to {plan.group} in {plan.inventory}")
    else:
        # from the file as it is now: an edit made since the plan was read is kept
        current = plan.inventory.read_text() if plan.inventory.exists() else None
        try:
            text, changed = add_host(
                current, plan.group, plan.name, plan.data, path=str(plan.inventory)
            )
        except InventoryError as exc:
            raise Refused(f"{exc} (it changed while bootstrap ran)") from None
        if changed:
            write_atomically(plan.inventory, text)
        echo(f"added {plan.name} to {plan.group} in {plan.inventory}")


def _converge(
    plan: Plan,
    *,
    echo: Callable[..., None],
    converge: Callable[[list[str], Mapping[str, str]], int],
    env: Mapping[str, str],
) -> int:
    """pyinfra on the host, the password not passed on; ``Refused`` when it fails."""
    assert plan.group is not None
    command = converge_command(
        plan.converge_inventory or str(plan.inventory), plan.group, plan.name
    )
    shown = " ".join(shlex.quote(a) for a in ["pyinfra", *command[1:]])
    if plan.dry:
        echo(f"would converge: {shown}")
        return 0
    echo(f"converging: {shown}")
    rc = converge(command, {k: v for k, v in env.items() if k != PASSWORD_ENV})
    if rc != 0:
        raise Refused(
            f"{plan.name}: the converge failed (pyinfra exit {rc}, its output above): fix what "
            "it names and run bootstrap again: the steps done are kept"
        )
    echo(f"{plan.name} bootstrapped: {plan.group} converged")
    return 0


def main(*, echo: Callable[..., None] | None = None, **options: Any) -> int:
    """``gpufleet bootstrap``: 0 done, 1 refused or failed (one line on stderr), UsageError
    (exit 64) for an option or a local file that is wrong. ``options`` as ``make_plan``."""
    if echo is None:
        import click

        echo = click.echo
    quiet = logging.getLogger("paramiko")
    if not quiet.handlers:  # its transport thread logs tracebacks: a refusal is one line
        quiet.addHandler(logging.NullHandler())
    plan = make_plan(**options)
    try:
        return apply(plan, echo=echo)
    except Refused as exc:
        echo(f"gpufleet bootstrap: {mask(str(exc), plan.password)}", err=True)
        return 1
