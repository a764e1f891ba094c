"""``gpufleet bootstrap``: host key decisions, password handling, the remote scripts and the
inventory edit, each with its no-change twin; then the whole flow against a real SSH server
(paramiko, in a thread) that records every authentication and command it was sent."""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import subprocess
import threading
from contextlib import contextmanager, suppress
from pathlib import Path

import paramiko
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gpufleet import bootstrap as bs
from gpufleet.fleet.runner import UsageError

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "pw-Tr0ub4dor&3 'quoted' $x"  # quotes and a $: a leak would survive shell quoting
FIXED_PUB = "AAAAC3NzaC1lZDI1NTE5AAAAILCT1w0n3Xb74QdHoCPIrMU0nmYi0TURF47kZY60fRI6"
FIXED_FP = "SHA256:F20md+V2oLkJHJx4TgZX3B5PzPd/NdeGqrdYbxyGSg8"  # ssh-keygen -lf, once


def new_key() -> tuple[paramiko.Ed25519Key, str]:
    """A fresh Ed25519 key, and its private half in OpenSSH format."""
    private = ed25519.Ed25519PrivateKey.generate()
    text = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    return paramiko.Ed25519Key.from_private_key(io.StringIO(text)), text


def known(*lines: str) -> paramiko.HostKeys:
    keys = paramiko.HostKeys()
    for line in lines:
        entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
        for name in entry.hostnames:
            keys.add(name, entry.key.get_name(), entry.key)
    return keys


def line(name: str, key: paramiko.PKey) -> str:
    return f"{name} {key.get_name()} {key.get_base64()}"


# --- fingerprints -----------------------------------------------------------------------------


def test_fingerprint_of_a_fixed_key():
    key = paramiko.Ed25519Key(data=base64.b64decode(FIXED_PUB))
    assert bs.fingerprint(key) == FIXED_FP


def test_fingerprint_is_what_ssh_keygen_prints(tmp_path):
    key, _ = new_key()
    (tmp_path / "k.pub").write_text(f"ssh-ed25519 {key.get_base64()} test\n")
    out = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.split()[1] == bs.fingerprint(key)


# --- the host key decision --------------------------------------------------------------------


def test_known_hosts_entry_with_the_same_key_is_accepted_and_not_recorded_again():
    key, _ = new_key()
    check = bs.check_host_key("[10.0.0.5]:2222", key, known=known(line("[10.0.0.5]:2222", key)),
                              known_path="kh", expected=None)  # fmt: skip
    assert check == bs.HostKeyCheck(True, f"host key {bs.fingerprint(key)} matches kh", False)


def test_host_key_flag_accepts_an_unknown_host_and_records_it():
    key, _ = new_key()
    check = bs.check_host_key("ws-01", key, known=known(), known_path="kh",
                              expected=bs.fingerprint(key))  # fmt: skip
    assert check.ok and check.record
    assert check.line == f"host key {bs.fingerprint(key)} matches --host-key"


def test_unknown_host_is_refused_with_the_fingerprint_and_how_to_check_it():
    key, _ = new_key()
    check = bs.check_host_key("ws-01", key, known=known(), known_path="kh", expected=None)
    assert not check.ok
    assert check.line == (
        f"ws-01: host key {bs.fingerprint(key)} (ssh-ed25519) is not in kh: check it on the "
        "host's console with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`, then pass "
        "--host-key SHA256:... (nothing was sent)"
    )


def test_changed_key_is_refused_loudly_even_when_host_key_flag_matches():
    key, _ = new_key()
    old, _ = new_key()
    check = bs.check_host_key("ws-01", key, known=known(line("ws-01", old)), known_path="kh",
                              expected=bs.fingerprint(key))  # fmt: skip
    assert not check.ok
    assert "WARNING: HOST KEY CHANGED" in check.line
    assert bs.fingerprint(key) in check.line and bs.fingerprint(old) in check.line
    assert "ssh-keygen -R 'ws-01' -f kh" in check.line


def test_host_key_flag_that_differs_is_refused_even_when_known_hosts_matches():
    key, _ = new_key()
    other, _ = new_key()
    check = bs.check_host_key("ws-01", key, known=known(line("ws-01", key)), known_path="kh",
                              expected=bs.fingerprint(other))  # fmt: skip
    assert not check.ok
    assert f"is not the --host-key {bs.fingerprint(other)}" in check.line


def test_port_22_is_the_bare_name_and_other_ports_are_bracketed():
    key, _ = new_key()
    assert bs.known_hosts_name("ws-01", 22) == "ws-01"
    assert bs.known_hosts_name("ws-01", 2222) == "[ws-01]:2222"
    bare, bracketed = known(line("ws-01", key)), known(line("[ws-01]:2222", key))
    cases = ((bare, "ws-01", True), (bare, "[ws-01]:2222", False),
             (bracketed, "[ws-01]:2222", True), (bracketed, "ws-01", False))  # fmt: skip
    for keys, name, ok in cases:
        assert bs.check_host_key(name, key, known=keys, known_path="kh",
                                 expected=None).ok is ok, name  # fmt: skip


