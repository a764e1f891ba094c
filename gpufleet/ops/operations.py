"""gpufleet's own pyinfra operations, for what pyinfra's cannot do safely.

The plan (``gpufleet.plan``) decides what changes; these operations carry a change out. A
deploy calls one only for a change its plan lists, so they do not read facts or compare again
(each decision is made once per host per run); they are marked non-idempotent for that reason.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass

import click
import gevent.event
from pyinfra.api import FunctionCommand, OperationError, StringCommand, operation
from pyinfra.context import ContextObject

from gpufleet.control import inputs as control
from gpufleet.core import known, probes
from gpufleet.core.cuda import OBJECTS_FILE, sm_label
from gpufleet.core.hubcache import CachedFile
from gpufleet.core.known import HEALTH_PATHS
from gpufleet.core.wire import Failure
from gpufleet.plan.gate import ImageCheck

APPLIED = "Run only when the host's plan lists the change"
logger = logging.getLogger("pyinfra")
BUILD_WAIT_SECONDS = 4 * 3600  # a CUDA build of every kernel on a small machine


def run_state(state, name: str, factory=dict):
    """What this run keeps on pyinfra's state under ``_gpufleet_<name>``, made on first use."""
    attr = f"_gpufleet_{name}"
    if getattr(state, attr, None) is None:
        setattr(state, attr, factory())
    return getattr(state, attr)


def function_command(function, args: tuple = (), kwargs: dict | None = None) -> FunctionCommand:
    """A ``FunctionCommand`` whose ``OperationError`` fails the host the way a failed shell
    command does: its message once, with the host's name, and no traceback (pyinfra prints
    "Unexpected error in Python callback" and the whole traceback for any exception a
    function raises). The message is kept for the run's closing summary too."""

    @functools.wraps(function)
    def reported(state, host, *a, **kw):
        try:
            return function(state, host, *a, **kw)
        except OperationError as exc:
            # each line with the host's name, so a reader of the output (gpufleet's runner)
            # keeps a gate's log tail with its host
            for line in str(exc).splitlines() or [""]:
                host.log_styled(line, fg="red", log_func=logger.error)
            lines = str(exc).splitlines() or [""]
            failure = Failure(step="", why=lines[0], log=tuple(lines[1:]))
            run_state(state, "failures").setdefault(host.name, failure)
            return False
        except TimeoutError:
            # the operation's _timeout (gpufleet's timeout_*_seconds): pyinfra says after how
            # long; the report says what ran out
            why = f"{function.__name__.strip('_')}: ran past its time bound (timeout_*_seconds)"
            run_state(state, "failures").setdefault(host.name, Failure(step="", why=why))
            raise

    return FunctionCommand(reported, args, kwargs or {})


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


def mask(text: str, secrets: tuple[Secret, ...]) -> str:
    """``text`` with every secret value replaced by ``<secret>``."""
    for secret in secrets:
        if secret.reveal():
            text = text.replace(secret.reveal(), "<secret>")
    return text


def _sudo(state, host) -> bool:
    return bool(host.data.get("_sudo") or state.config.SUDO)


def run_with_stdin(
    state, host, command: str, body: bytes, *, timeout: float = 120
) -> tuple[int, str, str]:
    """Run ``command`` on the host over its SSH connection with ``body`` as its input; the
    exit status, stdout and stderr (decoded with ``surrogateescape``: no byte is lost).

    Nothing sent this way reaches a command line, a log or a temporary file. A host that stops
    answering for ``timeout`` seconds fails with one line that says so.
    """
    if _sudo(state, host):
        command = "sudo -H -n sh -c " + shlex.quote(command)
    client = getattr(host.connector, "client", None)
    if client is None:
        raise OperationError(f"{host.name}: streaming needs an SSH connection")
    try:
        stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
        stdin.write(body)
        stdin.channel.shutdown_write()
        out = stdout.read().decode(errors="surrogateescape")
        err = stderr.read().decode(errors="surrogateescape")
        return stdout.channel.recv_exit_status(), out, err
    except TimeoutError:
        raise OperationError(f"no answer from the host within {timeout:.0f}s") from None


def whole_file_script(
    path: str, size: int, mode: str = "644", *, owner: str | None = None, group: str = "root"
) -> str:
    """Shell that writes stdin to ``path`` whole or not at all: a temporary file beside it
    (made under umask 077: private from the moment it exists), its size checked, its owner and
    mode set, then renamed over the old one. A channel that drops mid-way leaves the old file."""
    chown = f'chown {shlex.quote(owner)}:{shlex.quote(group)} "$t"; ' if owner else ""
    return (
        f'set -e; umask 077; p={shlex.quote(path)}; d=$(dirname "$p"); mkdir -p "$d"; '
        f't=$(mktemp "$d/.gpufleet.XXXXXX"); trap \'rm -f "$t"\' EXIT; cat > "$t"; '
        f'[ "$(wc -c < "$t")" -eq {int(size)} ] || {{ echo "cut short" >&2; exit 7; }}; '
        f'{chown}chmod {shlex.quote(mode)} "$t"; mv -f "$t" "$p"; trap - EXIT'
    )


