"""Host setup on real hosts: engine, toolkit, runtime, probe, layout, secrets, idempotence."""

from __future__ import annotations

import json
import re

import pytest

from gpufleet.sandbox import fleet
from tests.sandbox.conftest import NO_SERVICES, assert_token_only_in_env_files, pyinfra

pytestmark = pytest.mark.sandbox

DEMO = ("sandbox-spark", "sandbox-rtx5090", "sandbox-jetson")
TOOLKIT = ("nvidia-container-toolkit", "nvidia-container-toolkit-base",
           "libnvidia-container-tools", "libnvidia-container1")  # fmt: skip
PLANTED = {"max-concurrent-downloads": 7}


def docker_started(host) -> str:
    return host.check_output("systemctl show docker -p ActiveEnterTimestampMonotonic")


@pytest.fixture(scope="module")
def first(sandbox, hosts):
    """The demo hosts as their vendors ship them, a key planted in spark's daemon.json,
    then one converge."""
    fleet.reset(list(DEMO))
    spark = hosts["sandbox-spark"]
    spark.check_output(
        "python3 -c \"import json; p='/etc/docker/daemon.json'; d=json.load(open(p)); "
        f"d.update({PLANTED!r}); json.dump(d, open(p, 'w'), indent=4)\""
    )
    assert not hosts["sandbox-rtx5090"].exists("docker")
    assert spark.package("nvidia-container-toolkit").version == "1.17.8-1"
    return pyinfra(*NO_SERVICES, "--exclude", "broken", "--json")


def test_first_converge_succeeds(first):
    assert first.rc == 0, first.stderr[-3000:]
    assert first.errors() == {}


def test_rtx5090_from_bare_to_ready(first, hosts):
    host = hosts["sandbox-rtx5090"]
    assert host.service("docker").is_running and host.service("docker").is_enabled
    assert host.check_output("docker compose version --short") == "2.40.3"
    for package in TOOLKIT:
        assert host.package(package).version == "1.18.0-1", package
    daemon = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert daemon["runtimes"]["nvidia"] == {"args": [], "path": "nvidia-container-runtime"}
    list_file = host.file("/etc/apt/sources.list.d/nvidia-container-toolkit.list")
    assert list_file.content_string.startswith(
        "deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] http://mirror/"
    )
    probes = [name for name in first.changed() if name.startswith("GPU probe | GPU probe")]
    assert probes and "sandbox-rtx5090" in first.changed()[probes[0]]


def test_spark_upgraded_and_planted_key_kept(first, hosts):
    host = hosts["sandbox-spark"]
    for package in TOOLKIT:
        assert host.package(package).version == "1.18.0-1", package
    assert host.check_output("nvidia-ctk --version").startswith(
        "NVIDIA Container Toolkit CLI version 1.18.0"
    )
    daemon = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert daemon["max-concurrent-downloads"] == 7
    assert "nvidia" in daemon["runtimes"]


def test_jetson_keeps_runtime_nvidia(first, hosts, sandbox):
    host = hosts["sandbox-jetson"]
    daemon = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert daemon["default-runtime"] == "nvidia"
    run = host.run(f"docker run --rm --runtime nvidia {sandbox['probe_image']} true")
    assert run.rc == 0, run.stderr


def test_env_files_are_0600_and_hold_the_token(first, hosts, token):
    for name in DEMO:
        env = hosts[name].file("/opt/gpufleet/.env")
        assert (env.mode, env.user, env.group) == (0o600, "root", "root")
        assert f"HF_TOKEN='{token}'" in env.content_string


def test_second_converge_changes_nothing_and_restarts_nothing(first, hosts):
    started = {name: docker_started(hosts[name]) for name in DEMO}
    again = pyinfra(*NO_SERVICES, "--exclude", "broken", "--json")
    assert again.rc == 0, again.stderr[-3000:]
    assert again.changed() == {}
    assert {name: docker_started(hosts[name]) for name in DEMO} == started


def test_docker_is_asked_its_versions_only_when_its_binary_changed(first, hosts, tmp_path):
    """A wrapper in the docker CLI's place logs each call: a snapshot of an unchanged host
    prints the versions it was told; a new binary is asked again."""
    host = hosts["sandbox-rtx5090"]
    log = "/tmp/docker-calls"
    cache = {"GPUFLEET_CACHE": str(tmp_path)}
    host.check_output(f"mv /usr/bin/docker /usr/bin/docker.real && rm -f {log} && printf "
                      f"'#!/bin/sh\\necho \"$*\" >> {log}\\nexec /usr/bin/docker.real \"$@\"\\n' "
                      "> /usr/bin/docker && chmod 755 /usr/bin/docker")  # fmt: skip

    def calls() -> list[str]:
        host.check_output(f"rm -f {log}")
        run = pyinfra(*NO_SERVICES, "--limit", "sandbox-rtx5090", "--json", env=cache)
        assert run.rc == 0 and run.changed() == {}, run.stderr[-2000:]
        return host.check_output(f"cat {log} 2>/dev/null || true").splitlines()

    try:
        assert "--version" in calls()  # nothing known yet: asked
        unchanged = calls()
        assert "--version" not in unchanged and "compose version --short" not in unchanged
        assert any(c.startswith("ps ") for c in unchanged)  # the containers are still read
        host.check_output("touch -d '1 hour ago' /usr/bin/docker")  # an upgrade's new file
        assert "--version" in calls()
    finally:
        host.check_output("mv -f /usr/bin/docker.real /usr/bin/docker")


