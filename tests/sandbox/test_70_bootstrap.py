"""`gpufleet bootstrap` on the sandbox's fresh workstation, which knows only its user's password.

Each refusal (unknown, wrong or changed host key, wrong password) is one line and leaves the host
as it was, fingerprinted before and after from its console (``docker exec``); the bootstrap
itself ends with a healthy llama service; a second one changes nothing; and the password is in
no output, no process list sampled meanwhile and no file of the host.

The converge inventory is the sandbox's plus the hosts bootstrap wrote to its ``--inventory``
file (``read_inventory``): what ``inventory/sandbox.py`` does once it takes bootstrapped hosts
in. The fresh host gets the llama.cpp image sent, as the light hosts do, not built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testinfra

from gpufleet.sandbox import fleet
from tests.sandbox.conftest import ROOT

pytestmark = pytest.mark.sandbox

GPUFLEET = str(Path(sys.executable).with_name("gpufleet"))
# What a bootstrap could change on the host: packages, and every path, mode, owner, size and
# mtime under /etc, /home, /opt, /usr/local and /root (the logs, sudo's timestamps and the
# Docker CLI's own state in /root/.docker aside).
FINGERPRINT = (
    "dpkg-query -W -f='${Package} ${Version}\\n' | sha256sum; "
    "find /etc /home /opt /usr/local /root -xdev -path /root/.docker -prune "
    "-o -printf '%p %m %U %s %T@\\n' 2>/dev/null | sort | sha256sum; "
    "ls -la /etc/sudoers.d /home/ubuntu 2>&1"
)
CONVERGE = """\
exec(open({base!r}).read())
from gpufleet.bootstrap import read_inventory as _read_inventory

# The hosts `gpufleet bootstrap` took over: the sandbox's settings, their group's models and
# services (the llama.cpp image sent, as to the light hosts), then what bootstrap wrote.
_fresh = {{h["name"] for h in _state["hosts"] if h["bootstrap"]}}
for _g, _entries in _read_inventory({added!r}).items():
    globals().setdefault(_g, [])
    globals()[_g] += [(_n, dict(_common, models=_models(_g), services=_services(_g, True), **_d))
                      for _n, _d in _entries if _n in _fresh]