def write_now(state, host, path: str, body: str, *, mode: str = "644") -> str | None:
    """Write a file on the host at once, outside pyinfra's operations (a read-only run that
    still keeps one file current); None when written, else why not."""
    data = body.encode()
    try:
        status, _, err = run_with_stdin(state, host, whole_file_script(path, len(data), mode), data)
    except OperationError as exc:
        return str(exc)
    return None if status == 0 else f"{path} not written ({status}): {err.strip()[-200:]}"


def exec_with_stdin(state, host, command: str, feed) -> str:
    """Run ``command`` on the host over its SSH connection, ``feed(stdin)`` writing its input.

    Nothing sent this way reaches a command line, a log or a temporary file. Returns stdout.
    """
    if _sudo(state, host):
        command = "sudo -H -n sh -c " + shlex.quote(command)
    client = getattr(host.connector, "client", None)
    if client is None:
        raise OperationError(f"{host.name}: streaming needs an SSH connection")
    stdin, stdout, stderr = client.exec_command(command)
    feed(stdin)
    stdin.channel.shutdown_write()
    out = stdout.read().decode(errors="replace")
    status = stdout.channel.recv_exit_status()
    if status != 0:
        err = stderr.read().decode(errors="replace").strip()
        raise OperationError(f"remote command failed ({status}): {err[-500:]}")
    return out


def _write_secret_file(state, host, path: str, content: Secret, owner: str, group: str) -> None:
    data = content.reveal().encode()
    script = whole_file_script(path, len(data), "600", owner=owner, group=group)

    def feed(stdin):
        stdin.write(data)

    exec_with_stdin(state, host, script, feed)


@operation(is_idempotent=False, idempotent_notice=APPLIED)
def secret_file(path: str, content: Secret, *, owner: str = "root", group: str = "root"):
    """Write a file of secrets (a ``.env``) at ``path``, mode 0600, never showing its content.

    + path: remote path
    + content: the whole file, wrapped in ``Secret``
    + owner/group: who owns it

    The content travels on the SSH channel's stdin: never on a command line, in ``--diff``
    or in a temporary file readable by others.

    **Example:**

    .. code:: python

        secret_file("/opt/gpufleet/.env", Secret(text))
    """
    yield function_command(_write_secret_file, (path, content, owner, group), {})


# --- apt, with a bounded wait for its lock ------------------------------------------------
#
# Another apt or dpkg (unattended-upgrades, a person) holds the lock: wait for it up to a
# bound, then say who holds it. apt waits on the dpkg lock itself (DPkg::Lock::Timeout); the
# lists lock of ``apt-get update`` is waited for here, one try every few seconds.

LOCK_RE = re.compile(
    r"Could not get lock (/\S+?)\.?(?=\s|$)"
    r"(?: It is held by process (\d+)(?: \(([^)]*)\))?)?"
)
# what apt says when DPkg::Lock::Timeout ran out (after "Waiting for cache lock: ...")
UNABLE_RE = re.compile(r"Unable to acquire the dpkg frontend lock \((/[^)]+)\)")
LOCK_RETRY_SECONDS = 3.0


def apt_commands(
    packages: Sequence[str],
    *,
    lock_seconds: int,
    allow_downgrades: bool = False,
    update: bool = True,
) -> list[str]:
    """The apt-get command lines (update, then install) for ``packages``."""
    apt = f"DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout={lock_seconds}"
    install = (
        f"{apt} -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "
        "install"
        + (" --allow-downgrades" if allow_downgrades else "")
        + " "
        + " ".join(shlex.quote(p) for p in packages)
    )
    return ([f"{apt} update"] if update else []) + [install]


def lock_holder(output: str) -> tuple[str, str] | None:
    """The lock apt could not get and who holds it (``process 812 (unattended-upgr)``), from
    its error output; None when the failure was not a lock."""
    m = LOCK_RE.search(output)
    if m is None:
        unable = UNABLE_RE.search(output)
        return (unable.group(1), "another process") if unable else None
    lock, pid, name = m.groups()
    who = f"process {pid}" + (f" ({name})" if name else "") if pid else "another process"
    return lock, who


def _apt_install(state, host, commands: tuple[str, ...], lock_seconds: int) -> None:
    deadline = time.monotonic() + lock_seconds
    sudo = _sudo(state, host)
    for command in commands:
        while True:
            ok, output = host.run_shell_command(StringCommand(command), _sudo=sudo)
            if ok:
                break
            text = "\n".join(output.stdout_lines + output.stderr_lines)
            held = lock_holder(text)
            if held is None:
                errors = [ln for ln in text.splitlines() if ln.startswith(("E:", "dpkg:"))]
                raise OperationError("apt-get failed: " + ("; ".join(errors[-3:]) or text[-300:]))
            if time.monotonic() + LOCK_RETRY_SECONDS > deadline:
                lock, who = held
                raise OperationError(
                    f"{lock} is held by {who} after waiting {lock_seconds}s: let it finish "
                    "(or stop it), then run again"
                )
            time.sleep(LOCK_RETRY_SECONDS)


