"""Operation fixtures, pyinfra style: arguments in, commands (or an error) out.

Each ``tests/operations/<module>.<op>/<case>.json`` holds ``args``, ``kwargs`` and either
``commands`` or ``exception``. A ``content`` kwarg is wrapped in ``ops.Secret`` as callers do.
gpufleet's operations carry out a change the plan decided, so their no-change twins are plan
fixtures (``tests/plans/``): there, the same state gives no change and no operation.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from pyinfra.api import FunctionCommand, OperationError, StringCommand
from pyinfra.context import ctx_host

from gpufleet import ops

FIXTURES = Path(__file__).parent / "operations"
CASES = sorted(FIXTURES.glob("*/*.json"))


class FakeHost:
    name = "testhost"
    print_prefix = "[testhost] "

    def __init__(self, facts: dict) -> None:
        self.facts = facts
        self.noops: list[str] = []
        self.data = {}

    def noop(self, description: str) -> None:
        self.noops.append(description)

    def get_fact(self, cls, **kwargs):
        return self.facts[cls.name]


def _render(command) -> str:
    if isinstance(command, StringCommand):
        return command.get_raw_value()
    if isinstance(command, FunctionCommand):
        return f"function:{command.function.__name__}"
    return str(command)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.stem}" for c in CASES])
def test_operation(case: Path):
    spec = json.loads(case.read_text())
    module, name = case.parent.name.rsplit(".", 1)
    op = getattr(importlib.import_module(f"gpufleet.{module}"), name)
    kwargs = dict(spec.get("kwargs", {}))
    if "content" in kwargs:
        kwargs["content"] = ops.Secret(kwargs["content"])
    fake = FakeHost(spec.get("facts", {}))
    with ctx_host.use(fake):
        if "exception" in spec:
            with pytest.raises(OperationError) as err:
                list(op._inner(*spec.get("args", []), **kwargs))
            assert str(err.value) == spec["exception"]
            return
        commands = [_render(c) for c in op._inner(*spec.get("args", []), **kwargs)]
    assert commands == spec["commands"]
    assert fake.noops == []  # the plan decided: an operation always has work


def test_secret_never_prints():
    secret = ops.Secret("hf_abcdef")
    assert "hf_abcdef" not in repr(secret) and "hf_abcdef" not in str(secret)
    command = FunctionCommand(ops._write_secret_file, ("/x/.env", secret, "root", "root"), {})
    assert "hf_abcdef" not in repr(command)


def test_fetch_model_gets_its_retry_settings_and_never_the_token():
    args = ops.fetch_args("/usr/local/libexec/gpufleet/fetch-model", "http://hub/r/resolve/s/m.gguf",
                          "/m/m.gguf", "a" * 64, 120, "/opt/gpufleet/.env", attempts=6,
                          stall_seconds=30)  # fmt: skip
    assert args == ("env", "FETCH_ATTEMPTS=6", "FETCH_STALL_SECONDS=30",
                    "/usr/local/libexec/gpufleet/fetch-model", "http://hub/r/resolve/s/m.gguf",
                    "/m/m.gguf", "a" * 64, "120", "/opt/gpufleet/.env")  # fmt: skip
    defaults = ops.fetch_args("f", "u", "d", "a" * 64, 1, "e")
    assert defaults[1:3] == ("FETCH_ATTEMPTS=4", "FETCH_STALL_SECONDS=120")