"""


class Fresh:
    """The fresh host, the files a bootstrap of it uses, and every output seen on the way."""

    def __init__(self, sandbox: dict, tmp: Path) -> None:
        spec = next(h for h in sandbox["hosts"] if h["bootstrap"])
        self.name, self.port, self.container = spec["name"], spec["port"], spec["container"]
        self.user = sandbox["bootstrap"]["user"]
        self.password_file = sandbox["bootstrap"]["password_file"]
        self.password = Path(self.password_file).read_text().split("\n")[0]
        self.key = sandbox["ssh"]["key"]
        self.sandbox_known_hosts = sandbox["ssh"]["known_hosts"]
        self.known_hosts = tmp / "known_hosts"  # starts absent: bootstrap records the key
        self.added = tmp / "bootstrapped.py"
        self.inventory = tmp / "converge.py"
        self.inventory.write_text(CONVERGE.format(base=str(ROOT / "inventory" / "sandbox.py"),
                                                  added=str(self.added)))  # fmt: skip
        self.tmp = tmp
        self.outputs: list[str] = []
        self.processes: list[str] = []

    def console(self, command: str, *, stdin: str | None = None) -> str:
        proc = subprocess.run(["docker", "exec", "-i", self.container, "sh", "-c", command],
                              input=stdin, capture_output=True, text=True, timeout=120,
                              check=False)  # fmt: skip
        return proc.stdout

    def fingerprint(self) -> str:
        return self.console(FINGERPRINT)

    def console_host_key(self) -> str:
        """The fingerprint as the person at the console reads it."""
        return self.console("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").split()[1]

    def bootstrap(self, *args: str, password_file: str | bool = True, env: dict | None = None,
                  sample: bool = False, user: str | None = None,
                  ) -> subprocess.CompletedProcess:  # fmt: skip
        """``gpufleet bootstrap`` of this host as ``user`` (the sandbox's sudo user), the
        password from the sandbox's file (or ``password_file``, or False: none); ``sample``: its
        process list read meanwhile."""
        command = [GPUFLEET, "bootstrap", "127.0.0.1", "--port", str(self.port), "--name",
                   self.name, "--user", user or self.user, "--key", self.key, *args]  # fmt: skip
        if password_file:
            command += ["--password-file",
                        self.password_file if password_file is True else password_file]  # fmt: skip
        out, err = self.tmp / "stdout", self.tmp / "stderr"
        with out.open("w") as o, err.open("w") as e:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})})  # fmt: skip
            deadline = time.monotonic() + 1800
            while proc.poll() is None and time.monotonic() < deadline:
                if sample:
                    self.processes.append(self.console("ps -eww -o args"))
                time.sleep(0.2)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        result = subprocess.CompletedProcess(command, proc.returncode, out.read_text(),
                                             err.read_text())  # fmt: skip
        self.outputs += [result.stdout, result.stderr]
        return result


def is_fresh(container: str) -> bool:
    """No key, no drop-in, no Docker: as `sandbox up` started it."""
    return subprocess.run(
        ["docker", "exec", container, "sh", "-c", "! test -e /home/ubuntu/.ssh && "
         "! ls /etc/sudoers.d/gpufleet-* && ! command -v docker"],
        capture_output=True, timeout=60, check=False,
    ).returncode == 0  # fmt: skip


@pytest.fixture(scope="module")
def fresh(sandbox, tmp_path_factory) -> Fresh:
    spec = next(h for h in sandbox["hosts"] if h["bootstrap"])
    if not is_fresh(spec["container"]):  # an earlier run bootstrapped it: start again
        sandbox = fleet.reset([spec["name"]])
    return Fresh(sandbox, tmp_path_factory.mktemp("bootstrap"))


@pytest.fixture(scope="module")
def console(fresh):
    return testinfra.get_host(f"docker://{fresh.container}")


def refused(fresh: Fresh, *args: str, **kwargs) -> str:
    """A bootstrap that must be refused in one line, the host unchanged; returns the line."""
    before = fresh.fingerprint()
    run = fresh.bootstrap(*args, **kwargs)
    assert run.returncode == 1, run.stdout + run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert fresh.fingerprint() == before
    return run.stderr.strip()


def test_unknown_host_key_is_refused_with_its_fingerprint(fresh):
    line = refused(fresh, "--known-hosts", str(fresh.tmp / "empty_known_hosts"))
    seen = fresh.console_host_key()
    assert f"host key {seen} (ssh-ed25519) is not in" in line
    assert "`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`, then pass --host-key" in line
    assert not (fresh.tmp / "empty_known_hosts").exists()


def test_wrong_host_key_is_refused(fresh, sandbox):
    other = Path(sandbox["ssh"]["key"]).parent / "hostkeys" / "sandbox-rtx5090"
    keygen = ["ssh-keygen", "-lf", str(other / "ssh_host_ed25519_key.pub")]
    wrong = subprocess.run(keygen, capture_output=True, text=True, check=True).stdout.split()[1]
    line = refused(fresh, "--known-hosts", fresh.sandbox_known_hosts, "--host-key", wrong)
    assert f"is not the --host-key {wrong}" in line


def test_changed_host_key_is_refused(fresh, sandbox):
    other = Path(sandbox["ssh"]["key"]).parent / "hostkeys" / "sandbox-rtx5090"
    kind, blob = (other / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    forged = fresh.tmp / "forged_known_hosts"
    forged.write_text(f"[127.0.0.1]:{fresh.port} {kind} {blob}\n")
    line = refused(fresh, "--known-hosts", str(forged))
    assert "WARNING: HOST KEY CHANGED" in line


def test_wrong_password_is_refused(fresh):
    wrong = fresh.tmp / "wrong_password"
    wrong.write_text("not-the-password\n")
    line = refused(fresh, "--known-hosts", fresh.sandbox_known_hosts, password_file=str(wrong))
    assert line == (f"gpufleet bootstrap: {fresh.user}@127.0.0.1:{fresh.port}: the password "
                    "was refused; check it (nothing was changed)")  # fmt: skip


def test_a_user_without_sudo_is_refused(fresh):
    # a second login on the fresh host, with the same password but no sudo rights
    fresh.console("useradd -m -s /bin/bash nosudo && chpasswd", stdin=f"nosudo:{fresh.password}\n")
    try:
        line = refused(fresh, "--known-hosts", fresh.sandbox_known_hosts, user="nosudo")
    finally:
        fresh.console("userdel -r nosudo")
    assert line.startswith(f"gpufleet bootstrap: nosudo cannot use sudo on {fresh.name} (")
    assert line.endswith(": add it to the sudo group on the console (`usermod -aG sudo nosudo`) "
                         "(nothing was changed)")  # fmt: skip
    assert fresh.password not in line


def test_an_unsupported_os_is_refused(fresh):
    fedora = 'ID=fedora\nPRETTY_NAME="Fedora Linux 41"\n'
    fresh.console("mv /etc/os-release /etc/os-release.keep && cat > /etc/os-release", stdin=fedora)
    try:
        line = refused(fresh, "--known-hosts", fresh.sandbox_known_hosts)
    finally:
        fresh.console("mv -f /etc/os-release.keep /etc/os-release")
    assert line == (f"gpufleet bootstrap: {fresh.name}: unsupported OS Fedora Linux 41: gpufleet "
                    "bootstraps Ubuntu and Debian (nothing was changed)")  # fmt: skip


@pytest.fixture(scope="module")
def first(fresh):
    """The real bootstrap: the host key from the console, passwordless sudo, the converge."""
    return fresh.bootstrap(
        "--group", "rtx5090", "--host-key", fresh.console_host_key(), "--known-hosts",
        str(fresh.known_hosts), "--passwordless-sudo", "--inventory", str(fresh.added),
        "--converge-inventory", str(fresh.inventory), sample=True,
    )  # fmt: skip


def test_bootstrap_converges_the_host_to_a_healthy_service(first, fresh, console):
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    lines = first.stdout.splitlines()
    assert lines[:3] == [
        f"host key {fresh.console_host_key()} matches --host-key",
        f"password accepted for ubuntu (from {fresh.password_file})",
        "Debian GNU/Linux 12 (bookworm), sudo works for ubuntu",
    ]
    for expected in ("key installed for ubuntu",
                     "sudoers drop-in /etc/sudoers.d/gpufleet-ubuntu written (visudo accepted it)",
                     f"host key recorded in {fresh.known_hosts}",
                     "key login and passwordless sudo work for ubuntu",
                     f"added {fresh.name} to rtx5090 in {fresh.added}"):  # fmt: skip
        assert expected in lines
    assert lines[-1] == f"{fresh.name} bootstrapped: rtx5090 converged"
    health = console.check_output("curl -fsS http://127.0.0.1:8000/health")
    assert json.loads(health)["status"] == "ok"
    assert console.service("docker").is_running


def test_bootstrap_left_the_key_the_drop_in_and_the_records(first, fresh, console):
    assert first.returncode == 0
    pub = Path(fresh.key + ".pub").read_text().strip()
    keys = console.file("/home/ubuntu/.ssh/authorized_keys")
    assert keys.content_string.splitlines() == [pub]
    assert (keys.mode, keys.user) == (0o600, "ubuntu")
    assert console.file("/home/ubuntu/.ssh").mode == 0o700
    drop_in = console.file("/etc/sudoers.d/gpufleet-ubuntu")
    assert (drop_in.mode, drop_in.user) == (0o440, "root")
    assert drop_in.content_string.splitlines()[-1] == "ubuntu ALL=(ALL) NOPASSWD:ALL"
    kind, blob = console.file("/etc/ssh/ssh_host_ed25519_key.pub").content_string.split()[:2]
    assert fresh.known_hosts.read_text() == f"[127.0.0.1]:{fresh.port} {kind} {blob}\n"
    assert fresh.known_hosts.stat().st_mode & 0o777 == 0o600
    data = {"ssh_user": "ubuntu", "_sudo": True, "ssh_hostname": "127.0.0.1",
            "ssh_port": fresh.port, "ssh_key": str(Path(fresh.key).resolve()),
            "ssh_known_hosts_file": str(fresh.known_hosts.resolve())}  # fmt: skip
    from gpufleet.bootstrap import read_inventory

    assert read_inventory(fresh.added) == {"rtx5090": [(fresh.name, data)]}


@pytest.fixture(scope="module")
def second(first, fresh, console):
    """The same bootstrap again, the password from the environment this time."""
    assert first.returncode == 0
    llama = "docker ps -q --no-trunc --filter label=com.docker.compose.service=llama"
    before = (fresh.fingerprint(), console.check_output(llama),
              console.check_output("systemctl show docker -p ActiveEnterTimestampMonotonic"),
              fresh.added.read_text(), fresh.known_hosts.read_text())  # fmt: skip
    run = fresh.bootstrap(
        "--group", "rtx5090", "--known-hosts", str(fresh.known_hosts), "--passwordless-sudo",
        "--inventory", str(fresh.added), "--converge-inventory", str(fresh.inventory),
        password_file=False, env={"GPUFLEET_BOOTSTRAP_PASSWORD": fresh.password}, sample=True,
    )  # fmt: skip
    after = (fresh.fingerprint(), console.check_output(llama),
             console.check_output("systemctl show docker -p ActiveEnterTimestampMonotonic"),
             fresh.added.read_text(), fresh.known_hosts.read_text())  # fmt: skip
    return run, before, after


def test_second_bootstrap_changes_nothing(second, fresh):
    run, before, after = second
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    for expected in (f"host key {fresh.console_host_key()} matches {fresh.known_hosts}",
                     "password accepted for ubuntu (from $GPUFLEET_BOOTSTRAP_PASSWORD)",
                     "key already installed for ubuntu",
                     "sudoers drop-in /etc/sudoers.d/gpufleet-ubuntu already in place",
                     f"host key already in {fresh.known_hosts}",
                     f"{fresh.name} already in rtx5090 in {fresh.added}"):  # fmt: skip
        assert expected in lines
    assert after == before


def test_the_password_is_in_no_output_process_or_file(first, second, fresh):
    assert fresh.processes, "the process list was never sampled"
    for text in (*fresh.outputs, *fresh.processes, fresh.added.read_text(),
                 fresh.known_hosts.read_text()):  # fmt: skip
        assert fresh.password not in text
    # On the host: every file a login, a sudo or a converge could have written (the password
    # goes to grep on stdin, not on its command line).
    found = fresh.console(
        "grep -rlsF -D skip -f - /tmp /var/tmp /home /root /etc /opt /run /var/log "
        "/var/lib/gpufleet",
        stdin=fresh.password + "\n",
    )
    assert found.split() == []