@operation(is_idempotent=False, idempotent_notice=APPLIED)
def apt_install(
    packages: Sequence[str], *, lock_seconds: int = 120, allow_downgrades: bool = False
):
    """Update the package lists and install ``packages``, waiting for apt's lock a bounded time.

    + packages: names, or ``name=version`` pins
    + lock_seconds: how long another apt or dpkg may hold the lock before this fails, naming it
    + allow_downgrades: for pins older than what is installed
    """
    commands = apt_commands(packages, lock_seconds=lock_seconds, allow_downgrades=allow_downgrades)
    yield function_command(_apt_install, (tuple(commands), lock_seconds), {})


# --- long work, shown while it runs -------------------------------------------------------
#
# pyinfra prints a command's output only at -vvv, and only once it ended. The long steps
# (model downloads, image builds) are run with pyinfra's own live output switched on for that
# one command: each line the host prints appears as it comes, prefixed with the host's name,
# at every verbosity. What is printed is what the command itself says: fetch-model's progress
# lines (file, bytes, percent, rate, ETA every 5 s), the build's step lines. Neither holds a
# secret: the token travels on curl's stdin, and a build has none.


PROGRESS_SECONDS = 10  # how often the long steps gpufleet drives itself say where they are


def say(host, text: str) -> None:
    """One progress line, as pyinfra prints a command's live output: on stderr, with the host's
    name, at every verbosity."""
    click.echo(f"{host.print_prefix}{text}", err=True)


def human(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1024:.1f} KiB"


def _run_live(state, host, command: str) -> tuple[bool, list[str], list[str]]:
    """``command`` with its output printed as it comes; its stdout and stderr lines."""
    ok, output = host.run_shell_command(
        StringCommand(command), print_output=True, _sudo=_sudo(state, host)
    )
    return ok, output.stdout_lines, output.stderr_lines


KEEPALIVE_SECONDS = 15
# How often an idle SSH transport wakes to look at its own state (paramiko's default: 0.1 s).
# Under gevent, as pyinfra runs, closing a transport wakes its reader at once (gevent cancels
# a closed socket's waits), so the wake-up only paces paramiko's own keepalive, handshake and
# rekey checks, each counted in seconds. At 0.1 s every connected host woke 10 times a second
# for the whole run: 73,000 wake-ups in one drift of 1,024 SIMULATED hosts.
TRANSPORT_POLL_SECONDS = 1.0


def _transport(host):
    """The paramiko transport of the host's SSH connection, or None when it has none."""
    client = getattr(host.connector, "client", None)
    return client.get_transport() if client is not None else None


def keep_alive(host, seconds: int = KEEPALIVE_SECONDS, *, answer_within: int = 30) -> None:
    """Watch the host's SSH connection: every ``seconds`` (or the user's
    ``ServerAliveInterval``) ask the host for a reply; no reply within ``answer_within``
    seconds closes the connection, so every command waiting on it ends.

    TCP alone cannot tell a frozen host (its kernel still acknowledges, nothing answers) from
    a busy one, nor notice a host that rebooted during a long, quiet command: the run would
    wait on that socket for good. The host then fails as unreachable, with the reason kept
    for the run's report; the other hosts go on.
    """
    transport = _transport(host)
    if transport is None or getattr(transport, "_gpufleet_watch", None) is not None:
        return
    transport.sock.settimeout(TRANSPORT_POLL_SECONDS)  # connected before gpufleet's hooks ran
    # the Host itself: pyinfra's ``host`` is a context proxy, which in the watch's own greenlet
    # means another host, or none
    if isinstance(host, ContextObject):
        host = host._get_module()
    configured = getattr(transport.packetizer, "_Packetizer__keepalive_interval", 0)
    transport._gpufleet_watch = gevent.spawn(
        _watch, host, transport, configured or seconds, answer_within
    )


def _watch(host, transport, every: float, within: float) -> None:
    while transport.is_active():
        gevent.sleep(every)
        if not transport.is_active():
            return
        asked = gevent.spawn(transport.global_request, "keepalive@openssh.com", None, True)
        asked.join(timeout=within)
        if asked.ready():
            continue
        asked.kill(block=False)
        transport.close()  # first: every command waiting on this host ends now
        why = f"no answer to an SSH keepalive within {within:g}s"
        run_state(host.state, "lost").setdefault(host.name, why)
        host.log_styled(
            f"stopped answering ({why}): its connection is closed", fg="red", log_func=logger.error
        )
        return


def engine_start_command(seconds: int = 60) -> str:
    """Start the Docker engine and wait, at most ``seconds``, until it answers."""
    return (
        "systemctl start docker && for i in $(seq "
        f"{int(seconds)}); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done; exit 1"
    )


def start_engine_now(state, host, seconds: int = 60) -> str | None:
    """Start a stopped Docker engine while the host is planned (not as an operation): its
    images can be read only once it runs. None when it answers, else why, in one line."""
    ok, output = host.run_shell_command(
        StringCommand(engine_start_command(seconds)), _sudo=_sudo(state, host)
    )
    if ok:
        return None
    said = [line for line in output.stderr_lines if line.strip()]
    return (
        f"the Docker engine was stopped and did not answer within {seconds}s of "
        f"`systemctl start docker`{f': {said[-1]}' if said else ''}"
    )


def connection_lost(host, wait: float = 2.0) -> bool:
    """Whether the host's SSH connection is gone (a command then fails with no exit status)."""
    transport = _transport(host)
    if transport is None:
        return False
    deadline = time.monotonic() + wait  # the transport notices the closed socket a moment later
    while transport.is_active() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not transport.is_active()


