"""``python -m gpufleet.fleet.pyinfra_main ARGS``: pyinfra's own command line, plus a report.

The fleet commands start pyinfra through this module rather than the ``pyinfra`` script, with
``GPUFLEET_REPORT=<file>``. It is pyinfra's CLI unchanged (inventory, ``--limit``, ``--data``,
SSH settings, group data) with its pools sized from the inventory when no ``--parallel`` is
given (``default_parallel``), one callback handler on the run's state, and one writer that
runs when the process ends, however it ends:

- a host whose connection failed is reported ``unreachable`` with pyinfra's own reason (the
  connection error, not a line of its console output);
- a host that fails an operation is reported ``failed`` at that operation, with gpufleet's
  reason where an operation of gpufleet's gave one;
- each host the deploy planned carries its plan and snapshot (``deploys/_report.py``).

The report is a ``gpufleet.core.wire.RunReport``; the command reads its fields and nothing else.
"""

from __future__ import annotations

if __name__ == "__main__":
    # As pyinfra's own CLI does, before anything imports threading, sockets or paramiko: its
    # transports must be greenlets, or a wait on one never wakes when it closes.
    from gevent import monkey

    monkey.patch_all()

import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from pyinfra.api import state as state_module  # noqa: E402
from pyinfra.api.state import BaseStateCallback  # noqa: E402

from gpufleet.core.wire import REPORT_ENV, Failure, HostReport, RunReport  # noqa: E402

# What a run keeps on pyinfra's state for the report, under ``_gpufleet_<name>``: the deploy
# and gpufleet's operations fill these in (``gpufleet.ops.operations.run_state``).
REPORTS = "reports"  # host -> HostReport, from the deploy's plan
FAILURES = "failures"  # host -> Failure, from an operation of gpufleet's
FAILED_AT = "failed_at"  # host -> the name of the operation it failed at
UNREACHABLE = "unreachable"  # host -> why it could not be reached
LOST = "lost"  # host -> why its connection was closed mid-run (``operations.keep_alive``)
FIELDS = "host_fields"  # host -> more HostReport fields (a lease another run holds, ...)


def _kept(state, name: str) -> dict:
    attr = f"_gpufleet_{name}"
    if getattr(state, attr, None) is None:
        setattr(state, attr, {})
    return getattr(state, attr)


# Host keys are checked against known_hosts: a host never seen is refused, not trusted on its
# first answer (pyinfra's own default is "accept-new"). Host or group data says otherwise.
STRICT_HOST_KEYS = "yes"
UNKNOWN_HOST_KEY = (
    "its host key is not in known_hosts: `gpufleet bootstrap` records it (or add it with "
    "ssh-keyscan once its fingerprint is checked); ssh_strict_host_key_checking='accept-new' "
    "in its data trusts new hosts on first use"
)


def strict_host_keys() -> None:
    """Make strict host-key checking the default of every SSH connection of this run."""
    from pyinfra.connectors import ssh

    ssh.connector_data_meta["ssh_strict_host_key_checking"].default = STRICT_HOST_KEYS


def connect_reason(error: BaseException) -> str:
    """Why a host could not be reached, in one line, with what to do for an unknown key."""
    why = (str(error.args[0]) if getattr(error, "args", None) else str(error)).strip()
    if "No host key for" in why:
        return f"{why}; {UNKNOWN_HOST_KEY}"
    return why or type(error).__name__


class Recorder(BaseStateCallback):
    """Notes, per host, a failed connection and the first operation that failed."""

    @staticmethod
    def host_connect_error(state, host, error):
        _kept(state, UNREACHABLE).setdefault(host.name, connect_reason(error))

    @staticmethod
    def operation_host_error(state, host, op_hash, retry_attempt=0, max_retries=0):
        names = sorted(state.get_op_meta(op_hash).names)
        _kept(state, FAILED_AT).setdefault(host.name, names[0] if names else op_hash[:12])


