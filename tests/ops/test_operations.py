"""Operation fixtures, pyinfra style: arguments in, commands (or an error) out.

Each ``tests/operations/<module>.<op>/<case>.json`` holds ``args``, ``kwargs`` and either
``commands`` or ``exception``. A ``content`` kwarg is wrapped in ``ops.Secret`` as callers do.
gpufleet's operations carry out a change the plan decided, so their no-change twins are plan
fixtures (``tests/plans/``): there, the same state gives no change and no operation.
"""

from __future__ import annotations

import gzip
import importlib
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gevent
import pytest
from pyinfra.api import FunctionCommand, OperationError, StringCommand
from pyinfra.context import ctx_host

from gpufleet.control import inputs as control
from gpufleet.core import known
from gpufleet.core.hubcache import CachedFile
from gpufleet.core.wire import Failure
from gpufleet.ops import operations as ops

FIXTURES = Path(__file__).parents[1] / "operations"
CASES = sorted(FIXTURES.glob("*/*.json"))


class FakeHost:
    name = "testhost"
    print_prefix = "[testhost] "

    def __init__(self, facts: dict) -> None:
        self.facts = facts
        self.noops: list[str] = []
        self.data = {}

    def noop(self, description: str) -> None:
        self.noops.append(description)

    def get_fact(self, cls, **kwargs):
        return self.facts[cls.name]


def _render(command) -> str:
    if isinstance(command, StringCommand):
        return command.get_raw_value()
    if isinstance(command, FunctionCommand):
        return f"function:{command.function.__name__}"
    return str(command)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.stem}" for c in CASES])
def test_operation(case: Path):
    spec = json.loads(case.read_text())
    module, name = case.parent.name.rsplit(".", 1)
    op = getattr(importlib.import_module(f"gpufleet.ops.{module}"), name)
    kwargs = dict(spec.get("kwargs", {}))
    if "content" in kwargs:
        kwargs["content"] = ops.Secret(kwargs["content"])
    fake = FakeHost(spec.get("facts", {}))
    with ctx_host.use(fake):
        if "exception" in spec:
            with pytest.raises(OperationError) as err:
                list(op._inner(*spec.get("args", []), **kwargs))
            assert str(err.value) == spec["exception"]
            return
        commands = [_render(c) for c in op._inner(*spec.get("args", []), **kwargs)]
    assert commands == spec["commands"]
    assert fake.noops == []  # the plan decided: an operation always has work


def test_secret_never_prints():
    secret = ops.Secret("hf_abcdef")
    assert "hf_abcdef" not in repr(secret) and "hf_abcdef" not in str(secret)
    command = FunctionCommand(ops._write_secret_file, ("/x/.env", secret, "root", "root"), {})
    assert "hf_abcdef" not in repr(command)


def test_fetch_model_gets_its_retry_settings_and_never_the_token():
    blob = CachedFile("/h", "o/r", "c" * 40, "m.gguf", "a" * 64, 120)
    args = ops.fetch_args("/usr/local/libexec/gpufleet/fetch-model", "http://hub/r/resolve/s/m.gguf",
                          blob, "/opt/gpufleet/.env", attempts=6, stall_seconds=30)  # fmt: skip
    assert args == ("env", "FETCH_ATTEMPTS=6", "FETCH_STALL_SECONDS=30",
                    f"FETCH_STAMP=/var/lib/gpufleet/verified/models--o--r/{'a' * 64}",
                    f"FETCH_LOCK=/h/hub/.locks/models--o--r/{'a' * 64}.lock",
                    f"FETCH_LINK=/h/hub/models--o--r/snapshots/{'c' * 40}/m.gguf",
                    "/usr/local/libexec/gpufleet/fetch-model", "http://hub/r/resolve/s/m.gguf",
                    f"/h/hub/models--o--r/blobs/{'a' * 64}", "a" * 64, "120",
                    "/opt/gpufleet/.env")  # fmt: skip
    defaults = ops.fetch_args("f", "u", blob, "e")
    assert defaults[1:3] == ("FETCH_ATTEMPTS=4", "FETCH_STALL_SECONDS=120")