def _fetch(state, host, args: tuple[str, ...], label: str) -> None:
    ok, _, errors = _run_live(state, host, " ".join(shlex.quote(a) for a in args))
    if ok:
        return
    # fetch-model's last word is on stderr (its progress is on stdout)
    said = [line for line in errors if line.startswith("fetch: ")]
    if said:  # it names the file itself, mostly
        why = said[-1].removeprefix("fetch: ")
        raise OperationError(why if why.startswith(f"{label}: ") else f"{label}: {why}")
    if connection_lost(host):  # it said nothing: it was cut off, not failed
        raise OperationError(
            f"{label}: the SSH connection was lost during the download; the "
            "bytes so far stay on the host, and the next run resumes"
        )
    raise OperationError(f"{label}: fetch-model failed")


def fetch_args(
    script: str,
    url: str,
    file: CachedFile,
    env_file: str,
    *,
    attempts: int = 4,
    stall_seconds: int = 120,
    distrust: bool = False,
) -> tuple[str, ...]:
    """fetch-model's command line: its settings as environment, the blob as arguments.

    + file: the blob, its stamp, the lock ``huggingface_hub`` takes for it, its snapshot link
    + distrust: the blob was hashed in this run and does not match: fetch-model neither
      trusts its stamp nor hashes it again
    """
    settings = [
        f"FETCH_ATTEMPTS={attempts}",
        f"FETCH_STALL_SECONDS={stall_seconds}",
        f"FETCH_STAMP={file.stamp}",
        f"FETCH_LOCK={file.lock}",
        f"FETCH_LINK={file.link}",
    ]
    if distrust:
        settings.append("FETCH_DISTRUST=1")
    return ("env", *settings, script, url, file.blob, file.etag, str(file.size), env_file)


@operation(is_idempotent=False, idempotent_notice=APPLIED)
def fetch_model(
    script: str,
    url: str,
    file: CachedFile,
    env_file: str,
    *,
    attempts: int = 4,
    stall_seconds: int = 120,
    distrust: bool = False,
):
    """Download one blob into the Hub cache with ``script`` (fetch-model), its progress shown
    as it goes, and link it into its snapshot.

    + script: fetch-model on the host
    + url/file: where the bytes are, and the blob they must be (``hubcache.CachedFile``)
    + env_file: the stack's ``.env``, where fetch-model reads the token (never an argument)
    + attempts/stall_seconds: tries before it gives up, and how long a stall may last
    + distrust: the blob there was hashed in this run and differs (``ModelFetch.known_bad``)

    A failure ends in fetch-model's own last line (``no space left ...``, ``HTTP 429 from
    <url> ...``, ``sha256 ...``).
    """
    args = fetch_args(
        script,
        url,
        file,
        env_file,
        attempts=attempts,
        stall_seconds=stall_seconds,
        distrust=distrust,
    )
    yield function_command(_fetch, (args, file.path.rsplit("/", 1)[-1]), {})


# --- what an image's binary runs on ----------------------------------------------------


def labels_command(ref: str) -> str:
    """Prints the image's labels as one line of JSON (``null`` when it has none)."""
    return f"docker image inspect --format '{{{{json .Config.Labels}}}}' {shlex.quote(ref)}"


def _last_labels(ref: str, output: str) -> dict[str, str]:
    lines = output.strip().splitlines()
    try:
        labels = json.loads(lines[-1]) if lines else None
    except ValueError:
        raise OperationError(f"cannot read the labels of {ref}: {lines[-1][-200:]}") from None
    return labels if isinstance(labels, dict) else {}


def _refuse(checks: Sequence[ImageCheck], labels: dict[str, str]) -> None:
    """Fail the host, in one line, when the image cannot run on one of its GPUs: this runs
    before the compose step, so no service starts from it."""
    for check in checks:
        if why := check.refusal(labels):
            raise OperationError(why)


def _transfer_image(state, host, ref: str, checks: tuple[ImageCheck, ...] = ()) -> None:
    loaded = _load_image(
        state, host, known.CONTROL_MACHINE, ref, ref, "transferred", with_labels=bool(checks)
    )
    if checks:
        _refuse(checks, _last_labels(ref, loaded))


def _pull_image(state, host, ref: str, checks: tuple[ImageCheck, ...]) -> None:
    command = f"docker pull -q {shlex.quote(ref)} >/dev/null && {labels_command(ref)}"
    ok, output = host.run_shell_command(StringCommand(command), _sudo=_sudo(state, host))
    if not ok:
        tail = "\n".join((output.stdout_lines + output.stderr_lines)[-10:])
        raise OperationError(f"docker pull {ref} failed:\n{tail}")
    _refuse(checks, _last_labels(ref, "\n".join(output.stdout_lines)))


