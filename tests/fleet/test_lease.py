"""The lease's shell, run by a real ``sh`` against a temporary state directory.

The same scripts ``deploys/lease.py`` sends to hosts: two operators at once, an expired or
foreign lease, a file cut short. Only the path differs from a host's.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpufleet.fleet.lease import HELD, NOT_A_LEASE, drop_script, take_script


def _lease(lease_id: str, *, expires: float, holder: str = "op@ctl") -> str:
    doc = {"id": lease_id, "holder": holder, "control": "ctl", "pid": 1, "release": "rollout",
           "started": time.time(), "expires": expires}  # fmt: skip
    return json.dumps(doc, sort_keys=True)


def _take(path, lease_id: str, *, now: float | None = None, expires: float | None = None):
    now = time.time() if now is None else now
    body = _lease(lease_id, expires=now + 600 if expires is None else expires)
    script = take_script(lease_id, now, len(body.encode()), path=str(path))
    return subprocess.run(["sh", "-c", script], input=body, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def test_two_operators_starting_together_one_wins_every_time(tmp_path):
    path = tmp_path / "state" / "lease.json"
    with ThreadPoolExecutor(max_workers=2) as pool:
        for i in range(100):
            a, b = f"{2 * i:012x}", f"{2 * i + 1:012x}"
            results = list(pool.map(lambda lid: _take(path, lid), (a, b)))
            codes = sorted(r.returncode for r in results)
            assert codes == [0, HELD], [(r.returncode, r.stderr) for r in results]
            winner = json.loads(path.read_text())["id"]
            loser = next(r for r in results if r.returncode == HELD)
            assert json.loads(loser.stdout)["id"] == winner  # the loser is told who holds it
            assert winner in (a, b)
            path.unlink()
    assert sorted(os.listdir(path.parent)) == ["lease.json.lock"]  # no temporary file left


def test_our_own_lease_is_renewed_and_anothers_live_lease_is_not_replaced(tmp_path):
    path = tmp_path / "lease.json"
    assert _take(path, "aaaaaaaaaaaa").returncode == 0
    assert _take(path, "aaaaaaaaaaaa").returncode == 0  # renewed
    held = _take(path, "bbbbbbbbbbbb")
    assert held.returncode == HELD and json.loads(held.stdout)["id"] == "aaaaaaaaaaaa"


def test_an_expired_lease_is_replaced_only_past_the_margin_on_both_clocks(tmp_path):
    path = tmp_path / "lease.json"
    now = time.time()
    path.write_text(_lease("aaaaaaaaaaaa", expires=now - 30) + "\n")
    old = now - 3600
    os.utime(path, (old, old))  # not renewed for an hour
    # expired 30 s ago: within the 60 s margin, still held
    assert _take(path, "bbbbbbbbbbbb", now=now).returncode == HELD
    path.write_text(_lease("aaaaaaaaaaaa", expires=now - 120) + "\n")
    os.utime(path, (old, old))
    # the operator's clock runs an hour behind: by it the lease is live, so it holds
    assert _take(path, "bbbbbbbbbbbb", now=now - 3600).returncode == HELD
    assert _take(path, "bbbbbbbbbbbb", now=now).returncode == 0
    assert json.loads(path.read_text())["id"] == "bbbbbbbbbbbb"


def test_a_lease_renewed_moments_ago_is_not_taken_even_when_it_says_expired(tmp_path):
    path = tmp_path / "lease.json"
    path.write_text(_lease("aaaaaaaaaaaa", expires=time.time() - 3600) + "\n")  # mtime: now
    assert _take(path, "bbbbbbbbbbbb").returncode == HELD


@pytest.mark.parametrize("content", ["", '{"id": "aaaaaaaaaaaa", "holder": "op', "garbage\n"])
def test_a_lease_file_cut_short_or_foreign_is_named_not_replaced(tmp_path, content):
    path = tmp_path / "lease.json"
    path.write_text(content)
    run = _take(path, "bbbbbbbbbbbb")
    assert run.returncode == NOT_A_LEASE
    assert run.stdout == content[:2000] and path.read_text() == content


def test_a_lease_that_arrives_cut_short_leaves_no_lease(tmp_path):
    path = tmp_path / "lease.json"
    body = _lease("aaaaaaaaaaaa", expires=time.time() + 600)
    script = take_script("aaaaaaaaaaaa", time.time(), len(body.encode()), path=str(path))
    run = subprocess.run(["sh", "-c", script], input=body[:20], capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert run.returncode != 0 and "cut short" in run.stderr
    assert not path.exists() and os.listdir(tmp_path) == ["lease.json.lock"]


def test_release_drops_only_our_lease_and_break_only_the_one_it_judged(tmp_path):
    path = tmp_path / "lease.json"
    assert _take(path, "aaaaaaaaaaaa").returncode == 0

    def drop(lease_id):
        return subprocess.run(["sh", "-c", drop_script(lease_id, path=str(path))],
                              capture_output=True, text=True, check=False)  # fmt: skip

    assert drop("bbbbbbbbbbbb").returncode == HELD and path.exists()  # not ours: kept
    assert drop("aaaaaaaaaaaa").returncode == 0 and not path.exists()
    assert drop("aaaaaaaaaaaa").returncode == 0  # nothing there: nothing to do
    path.write_text("not a lease")
    assert drop("aaaaaaaaaaaa").returncode == NOT_A_LEASE  # by id: not what it cannot read
    assert path.exists()
    assert drop(None).returncode == 0 and not path.exists()  # by hand: whatever is there