class ScriptedHost(FakeHost):
    """Answers each command with the next scripted (ok, output line) and records them."""

    def __init__(self, answers: list[tuple[bool, str]]) -> None:
        super().__init__({})
        self.answers, self.ran = list(answers), []

    def run_shell_command(self, command, _sudo=False, print_output=False):
        self.ran.append(command.get_raw_value())
        ok, *texts = self.answers.pop(0)  # (ok, stderr) or (ok, stdout, stderr)
        out, err = texts if len(texts) == 2 else ("", texts[0])
        return ok, SimpleNamespace(stdout_lines=out.splitlines(), stderr_lines=err.splitlines())


STATE = type("State", (), {"config": type("Config", (), {"SUDO": False})()})()
FRONTEND_HELD = (
    "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 2345 (python3)"
)


def test_apt_waits_out_a_held_lock_then_installs(monkeypatch):
    monkeypatch.setattr(ops.time, "sleep", lambda s: None)
    host = ScriptedHost([(True, ""), (False, FRONTEND_HELD), (True, "")])
    commands = ops.apt_commands(["nvidia-container-toolkit=1.18.0-1"], lock_seconds=60)
    ops._apt_install(STATE, host, tuple(commands), 60)
    assert host.ran == [commands[0], commands[1], commands[1]]
    assert "-o DPkg::Lock::Timeout=60 " in commands[1]
    assert commands[1].endswith(" install nvidia-container-toolkit=1.18.0-1")


