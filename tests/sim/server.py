"""The SIMULATED fleet's SSH side: one asyncio process, one asyncssh listener per host.

    python -m tests.sim serve --hosts 256 --latency-ms 50 --dir /tmp/simfleet

writes into ``--dir`` a host key, a client key, ``known_hosts`` (every simulated host pinned),
``hosts.json``, ``inventory.py`` and a seeded Hub cache (``cache/``), then serves until it is
stopped (SIGINT/SIGTERM). Every host listens on its own port of 127.0.0.1; each command's answer
waits one round trip (``--latency-ms``), a login four (key exchange and authentication).
Commands a host does not recognise are answered with exit 0 and logged to ``unknown.log``.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
from pathlib import Path

from tests.sim.hosts import GROUPS, SimHost, converged_host, seed_hub_cache

LOGIN_ROUND_TRIPS = 4  # key exchange (2) and public-key authentication (2)

INVENTORY = '''\
"""SIMULATION: {count} simulated hosts served by `python -m tests.sim serve` (tests/sim).

Not real hosts: each answers with a recorded sandbox host's snapshot. Written by the
simulator; the hosts' ports and group data are in hosts.json beside this file.
"""

import json as _json

_sim = _json.load(open({hosts!r}))
_common = {{
    "ssh_hostname": "127.0.0.1",
    "ssh_user": "root",
    "ssh_key": {key!r},
    "ssh_known_hosts_file": {known!r},
    "ssh_strict_host_key_checking": "yes",
}}


def _group(name):
    return [(h["name"], dict(_common, ssh_port=h["port"], **_sim["data"][name]))
            for h in _sim["hosts"] if h["group"] == name]


spark = _group("spark")
rtx5090 = _group("rtx5090")
jetson = _group("jetson")
'''


def fd_needed(hosts: int) -> int:
    """Descriptors one side needs for ``hosts`` connections (the simulator: also a listener
    each), with room for the rest of the process."""
    return 2 * hosts + 128


def raise_fd_limit(needed: int, who: str) -> None:
    """Raise this process's soft ``RLIMIT_NOFILE`` to ``needed``; say clearly when the hard
    limit does not allow it (``SystemExit``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(
            f"{who} needs about {needed} open files and the limit is {soft} (hard {hard}): "
            f"raise it first (`ulimit -n {needed}` as root, or nofile in limits.conf)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def plan_fleet(count: int) -> list[SimHost]:
    """``count`` hosts spread over the three groups in turn: sim-spark-0001, ..."""
    return [
        converged_host(f"sim-{g}-{i // len(GROUPS) + 1:04d}", g)
        for i in range(count)
        for g in [GROUPS[i % len(GROUPS)]]
    ]


def _keys(folder: Path):
    import asyncssh

    host_key, client_key = folder / "host_key", folder / "id_ed25519"
    for path in (host_key, client_key):
        if not path.exists():
            asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(path))
            path.chmod(0o600)
    client = asyncssh.read_private_key(str(client_key))
    client.write_public_key(str(client_key) + ".pub")
    return asyncssh.read_private_key(str(host_key)), client


class Fleet:
    """The listeners and the hosts behind them; counts what they were asked."""

    def __init__(self, hosts: list[SimHost], latency: float) -> None:
        self.hosts = hosts
        self.latency = latency
        self.commands = 0
        self.logins = 0
        self.ports: dict[str, int] = {}
        self.servers: list = []

    async def start(self, folder: Path) -> None:
        import asyncssh

        host_key, client = _keys(folder)
        authorized = asyncssh.import_authorized_keys(client.export_public_key().decode())
        fleet = self

        class Server(asyncssh.SSHServer):
            async def begin_auth(self, username: str) -> bool:
                fleet.logins += 1
                await asyncio.sleep(fleet.latency * LOGIN_ROUND_TRIPS)
                return True

        for host in self.hosts:
            server = await asyncssh.create_server(
                Server,
                "127.0.0.1",
                0,
                server_host_keys=[host_key],
                authorized_client_keys=authorized,
                process_factory=self._handler(host),
                encoding=None,
                keepalive_interval=0,
                backlog=1024,
            )
            self.servers.append(server)
            self.ports[host.name] = server.sockets[0].getsockname()[1]
        public = host_key.export_public_key().decode().strip()
        (folder / "known_hosts").write_text(
            "".join(f"[127.0.0.1]:{port} {public}\n" for port in self.ports.values())
        )

    def _handler(self, host: SimHost):
        async def handle(process) -> None:
            self.commands += 1
            command = process.command or ""
            stdin = b""
            if "cat >" in command:  # a lease or an audit line comes on stdin
                stdin = await process.stdin.read()
            await asyncio.sleep(self.latency)
            status, out, err = host.answer(command, stdin)
            process.stdout.write(out.encode())
            if err:
                process.stderr.write(err.encode())
            process.exit(status)

        return handle


def write_inventory(folder: Path, fleet: Fleet) -> Path:
    hosts = [{"name": h.name, "group": h.group, "port": fleet.ports[h.name]} for h in fleet.hosts]
    from tests.sim.hosts import host_data

    data = {g: host_data(g) for g in GROUPS}
    (folder / "hosts.json").write_text(json.dumps({"hosts": hosts, "data": data}, indent=1))
    inventory = folder / "inventory.py"
    inventory.write_text(
        INVENTORY.format(
            count=len(hosts),
            hosts=str(folder / "hosts.json"),
            key=str(folder / "id_ed25519"),
            known=str(folder / "known_hosts"),
        )
    )
    return inventory


async def serve(count: int, latency_ms: float, folder: Path, ready=None) -> Fleet:
    """Start the simulated fleet; ``ready(fleet)`` is called once every host listens."""
    folder.mkdir(parents=True, exist_ok=True)
    raise_fd_limit(fd_needed(count), f"a simulated fleet of {count} hosts")
    seed_hub_cache(folder / "cache")
    # the simulator plans its hosts' state with the same seeded cache the control side reads
    os.environ["GPUFLEET_CACHE"] = str(folder / "cache")
    fleet = Fleet(plan_fleet(count), latency_ms / 1000)
    await fleet.start(folder)
    write_inventory(folder, fleet)
    if ready:
        ready(fleet)
    return fleet


def main(count: int, latency_ms: float, folder: Path) -> None:
    """Serve until SIGINT/SIGTERM, then write what was asked to ``unknown.log``."""

    async def run() -> Fleet:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(fleet: Fleet) -> None:
            print(
                f"SIMULATION: {count} simulated hosts on 127.0.0.1 "
                f"(ports {min(fleet.ports.values())}-{max(fleet.ports.values())}), "
                f"{latency_ms:g} ms per round trip; inventory {folder / 'inventory.py'}; "
                f"run gpufleet with GPUFLEET_CACHE={folder / 'cache'}",
                flush=True,
            )

        fleet = await serve(count, latency_ms, folder, ready)
        (folder / "ready").write_text(str(os.getpid()))
        await stop.wait()
        for server in fleet.servers:
            server.close()
        return fleet

    fleet = asyncio.run(run())
    unknown = [f"{h.name}\t{c}" for h in fleet.hosts for c in h.unknown]
    (folder / "unknown.log").write_text("".join(line + "\n" for line in unknown))
    print(
        f"SIMULATION stopped: {fleet.logins} logins, {fleet.commands} commands, "
        f"{len(unknown)} not recognised (unknown.log)",
        file=sys.stderr,
    )