def test_hashed_entries_match_and_detect_a_change(tmp_path):
    key, _ = new_key()
    other, _ = new_key()
    hashed = paramiko.HostKeys.hash_host("[10.0.0.5]:2222")
    path = tmp_path / "known_hosts"
    path.write_text(f"# a comment\n{line(hashed, key)}\n")
    keys = bs.load_known_hosts(path).keys
    assert bs.check_host_key("[10.0.0.5]:2222", key, known=keys, known_path="kh",
                             expected=None).ok  # fmt: skip
    changed = bs.check_host_key("[10.0.0.5]:2222", other, known=keys, known_path="kh",
                                expected=None)  # fmt: skip
    assert not changed.ok and "HOST KEY CHANGED" in changed.line
    assert not bs.check_host_key("10.0.0.5", key, known=keys, known_path="kh", expected=None).ok


def test_known_hosts_markers_and_bad_lines_are_read_as_openssh_does(tmp_path):
    key, _ = new_key()
    bad, _ = new_key()
    path = tmp_path / "known_hosts"
    path.write_text(f"@cert-authority *.lab {key.get_name()} {key.get_base64()}\n"
                    f"@revoked * {bad.get_name()} {bad.get_base64()}\n"
                    "not a known_hosts line\nws-02 ssh-ed25519 AAAA!!\n"
                    f"{line('ws-01,10.0.0.5', key)}\n{line('ws-03', bad)}\n")  # fmt: skip
    known = bs.load_known_hosts(path)
    assert known.revoked == {bad.get_base64()}
    for name in ("ws-01", "10.0.0.5"):
        assert bs.check_host_key(name, key, known=known.keys, known_path="kh", expected=None,
                                 revoked=known.revoked).ok  # fmt: skip
    check = bs.check_host_key("ws-03", bad, known=known.keys, known_path="kh",
                              expected=bs.fingerprint(bad), revoked=known.revoked)  # fmt: skip
    assert not check.ok and "is @revoked in kh" in check.line


def test_a_known_key_of_another_type_is_unknown_not_changed_and_asked_for_first():
    key, _ = new_key()
    rsa = paramiko.RSAKey.generate(1024)
    check = bs.check_host_key("ws-01", key, known=known(line("ws-01", rsa)), known_path="kh",
                              expected=None)  # fmt: skip
    assert not check.ok and "is not in kh" in check.line
    defaults = ("ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")
    rsa_first = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa", "ssh-ed25519", "ecdsa-sha2-nistp256"]
    assert bs.preferred_key_types(["ssh-rsa"], defaults) == rsa_first
    assert bs.preferred_key_types([], defaults) == list(defaults)


def test_console_command_names_the_key_file_of_the_type_seen():
    assert bs.console_command("ssh-rsa") == "ssh-keygen -lf /etc/ssh/ssh_host_rsa_key.pub"
    assert bs.console_command("ecdsa-sha2-nistp256").endswith("ssh_host_ecdsa_key.pub")


def test_recording_the_host_key_creates_a_private_file_once(tmp_path):
    key, _ = new_key()
    path = tmp_path / "ssh" / "known_hosts"
    assert bs.record_host_key(path, "[ws-01]:2222", key)
    assert path.read_text() == line("[ws-01]:2222", key) + "\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    before = path.stat().st_mtime_ns
    assert not bs.record_host_key(path, "[ws-01]:2222", key)
    assert path.stat().st_mtime_ns == before


def test_recording_after_a_last_line_without_newline(tmp_path):
    key, _ = new_key()
    other, _ = new_key()
    path = tmp_path / "known_hosts"
    path.write_text(line("ws-00", other))
    assert bs.record_host_key(path, "ws-01", key)
    assert path.read_text().splitlines() == [line("ws-00", other), line("ws-01", key)]


# --- the password -----------------------------------------------------------------------------


def test_password_file_first_line_wins_over_the_environment(tmp_path):
    path = tmp_path / "pw"
    path.write_text(PASSWORD + "\nsecond line\n")
    password, source = bs.read_password(str(path), {bs.PASSWORD_ENV: "from-env"})
    assert password.get_secret_value() == PASSWORD and source == str(path)


def test_password_from_the_environment_and_else_none():
    password, source = bs.read_password(None, {bs.PASSWORD_ENV: PASSWORD})
    assert password.get_secret_value() == PASSWORD and source == "$GPUFLEET_BOOTSTRAP_PASSWORD"
    assert bs.read_password(None, {}) == (None, "the prompt")


def test_an_empty_or_missing_password_file_is_a_usage_error(tmp_path):
    (tmp_path / "empty").write_text("\nsecret-on-line-2\n")
    with pytest.raises(UsageError, match="first line is empty"):
        bs.read_password(str(tmp_path / "empty"), {})
    with pytest.raises(UsageError, match="No such file"):
        bs.read_password(str(tmp_path / "absent"), {})


def test_the_password_is_in_no_repr_or_str(tmp_path, control_key):
    password, _ = bs.read_password(None, {bs.PASSWORD_ENV: PASSWORD})
    plan = bs.make_plan(host="ws-01", user="ubuntu", key=str(control_key),
                        env={bs.PASSWORD_ENV: PASSWORD})  # fmt: skip
    for text in (repr(password), str(password), repr(plan), str(plan), f"{plan}"):
        assert PASSWORD not in text
    assert plan.password.get_secret_value() == PASSWORD
    assert bs.mask(f"sudo said {PASSWORD}", password) == "sudo said <password>"