@operation(is_idempotent=False, idempotent_notice=APPLIED)
def image(ref: str, *, source: str, checks: Sequence[ImageCheck] = ()):
    """Make a container image present on the host.

    + ref: image reference, e.g. ``nvidia/cuda:12.8.1-base-ubuntu24.04``
    + source: ``pull`` from its registry, or ``transfer`` from the control machine's Docker
      (its ``docker save``, gzipped once and kept, streamed into ``docker load`` over SSH) for
      air-gapped hosts
    + checks: the services' ``ImageCheck``: once the image is here, its labels are read in the
      same command and a binary that cannot run on the host's GPUs fails the host
    """
    checks = tuple(checks)
    if source == "pull" and checks:
        yield function_command(_pull_image, (ref, checks), {})
    elif source == "pull":
        yield StringCommand("docker", "pull", "-q", ref)
    elif source == "transfer":
        yield function_command(_transfer_image, (ref, checks), {})
    else:
        raise OperationError(f"image {ref}: unknown source {source!r}")


def _count(state, key: str, host_name: str, amount: int = 1) -> None:
    """Tally what a run did, per host, for the summary it prints at the end."""
    tallies = run_state(state, "tallies")
    tallies.setdefault(key, {})
    tallies[key][host_name] = tallies[key].get(host_name, 0) + amount


def summary_lines(tallies: dict[str, dict[str, int]]) -> list[str]:
    """What the run built and sent, for the line it ends with."""
    lines = []
    if builds := tallies.get("builds"):
        lines.append(f"{sum(builds.values())} image build(s): {', '.join(sorted(builds))}")
    for key, what in (
        ("received", "images sent instead of built"),
        ("transferred", "images sent from the control machine"),
    ):
        if sent := tallies.get(key):
            per_host = ", ".join(f"{h} {n / 2**20:.1f} MiB" for h, n in sorted(sent.items()))
            lines.append(f"{what}: {per_host}")
    return lines


def failure_lines(failed_at: dict[str, str], reasons: dict[str, Failure]) -> list[str]:
    """One line per failed host: the step it failed at, and gpufleet's reason where it gave
    one (a shell command's own output is printed above, where it failed)."""
    lines = []
    for name in sorted(set(failed_at) | set(reasons)):
        why = reasons[name].why if name in reasons else "its output is above"
        at = failed_at.get(name) or (reasons[name].step if name in reasons else "") or "?"
        lines.append(f"{name} failed at '{at}': {why}")
    return lines


def _build_done(state, inputs: str) -> gevent.event.AsyncResult:
    """Where the host building ``inputs`` posts its result for hosts waiting to receive it."""
    return run_state(state, "builds_done").setdefault(inputs, gevent.event.AsyncResult())


def build_command(context: str, ref: str, inputs: str, *, cuda: bool = False) -> str:
    """The image build, as one remote command.

    The classic builder: present on every engine from 20.10 on, with or without the buildx
    plugin (Debian's docker.io has none). A CPU build is labelled ``gpufleet.inputs`` as it is
    built. A CUDA build is not yet: the command ends by printing the cuobjdump listing its build
    stage left in ``OBJECTS_FILE``, and ``label_command`` then labels the image with what that
    listing holds and with its inputs, so an image whose labelling was cut short carries no
    inputs label and the next plan builds it again (from Docker's cache).
    """
    q = shlex.quote
    build = f"DOCKER_BUILDKIT=0 docker build -t {q(ref)}"
    if not cuda:
        build = f"{build} --label gpufleet.inputs={q(inputs)} ."
        return (
            f"cd {q(context)} && {with_progress(build, f'{context}.build.log')} && "
            "rm -rf src source.tar.gz"
        )
    # NVIDIA_VISIBLE_DEVICES=void: no GPU is mounted to read a file, whatever the default runtime
    return (
        f"cd {q(context)} && {with_progress(f'{build} .', f'{context}.build.log')} && "
        f"docker run --rm --network none -e NVIDIA_VISIBLE_DEVICES=void "
        f"--entrypoint cat {q(ref)} {OBJECTS_FILE}"
    )


PROGRESS = "build: "


def with_progress(command: str, log: str, every: int = 10) -> str:
    """``command`` with its output kept in ``log`` (outside the build context, removed after),
    and every ``every`` seconds one line on stdout: ``build: 40s, Step 7/15 : RUN cmake ...
    [ 45%]`` (the Dockerfile step, and the compile's own progress once it prints one).
    A command that fails prints the log's last 20 lines and exits with its status; one that
    ends within ``every`` seconds prints nothing."""
    log = shlex.quote(log)
    return (
        f"{{ rm -f {log} {log}.rc; ( ( {command} ) > {log} 2>&1; echo $? > {log}.rc ) & "
        f"i=0; while sleep 1; [ ! -s {log}.rc ]; do i=$((i + 1)); "
        f"if [ $((i % {every})) -eq 0 ]; then printf '{PROGRESS}%ss, %s%s\\n' \"$i\" "
        f"\"$(grep '^Step ' {log} | tail -n 1 | cut -c1-80)\" "
        f"\"$(grep -o '^\\[ *[0-9]*%\\]' {log} | tail -n 1 | sed 's/^/ /')\"; fi; done; "
        f'rc=$(cat {log}.rc); if [ "$rc" -ne 0 ]; then tail -n 20 {log}; fi; '
        f'rm -f {log} {log}.rc; [ "$rc" -eq 0 ]; }}'
    )


