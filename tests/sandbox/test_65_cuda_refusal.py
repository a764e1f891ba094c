"""An image whose binary holds no code for the host's GPU is refused before its service starts.

The sandbox spark is a GB10 (compute capability 12.1) by its stand-in nvidia-smi. Its llama
image is relabelled in place as a build holding only ``sm_120a`` (an RTX 5090's cubin), the
label a CUDA build gets from cuobjdump; its ``gpufleet.inputs`` stays, so to the plan the image
is current and only the binary's label differs. No llama.cpp is rebuilt: the relabel is a build
of ``FROM <image>`` with one label, undone by tagging the original image again.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.sandbox.conftest import PYINFRA, ROOT, pyinfra
from tests.support.inventories import variant

pytestmark = pytest.mark.sandbox

HOST = "sandbox-spark"
REF = "gpufleet/llama.cpp:spark"
LLAMA = "docker ps -aq --no-trunc --filter label=com.docker.compose.service=llama"
REFUSAL = (
    "services.llama: image gpufleet/llama.cpp:spark has sm_120a; this GPU is 12.1 "
    '(NVIDIA GB10): rebuild with cuda_archs ["121"]'
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def image_id(host, ref: str = REF) -> str:
    return host.check_output(f"docker image inspect --format '{{{{.Id}}}}' {ref}")


def labels(host, ref: str = REF) -> dict[str, str]:
    return json.loads(
        host.check_output(f"docker image inspect --format '{{{{json .Config.Labels}}}}' {ref}")
    )


def container(host) -> tuple[str, str, str]:
    """The llama container: its id, the image id it runs, its state."""
    cid = host.check_output(LLAMA)
    image, state = host.check_output(
        f"docker inspect --format '{{{{.Image}}}} {{{{.State.Status}}}}' {cid}"
    ).split()
    return cid, image, state


def converge(inventory: str = "inventory/sandbox.py") -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYINFRA, "-y", inventory, "deploys/fleet.py", "--limit", HOST],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip


def assert_refused_in_one_line(stderr: str) -> None:
    text = ANSI.sub("", stderr)
    assert re.search(r"\[sandbox-spark\]\s+" + re.escape(REFUSAL) + "$", text, re.M), text[-3000:]
    # every line that names the mismatch is that one line (pyinfra's, and the run's summary)
    for line in text.splitlines():
        if "has sm_120a" in line:
            assert line.endswith(REFUSAL), line


@pytest.fixture(scope="module")
def serving(sandbox, hosts):
    """The spark converged and serving from its own (CPU-built, unlabelled) image."""
    host = hosts[HOST]
    run = pyinfra("--limit", HOST)
    assert run.rc == 0, run.stderr[-3000:]
    assert "gpufleet.cuda.sm" not in labels(host)  # a CPU build carries no device code label
    return host


@pytest.fixture
def relabelled(serving):
    """The llama image relabelled as a CUDA build for sm_120a only; the original tag restored
    afterwards, and the relabelled image removed."""
    host = serving
    original = image_id(host)
    host.check_output(
        f"printf 'FROM %s\\n' {REF} | DOCKER_BUILDKIT=0 docker build -q -t {REF} "
        "--label gpufleet.cuda.sm=sm_120a --label gpufleet.cuda.ptx= -"
    )
    bad = image_id(host)
    assert bad != original
    try:
        yield original, bad
    finally:
        host.run(f"docker tag {original} {REF}")
        host.run(f"docker rmi {bad}")


def test_an_image_without_code_for_the_gpu_is_refused_and_its_service_not_started(
        serving, relabelled, tmp_path):  # fmt: skip
    host = serving
    original, bad = relabelled
    before = container(host)
    assert before[1:] == (original, "running")
    wrong = labels(host)
    assert wrong["gpufleet.cuda.sm"] == "sm_120a"
    # still current to the plan (its inputs label survived): only its code differs
    assert len(wrong["gpufleet.inputs"]) == 64

    # a converge with nothing else to do
    run = converge()
    assert run.returncode != 0, run.stderr[-3000:]
    assert_refused_in_one_line(run.stderr)
    assert container(host) == before

    # and one that would recreate the service (a new context size): refused before that too
    inv = variant(tmp_path / "ctx.py", {"spark": {"services.llama.ctx_size": 2048}})
    run = converge(inv)
    assert run.returncode != 0, run.stderr[-3000:]
    assert_refused_in_one_line(run.stderr)
    after = container(host)
    assert after == before  # the same container, still on the original image, still running
    assert after[1] != bad
    assert image_id(host) == bad  # nothing was rebuilt or retagged either


def test_with_its_own_image_back_the_host_converges_and_serves(serving, relabelled):
    host = serving
    original, _ = relabelled
    host.check_output(f"docker tag {original} {REF}")  # the relabel removed by hand
    run = converge()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "has sm_120a" not in run.stderr
    cid, image, state = container(host)
    assert (image, state) == (original, "running")
    health = json.loads(host.check_output("curl -fsS http://127.0.0.1:8000/health"))
    assert health["status"] == "ok"
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    answer = json.loads(host.check_output(
        f"curl -fsS -H 'Content-Type: application/json' -d '{body}' "
        "http://127.0.0.1:8000/v1/chat/completions"
    ))  # fmt: skip
    assert answer["choices"]
