"""The ``toolkit``, ``daemon`` and ``cdi`` steps on their own (``gpufleet.plan.container_toolkit``);
their fixtures are ``tests/plans/toolkit/``, ``daemon/`` and ``cdi/``."""

from __future__ import annotations

from gpufleet.core import known
from gpufleet.plan.container_toolkit import owned_daemon_keys, toolkit_unavailable
from tests.support.plans import config_for


def test_owned_daemon_keys_leave_others_alone():
    daemon = {"runtimes": {"nvidia": dict(known.NVIDIA_RUNTIME)}, "log-driver": "journald"}
    assert owned_daemon_keys(daemon, set_default=False, cdi=False) == []
    assert owned_daemon_keys(daemon, set_default=True, cdi=True) == [
        "default-runtime", "features.cdi"
    ]  # fmt: skip
    assert owned_daemon_keys(None, set_default=False, cdi=False) == ["runtimes.nvidia"]


def test_toolkit_availability_names_what_the_repository_has():
    config = config_for("rtx5090", toolkit_version="1.19.0-1")
    url = "http://mirror/libnvidia-container/stable/deb/amd64"
    offered = {"nvidia-container-toolkit": ["1.17.8-1", "1.18.0-1"]}
    assert toolkit_unavailable(config, offered, url) == (
        f"NVIDIA Container Toolkit 1.19.0-1 is not in {url} (it has 1.17.8-1, 1.18.0-1); "
        "set toolkit_version to one of those"
    )
    assert toolkit_unavailable(config_for("rtx5090"), offered, url) is None
    assert toolkit_unavailable(config, {"": ["curl: (6) Could not resolve host"]}, url) == (
        f"cannot read the toolkit repository {url}: curl: (6) Could not resolve host"
    )
