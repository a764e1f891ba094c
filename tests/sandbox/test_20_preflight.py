"""The preflight gate on real hosts: broken hosts refused with zero changes, others pass."""

from __future__ import annotations

import json
import re

import pytest

from tests.sandbox.conftest import NO_SERVICES, inventory_data, pyinfra, remote_commands

pytestmark = pytest.mark.sandbox

BROKEN = ("sandbox-old-driver", "sandbox-no-driver")
# Everything a converge could touch on a host, as a fingerprint taken before and after.
FINGERPRINT = (
    "dpkg-query -W -f='${Package} ${Version}\\n' | sha256sum; "
    "ls -la /etc/apt/sources.list.d /usr/share/keyrings /etc/docker /opt 2>&1 | sha256sum; "
    "find /etc /opt /usr/local /var/lib/dpkg -xdev -newer /run/gpufleet-test-marker "
    "-not -path '/etc/ssh/*' 2>/dev/null | head -20"
)


def test_broken_hosts_refused_with_one_line_and_nothing_changed(hosts):
    before = {}
    for name in BROKEN:
        hosts[name].check_output("touch -d '1 minute ago' /run/gpufleet-test-marker")
        before[name] = hosts[name].check_output(FINGERPRINT)

    run = pyinfra(*NO_SERVICES, "--limit", "broken", "--limit", "sandbox-spark")

    assert run.rc != 0
    assert (
        "[sandbox-old-driver] NVIDIA driver 550.54.14 is older than 580.65.06, "
        "the minimum for CUDA 13.0 (spark)"
    ) in run.stderr
    assert (
        "[sandbox-no-driver]  NVIDIA driver not usable: NVIDIA-SMI has failed because it "
        "couldn't communicate with the NVIDIA driver."
    ) in run.stderr
    assert "rtx5090 needs driver >= 570.26, the minimum for CUDA 12.8" in run.stderr
    # The healthy host went on past the gate and converged.
    assert "[sandbox-spark]" not in "".join(
        line for line in run.stderr.splitlines() if "older than" in line or "not usable" in line
    )
    assert hosts["sandbox-spark"].file("/opt/gpufleet/.env").exists
    for name in BROKEN:
        assert hosts[name].check_output(FINGERPRINT) == before[name], name
        assert not hosts[name].file("/opt/gpufleet").exists


def test_group_entry_file_gates_only_its_group(hosts):
    run = pyinfra(*NO_SERVICES, "--limit", "sandbox-rtx5090", "--limit", "sandbox-no-driver",
                  deploy="deploys/rtx5090.py")  # fmt: skip
    assert run.rc != 0
    assert "[sandbox-no-driver]  NVIDIA driver not usable" in run.stderr
    assert "older than" not in run.stderr


def test_preflight_reads_a_host_in_one_remote_command(sandbox):
    commands, output = remote_commands(
        "fact", "facts.identity.HostIdentity", "--limit", "sandbox-spark"
    )
    assert commands == {"sandbox-spark": 1}
    assert '"name": "NVIDIA GB10"' in output  # pyinfra prints facts on stderr


def test_model_that_does_not_fit_is_refused_before_any_change(hosts):
    host = hosts["sandbox-spark"]
    host.check_output("touch -d '1 minute ago' /run/gpufleet-test-marker")
    before = host.check_output(FINGERPRINT)
    # gpt-oss-120b's declared size (group_data/spark.py) against this machine's memory
    model = {"repo": "gpufleet-sandbox/tiny-gated-GGUF", "revision": "main",
             "files": ["tiny-gated-Q8_0.gguf"], "size_bytes": 63_400_000_000}  # fmt: skip
    # the host's other models stay declared (spark's vLLM names one)
    models = json.dumps({**inventory_data("sandbox-spark")["models"], "gpt-oss-20b": model})
    run = pyinfra("--limit", "sandbox-spark", "--data", f"models={models}")
    assert run.rc != 0
    wanted = (
        r"\[sandbox-spark\]\s+Model needs [\d.]+ GiB \(59\.0 GiB \+ 2 GiB KV allowance\), "
        r"more than the [\d.]+ GiB of host memory \(spark\)"
    )
    assert re.search(wanted, run.stderr), run.stderr[-2000:]
    assert host.check_output(FINGERPRINT) == before