# --- the remote scripts -----------------------------------------------------------------------


PUB = f"ssh-ed25519 {FIXED_PUB} ops@control"


def sh(script: str, home: Path, path: str | None = None) -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "PATH": path or os.environ["PATH"]}
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True,
                          check=False)  # fmt: skip


def test_sudo_reads_the_password_from_stdin_and_the_script_never_does():
    command = bs.sudo_command("id -u")
    assert command == "sudo -S -p '' sh -c 'exec </dev/null; id -u'"
    assert bs.SUDO_VALIDATE == "sudo -S -p '' -v"


def test_authorized_key_is_added_once_with_private_modes(tmp_path):
    first = sh(bs.authorized_key_script(PUB, dry=False), tmp_path)
    assert (first.returncode, first.stdout) == (0, "changed\n"), first.stderr
    keys = tmp_path / ".ssh" / "authorized_keys"
    assert keys.read_text() == PUB + "\n"
    assert (tmp_path / ".ssh").stat().st_mode & 0o777 == 0o700
    assert keys.stat().st_mode & 0o777 == 0o600
    before = keys.stat().st_mtime_ns
    second = sh(bs.authorized_key_script(PUB, dry=False), tmp_path)
    assert second.stdout == "unchanged\n"
    assert keys.read_text() == PUB + "\n" and keys.stat().st_mtime_ns == before