def test_drift_in_owned_key_is_repaired_and_restarts_docker_once(first, hosts):
    host = hosts["sandbox-rtx5090"]
    host.check_output(
        "python3 -c \"import json; p='/etc/docker/daemon.json'; d=json.load(open(p)); "
        "d['runtimes'].pop('nvidia'); d['debug']=False; json.dump(d, open(p, 'w'))\""
    )
    before = docker_started(host)
    run = pyinfra(*NO_SERVICES, "--limit", "sandbox-rtx5090", "--json")
    assert run.rc == 0, run.stderr[-3000:]
    changed = run.changed()
    assert changed["NVIDIA Container Toolkit | Configure Docker's nvidia runtime"] == [
        "sandbox-rtx5090"
    ]
    assert docker_started(host) != before
    daemon = json.loads(host.file("/etc/docker/daemon.json").content_string)
    assert daemon["debug"] is False and "nvidia" in daemon["runtimes"]


def test_sudo_user_converges(first, hosts):
    host = hosts["sandbox-rtx5090"]
    host.check_output("rm /opt/gpufleet/.env")
    as_ops = ("--data", "ssh_user=ops", "--data", "_sudo=true")
    run = pyinfra(*NO_SERVICES, *as_ops, "--limit", "sandbox-rtx5090", "--json")
    assert run.rc == 0, run.stderr[-3000:]
    # the .env, and the host's metrics textfile that every converge with a change writes
    changed = [name for name in run.changed() if not name.startswith("Host metrics")]
    assert changed == ["Stack layout | Environment file /opt/gpufleet/.env"]
    env = host.file("/opt/gpufleet/.env")
    assert (env.mode, env.user) == (0o600, "root")


@pytest.mark.parametrize("flags", [["-v"], ["-vv"], ["--debug"], ["--diff"], ["--json"]])
def test_token_appears_only_in_the_env_files(first, hosts, token, flags):
    for name in DEMO:  # force the .env to be written again in this run
        hosts[name].check_output("rm -f /opt/gpufleet/.env")
    run = pyinfra(*NO_SERVICES, "--exclude", "broken", *flags)
    assert run.rc == 0, run.stderr[-3000:]
    assert token not in run.stdout and token not in run.stderr
    for name in DEMO:
        host = hosts[name]
        assert token in host.file("/opt/gpufleet/.env").content_string
        assert_token_only_in_env_files(host, token)
        assert token not in host.check_output("ps -eo args"), name


def test_unavailable_toolkit_version_changes_nothing(first, hosts):
    host = hosts["sandbox-spark"]
    before = host.check_output("sha256sum /etc/apt/sources.list.d/* /etc/docker/daemon.json")
    run = pyinfra(*NO_SERVICES, "--limit", "sandbox-spark", "--data", "toolkit_version=1.99.0-1")
    assert run.rc != 0
    wanted = r"Toolkit 1\.99\.0-1 is not in http://mirror/\S+ \(it has 1\.17\.8-1, 1\.18\.0-1\)"
    assert re.search(wanted, run.stderr), run.stderr[-2000:]
    assert host.package("nvidia-container-toolkit").version == "1.18.0-1"
    assert (
        host.check_output("sha256sum /etc/apt/sources.list.d/* /etc/docker/daemon.json") == before
    )


def test_invalid_daemon_json_is_refused_before_any_change(first, hosts):
    host = hosts["sandbox-jetson"]
    original = host.file("/etc/docker/daemon.json").content_string
    host.check_output("echo '{broken' > /etc/docker/daemon.json && rm -f /opt/gpufleet/.env")
    try:
        run = pyinfra(*NO_SERVICES, "--limit", "sandbox-jetson", "--limit", "sandbox-spark")
        assert run.rc != 0
        wanted = (
            r"\[sandbox-jetson\]\s+/etc/docker/daemon.json is not valid JSON: .*: fix or remove it"
        )
        assert re.search(wanted, run.stderr), run.stderr[-2000:]
        assert host.file("/etc/docker/daemon.json").content_string == "{broken\n"
        assert not host.file("/opt/gpufleet/.env").exists
    finally:
        host.check_output(f"cat > /etc/docker/daemon.json <<'EOF'\n{original}EOF")
        pyinfra(*NO_SERVICES, "--limit", "sandbox-jetson")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("toolkit_verison=1.18.0-1",
         "spark/sandbox-spark/toolkit_verison: unknown setting (did you mean toolkit_version?)"),
        ('secrets={"API_KEY": "env:GPUFLEET_TEST_UNSET"}',
         "spark/sandbox-spark/secrets/API_KEY: not set (environment variable "
         "GPUFLEET_TEST_UNSET is empty or missing)"),
    ],
)  # fmt: skip
def test_bad_host_data_stops_the_run_before_any_change(first, hosts, data, message):
    host = hosts["sandbox-spark"]
    host.check_output("rm -f /opt/gpufleet/.env")
    run = pyinfra(
        *NO_SERVICES, "--limit", "sandbox-spark", "--limit", "sandbox-rtx5090", "--data", data
    )
    assert run.rc != 0
    assert message in run.stderr
    assert "Traceback" not in run.stderr
    assert not host.file("/opt/gpufleet/.env").exists
    pyinfra(*NO_SERVICES, "--limit", "sandbox-spark")  # put the .env back for later tests
