"""Inference services end to end: llama-server built from source once, on the control machine
(``gpufleet sandbox up``), and sent to every host (spark and rtx5090 declare a build of the same
inputs, so they receive it instead of building), models fetched and verified, health-gated,
and nothing redone needlessly. A build on a host is proven in test_85."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sandbox.conftest import (
    PYINFRA,
    ROOT,
    assert_token_only_in_env_files,
    inventory_data,
    pyinfra,
    remote_commands,
    stored,
)

pytestmark = pytest.mark.sandbox

DEMO = ("sandbox-spark", "sandbox-rtx5090", "sandbox-jetson")
LLAMA_FILTER = "--filter label=com.docker.compose.service=llama"
LLAMA_ID = f"docker ps -q --no-trunc {LLAMA_FILTER}"
PORTS = {"sandbox-spark": 8000, "sandbox-rtx5090": 8000, "sandbox-jetson": 11434}


def container_ids(hosts) -> dict[str, str]:
    return {
        name: hosts[name].check_output(
            "docker ps -q --no-trunc --filter label=com.docker.compose.service=llama"
        )
        for name in DEMO
    }


def chat(host, port: int) -> dict:
    body = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    return json.loads(host.check_output(
        f"curl -fsS -H 'Content-Type: application/json' -d '{body}' "
        f"http://127.0.0.1:{port}/v1/chat/completions"
    ))  # fmt: skip


BUILT = {
    "sandbox-spark": "gpufleet/llama.cpp:spark",
    "sandbox-rtx5090": "gpufleet/llama.cpp:rtx5090",
}


@pytest.fixture(scope="module")
def served(sandbox, hosts):
    had_images = {
        n: hosts[n].run(f"docker image inspect {ref}").rc == 0 for n, ref in BUILT.items()
    }
    run = pyinfra("--exclude", "broken", "--json")
    assert run.rc == 0, run.stderr[-4000:]
    run.had_images = had_images
    return run


def test_every_demo_host_answers_a_chat_completion(served, hosts):
    for name in DEMO:
        answer = chat(hosts[name], PORTS[name])
        assert answer["choices"], name
        health = hosts[name].check_output(f"curl -fsS http://127.0.0.1:{PORTS[name]}/health")
        assert json.loads(health)["status"] == "ok"


def test_spark_and_rtx5090_receive_the_control_machines_build_of_the_same_inputs(
    served, hosts, sandbox
):
    archive = Path(sandbox["llama"]["build"]["source_archive"])
    archive_sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    # the image's own step ("Build context for llama" is its directory)
    built = [op for op in served.changed() if op.startswith("Inference services | Build gpufleet/")]
    hosts_built = sorted({h for op in built for h in served.changed()[op]})
    assert hosts_built == sorted(n for n, had in served.had_images.items() if not had)
    # each host lacking it got the image from a host that had it, or else the control machine
    senders = ("the control machine", *(n for n, had in served.had_images.items() if had))
    for op in built:
        assert op.rpartition("(llama.cpp receive from ")[2].rstrip(")") in senders, built
    assert "image build(s)" not in served.stderr  # nobody compiled
    if hosts_built:
        assert "--> gpufleet: images sent instead of built: " in served.stderr
    for name, ref in BUILT.items():
        labels = json.loads(hosts[name].check_output(
            f"docker image inspect --format '{{{{json .Config.Labels}}}}' {ref}"
        ))  # fmt: skip
        assert labels["gpufleet.llama.source"] == f"sha256:{archive_sha}"
        assert len(labels["gpufleet.inputs"]) == 64


def test_jetson_runs_the_sent_image_with_runtime_nvidia(served, hosts, sandbox):
    host = hosts["sandbox-jetson"]
    cid = host.check_output("docker ps -q --filter label=com.docker.compose.service=llama")
    info = json.loads(host.check_output(f"docker inspect {cid}"))[0]
    assert info["HostConfig"]["Runtime"] == "nvidia"
    assert info["Config"]["Image"] == sandbox["llama"]["image"]


def test_models_are_verified_and_the_gated_one_was_fetched(served, hosts, sandbox):
    repos = sandbox["hf"]["repos"]
    expected = {
        "sandbox-spark": ("gpt-oss-20b", "gpufleet-sandbox/tiny-gated-GGUF"),
        "sandbox-rtx5090": ("qwen3-vl-30b-a3b", "gpufleet-sandbox/tiny-llama-GGUF"),
        "sandbox-jetson": ("llama-3.2-3b", "gpufleet-sandbox/tiny-llama-GGUF"),
    }
    for name, (model, repo) in expected.items():
        blob = stored(name, model)
        assert blob.repo == repo and repos[repo]["files"][blob.path]["sha256"] == blob.etag
        # read through its snapshot link, as llama-server reads it: the blob's verified bytes
        assert hosts[name].file(blob.link).linked_to == blob.blob
        assert hosts[name].check_output(f"sha256sum < {blob.link}").split()[0] == blob.etag
        assert hosts[name].file(blob.stamp).content_string.split() == [blob.etag, str(blob.size)]
        assert not hosts[name].file(blob.incomplete).exists


def test_second_converge_changes_nothing_and_recreates_nothing(served, hosts):
    before = container_ids(hosts)
    again = pyinfra("--exclude", "broken", "--json")
    assert again.rc == 0, again.stderr[-3000:]
    assert again.changed() == {}
    assert container_ids(hosts) == before


def test_context_size_change_recreates_only_that_service(served, hosts):
    before = container_ids(hosts)
    data = inventory_data("sandbox-rtx5090")
    services = json.loads(json.dumps(data["services"]))
    services["llama"]["ctx_size"] = 2048
    override = f"services={json.dumps(services)}"
    run = pyinfra("--limit", "sandbox-rtx5090", "--data", override, "--json")
    assert run.rc == 0, run.stderr[-3000:]
    after = container_ids(hosts)
    assert after["sandbox-rtx5090"] != before["sandbox-rtx5090"]
    assert {n: after[n] for n in DEMO if n != "sandbox-rtx5090"} == {
        n: before[n] for n in DEMO if n != "sandbox-rtx5090"
    }
    assert not any(op.startswith("Inference services | Build ") for op in run.changed())
    assert "2048" in hosts["sandbox-rtx5090"].check_output(
        "docker inspect --format '{{json .Config.Cmd}}' $(docker ps -q --filter "
        "label=com.docker.compose.service=llama)"
    )


def test_switching_the_model_fetches_it_and_recreates_its_service(served, hosts):
    host = hosts["sandbox-jetson"]
    data = inventory_data("sandbox-jetson")
    services = json.loads(json.dumps(data["services"]))
    services["llama"]["model"] = "qwen2.5-coder-7b"
    coder = stored("sandbox-jetson", "qwen2.5-coder-7b")
    host.check_output(f"rm -rf {coder.repo_dir}")  # whatever an earlier run left
    override = f"services={json.dumps(services)}"
    run = pyinfra("--limit", "sandbox-jetson", "--data", override, "--json")
    assert run.rc == 0, run.stderr[-3000:]
    fetched = [op for op in run.changed() if op.startswith("Models | Fetch model qwen2.5-coder-7b")]
    assert fetched
    models = json.loads(host.check_output("curl -fsS http://127.0.0.1:11434/v1/models"))
    assert models["data"][0]["id"].endswith(f"{coder.commit}/{coder.path}")  # its snapshot
    assert host.file(stored("sandbox-jetson", "llama-3.2-3b").link).exists  # models_keep_unused


def test_a_download_killed_halfway_resumes_and_only_a_whole_file_lands(served, hosts, sandbox):
    host = hosts["sandbox-rtx5090"]
    blob = stored("sandbox-rtx5090", "qwen3-vl-30b-a3b")
    path, dest, size = blob.path, blob.blob, blob.size
    full = host.file(dest).sha256sum
    host.check_output(f"rm {dest} {blob.stamp}")
    # The same endpoint behind a 16 KiB/s link: the download takes seconds, time to kill it.
    slow = f"hf_endpoint={sandbox['mirror']['internal_url']}/slow/16384"
    converge = subprocess.Popen(
        [PYINFRA, "-y", "inventory/sandbox.py", "deploys/fleet.py", "--limit", "sandbox-rtx5090",
         "--data", slow], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        partial = host.file(blob.incomplete)
        if partial.exists and partial.size >= size // 4:
            break
        time.sleep(0.3)
    else:
        converge.kill()
        pytest.fail("the download never reached a quarter of the file")
    assert not host.file(dest).exists
    # (a bracket keeps pkill from matching its own shell's command line)
    host.run("pkill -KILL -f '[f]etch-model'; pkill -KILL -x curl")
    assert converge.wait(timeout=120) != 0
    left = host.file(blob.incomplete).size
    assert 0 < left < size, (left, size)
    assert not host.file(dest).exists

    run = pyinfra("--limit", "sandbox-rtx5090")  # at the default verbosity
    assert run.rc == 0, run.stderr[-3000:]
    # the download's own lines are shown live, with the host's name, without -vvv
    assert re.search(rf"sandbox-rtx5090.*fetch: {re.escape(path)}: resuming at",
                     run.stdout + run.stderr), run.stdout[-2000:]  # fmt: skip
    assert host.file(dest).sha256sum == full
    assert not host.file(blob.incomplete).exists
    assert host.file(blob.stamp).exists and host.file(blob.link).linked_to == dest


def gpufleet(*args: str):
    exe = str(Path(sys.executable).with_name("gpufleet"))
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip


def drift_json(*args: str) -> tuple[int, dict]:
    run = gpufleet("drift", "inventory/sandbox.py", "--json", *args)
    return run.returncode, json.loads(run.stdout)


def items(doc: dict, host: str) -> list[tuple[str, str, str]]:
    entry = next(h for h in doc["hosts"] if h["host"] == host)
    return [(i["step"], i["resource"], i["reason"]) for i in entry["items"]]


def test_drift_says_why_and_converge_repairs_it(served, hosts):
    assert pyinfra("--exclude", "broken").rc == 0
    clean = gpufleet("drift", "inventory/sandbox.py", "--exclude", "broken")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.splitlines()[-1] == "3 in sync, 0 drifted, 0 refused, 0 unreachable"

    hosts["sandbox-spark"].check_output("chmod 644 /opt/gpufleet/.env")
    hosts["sandbox-rtx5090"].check_output(f"docker stop $({LLAMA_ID})")
    jetson = hosts["sandbox-jetson"]
    jetson.check_output(
        "apt-get install -y -qq --allow-downgrades " + " ".join(
            f"{p}=1.17.8-1" for p in ("nvidia-container-toolkit", "nvidia-container-toolkit-base",
                                      "libnvidia-container-tools", "libnvidia-container1"))
    )  # fmt: skip
    rc, doc = drift_json("--exclude", "broken")
    assert rc == 2
    assert doc["schema"] == "gpufleet.drift/1"
    assert doc["summary"] == {"in-sync": 0, "drift": 3, "refused": 0, "unreachable": 0}
    assert items(doc, "sandbox-spark") == [
        ("env", "/opt/gpufleet/.env", "file 644 root:root found, file 600 root:root declared")
    ]
    assert items(doc, "sandbox-rtx5090")[0] == ("recreate", "llama", "container exited")
    assert items(doc, "sandbox-jetson")[0] == (
        "toolkit",
        "nvidia-container-toolkit",
        "toolkit 1.17.8-1 installed, 1.18.0-1 declared",
    )
    # the check changed nothing
    assert hosts["sandbox-spark"].file("/opt/gpufleet/.env").mode == 0o644
    assert jetson.package("nvidia-container-toolkit").version == "1.17.8-1"

    assert pyinfra("--exclude", "broken").rc == 0
    assert hosts["sandbox-spark"].file("/opt/gpufleet/.env").mode == 0o600
    assert jetson.package("nvidia-container-toolkit").version == "1.18.0-1"
    chat(hosts["sandbox-rtx5090"], 8000)
    assert gpufleet("drift", "inventory/sandbox.py", "--exclude", "broken").returncode == 0


def test_drift_exit_codes(served, tmp_path):
    assert gpufleet("drift", "inventory/sandbox.py", "--limit", "sandbox-spark").returncode == 0
    refused = gpufleet("drift", "inventory/sandbox.py", "--limit", "sandbox-old-driver",
                       "--limit", "sandbox-spark")  # fmt: skip
    assert refused.returncode == 1
    assert "sandbox-old-driver: refused: NVIDIA driver 550.54.14 is older than 580.65.06" in (
        refused.stdout
    )
    assert gpufleet("drift", "inventory/sandbox.py", "--no-such-flag").returncode == 64
    assert gpufleet("drift", str(tmp_path / "missing.py")).returncode == 64


def test_a_frozen_server_is_drift_and_a_converge_brings_it_back(served, hosts):
    host = hosts["sandbox-rtx5090"]
    host.check_output("pkill -STOP -x llama-server")
    try:
        # the container runs and its port is open, but nothing answers
        assert host.check_output(f"docker ps -q --filter status=running {LLAMA_FILTER}")
        rc, doc = drift_json("--limit", "sandbox-rtx5090")
        assert rc == 2
        assert items(doc, "sandbox-rtx5090")[0] == (
            "recreate",
            "llama",
            "running but its health endpoint gave no answer (timeout)",
        )
        assert pyinfra("--limit", "sandbox-rtx5090").rc == 0
    finally:
        host.run("pkill -CONT -x llama-server")
    chat(host, 8000)
    assert drift_json("--limit", "sandbox-rtx5090")[0] == 0


def test_a_model_truncated_under_its_server_is_refetched_and_served(served, hosts, sandbox):
    host = hosts["sandbox-jetson"]
    path = stored("sandbox-jetson", "llama-3.2-3b").blob
    want = sandbox["hf"]["repos"]["gpufleet-sandbox/tiny-llama-GGUF"]["files"][
        "tiny-llama-Q8_0.gguf"]["sha256"]  # fmt: skip
    host.check_output(f"truncate -s 1000 {path}")
    rc, doc = drift_json("--limit", "sandbox-jetson")
    assert rc == 2
    assert [(step, res) for step, res, _ in items(doc, "sandbox-jetson")] == [
        ("model", path),
        ("recreate", "llama"),
        ("gate", "llama"),
    ]
    run = pyinfra("--limit", "sandbox-jetson", "--json")
    assert run.rc == 0, run.stderr[-3000:]
    assert host.file(path).sha256sum == want
    assert chat(host, 11434)["choices"]
    assert drift_json("--limit", "sandbox-jetson")[0] == 0


def test_a_hand_edited_dockerfile_is_drift_and_rewritten_without_a_build(served, hosts):
    host = hosts["sandbox-spark"]
    dockerfile = "/opt/gpufleet/build/llama/Dockerfile"
    image = host.check_output("docker image inspect --format '{{.Id}}' gpufleet/llama.cpp:spark")
    before = host.file(dockerfile).sha256sum
    host.check_output(f"echo '# tried something' >> {dockerfile}")
    rc, doc = drift_json("--limit", "sandbox-spark")
    assert rc == 2
    assert items(doc, "sandbox-spark") == [("build", dockerfile, "the build context's Dockerfile "
                                            "was edited; the image is current")]  # fmt: skip
    run = pyinfra("--limit", "sandbox-spark", "--json")
    assert run.rc == 0
    # the Dockerfile, and the host's metrics textfile that every converge with a change writes
    changed = [name for name in run.changed() if not name.startswith("Host metrics")]
    assert changed == ["Inference services | Dockerfile for llama"]
    assert host.file(dockerfile).sha256sum == before
    assert (
        host.check_output("docker image inspect --format '{{.Id}}' gpufleet/llama.cpp:spark")
        == image
    )


def test_a_host_lacking_its_image_receives_it_from_a_host_of_the_run_that_has_it(served, hosts):
    spark = hosts["sandbox-spark"]
    image = spark.check_output("docker image inspect --format '{{.Id}}' gpufleet/llama.cpp:spark")
    # only the tag goes (another keeps the image, whatever tags the releases hold)
    spark.check_output("docker tag gpufleet/llama.cpp:spark gpufleet-test/kept:spark && "
                       "docker rmi gpufleet/llama.cpp:spark")  # fmt: skip
    run = pyinfra("--limit", "sandbox-spark", "--limit", "sandbox-rtx5090", "--json")
    assert run.rc == 0, run.stderr[-3000:]
    # a host that has the image sends it before the control machine does, and nobody builds
    build = ("Inference services | Build gpufleet/llama.cpp:spark "
             "(llama.cpp receive from sandbox-rtx5090)")  # fmt: skip
    assert run.changed()[build] == ["sandbox-spark"]
    assert "--> gpufleet: images sent instead of built: sandbox-spark " in run.stderr
    assert "image build(s)" not in run.stderr
    assert spark.check_output(
        "docker image inspect --format '{{.Id}}' gpufleet/llama.cpp:spark") == image  # fmt: skip
    spark.check_output("docker rmi gpufleet-test/kept:spark")
    assert chat(spark, PORTS["sandbox-spark"])["choices"]


def test_drift_check_of_a_refused_host_is_an_error(served):
    run = gpufleet("drift", "inventory/sandbox.py", "--limit", "sandbox-old-driver",
                   "--limit", "sandbox-spark")  # fmt: skip
    assert run.returncode == 1
    assert "older than 580.65.06" in run.stdout


def test_no_change_run_reads_each_host_in_one_remote_command(served):
    for deploy_args in (("deploys/fleet.py", "--dry"), ("deploys/fleet.py",)):
        commands, _ = remote_commands(*deploy_args, "--exclude", "broken")
        assert commands == dict.fromkeys(DEMO, 1), commands


def test_gated_download_never_shows_the_token(served, hosts, token):
    host = hosts["sandbox-spark"]
    # the gated model: fetched again, with the token
    host.check_output(f"rm -rf {stored('sandbox-spark', 'gpt-oss-20b').repo_dir}")
    run = pyinfra("--limit", "sandbox-spark", "--debug", "-vv", "--diff")
    assert run.rc == 0, run.stderr[-3000:]
    assert "Fetch model gpt-oss-20b" in run.stderr
    assert token not in run.stdout and token not in run.stderr
    assert_token_only_in_env_files(host, token)
    assert token not in host.check_output("ps -eo args")