def test_authorized_key_after_a_last_line_without_newline(tmp_path):
    (tmp_path / ".ssh").mkdir(mode=0o700)
    (tmp_path / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAAother human@laptop")
    assert sh(bs.authorized_key_script(PUB, dry=False), tmp_path).stdout == "changed\n"
    assert (tmp_path / ".ssh" / "authorized_keys").read_text().splitlines() == [
        "ssh-ed25519 AAAAother human@laptop", PUB]  # fmt: skip


def test_authorized_key_dry_run_changes_nothing(tmp_path):
    assert sh(bs.authorized_key_script(PUB, dry=True), tmp_path).stdout == "would\n"
    assert list(tmp_path.iterdir()) == []
    sh(bs.authorized_key_script(PUB, dry=False), tmp_path)
    assert sh(bs.authorized_key_script(PUB, dry=True), tmp_path).stdout == "unchanged\n"


def test_ops_user_script_creates_the_user_only_when_absent():
    script = bs.ops_user_script("ops", PUB, dry=False)
    assert "if ! getent passwd \"$u\" >/dev/null; then useradd -m -s /bin/bash -G sudo -p '*'" in (
        script
    )
    assert "grep -qxF -- 'ssh-ed25519 " in script and 'chmod 600 "$f"' in script
    dry = bs.ops_user_script("ops", PUB, dry=True)
    assert "useradd" not in dry and "echo would-create; exit 0" in dry


def test_sudoers_drop_in_content():
    assert bs.sudoers_path("ubuntu") == "/etc/sudoers.d/gpufleet-ubuntu"
    assert bs.sudoers_content("ubuntu").splitlines()[-1] == "ubuntu ALL=(ALL) NOPASSWD:ALL"
    assert all(x.startswith("#") for x in bs.sudoers_content("ubuntu").splitlines()[:-1])


def test_sudoers_drop_in_is_validated_before_it_is_installed():
    script = bs.sudoers_script("ubuntu", dry=False)
    body = base64.b64encode(bs.sudoers_content("ubuntu").encode()).decode()
    assert f"want() {{ printf %s {body} | base64 -d; }}" in script
    check, install = script.index('visudo -cqf "$t"'), script.index('install -m 0440 "$t" "$p"')
    assert check < install < script.index("visudo -cq >/dev/null ||")
    assert "NOPASSWD" not in script  # the content only travels encoded


@pytest.fixture
def fake_visudo(tmp_path) -> str:
    """A PATH whose visudo rejects files that contain BROKEN (the real one is not here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "visudo").write_text(
        '#!/bin/sh\nfor a; do f=$a; done\n[ "$1" = -cq ] && exit 0\n! grep -q BROKEN "$f"\n'
    )
    (bin_dir / "visudo").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_sudoers_drop_in_is_written_once(tmp_path, fake_visudo):
    drop_ins = tmp_path / "sudoers.d"
    drop_ins.mkdir()
    script = bs.sudoers_script("ubuntu", dry=False, directory=str(drop_ins))
    assert sh(script, tmp_path, fake_visudo).stdout == "changed\n"
    path = drop_ins / "gpufleet-ubuntu"
    assert path.read_text() == bs.sudoers_content("ubuntu")
    assert path.stat().st_mode & 0o777 == 0o440
    before = path.stat().st_mtime_ns
    assert sh(script, tmp_path, fake_visudo).stdout == "unchanged\n"
    assert path.stat().st_mtime_ns == before
    dry = bs.sudoers_script("ubuntu", dry=True, directory=str(drop_ins))
    assert sh(dry, tmp_path, fake_visudo).stdout == "unchanged\n"


def test_sudoers_drop_in_rejected_by_visudo_is_not_installed(tmp_path, fake_visudo, monkeypatch):
    drop_ins = tmp_path / "sudoers.d"
    drop_ins.mkdir()
    monkeypatch.setattr(bs, "sudoers_content", lambda user: "BROKEN\n")
    run = sh(bs.sudoers_script("ubuntu", dry=False, directory=str(drop_ins)), tmp_path,
             fake_visudo)  # fmt: skip
    assert (run.returncode, run.stdout) == (3, "invalid\n")
    assert list(drop_ins.iterdir()) == []


def test_sudoers_dry_run_changes_nothing(tmp_path, fake_visudo):
    drop_ins = tmp_path / "sudoers.d"
    drop_ins.mkdir()
    run = sh(bs.sudoers_script("ubuntu", dry=True, directory=str(drop_ins)), tmp_path,
             fake_visudo)  # fmt: skip
    assert run.stdout == "would\n" and list(drop_ins.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "ok"),
    [("ubuntu\n\nUbuntu 24.04.1 LTS\n", True), ("debian\n\nDebian GNU/Linux 12 (bookworm)\n", True),
     ("pop\nubuntu debian\nPop!_OS 22.04 LTS\n", True), ("fedora\n\nFedora Linux 40\n", False),
     ("", False)],
)  # fmt: skip
def test_os_release_decides_support(text, ok):
    os_id, like, _ = bs.parse_os_release(text)
    assert bs.supported_os(os_id, like) is ok


# --- the inventory ----------------------------------------------------------------------------

DATA = {"ssh_user": "ops", "_sudo": True, "ssh_port": 2226}
HOSTS = (ROOT / "inventory" / "hosts.py").read_text()


def test_host_is_added_to_its_group_and_nothing_else_moves():
    new, changed = bs.add_host(HOSTS, "rtx5090", "ws-01", DATA)
    assert changed
    added = '    ("ws-01", {"ssh_user": "ops", "_sudo": True, "ssh_port": 2226}),\n'
    old_lines, new_lines = HOSTS.splitlines(keepends=True), new.splitlines(keepends=True)
    at = new_lines.index(added)
    assert new_lines[:at] + new_lines[at + 1 :] == old_lines
    assert new_lines[at - 1].startswith('    ("ws-5090-a.lab.example"')
    assert bs.read_inventory_text(new)["rtx5090"][-1] == ("ws-01", DATA)


def test_host_already_in_its_group_is_unchanged():
    new, _ = bs.add_host(HOSTS, "rtx5090", "ws-01", DATA)
    assert bs.add_host(new, "rtx5090", "ws-01", DATA) == (new, False)


def test_host_in_its_group_with_other_data_is_left_to_a_person():
    new, _ = bs.add_host(HOSTS, "rtx5090", "ws-01", DATA)
    with pytest.raises(bs.InventoryError, match=r"ws-01 is already in rtx5090 as \(\"ws-01\""):
        bs.add_host(new, "rtx5090", "ws-01", {**DATA, "ssh_user": "ubuntu"})


def test_a_new_group_is_appended_and_a_new_file_made():
    new, changed = bs.add_host(HOSTS, "lab", "ws-01", DATA)
    assert changed and new.startswith(HOSTS.rstrip("\n"))
    assert new.endswith('\n\nlab = [\n    ("ws-01", {"ssh_user": "ops", "_sudo": True, '
                        '"ssh_port": 2226}),\n]\n')  # fmt: skip
    made, changed = bs.add_host(None, "rtx5090", "ws-01", DATA)
    assert changed and made.startswith('"""Hosts `gpufleet bootstrap` took over')
    assert bs.read_inventory_text(made) == {"rtx5090": [("ws-01", DATA)]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rtx5090 = []\n", 'rtx5090 = [\n    ("ws-01", {}),\n]\n'),
        ('rtx5090 = ["a"]  # lab\n', 'rtx5090 = [\n    "a",\n    ("ws-01", {}),\n]  # lab\n'),
        ('rtx5090 = [\n    ("a", {})\n]\n', 'rtx5090 = [\n    ("a", {}),\n    ("ws-01", {}),\n]\n'),
        ('rtx5090 = [  # Zürich\n  "a",  # ü\n]\n',
         'rtx5090 = [  # Zürich\n  "a",  # ü\n  ("ws-01", {}),\n]\n'),
        ('rtx5090 = ["ü", ("a", {"x": 1})]\n',
         'rtx5090 = [\n    "ü",\n    ("a", {"x": 1}),\n    ("ws-01", {}),\n]\n'),
    ],
)  # fmt: skip
def test_lists_in_any_layout_get_the_host(text, expected):
    assert bs.add_host(text, "rtx5090", "ws-01", {}) == (expected, True)


def test_a_generated_inventory_is_refused():
    text = (ROOT / "inventory" / "sandbox.py").read_text()
    with pytest.raises(bs.InventoryError, match=r"line \d+ is not a plain `group = "):
        bs.add_host(text, "rtx5090", "ws-01", DATA, path="inventory/sandbox.py")
    for other in ("rtx5090 = _group('rtx5090')\n", "import os\nrtx5090 = []\n",
                  "rtx5090 = [('a', {'k': os.sep})]\n", "rtx5090 = []\nrtx5090 = []\n",
                  "rtx5090 = [\n"):  # fmt: skip
        with pytest.raises(bs.InventoryError):
            bs.add_host(other, "rtx5090", "ws-01", DATA)


