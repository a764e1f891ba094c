"""Every host-data value that reaches a shell is quoted or refused: nothing it holds executes.

Hypothesis puts shell syntax, quotes and line breaks into each string field that reaches a
remote command or a file a shell or Docker runs (the stack directory, the compose project, a
service's name, the apt key URL and keyring, an Ollama model to pull, cmake arguments, the
group name in ``.env``). A value is either refused by the schema, with one line naming its
field, or rendered and run by a real ``sh`` against stub binaries that record their argv: no
canary file appears, and the value arrives as one intact argument.
"""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from deploys._apt import key_command
from facts import compose, health
from gpufleet.core.render import cmake_flags, render_dockerfile, render_env
from gpufleet.core.schema import ConfigError, parse
from gpufleet.ops import operations as ops
from gpufleet.plan.container_toolkit import toolkit_source
from tests.support.fuzz import fuzz
from tests.support.plans import group_data

STUBS = ("docker", "curl", "gpg", "install", "chmod", "cmake", "apt-get", "mkdir")
# each stub writes its name and arguments, NUL-separated, to a file of its own (the stubs of a
# pipeline run at once)
STUB = '#!/bin/sh\nprintf "%s\\0" "${0##*/}" "$@" > "$(mktemp "$ARGV_DIR/call.XXXXXX")"\n'

# what an attacker would write: each tries to run `touch $CANARY` some way
PAYLOADS = (
    "$(touch $CANARY)",
    "`touch $CANARY`",
    ";touch $CANARY;",
    "'; touch $CANARY; '",
    '"; touch $CANARY; "',
    "\ntouch $CANARY\n",
    "|touch $CANARY",
    "&& touch $CANARY",
    "$(touch${IFS}$CANARY)",
    "\\'$(touch $CANARY)\\'",
    "\rRUN touch $CANARY",
)
PIECES = ("", "a", "-", "--", " ", "'", '"', "\\", "$", "#", "*", "?", "~", "\t", "\n", "{", "}")
hostile = st.one_of(
    st.sampled_from(PAYLOADS),
    st.tuples(st.sampled_from(PIECES), st.sampled_from(PAYLOADS), st.sampled_from(PIECES)).map(
        "".join
    ),
    st.text(alphabet="ab-_./$`'\"\\;|&()<>*?!#~ \t\n", max_size=16),
)


@cache
def _base() -> dict:
    return group_data("spark")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("injection")
    (root / "bin").mkdir()
    for name in STUBS:
        stub = root / "bin" / name
        stub.write_text(STUB)
        stub.chmod(0o755)
    return root


def run_sh(root: Path, command: str) -> list[list[str]]:
    """Run ``command`` under ``sh`` with the stubs first on PATH and ``cd`` recording its
    argument instead of moving (the stack directory does not exist here); return each stub
    call's argv."""
    calls_dir, canary = root / "calls", root / "canary"
    shutil.rmtree(calls_dir, ignore_errors=True)
    calls_dir.mkdir()
    canary.unlink(missing_ok=True)
    env = {
        "PATH": f"{root / 'bin'}:/usr/bin:/bin",
        "ARGV_DIR": str(calls_dir),
        "CANARY": str(canary),
        "HOME": str(root),
    }
    prelude = 'cd() { printf "%s\\0" cd "$@" > "$(mktemp "$ARGV_DIR/call.XXXXXX")"; }; '
    subprocess.run(
        ["sh", "-c", prelude + command],
        env=env,
        cwd=root,
        capture_output=True,
        timeout=10,
        stdin=subprocess.DEVNULL,
    )
    assert not canary.exists(), f"the command ran an injected one: {command!r}"
    return [
        [os.fsdecode(arg) for arg in call.read_bytes().split(b"\0")[:-1]]
        for call in calls_dir.iterdir()
    ]


def _config(**overrides):
    data = copy.deepcopy(_base())
    data.update(overrides)
    group = data.pop("gpufleet_group", "spark")
    try:
        return parse("spark-01", group, data)
    except ConfigError as exc:
        # refused: one line per problem, each naming where it is
        for line in str(exc).splitlines():
            assert line.startswith(("spark/spark-01/", "spark-01/gpufleet_group: ")), line
        event("refused by the schema")
        return None


def _argv_with(calls: list[list[str]], value: str) -> list[list[str]]:
    return [call for call in calls if value in call]


@fuzz(150)
@given(value=hostile)
def test_stack_dir_reaches_the_gate_and_compose_commands_intact(sandbox, value):
    stack = "/opt/" + value
    config = _config(layout_stack_dir=stack)
    if config is None:
        return
    event("accepted")
    for command in (
        ops.gate_probe_command(stack, config.project, "llama", "http://127.0.0.1:8000/health"),
        ops.gate_logs_command(stack, config.project, "llama"),
        ops.compose_up_command(stack, config.project, ["llama"]),
        ops.gate_chat_command(stack, "http://127.0.0.1:8000", "{}", "LLAMA_API_KEY"),
    ):
        calls = run_sh(sandbox, command)
        assert ["cd", stack] in calls or any(c[0] == "curl" for c in calls), calls


