"""The SIMULATED fleet (tests/sim): real `gpufleet drift` runs over real SSH against it.

Four simulated hosts on loopback, in this process (a thread runs their asyncio loop), so a
test can change what one of them answers and see the control machine find it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("asyncssh")

from tests.sim.server import Fleet, serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> tuple[Path, Fleet]:
    folder = tmp_path_factory.mktemp("sim")
    before = os.environ.get("GPUFLEET_CACHE")
    loop = asyncio.new_event_loop()
    fleet = loop.run_until_complete(serve(4, 0, folder))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield folder, fleet
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    if before is None:
        os.environ.pop("GPUFLEET_CACHE", None)
    else:
        os.environ["GPUFLEET_CACHE"] = before


def drift(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPUFLEET_CACHE": str(folder / "cache"), "PYTHONPATH": str(ROOT)}
    gpufleet = Path(sys.executable).with_name("gpufleet")
    return subprocess.run(
        [str(gpufleet), "drift", str(folder / "inventory.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_simulated_fleet_is_in_sync(sim) -> None:
    folder, fleet = sim
    done = drift(folder, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    hosts = {h["host"]: h for h in report["hosts"]}
    assert sorted(hosts) == sorted(h.name for h in fleet.hosts)
    assert {h.group for h in fleet.hosts} == {"spark", "rtx5090", "jetson"}
    assert all(h["status"] == "in-sync" and not h["items"] for h in hosts.values())
    assert report["summary"]["in-sync"] == 4
    assert all(not h.unknown for h in fleet.hosts)  # every command it sent was understood


def test_a_changed_answer_of_one_simulated_host_is_drift(sim) -> None:
    folder, fleet = sim
    host = fleet.hosts[0]
    compose = next(p for p in host.files if p.endswith("compose.yaml"))
    saved = host.files[compose]
    host.files[compose] = "0" * 64 + "\t644 root root"  # edited by hand on that host
    try:
        done = drift(folder, "--json")
    finally:
        host.files[compose] = saved
    assert done.returncode == 2, done.stderr
    hosts = {h["host"]: h for h in json.loads(done.stdout)["hosts"]}
    changed = hosts.pop(host.name)
    assert changed["status"] == "drift"
    assert [(c["step"], c["resource"]) for c in changed["items"]] == [("compose", compose)]
    assert all(h["status"] == "in-sync" for h in hosts.values())