def label_command(context: str, ref: str, labels: dict[str, str]) -> str:
    """Relabel ``ref`` in place: a build of ``FROM ref`` read from stdin (no context, no layer,
    the same tag) with ``labels`` added to the ones the image has."""
    flags = " ".join(f"--label {shlex.quote(f'{key}={value}')}" for key, value in labels.items())
    return (
        f"printf 'FROM %s\\n' {shlex.quote(ref)} | DOCKER_BUILDKIT=0 docker build -q "
        f"-t {shlex.quote(ref)} {flags} - && cd {shlex.quote(context)} && rm -rf src source.tar.gz"
    )


def _docker_build(
    state,
    host,
    context: str,
    ref: str,
    inputs: str,
    cuda: bool = False,
    check: ImageCheck | None = None,
) -> None:
    done = _build_done(state, inputs)
    sudo = _sudo(state, host)

    def run(command: str, live: bool = False) -> list[str]:
        try:
            ok, output = host.run_shell_command(
                StringCommand(command), print_output=live, _sudo=sudo
            )
        except BaseException as exc:
            done.set_exception(OperationError(f"the build on {host.name} failed: {exc}"))
            raise
        if not ok:
            tail = "\n".join((output.stdout_lines + output.stderr_lines)[-20:])
            done.set_exception(OperationError(f"the build on {host.name} failed"))
            if connection_lost(host):  # whatever the build did without us, the next run sees
                raise OperationError(
                    f"docker build of {ref}: the SSH connection was lost during the build; "
                    "the next run builds what is missing"
                )
            raise OperationError(f"docker build of {ref} failed; its last lines:\n{tail}")
        return [line for line in output.stdout_lines if not line.startswith(PROGRESS)]

    # shown as it runs, at every verbosity (see "long work" above)
    listing = run(build_command(context, ref, inputs, cuda=cuda), live=True)
    labels: dict[str, str] = {}
    if cuda:
        try:
            labels = sm_label("\n".join(listing))
        except ValueError as exc:
            done.set_exception(OperationError(f"the build on {host.name} failed"))
            raise OperationError(f"{ref}: {OBJECTS_FILE}: {exc}") from None
        run(label_command(context, ref, {"gpufleet.inputs": inputs, **labels}))
    done.set(host.name)
    _count(state, "builds", host.name)
    if check is not None:  # the image is good for hosts with other GPUs: built, then refused
        _refuse((check,), labels)


def _saved_image(state, builder: str, ref: str):
    """``docker save`` of ``ref``, gzipped, from ``builder``: a host of this run, or this machine
    (``known.CONTROL_MACHINE``, whose gzipped save is made once and kept: ``control.saved_image``).
    Returns the byte stream and ``done(aborted)``, which ends the sender and returns why it
    failed (None when it did not)."""
    if builder == known.CONTROL_MACHINE:
        try:
            saved = open(control.saved_image(ref), "rb")  # noqa: SIM115 (closed by done)
        except control.SaveError as exc:
            raise OperationError(f"docker save {ref} failed on {builder}: {exc}") from None

        def closed(aborted: bool) -> str | None:
            saved.close()
            return None

        return saved, closed
    source = state.inventory.get_host(builder)
    client = getattr(source.connector, "client", None)
    if client is None:
        raise OperationError(f"{builder} has no SSH connection to send {ref} from")
    save = "docker save " + shlex.quote(ref) + " | gzip -1"
    if _sudo(state, source):
        save = "sudo -H -n sh -c " + shlex.quote(save)
    _, out, err = client.exec_command(save)

    def finished(aborted: bool) -> str | None:
        if out.channel.recv_exit_status() != 0:
            return err.read().decode(errors="replace").strip()[-300:]
        return None

    return out, finished


def _load_image(
    state, host, builder: str, builder_ref: str, ref: str, tally: str, *, with_labels: bool
) -> str:
    """Stream the builder's gzipped ``docker save`` into ``docker load`` here, tag it as this
    host's ``ref``, and print its labels when asked. The bytes sent are tallied under
    ``tally`` for the run's summary, and every ``PROGRESS_SECONDS`` one line says how far it is.
    Returns the remote command's output."""
    out, done = _saved_image(state, builder, builder_ref)
    sent, started = 0, time.monotonic()

    def feed(stdin):
        nonlocal sent
        tick = started + PROGRESS_SECONDS
        while chunk := out.read(1 << 20):
            sent += len(chunk)
            stdin.write(chunk)
            if (now := time.monotonic()) >= tick:
                tick = now + PROGRESS_SECONDS
                say(
                    host,
                    f"transfer: {builder_ref} from {builder}: {human(sent)} received "
                    f"(gzip), {human(sent / (now - started))}/s",
                )

    load = "gunzip | docker load -q >/dev/null"
    if builder_ref != ref:
        load += f" && docker tag {shlex.quote(builder_ref)} {shlex.quote(ref)}"
        load += f" && docker rmi {shlex.quote(builder_ref)} >/dev/null"
    if with_labels:
        load += f" && {labels_command(ref)}"
    aborted = True
    try:
        loaded = exec_with_stdin(state, host, load, feed)
        aborted = False
    finally:
        if why := done(aborted):
            raise OperationError(f"docker save {builder_ref} failed on {builder}: {why}")
    _count(state, tally, host.name, sent)
    return loaded