def test_read_inventory_reads_a_file_without_running_it(tmp_path):
    path = tmp_path / "bootstrapped.py"
    assert bs.read_inventory(path) == {}
    path.write_text(bs.add_host(None, "rtx5090", "ws-01", DATA)[0])
    assert bs.read_inventory(path) == {"rtx5090": [("ws-01", DATA)]}


def test_host_data_says_only_what_differs_from_pyinfras_defaults():
    assert bs.host_data(user="ubuntu", host="ws-01", name="ws-01", port=22, key=None,
                        known_hosts=None) == {"ssh_user": "ubuntu", "_sudo": True}  # fmt: skip
    assert bs.host_data(user="ops", host="127.0.0.1", name="sandbox-fresh", port=2226,
                        key="/k", known_hosts="/kh") == {
        "ssh_user": "ops", "_sudo": True, "ssh_hostname": "127.0.0.1", "ssh_port": 2226,
        "ssh_key": "/k", "ssh_known_hosts_file": "/kh"}  # fmt: skip


# --- the plan: usage errors before anything is sent -------------------------------------------


@pytest.fixture
def control_key(tmp_path) -> Path:
    key, private = new_key()
    path = tmp_path / "id_ed25519"
    path.write_text(private)
    path.chmod(0o600)
    path.with_name("id_ed25519.pub").write_text(f"ssh-ed25519 {key.get_base64()} gpufleet@ctl\n")
    return path


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"inventory": "x.py", "group": "rtx5090"}, "needs --passwordless-sudo or --ops-user"),
        ({"inventory": "x.py", "passwordless_sudo": True}, "--inventory needs --group"),
        ({"host_key": "SHA256:short"}, "--host-key 'SHA256:short'"),
        ({"user": "Bad.User"}, "--user 'Bad.User'"),
        ({"ops_user": "ops.1"}, "--ops-user 'ops.1'"),
        ({"group": "rtx-5090"}, "--group 'rtx-5090'"),
        ({"converge_inventory": "inventory/sandbox.py"}, "needs --inventory"),
        ({"inventory": "x.py", "group": "nosuch", "passwordless_sudo": True},
         "deploy file deploys/nosuch.py not found"),
        ({"inventory": "inventory/sandbox.py", "group": "rtx5090", "passwordless_sudo": True},
         "inventory/sandbox.py line"),
    ],
)  # fmt: skip
def test_usage_errors(control_key, monkeypatch, options, message):
    monkeypatch.chdir(ROOT)
    with pytest.raises(UsageError, match=re.escape(message)):
        bs.make_plan(**{"host": "ws-01", "user": "ubuntu", "key": str(control_key),
                        "env": {bs.PASSWORD_ENV: PASSWORD}, **options})  # fmt: skip


def test_a_missing_public_key_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"no public key in .*nokey.pub: make the pair"):
        bs.make_plan(host="ws-01", user="ubuntu", key=str(tmp_path / "nokey"), env={})


# --- the whole flow, against a real SSH server -------------------------------------------------


class FakeHost(paramiko.ServerInterface):
    """An SSH server that records what it is sent and answers like a Debian host would.

    + os_id: what /etc/os-release says; sudo_ok: whether the user's sudo works
    + state: what the steps have done so far (a second run finds them done)
    """

    def __init__(self, *, client: paramiko.PKey, os_id: str = "debian", sudo_ok: bool = True):
        self.client, self.os_id, self.sudo_ok = client, os_id, sudo_ok
        self.auth: list[tuple[str, str]] = []
        self.commands: list[tuple[str, bytes]] = []
        self.state: set[str] = set()

    def get_allowed_auths(self, username):
        return "password,publickey"

    def check_auth_password(self, username, password):
        self.auth.append(("password", username))
        return paramiko.AUTH_SUCCESSFUL if password == PASSWORD else paramiko.AUTH_FAILED

    def check_auth_publickey(self, username, key):
        self.auth.append(("publickey", username))
        ok = key.asbytes() == self.client.asbytes() and "key" in self.state
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel, command):
        threading.Thread(target=self._serve, args=(channel, command.decode()), daemon=True).start()
        return True

    def _answer(self, command: str, stdin: bytes) -> tuple[int, str, str]:
        if command == bs.OS_RELEASE:
            pretty = {"debian": "Debian GNU/Linux 12 (bookworm)", "fedora": "Fedora Linux 40"}
            return 0, f"{self.os_id}\n\n{pretty[self.os_id]}\n", ""
        if command.startswith("sudo -S -p '' "):
            if stdin != PASSWORD.encode() + b"\n" and "sudoers" not in self.state:
                return 1, "", "sudo: 1 incorrect password attempt\n"
            if not self.sudo_ok:
                return 1, "", "ubuntu is not in the sudoers file.\n"
        if command == "sudo -n true":
            return (0, "", "") if "sudoers" in self.state else (1, "", "a password is required")
        for marker, step in (("authorized_keys", "key"), ("visudo", "sudoers")):
            if marker in command and command != bs.SUDO_VALIDATE:
                if step in self.state:
                    return 0, "unchanged\n", ""
                if "echo would;" in command:
                    return 0, "would\n", ""
                self.state.add(step)
                return 0, ("created\n" if "useradd" in command else "changed\n"), ""
        return (0, "", "") if command == bs.SUDO_VALIDATE else (127, "", "not found\n")

    def _serve(self, channel, command: str) -> None:
        stdin = b"".join(iter(lambda: channel.recv(65536), b""))
        self.commands.append((command, stdin))
        rc, out, err = self._answer(command, stdin)
        channel.sendall(out.encode())
        channel.sendall_stderr(err.encode())
        channel.send_exit_status(rc)
        channel.close()


