"""Shared test fixtures. Sandbox tests bring the local fleet up once per session.

Under ``CI=true`` a sandbox test never skips: a skip there is reported as a failure, because a
green run that did not touch a real host proves nothing.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_skipped_sandbox: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "sandbox" in report.keywords:
        _skipped_sandbox.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if IN_CI and _skipped_sandbox:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if IN_CI and _skipped_sandbox:
        terminalreporter.write_line(
            f"FAILED: {len(_skipped_sandbox)} sandbox tests skipped under CI=true "
            f"(first: {_skipped_sandbox[0]})",
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