def _receive_image(
    state,
    host,
    ref: str,
    inputs: str,
    builder: str,
    builder_ref: str,
    wait: bool,
    check: ImageCheck | None = None,
) -> None:
    """The image a builder of the same inputs has (a host of this run, or the control
    machine), loaded here as ``ref`` instead of built (and its labels read for ``check``)."""
    if wait:  # the builder builds in this same operation, on its own greenlet
        _build_done(state, inputs).get(timeout=BUILD_WAIT_SECONDS)
    loaded = _load_image(
        state, host, builder, builder_ref, ref, "received", with_labels=check is not None
    )
    if check is not None:
        _refuse((check,), _last_labels(ref, loaded))


@operation(is_idempotent=False, idempotent_notice=APPLIED)
def build_image(
    context: str,
    ref: str,
    *,
    inputs: str,
    receive_from: str | None = None,
    builder_ref: str | None = None,
    wait: bool = False,
    cuda: bool = False,
    check: ImageCheck | None = None,
):
    """Build the image in ``context`` as ``ref``, or receive it from the host that builds it.

    + context: the build context on the host (its Dockerfile and ``src/``)
    + ref: the tag this host runs
    + inputs: the build's identity (``gpufleet.core.render.build_inputs``), kept as the image label
      ``gpufleet.inputs`` so the next plan can tell whether the image is current
    + receive_from/builder_ref: a host of this run with the same inputs, and its tag: the image
      is streamed from it instead of built here
    + wait: that host builds the image in this run; hosts building and receiving run this one
      operation together, so the receivers wait for the build to finish
    + cuda: a CUDA build: the image is labelled with the device code its binary holds
      (``gpufleet.cuda.sm``/``.ptx``, from the cuobjdump listing of its build stage)
    + check: the service's ``ImageCheck``: an image that cannot run on this host's GPUs fails
      the host here, before the compose step starts anything from it

    Builds and bytes received are tallied for the run's summary.
    """
    if receive_from is None:
        yield function_command(_docker_build, (context, ref, inputs, cuda, check), {})
    else:
        args = (ref, inputs, receive_from, builder_ref or ref, wait, check)
        yield function_command(_receive_image, args, {})


@operation(is_idempotent=False, idempotent_notice=APPLIED)
def nvidia_runtime(*, set_default: bool = False, cdi: bool = False):
    """Wire the NVIDIA runtime into Docker with ``nvidia-ctk``.

    + set_default: make ``nvidia`` the default runtime (Jetson)
    + cdi: enable CDI in Docker

    ``nvidia-ctk`` merges into the existing file, so every key gpufleet does not own stays.
    """
    args = ["nvidia-ctk", "runtime", "configure", "--runtime=docker"]
    if set_default:
        args.append("--set-as-default")
    if cdi:
        args.append("--cdi.enabled")
    yield StringCommand(*args)


# --- the health gate --------------------------------------------------------------------


def compose_in(stack: str, project: str) -> str:
    """``docker compose`` for ``project``, run in the stack directory (where its .env is)."""
    return f"cd {shlex.quote(stack)} && docker compose -p {shlex.quote(project)}"


def compose_up_command(stack: str, project: str, recreate: Sequence[str] = ()) -> str:
    """Check the compose file, then bring the project up; ``recreate`` names services to
    recreate even though their config did not change."""
    names = "".join(f" {shlex.quote(name)}" for name in recreate)
    force = f" --force-recreate{names}" if recreate else ""
    return (
        f"{compose_in(stack, project)} config -q && docker compose -p {shlex.quote(project)} "
        f"up -d --remove-orphans --no-build{force}"
    )


def gate_logs_command(stack: str, project: str, service: str) -> str:
    """The service's last 20 log lines."""
    return f"{compose_in(stack, project)} logs --no-color --tail 20 {shlex.quote(service)}"


def gate_probe_command(stack: str, project: str, service: str, url: str) -> str:
    """One line: the health endpoint's HTTP status, then the service's container state,
    restart count and exit code."""
    return (
        f"c=$({probes.health_status_curl(url)}); "
        f"i=$({compose_in(stack, project)} ps -aq {shlex.quote(service)} | head -n 1); "
        "s=$(docker inspect --format '{{.State.Status}} {{.RestartCount}} {{.State.ExitCode}}' "
        '"$i" 2>/dev/null); echo "$c $s"'
    )


def gate_chat_command(stack: str, url: str, body: str, key_var: str | None) -> str:
    """A one-token chat completion; with ``key_var``, its API key read from the stack's .env
    and handed to curl on stdin (never on a command line)."""
    chat = probes.chat_curl(url, body, with_key=bool(key_var))
    if not key_var:
        return chat
    if not probes.KEY_VAR.fullmatch(key_var):
        raise OperationError(f"{key_var!r} is not a variable name")
    return f"{probes.read_key(f'{stack}/.env', key_var)}; {chat}"