@contextmanager
def ssh_server(host_key: paramiko.PKey, fake: FakeHost):
    listener = socket.create_server(("127.0.0.1", 0))
    transports: list[paramiko.Transport] = []
    threads: list[threading.Thread] = []

    def handshake(conn: socket.socket) -> None:
        transport = paramiko.Transport(conn)
        transport.add_server_key(host_key)
        transports.append(transport)
        with suppress(paramiko.SSHException, EOFError, OSError):  # the client hung up first
            transport.start_server(server=fake)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threads.append(threading.Thread(target=handshake, args=(conn,), daemon=True))
            threads[-1].start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield listener.getsockname()[1]
    finally:
        # no thread outlives the test: a later test that imports pyinfra_cli (gevent patches
        # threading then) fails on a lock a leftover thread holds
        with suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() that close() would not
        listener.close()
        server.join(timeout=5)
        for transport in transports:
            transport.close()
        for thread in [*threads, *transports]:
            thread.join(timeout=5)


@pytest.fixture
def host(control_key):
    """A fake host on a free port: (fake, port, its host key)."""
    host_key, _ = new_key()
    client = paramiko.PKey.from_path(control_key)
    fake = FakeHost(client=client)
    with ssh_server(host_key, fake) as port:
        yield fake, port, host_key


class Out:
    def __init__(self) -> None:
        self.lines: list[tuple[str, bool]] = []

    def __call__(self, text: str = "", err: bool = False) -> None:
        self.lines.append((text, err))

    @property
    def stdout(self) -> list[str]:
        return [t for t, err in self.lines if not err]

    @property
    def stderr(self) -> list[str]:
        return [t for t, err in self.lines if err]


def run(host, control_key, tmp_path, *, known_hosts_lines=(), converge=None, prompt=None,
        env=None, **options):  # fmt: skip
    """``bootstrap.apply`` against the fake host; returns (exit status, output, converge calls)."""
    fake, port, host_key = host
    known_hosts = tmp_path / "known_hosts"
    if known_hosts_lines and not known_hosts.exists():
        known_hosts.write_text("".join(f"{x}\n" for x in known_hosts_lines))
    env = env or {bs.PASSWORD_ENV: PASSWORD}
    options = {"host": "127.0.0.1", "user": "ubuntu", "port": port, "key": str(control_key),
               "known_hosts": str(known_hosts), "env": env, **options}  # fmt: skip
    out, calls = Out(), []

    def fake_converge(command, child_env):
        calls.append((command, dict(child_env)))
        return 0 if converge is None else converge

    plan = bs.make_plan(**options)
    try:
        rc = bs.apply(plan, echo=out, converge=fake_converge, env=env,
                      prompt=prompt or (lambda text: pytest.fail("prompted")))  # fmt: skip
    except bs.Refused as exc:
        out(f"gpufleet bootstrap: {exc}", err=True)
        rc = 1
    text = "\n".join(t for t, _ in out.lines)
    assert PASSWORD not in text
    for command, _ in fake.commands:
        assert PASSWORD not in command
    return rc, out, calls


def pinned(host) -> str:
    _, port, host_key = host
    return line(f"[127.0.0.1]:{port}", host_key)


def test_unknown_host_key_is_refused_before_anything_is_sent(host, control_key, tmp_path):
    fake, _, host_key = host
    rc, out, _ = run(host, control_key, tmp_path)
    assert rc == 1 and len(out.stderr) == 1 and out.stdout == []
    assert f"host key {bs.fingerprint(host_key)} (ssh-ed25519) is not in" in out.stderr[0]
    assert fake.auth == [] and fake.commands == []
    assert not (tmp_path / "known_hosts").exists()


def test_wrong_host_key_flag_is_refused_before_anything_is_sent(host, control_key, tmp_path):
    fake, _, _ = host
    other, _ = new_key()
    rc, out, _ = run(host, control_key, tmp_path, host_key=bs.fingerprint(other))
    assert rc == 1 and "is not the --host-key" in out.stderr[0]
    assert fake.auth == [] and fake.commands == []


def test_changed_host_key_is_refused_before_anything_is_sent(host, control_key, tmp_path):
    fake, port, _ = host
    other, _ = new_key()
    rc, out, _ = run(host, control_key, tmp_path,
                     known_hosts_lines=[line(f"[127.0.0.1]:{port}", other)])  # fmt: skip
    assert rc == 1 and "WARNING: HOST KEY CHANGED" in out.stderr[0]
    assert fake.auth == [] and fake.commands == []


def test_wrong_password_is_one_line_and_runs_nothing(host, control_key, tmp_path):
    fake, port, _ = host
    rc, out, _ = run(host, control_key, tmp_path, known_hosts_lines=[pinned(host)],
                     env={bs.PASSWORD_ENV: "not-it"})  # fmt: skip
    assert rc == 1
    assert out.stderr == [f"gpufleet bootstrap: ubuntu@127.0.0.1:{port}: the password was "
                          "refused; check it (nothing was changed)"]  # fmt: skip
    assert fake.auth == [("password", "ubuntu")] and fake.commands == []


