"""The sandbox hosts are real: SSH with pinned keys, systemd, Docker, apt, the mirror."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import testinfra

pytestmark = pytest.mark.sandbox

TOOLKIT = "http://mirror/libnvidia-container"


def ssh(sandbox, name: str, command: str, *extra: str, user: str = "root"):
    return subprocess.run(
        ["ssh", "-F", sandbox["ssh"]["config"], *extra, f"{user}@{name}", command],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def th(sandbox, name: str):
    return testinfra.get_host(f"ssh://{name}", ssh_config=sandbox["ssh"]["config"])


def test_pinned_host_key_is_accepted(sandbox):
    for host in sandbox["hosts"]:
        proc = ssh(sandbox, host["name"], "hostname", "-o", "BatchMode=yes")
        if host["bootstrap"]:  # a fresh machine knows no key yet: only its user's password
            assert proc.returncode != 0 and "Permission denied" in proc.stderr
            continue
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == host["name"]


def test_changed_host_key_is_refused(sandbox, tmp_path):
    spark, rtx = sandbox["hosts"][0], sandbox["hosts"][1]
    known = Path(sandbox["ssh"]["known_hosts"]).read_text().splitlines()
    rtx_key = next(line for line in known if line.startswith(f"[127.0.0.1]:{rtx['port']} "))
    # spark's port, pinned to rtx5090's key: exactly what a swapped host looks like
    forged = tmp_path / "known_hosts"
    forged.write_text(rtx_key.replace(f":{rtx['port']} ", f":{spark['port']} ", 1) + "\n")
    proc = ssh(sandbox, spark["name"], "true", "-o", f"UserKnownHostsFile={forged}")
    assert proc.returncode != 0
    assert "Host key verification failed" in proc.stderr or "IDENTIFICATION HAS CHANGED" in (
        proc.stderr
    )


def test_sudo_user_ops(sandbox):
    proc = ssh(sandbox, "sandbox-spark", "sudo -n id -u", user="ops")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"


@pytest.mark.parametrize(
    ("name", "has_docker"),
    [("sandbox-spark", True), ("sandbox-jetson", True), ("sandbox-rtx5090", False),
     ("sandbox-old-driver", False), ("sandbox-no-driver", False)],
)  # fmt: skip
def test_systemd_is_pid1_and_docker_as_profiled(sandbox, name, has_docker):
    host = th(sandbox, name)
    assert host.file("/proc/1/comm").content_string.strip() == "systemd"
    assert host.service("ssh").is_running
    if has_docker:
        assert host.service("docker").is_running
        assert host.run("docker info --format '{{.ServerVersion}}'").rc == 0
    else:
        assert not host.exists("docker")
        assert not host.package("docker.io").is_installed


def test_gpu_identities(sandbox):
    spark = th(sandbox, "sandbox-spark")
    out = spark.check_output(
        "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader"
    )
    assert out == "NVIDIA GB10, [N/A], 580.95.05"
    assert th(sandbox, "sandbox-spark").package("nvidia-container-toolkit").version == "1.17.8-1"
    jetson = th(sandbox, "sandbox-jetson")
    assert jetson.file("/etc/nv_tegra_release").content_string.startswith("# R36 (release)")
    daemon = json.loads(jetson.file("/etc/docker/daemon.json").content_string)
    assert daemon["default-runtime"] == "nvidia"
    broken = th(sandbox, "sandbox-no-driver").run("nvidia-smi")
    assert broken.rc == 9
    assert "couldn't communicate with the NVIDIA driver" in broken.stdout


@pytest.fixture
def clean_apt(sandbox):
    host = th(sandbox, "sandbox-old-driver")
    yield host
    host.run(
        "apt-get purge -y -qq nvidia-container-toolkit nvidia-container-toolkit-base "
        "libnvidia-container-tools libnvidia-container1 >/dev/null 2>&1; "
        "rm -f /etc/apt/sources.list.d/sandbox-test.list /usr/share/keyrings/sandbox-test.gpg; "
        "apt-get update -qq >/dev/null 2>&1"
    )


def test_apt_installs_toolkit_through_signed_by_and_refuses_a_wrong_key(clean_apt):
    host = clean_apt
    keyring = "/usr/share/keyrings/sandbox-test.gpg"
    source = f"deb [signed-by={keyring}] {TOOLKIT}/stable/deb/$(ARCH) /"
    # A key that did not sign the repository: apt must refuse the source.
    wrong = host.run(
        "export GNUPGHOME=$(mktemp -d) && gpg --batch --quick-gen-key --passphrase '' "
        f"wrong@example.invalid ed25519 sign never && gpg --export > {keyring} && "
        f"echo '{source}' > /etc/apt/sources.list.d/sandbox-test.list && apt-get update"
    )
    assert "NO_PUBKEY" in wrong.stderr or "is not signed" in wrong.stderr, wrong.stderr
    refused = host.run("apt-get install -y nvidia-container-toolkit=1.18.0-1")
    assert refused.rc != 0
    # The mirror's key: the same packages install.
    host.check_output(f"curl -fsSL {TOOLKIT}/gpgkey | gpg --batch --yes --dearmor -o {keyring}")
    host.check_output("apt-get update -qq")
    host.check_output(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nvidia-container-toolkit=1.18.0-1"
    )
    assert host.package("nvidia-container-toolkit").version == "1.18.0-1"
    assert host.package("libnvidia-container1").version == "1.18.0-1"
    assert host.check_output("nvidia-ctk --version").startswith(
        "NVIDIA Container Toolkit CLI version 1.18.0"
    )


def test_gpu_container_starts_after_hook_and_restart(sandbox):
    host = th(sandbox, "sandbox-spark")
    probe = sandbox["probe_image"]
    save = subprocess.Popen(["docker", "save", probe], stdout=subprocess.PIPE)
    load = subprocess.run(
        ["docker", "exec", "-i", "gpufleet-sandbox-spark", "docker", "load", "-q"],
        stdin=save.stdout, capture_output=True, check=False,
    )  # fmt: skip
    assert save.wait() == 0 and load.returncode == 0, load.stderr
    assert host.exists("nvidia-container-runtime-hook")
    host.check_output("systemctl restart docker")
    run = host.run(f"docker run --rm --gpus all {probe} true")
    assert run.rc == 0, run.stderr
    runtime = host.run(f"docker run --rm --runtime nvidia {probe} true")
    assert runtime.rc == 0, runtime.stderr


def test_hf_endpoint_from_a_host(sandbox):
    host = th(sandbox, "sandbox-rtx5090")
    repo, rev = "gpufleet-sandbox/tiny-llama-GGUF", "main"
    listing = json.loads(host.check_output(f"curl -fsS http://mirror/api/models/{repo}/tree/{rev}"))
    entry = next(e for e in listing if e["path"].endswith(".gguf"))
    url = f"http://mirror/{repo}/resolve/{rev}/{entry['path']}"
    served = host.check_output(f"curl -fsS {url} | sha256sum").split()[0]
    assert served == entry["lfs"]["oid"]
    # Resume: the tail from byte 1000 on, appended to the head, is the whole file.
    resumed = host.check_output(
        f"cd $(mktemp -d) && curl -fsS -r 0-999 -o part {url} && "
        f"curl -fsS -C - -o part {url} && stat -c %s part && sha256sum < part"
    ).split()
    assert int(resumed[0]) == entry["lfs"]["size"]
    assert resumed[1] == entry["lfs"]["oid"]
    gated = host.run(
        "curl -s -o /dev/null -w '%{http_code}' "
        "http://mirror/gpufleet-sandbox/tiny-gated-GGUF/resolve/main/tiny-gated-Q8_0.gguf"
    )
    assert gated.stdout.strip() == "401"


def test_mirror_listing_matches_served_bytes_from_the_control_machine(sandbox):
    import requests

    base = sandbox["mirror"]["url"]
    token = Path(sandbox["hf"]["token_file"]).read_text().strip()
    repo = "gpufleet-sandbox/tiny-gated-GGUF"
    assert requests.get(f"{base}/api/models/{repo}/tree/main", timeout=10).status_code == 401
    headers = {"Authorization": f"Bearer {token}"}
    listing = requests.get(f"{base}/api/models/{repo}/tree/main", headers=headers, timeout=10)
    entry = next(e for e in listing.json() if e["path"].endswith(".gguf"))
    body = requests.get(f"{base}/{repo}/resolve/main/{entry['path']}", headers=headers, timeout=10)
    assert hashlib.sha256(body.content).hexdigest() == entry["lfs"]["oid"]