@dataclass(frozen=True, kw_only=True)
class GateSpec:
    """What a health gate waits for, and how it reaches the service.

    + stack/compose_project/service: the compose service, in its stack directory
    + kind/port: its kind (which names its health path) and published port
    + timeout: seconds to wait for health (llama-server answers 503 while loading)
    + secrets: values masked in the log tail a failure shows
    + address: where the host reaches the service; key_var: its API key's variable in ``.env``
    + chat: ask for one token (naming ``model``); pulls: Ollama models to pull first
    """

    stack: str
    compose_project: str
    service: str
    kind: str
    port: int
    timeout: int
    secrets: tuple[Secret, ...] = ()
    address: str = "127.0.0.1"
    key_var: str | None = None
    chat: bool = True
    model: str | None = None
    pulls: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def health_url(self) -> str:
        return f"{self.url}{HEALTH_PATHS[self.kind]}"


@dataclass(frozen=True)
class _Look:
    """One look at a service: its health endpoint's HTTP status and its container's state."""

    code: str
    status: str
    restarts: str
    exit_code: str

    @classmethod
    def parse(cls, line: str) -> _Look:
        code, _, rest = line.strip().partition(" ")
        return cls(code, *(rest.split() + ["", "", ""])[:3])

    def restarted_since(self, first: _Look) -> bool:
        counts = (self.restarts, first.restarts)
        return all(n.isdigit() for n in counts) and int(self.restarts) > int(first.restarts)


class _GateRun:
    """The commands of one gate on one host; ``fail`` raises with the service's last logs."""

    def __init__(self, state, host, spec: GateSpec) -> None:
        self.host, self.spec, self.sudo = host, spec, _sudo(state, host)

    def run(self, command: str) -> tuple[bool, str]:
        ok, output = self.host.run_shell_command(StringCommand(command), _sudo=self.sudo)
        return ok, "\n".join(output.stdout_lines + output.stderr_lines)

    def fail(self, why: str) -> None:
        spec = self.spec
        _, logs = self.run(gate_logs_command(spec.stack, spec.compose_project, spec.service))
        shown = mask(logs, spec.secrets)
        raise OperationError(f"{spec.service} {why}; its last log lines:\n{shown}")


def _wait_healthy(gate: _GateRun) -> None:
    """Until the health endpoint answers 200; fails at once when the server exits or restarts.

    One command a second: the health endpoint, and the container's state and restarts, so a
    server that exits (a bad flag, a file that is no model) fails the gate at once with its
    log, instead of after the whole deadline.
    """
    spec = gate.spec
    probe = gate_probe_command(spec.stack, spec.compose_project, spec.service, spec.health_url)
    started = time.monotonic()
    deadline, first = started + spec.timeout, None
    tick = started + PROGRESS_SECONDS
    while True:
        look = _Look.parse(gate.run(probe)[1])
        if look.code == "200":
            return
        if (now := time.monotonic()) >= tick:  # quiet for a server that answers at once
            tick = now + PROGRESS_SECONDS
            answer = f"HTTP {look.code}" if look.code not in ("", "000") else "no answer yet"
            waited = f"{now - started:.0f}s of {spec.timeout}s"
            say(
                gate.host,
                f"gate: {spec.service}: waiting for {spec.health_url} ({answer}), {waited}",
            )
        first = first or look
        if look.status in ("exited", "dead") or look.restarted_since(first):
            gate.fail(
                f"exited (status {look.status}, exit code {look.exit_code or '?'}, restarted "
                f"{look.restarts or '?'} times) before it was healthy"
            )
        if time.monotonic() > deadline:
            last = look.code or "none"
            gate.fail(f"is not healthy after {spec.timeout}s (last HTTP status {last})")
        time.sleep(1)


def _pull_models(gate: _GateRun) -> None:
    """The Ollama models the service lacks (``ollama pull`` prints progress bars: only its last
    lines matter)."""
    spec = gate.spec
    compose = compose_in(spec.stack, spec.compose_project)
    ollama = f"{compose} exec -T {shlex.quote(spec.service)} ollama"
    for name in spec.pulls:
        _, output = gate.run(f"{ollama} pull {shlex.quote(name)} 2>&1 | tail -n 3")
        _, listed = gate.run(f"{ollama} list")
        shown = name if ":" in name else f"{name}:latest"
        if shown not in listed.split():
            gate.fail(f"could not pull {name}: {output.strip()[-300:]}")


def _chat(gate: _GateRun) -> None:
    spec = gate.spec
    body = known.chat_body(spec.model)
    ok, answer = gate.run(gate_chat_command(spec.stack, spec.url, body, spec.key_var))
    if not ok or '"choices"' not in answer:
        gate.fail(f"is healthy but a one-token chat completion failed: {answer[-300:]}")


def _gate(state, host, spec: GateSpec) -> None:
    """Wait for the health endpoint (503 while loading), pull what Ollama lacks, then ask for
    one token."""
    gate = _GateRun(state, host, spec)
    _wait_healthy(gate)
    _pull_models(gate)
    if spec.chat:
        _chat(gate)


@operation(is_idempotent=False, idempotent_notice="Runs only after a service is (re)created")
def health_gate(spec: GateSpec):
    """Gate a service on its health endpoint and a one-token chat completion.

    + spec: the service, where it answers, how long to wait (``GateSpec``)

    .. code:: python

        ops.health_gate(
            name="Health gate: llama", spec=GateSpec(stack="/opt/gpufleet",
            compose_project="gpufleet-spark", service="llama", kind="llama-server",
            port=8000, timeout=600),
        )
    """
    yield function_command(_gate, (spec,))