def test_unsupported_os_is_refused_after_one_read(host, control_key, tmp_path):
    fake, _, _ = host
    fake.os_id = "fedora"
    rc, out, _ = run(host, control_key, tmp_path, known_hosts_lines=[pinned(host)])
    assert rc == 1
    assert out.stderr[0].endswith("unsupported OS Fedora Linux 40: gpufleet bootstraps Ubuntu "
                                  "and Debian (nothing was changed)")  # fmt: skip
    assert [c for c, _ in fake.commands] == [bs.OS_RELEASE]


def test_no_sudo_is_refused_after_the_read_only_checks(host, control_key, tmp_path):
    fake, _, _ = host
    fake.sudo_ok = False
    rc, out, _ = run(host, control_key, tmp_path, known_hosts_lines=[pinned(host)],
                     passwordless_sudo=True)  # fmt: skip
    assert rc == 1
    assert out.stderr == ["gpufleet bootstrap: ubuntu cannot use sudo on 127.0.0.1 (ubuntu is "
                          "not in the sudoers file.): add it to the sudo group on the console "
                          "(`usermod -aG sudo ubuntu`) (nothing was changed)"]  # fmt: skip
    assert [c for c, _ in fake.commands] == [bs.OS_RELEASE, bs.SUDO_VALIDATE]


def test_bootstrap_then_a_second_run_that_changes_nothing(host, control_key, tmp_path,
                                                          monkeypatch):  # fmt: skip
    monkeypatch.chdir(ROOT)
    fake, port, host_key = host
    inventory = tmp_path / "bootstrapped.py"
    options = {"name": "ws-01", "group": "rtx5090", "passwordless_sudo": True,
               "inventory": str(inventory), "host_key": bs.fingerprint(host_key)}  # fmt: skip
    env = {bs.PASSWORD_ENV: PASSWORD, "PATH": "/usr/bin"}
    rc, out, calls = run(host, control_key, tmp_path, env=env, **options)
    assert rc == 0, out.lines
    assert out.stderr == []
    assert out.stdout[:7] == [
        f"host key {bs.fingerprint(host_key)} matches --host-key",
        "password accepted for ubuntu (from $GPUFLEET_BOOTSTRAP_PASSWORD)",
        "Debian GNU/Linux 12 (bookworm), sudo works for ubuntu",
        "key installed for ubuntu",
        "sudoers drop-in /etc/sudoers.d/gpufleet-ubuntu written (visudo accepted it)",
        f"host key recorded in {tmp_path / 'known_hosts'}",
        "key login and passwordless sudo work for ubuntu",
    ]
    assert out.stdout[7] == f"added ws-01 to rtx5090 in {inventory}"
    assert out.stdout[-1] == "ws-01 bootstrapped: rtx5090 converged"
    # The password went only to sudo, on stdin; every other command had no input.
    for command, stdin in fake.commands:
        assert stdin == (PASSWORD.encode() + b"\n" if command.startswith("sudo -S") else b"")
    assert [c for c, _ in fake.commands][:2] == [bs.OS_RELEASE, bs.SUDO_VALIDATE]
    assert (tmp_path / "known_hosts").read_text() == pinned(host) + "\n"
    data = {"ssh_user": "ubuntu", "_sudo": True, "ssh_hostname": "127.0.0.1", "ssh_port": port,
            "ssh_key": str(control_key),
            "ssh_known_hosts_file": str(tmp_path / "known_hosts")}  # fmt: skip
    assert bs.read_inventory(inventory) == {"rtx5090": [("ws-01", data)]}
    [(command, child_env)] = calls
    assert command[1:] == ["-y", str(inventory), "deploys/rtx5090.py", "--limit", "ws-01"]
    assert child_env == {"PATH": "/usr/bin"}  # not the password

    written = inventory.read_text()
    fake.commands.clear()
    rc, out, calls = run(host, control_key, tmp_path, env=env,
                         **{**options, "host_key": None})  # fmt: skip
    assert rc == 0, out.lines
    assert out.stdout[:8] == [
        f"host key {bs.fingerprint(host_key)} matches {tmp_path / 'known_hosts'}",
        "password accepted for ubuntu (from $GPUFLEET_BOOTSTRAP_PASSWORD)",
        "Debian GNU/Linux 12 (bookworm), sudo works for ubuntu",
        "key already installed for ubuntu",
        "sudoers drop-in /etc/sudoers.d/gpufleet-ubuntu already in place",
        f"host key already in {tmp_path / 'known_hosts'}",
        "key login and passwordless sudo work for ubuntu",
        f"ws-01 already in rtx5090 in {inventory}",
    ]
    assert inventory.read_text() == written
    assert (tmp_path / "known_hosts").read_text() == pinned(host) + "\n"
    assert len(calls) == 1  # the converge runs again: it has nothing to do


