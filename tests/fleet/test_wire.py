"""The typed seam between a gpufleet command and its pyinfra run: options down, reports up.

A verdict is made from a report's fields; these tests pin the fields a run writes (from its
state, the way ``gpufleet.fleet.pyinfra_main`` writes them at exit) and that they read back whole.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from gpufleet.core.snapshot import Lease, Snapshot
from gpufleet.core.wire import (
    ENV_NAMES,
    STEPS,
    ChangeRecord,
    Failure,
    HostReport,
    Op,
    RunOptions,
    RunReport,
)
from gpufleet.fleet.pyinfra_main import build_report
from gpufleet.fleet.runner import Run
from gpufleet.plan.host import plan_host
from gpufleet.plan.types import PlanOptions
from tests.support.plans import config_for, control_for, converged


def _planned(group="spark", host=None, **patch) -> HostReport:
    config = config_for(group, host)
    control = control_for(config)
    snap = Snapshot.model_validate(converged(config, control))
    plan = plan_host(config, snap, control, PlanOptions())
    from deploys._report import _service

    return HostReport(
        host=config.host, group=config.group, refusal=plan.refusal, snapshot=snap,
        release=plan.release, release_id=plan.release.id if plan.release else None,
        services={n: _service(n, s, config) for n, s in config.enabled_services.items()}, **patch,
    )  # fmt: skip


def test_a_report_reads_back_whole_snapshot_and_typed_changes_included():
    report = _planned()
    change = ChangeRecord(step="env", op=Op.WRITE, resource="/opt/gpufleet/.env",
                          reason="absent", action="write (0600, atomically)")  # fmt: skip
    changed = report.model_copy(update={"changes": (change,)})
    run = RunReport(hosts={report.host: changed}, order=(report.host,))
    back = RunReport.model_validate_json(run.model_dump_json(exclude_defaults=True))
    assert back == run
    assert back.hosts[report.host].changes[0].op is Op.WRITE
    assert back.hosts[report.host].snapshot.identity == report.snapshot.identity
    assert back.hosts[report.host].current == report.snapshot.state.current


class _Host:
    def __init__(self, name):
        self.name = name
        self.connector = None


def _state(names, *, reports=None, failures=None, failed_at=None, unreachable=None,
           fields=None, failed=(), fatal=None):  # fmt: skip
    hosts = [_Host(n) for n in names]
    state = SimpleNamespace(
        inventory=hosts, is_host_in_limit=lambda h: True,
        failed_hosts={h for h in hosts if h.name in failed},
        _gpufleet_reports=reports or {}, _gpufleet_failures=failures or {},
        _gpufleet_failed_at=failed_at or {}, _gpufleet_unreachable=unreachable or {},
        _gpufleet_host_fields=fields or {}, _gpufleet_fatal=fatal,
    )  # fmt: skip
    return state


def test_the_run_reports_each_host_as_reached_failed_or_unreachable():
    planned = _planned("spark", "a")
    state = _state(
        ["a", "b", "c", "d", "e"],
        reports={"a": planned},
        # gpufleet's own reason for a's failed gate; the step comes from pyinfra's callback
        failures={"a": Failure(step="", why="llama exited before it was healthy",
                               log=("llama-1 | error: invalid argument: --no-such-flag",))},
        failed_at={"a": "Inference services | Health gate: llama", "c": "Models | Fetch"},
        unreachable={"b": "Could not connect (host key changed)"},
        failed=("a", "b", "c", "d"),
    )  # fmt: skip
    report = build_report(state)
    assert report.order == ("a", "b", "c", "d", "e")
    a, b, c, d, e = (report.hosts[n] for n in "abcde")
    assert a.planned and a.failed == Failure(
        step="Inference services | Health gate: llama", why="llama exited before it was healthy",
        log=("llama-1 | error: invalid argument: --no-such-flag",))  # fmt: skip
    assert b.unreachable == "Could not connect (host key changed)" and not b.planned
    assert c.failed.step == "Models | Fetch" and c.failed.why == "its output is above"
    assert d.failed.step == "read" and not d.planned  # failed before its plan
    assert e.failed is None and e.unreachable is None  # ran, nothing to say
    run = Run(1, report)
    assert set(run.hosts) == {"a"} and run.unreachable == {"b": b.unreachable}
    assert set(run.failures) == {"a", "c", "d"} and run.fatal is None


def test_a_byte_a_host_printed_that_is_not_utf8_survives_the_report(tmp_path):
    from gpufleet.fleet.pyinfra_main import write_report
    from gpufleet.fleet.runner import read_report

    why = "holder op\udcff@ctl"  # surrogateescape'd from the host's bytes
    state = _state(["a"], failures={"a": Failure(step="read", why=why)}, failed=("a",))
    write_report(state, str(tmp_path / "report.json"))
    assert read_report(tmp_path / "report.json").hosts["a"].failed.why == why


def test_a_lease_held_elsewhere_reaches_the_report_as_a_field():
    lease = Lease(id="0123456789ab", holder="ann@ctl", control="ctl", pid=7, release="rollout",
                  started=1.0, expires=2.0)  # fmt: skip
    state = _state(["a", "b"], fields={"a": {"lease_held": lease},
                                       "b": {"lease_error": "not a lease"}})  # fmt: skip
    report = RunReport.model_validate_json(build_report(state).model_dump_json())
    assert report.hosts["a"].lease_held.holder == "ann@ctl"
    assert report.hosts["b"].lease_error == "not a lease"


def test_what_ended_a_run_is_fatal_and_a_run_without_a_report_says_pyinfra_failed():
    assert Run(1, build_report(_state(["a"], fatal="invalid host data"))).fatal == (
        "invalid host data")  # fmt: skip
    lost = Run(2, RunReport(), output="--> Loading inventory...\nSyntaxError: bad inventory\n")
    assert lost.fatal == (
        "pyinfra exited 2 before reading any host: --> Loading inventory... / "
        "SyntaxError: bad inventory"
    )
    assert Run(0, RunReport()).fatal is None


def test_run_options_cross_as_environment_and_back():
    options = RunOptions(deep=True, lease_id="0123456789ab", chat=True, restore={"*": "previous"},
                         audit=5, lease_action="take", lease={"id": "x"}, now=12.5,
                         audit_lines={"a": "{}"})  # fmt: skip
    env = options.to_env()
    assert set(env) <= ENV_NAMES and env["GPUFLEET_DEEP"] == "1"
    assert RunOptions.from_env(env) == options
    assert RunOptions().to_env() == {}  # defaults are not sent
    assert RunOptions.from_env({}) == RunOptions()


def test_a_bad_option_value_names_its_variable():
    with pytest.raises(ValueError, match="GPUFLEET_RESTORE"):
        RunOptions.from_env({"GPUFLEET_RESTORE": "{not json"})
    with pytest.raises(ValueError, match="audit"):
        RunOptions.from_env({"GPUFLEET_AUDIT_TAIL": "many"})


def test_every_op_a_plan_can_emit_is_json_and_back():
    for op in Op:
        assert Op(json.loads(json.dumps(op.value))) is op
    assert STEPS[0] == "engine" and STEPS[-1] == "release"


def test_host_keys_are_checked_strictly_unless_data_says_otherwise(monkeypatch):
    from pyinfra.connectors import ssh

    from gpufleet.fleet import pyinfra_main

    meta = ssh.connector_data_meta["ssh_strict_host_key_checking"]
    monkeypatch.setattr(meta, "default", "accept-new")  # pyinfra's own
    pyinfra_main.strict_host_keys()
    assert meta.default == "yes"
    # the shipped group data says so too, for a plain `pyinfra inventory deploys/fleet.py`
    from gpufleet import paths

    shipped = {}
    exec((paths.project_root() / "group_data" / "all.py").read_text(), shipped)
    assert shipped["ssh_strict_host_key_checking"] == "yes"


def test_an_unknown_host_key_is_one_line_saying_what_to_do():
    from gpufleet.fleet.pyinfra_main import connect_reason

    error = Exception(
        "SSH error (StrictPolicy: No host key for [10.0.0.5]:22 found in known_hosts)"
    )
    why = connect_reason(error)
    assert why.startswith("SSH error (StrictPolicy") and "`gpufleet bootstrap` records it" in why
    assert "\n" not in why
    # its twin: any other failure is pyinfra's reason as it is
    assert connect_reason(Exception("Connection refused ")) == "Connection refused"
    assert connect_reason(TimeoutError()) == "TimeoutError"


def test_parallel_is_every_host_up_to_a_cap_and_what_open_files_leave_room_for():
    from gpufleet.fleet.pyinfra_main import PARALLEL_CAP, default_parallel

    assert default_parallel(3, fd_room=6000) == 3
    assert default_parallel(1024, fd_room=6000) == PARALLEL_CAP == 256
    assert default_parallel(1024, fd_room=100) == 100  # a low `ulimit -n` wins
    assert default_parallel(0, fd_room=6000) == 1


@pytest.mark.parametrize(("asked", "pools"), [(0, 256), (7, 7)])
def test_a_run_sizes_its_pools_from_the_inventory_unless_parallel_is_given(
    monkeypatch, asked, pools
):
    from pyinfra.api import Config, Inventory, State
    from pyinfra.api import state as state_module

    from gpufleet.fleet import pyinfra_main

    monkeypatch.setattr(state_module.State, "init", state_module.State.init)
    monkeypatch.setattr(state_module, "MAX_PARALLEL", 6000)
    pyinfra_main._choose_parallel()
    inventory = Inventory(([f"h{i}" for i in range(300)], {}))
    config = Config(PARALLEL=asked)
    state = State(inventory, config)
    assert (config.PARALLEL, state.pool.size) == (pools, pools)


def test_pyinfra_argument_types_are_read_once_and_answered_the_same(monkeypatch):
    from pyinfra.api import arguments, facts

    from gpufleet.fleet import pyinfra_main

    monkeypatch.setattr(arguments, "all_global_arguments", arguments.all_global_arguments)
    monkeypatch.setattr(facts, "all_global_arguments", facts.all_global_arguments)
    fresh = arguments.all_global_arguments()
    pyinfra_main.cache_argument_types()
    cached = arguments.all_global_arguments()
    assert cached == fresh and facts.all_global_arguments() == fresh
    cached.clear()  # a caller's change does not reach the next caller
    assert arguments.all_global_arguments() == fresh


def test_an_ssh_transport_polled_once_a_second_still_closes_at_once(monkeypatch):
    import socket
    import threading
    import time

    from paramiko.transport import Transport

    from gpufleet.fleet import pyinfra_main
    from gpufleet.ops.operations import TRANSPORT_POLL_SECONDS

    monkeypatch.setattr(Transport, "_active_check_timeout", Transport._active_check_timeout)
    pyinfra_main.poll_transports_less()
    ours, theirs = socket.socketpair()  # a host that never answers the banner
    transport = Transport(ours)
    assert ours.gettimeout() == TRANSPORT_POLL_SECONDS
    transport.start_client(event=threading.Event())
    time.sleep(0.05)  # its reader waits on the socket now
    began = time.monotonic()
    transport.close()
    transport.join(5)
    assert not transport.is_alive() and time.monotonic() - began < 0.5
    theirs.close()


def test_host_keys_are_found_by_name_as_paramikos_scan_finds_them(monkeypatch, tmp_path):
    from paramiko.hostkeys import HostKeys
    from pyinfra.connectors.sshuserclient import client

    from gpufleet.fleet import pyinfra_main

    monkeypatch.setattr(client, "HostKeys", HostKeys)
    pyinfra_main.index_host_keys()
    assert client.HostKeys is not HostKeys
    known = tmp_path / "known_hosts"
    key = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    lines = [f"[127.0.0.1]:{2200 + i} ssh-ed25519 {key}" for i in range(50)]
    lines.append(f"{HostKeys.hash_host('spark')} ssh-ed25519 {key}")
    lines.append(f"jetson,[127.0.0.1]:2201 ssh-ed25519 {key}")
    lines.append(f"[127.0.0.1]:2249 ssh-ed25519 {key}")  # twice: paramiko keeps one
    known.write_text("\n".join(lines) + "\n")
    plain, indexed = HostKeys(str(known)), client.HostKeys(str(known))
    assert [e.hostnames for e in indexed._entries] == [e.hostnames for e in plain._entries]
    for name in ["[127.0.0.1]:2201", "[127.0.0.1]:2249", "spark", "jetson", "nowhere"]:
        ours, theirs = indexed.lookup(name), plain.lookup(name)
        assert (ours is None) == (theirs is None)
        assert ours is None or [ours[k] for k in ours] == [theirs[k] for k in theirs]
    # a key added through an answer joins the table, and later entries are found
    spark = plain.lookup("spark")["ssh-ed25519"]
    plain.lookup("jetson")["ssh-rsa"] = spark
    indexed.lookup("jetson")["ssh-rsa"] = spark
    assert sorted(indexed.lookup("jetson").keys()) == sorted(plain.lookup("jetson").keys())
    assert len(indexed._entries) == len(plain._entries)
    indexed.add("newhost", "ssh-ed25519", spark)
    assert indexed.check("newhost", spark) and not indexed.check("elsewhere", spark)
    indexed._entries.pop(0)  # not an append: the index is made again
    assert indexed.lookup("[127.0.0.1]:2200") is None and indexed.check("newhost", spark)