def build_report(state) -> RunReport:
    """The run's report from what its state holds now."""
    reports: dict[str, HostReport] = dict(_kept(state, REPORTS))
    failures: dict[str, Failure] = _kept(state, FAILURES)
    failed_at: dict[str, str] = _kept(state, FAILED_AT)
    unreachable: dict[str, str] = _kept(state, UNREACHABLE)
    lost: dict[str, str] = _kept(state, LOST)
    inventory = getattr(state, "inventory", None)
    order = [h.name for h in inventory] if inventory is not None else []
    targeted = [h for h in inventory if state.is_host_in_limit(h)] if inventory else []
    failed_hosts = {h.name for h in getattr(state, "failed_hosts", ())}
    fields: dict[str, dict] = _kept(state, FIELDS)
    for host in targeted:
        name = host.name
        failure = failures.get(name)
        if failure is not None and not failure.step:
            failure = failure.model_copy(update={"step": failed_at.get(name, "?")})
        elif failure is None and name in failed_at:
            failure = Failure(step=failed_at[name], why="its output is above")
        if name in unreachable and name not in reports:
            reports[name] = HostReport(host=name, unreachable=unreachable[name])
            continue
        report = reports.get(name) or HostReport(host=name)
        update = dict(fields.get(name, {}))
        if failure is not None:
            update["failed"] = failure
        elif not report.planned and name in failed_hosts and not update:
            update["failed"] = Failure(step="read", why="the host could not be read")
        if name in lost or (not report.planned and _connection_lost(host) and "failed" in update):
            # connected, then stopped answering: before its plan, or while it was applied
            why = lost.get(name) or update["failed"].why
            update["unreachable"] = f"stopped answering: {why}"
        reports[name] = report.model_copy(update=update)
    fatal = getattr(state, "_gpufleet_fatal", None)
    return RunReport(hosts=reports, order=tuple(order), fatal=fatal)


def _connection_lost(host) -> bool:
    client = getattr(host.connector, "client", None)
    transport = client.get_transport() if client is not None else None
    return transport is not None and not transport.is_active()


def write_report(state, path: str) -> None:
    """Write the report whole: a temporary file beside it, then a rename."""
    report = build_report(state)
    directory = os.path.dirname(os.path.abspath(path))
    # ASCII JSON: a byte a host printed that is not UTF-8 travels as an escaped surrogate
    text = json.dumps(report.model_dump(mode="json", exclude_defaults=True))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


# Hosts worked on at once when the user gives no ``--parallel``. pyinfra's own default is 20
# per core (40 here), sized for CPU; a host's turn is mostly waiting on the network and on the
# host (4 round trips to log in, the snapshot's command), so more at once shortens the run.
# On a SIMULATED fleet of 1,024 hosts (tests/sim, 2 cores, medians of A B A B A B), 256
# against 40: a drift 21.5 s against 31.0 s at 50 ms of round trip, 16.4 s against 19.7 s at
# 0 ms, 10 MiB more at peak.
PARALLEL_CAP = 256


def default_parallel(hosts: int, *, fd_room: int) -> int:
    """Hosts to work on at once: every host up to ``PARALLEL_CAP``, and no more than the
    open-files limit leaves room for (``fd_room``: pyinfra's own reckoning, 3 per host)."""
    return max(1, min(hosts, PARALLEL_CAP, fd_room))


def _choose_parallel() -> None:
    """Size pyinfra's pools from the inventory when ``--parallel`` was not given (a user's
    ``--parallel N``, passed through after ``--``, is kept as it is)."""
    original = state_module.State.init

    def init(self, inventory, config=None, *args, **kwargs):
        if config is not None and not config.PARALLEL and inventory is not None:
            room = state_module.MAX_PARALLEL
            config.PARALLEL = default_parallel(len(inventory), fd_room=room)
        original(self, inventory, config, *args, **kwargs)

    state_module.State.init = init


def cache_argument_types() -> None:
    """Read pyinfra's global argument types once per process, not once per call.

    pyinfra 3.10 evaluates ``get_type_hints(AllArguments)`` every time it sorts an operation's,
    a fact's or a deploy's keyword arguments: twice per host in a converge (the deploy and its
    snapshot), about 2 ms of control CPU per host in a profile of 256 SIMULATED hosts. The
    hints are fixed when pyinfra is imported, so the first answer is kept (a copy each call:
    callers may change the list).
    """
    from pyinfra.api import arguments, facts

    if getattr(arguments.all_global_arguments, "_gpufleet_cached", False):
        return
    types = arguments.all_global_arguments()

    def all_global_arguments() -> list[tuple[str, type]]:
        return list(types)

    all_global_arguments._gpufleet_cached = True  # type: ignore[attr-defined]
    arguments.all_global_arguments = all_global_arguments
    facts.all_global_arguments = all_global_arguments


def poll_transports_less() -> None:
    """Wake each idle SSH transport once a second instead of ten times.

    The cost grew with the fleet twice over (more transports, open for a longer run): a drift
    of 1,024 SIMULATED hosts, 12.7 s -> 10.4 s of control CPU (medians of 4 paired runs).
    Transports made before this ran (a plain ``pyinfra`` run loads the deploy after it
    connects) are slowed by ``operations.keep_alive``.
    """
    from paramiko.transport import Transport

    from gpufleet.ops.operations import TRANSPORT_POLL_SECONDS

    Transport._active_check_timeout = TRANSPORT_POLL_SECONDS