def test_without_passwordless_sudo_the_key_is_installed_and_the_converge_explained(
    host, control_key, tmp_path
):
    fake, _, _ = host
    rc, out, calls = run(host, control_key, tmp_path, known_hosts_lines=[pinned(host)],
                         group="rtx5090")  # fmt: skip
    assert rc == 0 and calls == []
    assert out.stdout[3] == "key installed for ubuntu"
    assert out.stdout[-1] == bs.NOT_CONVERGED
    assert "pyinfra's sudo password goes on the remote command line" in bs.NOT_CONVERGED
    assert not any("visudo" in c for c, _ in fake.commands)


def test_ops_user_gets_the_key_and_the_drop_in(host, control_key, tmp_path):
    fake, port, _ = host
    rc, out, _ = run(host, control_key, tmp_path, known_hosts_lines=[pinned(host)],
                     group="rtx5090", ops_user="ops")  # fmt: skip
    assert rc == 0, out.lines
    assert out.stdout[3:5] == ["user ops created, key installed",
                               "sudoers drop-in /etc/sudoers.d/gpufleet-ops written (visudo "
                               "accepted it)"]  # fmt: skip
    assert out.stdout[-2] == (f'add it to your inventory: rtx5090 += [("127.0.0.1", '
                              f'{{"ssh_user": "ops", "_sudo": True, "ssh_port": {port}, '
                              f'"ssh_key": "{control_key}", "ssh_known_hosts_file": '
                              f'"{tmp_path / "known_hosts"}"}})]')  # fmt: skip
    assert out.stdout[-1] == (
        "then converge it: pyinfra -y INVENTORY deploys/rtx5090.py --limit 127.0.0.1"
    )
    assert ("publickey", "ops") in fake.auth
    commands = [c for c, _ in fake.commands]
    assert any(c.startswith("sudo -S -p '' sh -c") and "useradd" in c for c in commands)


def test_dry_run_checks_everything_and_changes_nothing(host, control_key, tmp_path,
                                                      monkeypatch):  # fmt: skip
    monkeypatch.chdir(ROOT)
    fake, _, host_key = host
    inventory = tmp_path / "bootstrapped.py"
    rc, out, calls = run(host, control_key, tmp_path, dry=True, group="rtx5090",
                         passwordless_sudo=True, inventory=str(inventory),
                         host_key=bs.fingerprint(host_key))  # fmt: skip
    assert rc == 0, out.lines
    assert out.stdout[3:] == [
        "would install key for ubuntu",
        "would write sudoers drop-in /etc/sudoers.d/gpufleet-ubuntu",
        f"would record the host key in {tmp_path / 'known_hosts'}",
        f"would add 127.0.0.1 to rtx5090 in {inventory}",
        f"would converge: pyinfra -y {inventory} deploys/rtx5090.py --limit 127.0.0.1",
    ]
    assert calls == [] and fake.state == set()
    assert not inventory.exists() and not (tmp_path / "known_hosts").exists()
    assert all(("publickey", u) not in fake.auth for u in ("ubuntu", "ops"))


def test_the_password_is_asked_for_only_after_the_host_key_is_trusted(host, control_key,
                                                                     tmp_path):  # fmt: skip
    asked = []

    def prompt(text):
        asked.append(text)
        return PASSWORD

    rc, _, _ = run(host, control_key, tmp_path, env={"HOME": "/nonexistent"}, prompt=prompt)
    assert rc == 1 and asked == []
    rc, out, _ = run(host, control_key, tmp_path, known_hosts_lines=[pinned(host)],
                     env={"HOME": "/nonexistent"}, prompt=prompt)  # fmt: skip
    assert rc == 0, out.lines
    assert asked == [f"password for ubuntu@127.0.0.1:{host[1]}"]
    assert out.stdout[1] == "password accepted for ubuntu (from the prompt)"


def test_a_failed_converge_is_one_line_and_exit_1(host, control_key, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc, out, _ = run(host, control_key, tmp_path, known_hosts_lines=[pinned(host)],
                     group="rtx5090", passwordless_sudo=True,
                     inventory=str(tmp_path / "inv.py"), converge=2)  # fmt: skip
    assert rc == 1
    assert out.stderr == ["gpufleet bootstrap: 127.0.0.1: the converge failed (pyinfra exit 2, "
                          "its output above): fix what it names and run bootstrap again: the "
                          "steps done are kept"]  # fmt: skip


def test_nothing_listening_is_one_line(control_key, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    plan = bs.make_plan(host="127.0.0.1", user="ubuntu", port=port, key=str(control_key),
                        env={bs.PASSWORD_ENV: PASSWORD})  # fmt: skip
    with pytest.raises(bs.Refused, match="connection refused: is sshd running"):
        bs.apply(plan, echo=Out())


def test_cli_exit_statuses(host, control_key, tmp_path):
    _, port, _ = host
    from gpufleet.cli import main

    runner = CliRunner()
    base = ["bootstrap", "127.0.0.1", "--user", "ubuntu", "--port", str(port),
            "--key", str(control_key), "--known-hosts", str(tmp_path / "kh")]  # fmt: skip
    usage = runner.invoke(main, [*base, "--inventory", "x.py", "--group", "rtx5090"],
                          env={bs.PASSWORD_ENV: PASSWORD})  # fmt: skip
    assert usage.exit_code == 64
    refused = runner.invoke(main, base, env={bs.PASSWORD_ENV: PASSWORD})
    assert refused.exit_code == 1
    assert "is not in" in refused.output and PASSWORD not in refused.output