def test_apt_lock_held_past_the_bound_names_its_holder(monkeypatch):
    clock = iter(range(0, 1000, 2))  # two seconds pass per look at the clock
    monkeypatch.setattr(ops.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(ops.time, "sleep", lambda s: None)
    host = ScriptedHost([(False, FRONTEND_HELD)] * 50)
    with pytest.raises(OperationError) as err:
        ops._apt_install(STATE, host, ("apt-get update",), 10)
    assert str(err.value) == (
        "/var/lib/dpkg/lock-frontend is held by process 2345 (python3) "
        "after waiting 10s: let it finish (or stop it), then run again"
    )
    assert 1 < len(host.ran) < 10


def test_apt_failure_that_is_no_lock_is_not_waited_for():
    host = ScriptedHost([(False, "E: Unable to locate package nvidia-container-toolkit")])
    with pytest.raises(OperationError) as err:
        ops._apt_install(STATE, host, ("apt-get install x",), 60)
    assert str(err.value) == "apt-get failed: E: Unable to locate package nvidia-container-toolkit"
    assert len(host.ran) == 1


@pytest.mark.parametrize(
    ("output", "held"),
    [
        (FRONTEND_HELD, ("/var/lib/dpkg/lock-frontend", "process 2345 (python3)")),
        ("E: Could not get lock /var/lib/apt/lists/lock. It is held by process 812 (apt-get)\n"
         "E: Unable to lock directory /var/lib/apt/lists/", ("/var/lib/apt/lists/lock",
                                                             "process 812 (apt-get)")),
        # apt before 1.9 does not say who
        ("E: Could not get lock /var/lib/dpkg/lock - open (11: Resource temporarily unavailable)",
         ("/var/lib/dpkg/lock", "another process")),
        # apt 2.x waiting on DPkg::Lock::Timeout, then giving up
        ("Waiting for cache lock: Could not get lock /var/lib/dpkg/lock-frontend. It is held by "
         "process 15619 (python3)... 1s\nE: Unable to acquire the dpkg frontend lock "
         "(/var/lib/dpkg/lock-frontend), is another process using it?",
         ("/var/lib/dpkg/lock-frontend", "process 15619 (python3)")),
        ("E: Unable to acquire the dpkg frontend lock (/var/lib/dpkg/lock-frontend), is another "
         "process using it?", ("/var/lib/dpkg/lock-frontend", "another process")),
        ("E: Unable to locate package x", None),
    ],
)  # fmt: skip
def test_lock_holder(output, held):
    assert ops.lock_holder(output) == held


def with_transport(host: ScriptedHost, active: bool) -> ScriptedHost:
    transport = SimpleNamespace(is_active=lambda: active)
    host.connector = SimpleNamespace(client=SimpleNamespace(get_transport=lambda: transport))
    return host


PROGRESS = (
    "fetch: m.gguf: downloading 120.3 KiB\n"
    "fetch: m.gguf 30% (36.1 KiB of 120.3 KiB, 8.0 KiB/s, ETA 10s)"
)


def test_a_download_cut_off_by_a_lost_connection_says_so():
    host = with_transport(ScriptedHost([(False, PROGRESS, "")]), active=False)
    with pytest.raises(OperationError) as err:
        ops._fetch(STATE, host, ("fetch-model",), "m.gguf")
    assert str(err.value).startswith("m.gguf: the SSH connection was lost during the download")


@pytest.mark.parametrize(
    ("out", "err", "shown"),
    [
        (PROGRESS, "fetch: m.gguf: HTTP 500 from http://hub/m; run again to resume",
         "m.gguf: HTTP 500 from http://hub/m; run again to resume"),
        ("", "fetch: cannot read /opt/gpufleet/.env", "m.gguf: cannot read /opt/gpufleet/.env"),
        # what it said on stdout is progress, not a reason: with no last word, say it failed
        (PROGRESS, "", "m.gguf: fetch-model failed"),
    ],
)  # fmt: skip
def test_a_failed_download_shows_fetch_models_last_word(out, err, shown, monkeypatch):
    clock = iter(range(1000))  # a second per look: connection_lost gives up at once
    monkeypatch.setattr(ops.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(ops.time, "sleep", lambda s: None)
    host = with_transport(ScriptedHost([(False, out, err)]), active=True)
    with pytest.raises(OperationError) as exc:
        ops._fetch(STATE, host, ("fetch-model",), "m.gguf")
    assert str(exc.value) == shown


def gate(host, monkeypatch, seconds_per_look: int = 4, **kw):
    clock = iter(range(0, 10_000, seconds_per_look))
    monkeypatch.setattr(ops.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(ops.time, "sleep", lambda s: None)
    args = dict(stack="/opt/gpufleet", compose_project="gpufleet-jetson", service="llama",
                kind="llama-server", port=11434, timeout=60, chat=False, secrets=())  # fmt: skip
    ops._gate(STATE, host, ops.GateSpec(**{**args, **kw}))


def test_a_slow_gate_says_what_it_waits_for_and_how_long(monkeypatch, capsys):
    host = ScriptedHost([(True, "000 running 0 0")] + [(True, "503 running 0 0")] * 5
                        + [(True, "200 running 0 0")])  # fmt: skip
    gate(host, monkeypatch)
    lines = capsys.readouterr().err.splitlines()
    pattern = (r"\[testhost\] gate: llama: waiting for http://127.0.0.1:11434/health "
               r"\(HTTP 503\), (\d+)s of 60s")  # fmt: skip
    said = [re.fullmatch(pattern, line) for line in lines]
    assert len(lines) >= 2 and all(said), lines
    seconds = [int(m.group(1)) for m in said]
    gaps = [b - a for a, b in zip(seconds, seconds[1:], strict=False)]
    assert all(gap >= ops.PROGRESS_SECONDS for gap in gaps), seconds


def test_a_quick_gate_is_quiet(monkeypatch, capsys):
    gate(ScriptedHost([(True, "503 running 0 0"), (True, "200 running 0 0")]), monkeypatch)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "looks",
    [
        ["000 running 0 0", "000 restarting 1 1"],  # restarted since the first look
        ["000 exited 0 1"],  # gone, no restart policy
    ],
)
def test_a_server_that_exits_fails_the_gate_at_once_with_its_log(monkeypatch, looks):
    log = "llama  | gguf_init_from_file_impl: invalid magic characters: 'a8/\\x13'"
    host = ScriptedHost([(True, look) for look in looks] + [(True, log)])
    with pytest.raises(OperationError) as err:
        gate(host, monkeypatch)
    assert str(err.value).startswith("llama exited (status ")
    assert str(err.value).endswith(f"before it was healthy; its last log lines:\n{log}")
    assert len(host.ran) == len(looks) + 1  # the looks, then the log: no waiting out 60 s


def test_a_server_that_never_answers_fails_at_its_deadline(monkeypatch):
    host = ScriptedHost([(True, "503 running 0 0")] * 20 + [(True, "loading model")])
    with pytest.raises(OperationError) as err:
        gate(host, monkeypatch, seconds_per_look=8)
    assert str(err.value).startswith("llama is not healthy after 60s (last HTTP status 503)")


class LoggingHost(FakeHost):
    def __init__(self) -> None:
        super().__init__({})
        self.logged: list[str] = []

    def log_styled(self, message, log_func=None, **styles):
        self.logged.append(message)


def test_a_failing_function_fails_its_host_with_its_message_and_no_traceback():
    def broken(state, host, what):
        raise OperationError(f"{what}: HTTP 500 from http://hub/m\nsecond line")

    command = ops.function_command(broken, ("m.gguf",))
    host, state = LoggingHost(), SimpleNamespace()
    assert command.function.__wrapped__ is broken and command.function.__name__ == "broken"
    assert command.execute(state, host, {}) is False  # pyinfra: a failed command, not a crash
    assert host.logged == ["m.gguf: HTTP 500 from http://hub/m", "second line"]  # a line each
    assert state._gpufleet_failures == {
        "testhost": Failure(step="", why="m.gguf: HTTP 500 from http://hub/m", log=("second line",))
    }


def test_a_function_that_succeeds_is_untouched():
    command = ops.function_command(lambda state, host, x: None, (1,))
    host = LoggingHost()
    assert command.execute(SimpleNamespace(), host, {}) is None and host.logged == []


def _docker_on_path(tmp_path, monkeypatch, script: str) -> None:
    """A stand-in ``docker`` (a shell script) first on PATH: real processes, real pipes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text("#!/bin/sh\n" + script)
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


@pytest.fixture
def fresh_run(tmp_path, monkeypatch):
    """A run of its own: its own cache directory, nothing asked of Docker yet."""
    monkeypatch.setenv("GPUFLEET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(control, "_fallback_dir", [])
    next_run()
    yield tmp_path
    next_run()


def next_run() -> None:
    control.saved_image.cache_clear()
    control.local_image_id.cache_clear()


def _images(saves: Path, size: str = "1000", image_id: str = "sha256:1d") -> str:
    """A stand-in ``docker``: ``image inspect`` prints ``image_id``, ``save`` logs its image
    and prints ``size`` zero bytes."""
    save = f'echo "$2" >> {saves}; sleep 0.3; head -c {size} /dev/zero'
    return f'case "$1" in image) echo {image_id} ;; save) {save} ;; *) exit 3 ;; esac\n'


def test_the_control_machine_sends_its_image_gzipped(fresh_run, monkeypatch):
    _docker_on_path(fresh_run, monkeypatch, _images(fresh_run / "saves", "3000000"))
    stream, done = ops._saved_image(None, known.CONTROL_MACHINE, "fleet/llama:abc")
    assert gzip.decompress(stream.read()) == bytes(3_000_000)
    assert done(False) is None
    assert (fresh_run / "saves").read_text().split() == ["fleet/llama:abc"]


def test_the_control_machine_saves_an_image_once_for_every_host_and_run(fresh_run, monkeypatch):
    saves = fresh_run / "saves"
    _docker_on_path(fresh_run, monkeypatch, _images(saves))
    paths = []
    hosts = [threading.Thread(target=lambda: paths.append(control.saved_image("fleet/llama:abc")))
             for _ in range(6)]  # fmt: skip
    for host in hosts:
        host.start()
    for host in hosts:
        host.join()
    assert saves.read_text().split() == ["fleet/llama:abc"]  # one docker save, six receivers
    assert len(set(paths)) == 1 and gzip.decompress(paths[0].read_bytes()) == bytes(1000)
    next_run()
    assert control.saved_image("fleet/llama:abc") == paths[0]  # the next run sends the same
    assert saves.read_text().split() == ["fleet/llama:abc"]
    control.saved_image("fleet/other:1")  # another tag of the same id: its own tarball
    assert saves.read_text().split() == ["fleet/llama:abc", "fleet/other:1"]


def test_a_rebuilt_image_is_saved_again(fresh_run, monkeypatch):
    saves = fresh_run / "saves"
    _docker_on_path(fresh_run, monkeypatch, _images(saves))
    first = control.saved_image("fleet/llama:abc")
    next_run()
    (fresh_run / "rebuilt").mkdir()
    _docker_on_path(fresh_run / "rebuilt", monkeypatch, _images(saves, image_id="sha256:2e"))
    assert control.saved_image("fleet/llama:abc") != first
    assert saves.read_text().split() == ["fleet/llama:abc", "fleet/llama:abc"]


def test_saves_kept_are_the_most_recently_sent_within_the_budget(fresh_run, monkeypatch):
    _docker_on_path(fresh_run, monkeypatch, _images(fresh_run / "saves", image_id="sha256:$5"))
    old, used = control.saved_image("fleet/old:1"), control.saved_image("fleet/used:1")
    monkeypatch.setattr(control, "IMAGES_KEPT_BYTES", int(2.5 * old.stat().st_size))
    for age, path in ((300, old), (200, used)):
        os.utime(path, (time.time() - age,) * 2)
    next_run()
    assert control.saved_image("fleet/used:1") == used  # sent again: now the most recent
    killed = control._images_dir() / "tmp1.partial"  # what a killed run left, two days ago
    killed.write_text("")
    os.utime(killed, (time.time() - 2 * 86400,) * 2)
    newer = control.saved_image("fleet/newer:1")
    assert sorted(p.name for p in control._images_dir().iterdir()) == sorted(
        [newer.name, used.name]
    )


def test_a_failed_save_on_the_control_machine_says_why_and_leaves_no_file(fresh_run, monkeypatch):
    stand_in = ('[ "$1" = image ] && exec echo sha256:1d\n'
                'head -c 5000 /dev/zero; echo "Error: cannot save: $2" >&2; exit 1\n')  # fmt: skip
    _docker_on_path(fresh_run, monkeypatch, stand_in)
    with pytest.raises(OperationError) as failed:
        ops._saved_image(None, known.CONTROL_MACHINE, "fleet/llama:abc")
    assert str(failed.value) == ("docker save fleet/llama:abc failed on the control machine: "
                                 "Error: cannot save: fleet/llama:abc")  # fmt: skip
    assert list(control._images_dir().iterdir()) == []  # no half-written image to send


def test_an_image_gone_from_the_control_machine_is_one_line(fresh_run, monkeypatch):
    _docker_on_path(fresh_run, monkeypatch, "exit 1\n")
    with pytest.raises(
        OperationError,
        match=r"^docker save fleet/llama:gone failed on the "
        r"control machine: this machine's Docker has no image fleet/llama:gone$",
    ):
        ops._saved_image(None, known.CONTROL_MACHINE, "fleet/llama:gone")


def test_a_cache_it_cannot_write_sends_from_the_temporary_directory(fresh_run, monkeypatch):
    (fresh_run / "a-file").write_text("")
    monkeypatch.setenv("GPUFLEET_CACHE", str(fresh_run / "a-file" / "cache"))  # not a dir
    registered = []
    monkeypatch.setattr(control.atexit, "register", lambda *args: registered.append(args))
    _docker_on_path(fresh_run, monkeypatch, _images(fresh_run / "saves", "10"))
    path = control.saved_image("fleet/llama:abc")
    assert path.parent.parent == Path(tempfile.gettempdir())
    assert path.parent.stat().st_mode & 0o77 == 0  # this user's alone
    assert gzip.decompress(path.read_bytes()) == bytes(10)
    ((cleanup, directory, ignore_errors),) = registered
    cleanup(directory, ignore_errors)  # what the run does at its exit
    assert not path.exists()


class _LocalClient:
    """An SSH client whose ``exec_command`` runs the command here, in ``sh``: a real shell, real
    pipes, a stand-in ``docker`` on PATH (no SSH server in a unit test)."""

    def __init__(self):
        self.commands = []

    def exec_command(self, command):
        self.commands.append(command)
        proc = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        channel = SimpleNamespace(shutdown_write=proc.stdin.close, recv_exit_status=proc.wait)
        proc.stdin.channel = channel
        return (SimpleNamespace(write=proc.stdin.write, channel=channel),
                SimpleNamespace(read=proc.stdout.read, channel=channel), proc.stderr)  # fmt: skip


def test_hosts_receiving_the_control_machines_image_are_sent_one_gzipped_save(
    fresh_run, monkeypatch
):
    saves, loads = fresh_run / "saves", fresh_run / "loads"
    _docker_on_path(
        fresh_run,
        monkeypatch,
        f"""case "$1" in
        save) echo "$2" >> {saves}; head -c 2000000 /dev/zero ;;
        load) wc -c >> {loads} ;;
        image) echo '{{"gpufleet.inputs": "abc"}}' ;;
        tag|rmi) ;;
        *) exit 3 ;;
        esac\n""",
    )
    state = SimpleNamespace(config=SimpleNamespace(SUDO=False))
    hosts = [SimpleNamespace(name=f"ws-{i}", data={}, connector=SimpleNamespace(
        client=_LocalClient())) for i in (1, 2)]  # fmt: skip
    for host in hosts:
        ops._transfer_image(state, host, "fleet/llama:abc")
    assert saves.read_text().split() == ["fleet/llama:abc"]  # saved once for both hosts
    assert loads.read_text().split() == ["2000000", "2000000"]  # each loaded the whole image
    assert hosts[0].connector.client.commands == ["gunzip | docker load -q >/dev/null"]
    sent = state._gpufleet_tallies["transferred"]
    assert set(sent) == {"ws-1", "ws-2"} and sent["ws-1"] == sent["ws-2"] < 2000000 / 100  # gzip
    received = SimpleNamespace(name="spark", data={}, connector=SimpleNamespace(
        client=_LocalClient()))  # fmt: skip
    ops._receive_image(state, received, "gpufleet/llama.cpp:spark", "abc", known.CONTROL_MACHINE,
                       "fleet/llama:abc", wait=False)  # fmt: skip
    assert saves.read_text().split() == ["fleet/llama:abc"]  # the same file again
    assert received.connector.client.commands == [
        "gunzip | docker load -q >/dev/null && docker tag fleet/llama:abc "
        "gpufleet/llama.cpp:spark && docker rmi fleet/llama:abc >/dev/null"
    ]
    assert state._gpufleet_tallies["received"] == {"spark": sent["ws-1"]}


class _Transport:
    """A paramiko transport whose peer answers keepalives after ``delay`` seconds (None:
    never, a frozen host)."""

    def __init__(self, delay: float | None, interval: int = 0):
        self.packetizer = SimpleNamespace(_Packetizer__keepalive_interval=interval)
        self.delay = delay
        self.asked = 0
        self.active = True
        self.polls: list[float] = []  # the socket timeouts set: how often its reader wakes
        self.sock = SimpleNamespace(settimeout=self.polls.append)

    def is_active(self):
        return self.active

    def global_request(self, kind, data=None, wait=True):
        assert kind == "keepalive@openssh.com" and wait
        self.asked += 1
        gevent.sleep(3600 if self.delay is None else self.delay)

    def close(self):
        self.active = False


def _connected(transport, name="frozen-1"):
    client = SimpleNamespace(get_transport=lambda: transport)
    host = SimpleNamespace(name=name, state=SimpleNamespace(), connector=SimpleNamespace(
        client=client), logged=[])  # fmt: skip
    host.log_styled = lambda message, **kw: host.logged.append(message)
    return host


def test_a_host_that_stops_answering_keepalives_has_its_connection_closed():
    transport = _Transport(delay=None)
    host = _connected(transport)
    ops.keep_alive(host, 0.05, answer_within=0.2)
    gevent.sleep(0.6)
    assert not transport.active and transport.asked == 1
    assert host.state._gpufleet_lost == {"frozen-1": "no answer to an SSH keepalive within 0.2s"}
    assert host.logged and "stopped answering" in host.logged[0]


def test_the_watch_keeps_its_own_host_when_pyinfras_current_host_changes():
    from pyinfra.context import ctx_host
    from pyinfra.context import host as current

    transport = _Transport(delay=None)
    frozen = _connected(transport, "frozen-2")
    with ctx_host.use(frozen):
        ops.keep_alive(current, 0.05, answer_within=0.2)  # the deploy's proxy, as it calls it
    with ctx_host.use(_connected(_Transport(delay=0), "other")):  # pyinfra moved on
        gevent.sleep(0.6)
    assert not transport.active
    assert frozen.state._gpufleet_lost == {"frozen-2": "no answer to an SSH keepalive within 0.2s"}


def test_a_host_that_answers_keeps_its_connection_and_one_watch():
    transport = _Transport(delay=0.01)
    host = _connected(transport)
    ops.keep_alive(host, 0.05, answer_within=0.5)
    ops.keep_alive(host, 0.05, answer_within=0.5)  # a second call adds no second watch
    gevent.sleep(0.4)
    assert transport.active and 3 <= transport.asked <= 8
    assert not getattr(host.state, "_gpufleet_lost", None)
    assert transport.polls == [ops.TRANSPORT_POLL_SECONDS]  # once a second, not paramiko's 0.1
    transport.close()
    ops.keep_alive(SimpleNamespace(connector=SimpleNamespace()))  # not connected: nothing to do


def test_a_function_past_its_bound_fails_its_host_saying_what_ran_out():
    import gevent

    def _fetch(state, host):
        gevent.sleep(5)

    command = ops.function_command(_fetch)
    host, state = LoggingHost(), SimpleNamespace()
    # as pyinfra runs a function command with the operation's _timeout
    with pytest.raises(TimeoutError), gevent.Timeout(0.05, exception=TimeoutError):
        command.execute(state, host, {})
    why = state._gpufleet_failures["testhost"].why
    assert why == "fetch: ran past its time bound (timeout_*_seconds)"


@pytest.mark.parametrize("owner", [None, "root"])
def test_a_file_written_whole_or_not_at_all_by_a_real_sh(tmp_path, owner):
    """The .env (0600, owned) and the status textfile (0644) share one writer: stdin to a
    private temporary file, its size checked, then renamed. Cut short, the old file stays."""
    import os
    import stat
    import subprocess

    target = tmp_path / "stack" / ".env"
    target.parent.mkdir()
    target.write_text("OLD=1\n")
    body = b"HF_TOKEN='s3cret'\nPORT='8000'\n"
    mode = "600" if owner else "644"

    def write(data: bytes) -> subprocess.CompletedProcess:
        script = ops.whole_file_script(str(target), len(body), mode, owner=owner)
        return subprocess.run(["sh", "-c", script], input=data, capture_output=True, check=False)

    cut = write(body[:7])
    assert cut.returncode == 7 and b"cut short" in cut.stderr
    assert target.read_text() == "OLD=1\n"
    assert sorted(p.name for p in target.parent.iterdir()) == [".env"]  # no temporary left
    whole = write(body)
    assert whole.returncode == 0, whole.stderr
    assert target.read_bytes() == body
    assert stat.S_IMODE(os.stat(target).st_mode) == int(mode, 8)