@fuzz(150)
@given(value=hostile)
def test_group_reaches_the_compose_project_and_env_intact(sandbox, value):
    config = _config(gpufleet_group="spark" + value)
    if config is None:
        return
    event("accepted")
    stack = config.layout.stack_dir
    calls = run_sh(sandbox, ops.compose_up_command(stack, config.project, ["llama"]))
    assert any(c[:3] == ["docker", "compose", "-p"] and c[3] == config.project for c in calls)
    script = str(compose.script(config.project, ["img:1"]))
    label = f"label=com.docker.compose.project={config.project}"
    assert _argv_with(run_sh(sandbox, script), label)
    first, *values = render_env(config, {}).splitlines()
    assert first.startswith(f"# Managed by gpufleet for the {config.group} group: ")
    assert len(values) == len(config.env)


@fuzz(150)
@given(value=hostile)
def test_apt_key_url_and_keyring_reach_curl_and_gpg_intact(sandbox, value):
    config = _config(toolkit_key_url="https://mirror.example/" + value)
    if config is None:
        return
    event("accepted")
    source = toolkit_source(config)
    calls = run_sh(sandbox, key_command(source.key_url, source.keyring))
    curl = [c for c in calls if c[0] == "curl"]
    assert curl and curl[0][-2:] == ["--", source.key_url], calls
    assert ["chmod", "0644", source.keyring] in calls


@fuzz(100)
@given(value=hostile)
def test_keyring_path_reaches_gpg_intact(sandbox, value):
    config = _config(toolkit_keyring="/usr/share/keyrings/" + value)
    if config is None:
        return
    event("accepted")
    source = toolkit_source(config)
    calls = run_sh(sandbox, key_command(source.key_url, source.keyring))
    assert any(c[0] == "gpg" and c[-1] == source.keyring for c in calls), calls


@fuzz(100)
@given(value=hostile)
def test_service_names_and_pulled_models_reach_docker_intact(sandbox, value):
    services = copy.deepcopy(_base()["services"])
    name = "ollama" + value
    ollama = {"kind": "ollama", "enabled": True, "port": 11500, "models": ["llama3.2" + value]}
    config = _config(services={**services, name: ollama})
    if config is None:
        return
    event("accepted")
    stack, project = config.layout.stack_dir, config.project
    svc = config.services[name]
    exec_in = f"{ops.compose_in(stack, project)} exec -T {shlex.quote(name)}"
    pull = f"{exec_in} ollama pull {shlex.quote(svc.models[0])}"
    for command in (pull, ops.gate_logs_command(stack, project, name)):
        assert _argv_with(run_sh(sandbox, command), name)
    probe = {name: ("127.0.0.1", svc.port, "/api/tags", True, None, svc.models[0])}
    run_sh(sandbox, str(health.script(probe)))


@fuzz(150)
@given(value=hostile)
def test_cmake_args_reach_cmake_as_arguments_and_never_a_dockerfile_line(sandbox, value):
    services = copy.deepcopy(_base()["services"])
    llama = services["llama"]
    llama["build"] = {**llama.get("build", {}), "cmake_args": [f"-DX={value}"]}
    config = _config(services={**services, "llama": llama})
    if config is None:
        return
    event("accepted")
    build = config.services["llama"].build
    dockerfile = render_dockerfile(build)
    run = next(line for line in dockerfile.splitlines() if line.startswith("RUN cmake -B build"))
    command = run.removeprefix("RUN ").removesuffix(" \\")
    (cmake,) = run_sh(sandbox, command)
    assert cmake[1:] == ["-B", "build", *cmake_flags(build)]
    instructions = {"#", "ARG", "FROM", "RUN", "COPY", "WORKDIR", "LABEL", "ENV", "ENTRYPOINT"}
    lines = dockerfile.splitlines()
    for before, line in zip(["", *lines], lines, strict=False):
        if line and not before.endswith("\\"):
            assert line.split()[0] in instructions or line.startswith("#"), line


# --- the quoting alone, as if the schema had let anything through ---------------------------


@fuzz(50)
@given(stack=hostile, project=hostile, service=hostile)
def test_gate_and_compose_commands_quote_whatever_they_are_given(sandbox, stack, project, service):
    for command in (
        ops.gate_probe_command(stack, project, service, "http://127.0.0.1:8000/health"),
        ops.gate_logs_command(stack, project, service),
        ops.compose_up_command(stack, project, [service]),
    ):
        calls = run_sh(sandbox, command)
        assert ["cd", stack] in calls, (command, calls)
        docker = [c for c in calls if c[:2] == ["docker", "compose"]]
        assert docker and all(c[2:4] == ["-p", project] for c in docker), calls
        assert all(service in c for c in docker if "config" not in c), calls


@fuzz(60)
@given(url=hostile, keyring=hostile)
def test_key_command_quotes_whatever_it_is_given(sandbox, url, keyring):
    calls = run_sh(sandbox, key_command("https://k.example/" + url, "/k/" + keyring))
    assert ["curl", "-fsSL", "--", "https://k.example/" + url] in calls, calls
    assert ["chmod", "0644", "/k/" + keyring] in calls, calls
