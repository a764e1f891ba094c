"""Shared test fixtures. Sandbox tests bring the local fleet up once per session.

Under ``CI=true`` no test skips: a skip there is reported as a failure, because a green run that
did not touch a real host, or did not run a unit test, proves nothing.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

# gevent's monkey patching first, as pyinfra's own CLI does: the deploys and gpufleet's
# inventory loader import pyinfra_cli, which patches; patched after ssl was imported (by
# requests, aiohttp), the first HTTPS download of the session ends in a RecursionError
import pyinfra_cli  # noqa: F401, I001
import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if IN_CI and _skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if IN_CI and _skipped:
        terminalreporter.write_line(
            f"FAILED: {len(_skipped)} tests skipped under CI=true (first: {_skipped[0]})",
            red=True,
        )


@pytest.fixture(scope="session")
def sandbox():
    """The running sandbox's state (hosts.json as a dict); brings it up when needed."""
    from gpufleet.sandbox import docker, fleet

    try:
        docker.engine_info()
    except docker.SandboxError as exc:
        if IN_CI:
            pytest.fail(f"sandbox unavailable under CI: {exc}")
        pytest.skip(f"no Docker engine: {exc}")
    return fleet.up()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict, str]:
    """A Hub tree of the sandbox's generated models, and the gated repo's token."""
    from gpufleet.sandbox.models import SANDBOX_REPOS, build_hf_tree

    tmp = tmp_path_factory.mktemp("hf")
    repos = build_hf_tree(tmp / "hf", SANDBOX_REPOS)
    token = "hf_" + secrets.token_hex(16)
    (tmp / "hf_token").write_text(token + "\n")
    return tmp, repos, token


@pytest.fixture(scope="module")
def mirror(tree) -> Iterator:
    """mirror.py serving ``tree`` on a free loopback port (one per test module)."""
    from tests.support.mirror import Server

    server = Server(tree[0])
    yield server
    server.stop()