class _Appending(list):
    """The entries one lookup narrowed to; a key added through the lookup's answer joins the
    whole table too, as it does in paramiko's own lookup."""

    def __init__(self, entries: list, everything: list) -> None:
        super().__init__(entries)
        self._everything = everything

    def append(self, entry) -> None:
        super().append(entry)
        self._everything.append(entry)


def _host_keys_class():
    from paramiko.hostkeys import HostKeys

    class IndexedHostKeys(HostKeys):
        """paramiko's ``HostKeys``, each lookup narrowed by an index of the entries' names.

        paramiko scans every entry of known_hosts for each lookup: three per host a run
        connects to, and one per line while the file loads. With a line per host that is
        quadratic in the fleet's size (98,176 name comparisons for 256 SIMULATED hosts, 16
        times as many at 1,024). The index keeps the entries that name the host and those
        with hashed names (which cannot be indexed); paramiko's own scan then runs over
        only those, in the file's order, so it finds the same keys, and a key added through
        its answer joins the table as before. Entries added later are indexed when next
        looked up; any other change to the table rebuilds the index.
        """

        def __init__(self, filename=None) -> None:
            self._indexed: list = []  # the entries indexed so far, in order
            self._names: dict[str, list[int]] = {}  # name -> where its entries are
            self._hashed: list[int] = []  # where the entries with a hashed name are
            super().__init__(filename)

        def lookup(self, hostname):
            entries, indexed = self._entries, self._indexed
            if entries[: len(indexed)] != indexed:  # not only appended to: start again
                indexed.clear(), self._names.clear(), self._hashed.clear()
            for at in range(len(indexed), len(entries)):
                entry = entries[at]
                indexed.append(entry)
                for name in set(entry.hostnames):
                    self._names.setdefault(name, []).append(at)
                if any(name.startswith("|1|") for name in entry.hostnames):
                    self._hashed.append(at)
            where = sorted({*self._names.get(hostname, ()), *self._hashed})
            narrowed = HostKeys()
            narrowed._entries = _Appending([entries[at] for at in where], entries)
            return HostKeys.lookup(narrowed, hostname)

    return IndexedHostKeys


def index_host_keys() -> None:
    """Load known_hosts into ``IndexedHostKeys``: pyinfra's loader makes its table from the
    ``HostKeys`` its module names."""
    from pyinfra.connectors.sshuserclient import client

    if getattr(client.HostKeys, "_gpufleet_indexed", False):
        return
    client.HostKeys = _host_keys_class()
    client.HostKeys._gpufleet_indexed = True


def _install(path: str) -> list:
    """Hook the run's state as pyinfra makes it, and write the report at exit."""
    original = state_module.State.init
    seen: list = []

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback_handler(Recorder())
        seen.append(self)

    state_module.State.init = init

    def at_exit() -> None:
        if seen:
            write_report(seen[-1], path)

    atexit.register(at_exit)
    return seen


def fatal_message(exc) -> str:
    """The line a ClickException ends the run with; pyinfra's own kinds (an error raised in a
    deploy file) carry no ``message``, only their text."""
    try:
        return exc.format_message()
    except AttributeError:
        return str(exc).strip() or type(exc).__name__


def _no_host_left(state) -> bool:
    """Every targeted host failed: each one's report says why, nothing else ended the run."""
    return bool(getattr(state, "failed_hosts", None)) and not getattr(state, "active_hosts", 1)


def main(argv: list[str] | None = None) -> None:
    import click
    from pyinfra_cli import main as pyinfra

    strict_host_keys()
    path = os.environ.get(REPORT_ENV)
    states: list = []
    _choose_parallel()
    cache_argument_types()
    poll_transports_less()
    index_host_keys()
    if path:
        states = _install(path)
        command = pyinfra.cli

        def cli() -> None:
            # pyinfra's own handling, but the message that ends a run is kept for the report
            try:
                command.main(standalone_mode=False)
            except click.ClickException as exc:
                if states and not _no_host_left(states[-1]):
                    states[-1]._gpufleet_fatal = fatal_message(exc)
                exc.show()
                sys.exit(exc.exit_code)
            except click.exceptions.Abort:
                sys.exit(130)

        pyinfra.cli = cli
    sys.argv = ["pyinfra", *(sys.argv[1:] if argv is None else argv)]
    pyinfra.main()


if __name__ == "__main__":
    # the module by its own name, so the deploys' imports of it share this run's hooks
    from gpufleet.fleet.pyinfra_main import main as run

    run()
