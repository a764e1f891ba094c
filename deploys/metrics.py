"""gpufleet's metrics textfile on the host, and optionally node_exporter and dcgm-exporter.

Called twice by a converge (``deploys/_converge.py``): ``host_metrics`` once the plan is made,
``host_metrics_applied`` after the release is recorded. The first writes the host as the
converge found it, so a converge that fails half way leaves drift and health for the alerts;
the second writes it as the converge left it. A converge with nothing to change writes
nothing when the file is there (the snapshot reads its state with the other managed files): the
host is as the last converge left it, and so is the file; the run stays one remote command.
A refused host gets nothing written, as it gets no change at all.
"""

from __future__ import annotations

import shlex
import sys
import time
from io import StringIO
from pathlib import PurePosixPath

import yaml
from pyinfra import host, logger
from pyinfra.api.deploy import deploy
from pyinfra.context import state
from pyinfra.operations import apt, files, server, systemd

from deploys._config import run_options
from gpufleet.core.schema import HostConfig
from gpufleet.core.snapshot import Snapshot
from gpufleet.ops.operations import run_state, write_now
from gpufleet.plan.types import HostPlan

NODE_EXPORTER = "prometheus-node-exporter"  # Debian's and Ubuntu's package and unit


def _dry() -> bool:
    return "--dry" in sys.argv  # drift/status: read nothing more than the plan did


def _put(config: HostConfig, body: str, what: str):
    path = config.monitor.textfile_path
    # files.put uploads to a temporary name and moves it into place: node_exporter never
    # reads half a file; it is compared by sha256 first, so the same body is no change
    return files.put(
        name=f"Metrics textfile {path} ({what})",
        src=StringIO(body),
        dest=path,
        mode="644",
        user="root",
        group="root",
        create_remote_dir=True,
    )


@deploy("Host metrics")
def host_metrics(config: HostConfig, plan: HostPlan, snap: Snapshot):
    """The textfile as the converge found the host, and the exporters the group asks for.

    + config: validated host config (``monitor_*``)
    + plan: the host's plan
    + snap: the snapshot the plan was made from
    """
    if plan.refusal:
        return
    if _dry():
        if run_options().status:
            _as_status_found(config, plan, snap)
        return
    run_state(state, "metrics_snapshots")[config.host] = snap
    mon = config.monitor
    if mon.node_exporter:
        # lists a day old at most: a host that never ran apt-get update has none to install from
        apt.packages(
            name=f"Install {NODE_EXPORTER}",
            packages=[NODE_EXPORTER],
            update=True,
            cache_time=86400,
            _timeout=config.timeouts.apt_seconds,
        )
        name = f"{NODE_EXPORTER} running"
        systemd.service(name=name, service=NODE_EXPORTER, running=True, enabled=True)
    if mon.dcgm_exporter:
        _dcgm(config)
    if not mon.textfile:
        return
    if not plan.changes and snap.files.get(mon.textfile_path) is not None:
        # in sync: the host is as the last converge left it, and so is its textfile (written
        # then, "as applied"); a no-change run reads and writes nothing more
        return
    # no changes and no file yet: "found" and "applied" are the same host, written once
    from gpufleet.monitor import textfile  # prometheus_client: only when a textfile is written

    body = textfile.render(
        config, plan, snap, converged_at=int(time.time()), applied=not plan.changes
    )
    _put(config, body, "as found" if plan.changes else "in sync")


def _as_status_found(config: HostConfig, plan: HostPlan, snap: Snapshot) -> None:
    """``gpufleet status``: a host that is not as declared (a service down, drift) gets its
    textfile rewritten as found, so the alerts see it before the next converge. The last
    converge time is kept; a host in sync, or without the file yet, is left as it is."""
    if not config.monitor.textfile or not plan.changes or snap.metrics_converged_at is None:
        return
    from gpufleet.monitor import textfile

    body = textfile.render(
        config, plan, snap, converged_at=snap.metrics_converged_at, applied=False
    )
    if why := write_now(state, host, config.monitor.textfile_path, body):
        logger.warning(f"{host.print_prefix}metrics textfile not refreshed: {why}")


@deploy("Host metrics, applied")
def host_metrics_applied(config: HostConfig, plan: HostPlan):
    """The textfile as the converge leaves the host: every change applied and gated.

    + config: validated host config
    + plan: the host's plan, now applied
    """
    snap = run_state(state, "metrics_snapshots").get(config.host)
    if plan.refusal or not plan.changes or snap is None or not config.monitor.textfile:
        return
    from gpufleet.monitor import textfile

    now = int(time.time())
    _put(config, textfile.render(config, plan, snap, converged_at=now, applied=True), "applied")


def dcgm_compose(config: HostConfig) -> str:
    """dcgm-exporter's own compose project (not the stack's: the stack's hash, and so its
    release, stay as they are)."""
    mon = config.monitor
    gpus = {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    service = {
        "image": mon.dcgm_image.ref,
        "restart": "unless-stopped",
        "cap_add": ["SYS_ADMIN"],  # DCGM's profiling metrics
        "ports": [f"{mon.dcgm_port}:9400"],
        "deploy": {"resources": {"reservations": {"devices": [gpus]}}},
    }
    doc = {"name": "gpufleet-monitoring", "services": {"dcgm-exporter": service}}
    header = "# Managed by gpufleet: changes here are overwritten on the next run.\n"
    return header + yaml.safe_dump(doc, sort_keys=False)


def _dcgm(config: HostConfig) -> None:
    path = str(PurePosixPath(config.layout.stack_dir) / "monitoring" / "compose.yaml")
    body = StringIO(dcgm_compose(config))
    name = f"dcgm-exporter compose file {path}"
    put = files.put(name=name, src=body, dest=path, mode="644", create_remote_dir=True)
    server.shell(
        name="Start dcgm-exporter",
        commands=[f"docker compose -f {shlex.quote(path)} up -d --remove-orphans"],
        _if=put.did_change,
    )
