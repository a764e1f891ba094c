"""Malformed facts fail their host alone: Hypothesis corrupts the real outputs of every fact.

Each case takes a fixture's output (``tests/facts/<module>.<Fact>/*.json``: what real hosts
printed) and breaks it the way a host breaks it: cut short at any line or inside one, a marker
line half-written, garbage or a repeated line inserted, a number that is not one, a field too
many or too few, a daemon.json that is not JSON (or JSON of another shape), a model file's stamp
half-written. The parser then either returns a value or raises ``FactProcessError``, the one
error pyinfra confines to the host that printed the output, with a one-line message; any other
exception would end the whole run. A host snapshot that still parses must also plan.
"""

from __future__ import annotations

import importlib
import json
import re
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyinfra.api.exceptions import FactProcessError

from facts._sections import MARKER
from gpufleet.core.render import public_env
from gpufleet.core.schema import GROUPS
from gpufleet.core.snapshot import Snapshot
from gpufleet.plan.gate import check_host
from gpufleet.plan.host import plan_host
from tests.support.fuzz import CaseClock, fuzz, nasty_text, report
from tests.support.plans import config_for, control_for, converged

FIXTURES = Path(__file__).parent
# every fact with fixtures, and a kept release as `gpufleet rollback` reads it (made here)
FACTS = sorted(
    [path.name for path in FIXTURES.iterdir() if any(path.glob("*.json"))]
    + ["statedir.ReleaseRecord"]
)
CLOCKS = {
    name: CaseClock(f"facts {name}") for name in [*FACTS, "planned snapshots", "gated identities"]
}


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    report(request, list(CLOCKS.values()))


@cache
def outputs(fact: str) -> list[tuple[str, list[str]]]:
    """``(case name, output lines)`` of each fixture of a fact."""
    if fact == "statedir.ReleaseRecord":
        return [(group, _release_record(group)) for group in ("spark", "jetson")]
    paths = sorted((FIXTURES / fact).glob("*.json"))
    # fixtures write markers without this run's nonce
    texts = [(path.stem, path.read_text().replace("##gpufleet:", MARKER)) for path in paths]
    return [(stem, json.loads(text)["output"]) for stem, text in texts]


def _release_record(group: str) -> list[str]:
    """What ``ReleaseRecord`` reads of the release a converge of ``group`` records."""
    config, control = _config(group, "aarch64")
    identity = Snapshot.model_validate(converged(config, control)).identity
    release = plan_host(config, Snapshot(identity=identity), control).release
    images = [f"{name}\t{svc.image}\tsha256:{'b' * 64}" for name, svc in release.services.items()]
    return [
        f"{MARKER}release.manifest id={release.id}",
        *release.manifest().splitlines(),
        f"{MARKER}release.images",
        *images,
        f"{MARKER}release.env",
        *public_env(config).splitlines(),
    ]


def fact_class(fact: str):
    module, name = fact.split(".")
    return getattr(importlib.import_module(f"facts.{module}"), name)


# --- corruptions ------------------------------------------------------------------------------

_JSON_SHAPES = st.sampled_from([
    "[]", "null", "1", '"x"', "{", '{"runtimes": ', '{"runtimes": []}', '{"runtimes": "nvidia"}',
    '{"runtimes": {"nvidia": "x"}}', '{"runtimes": {"nvidia": null}}', '{"default-runtime": 5}',
    '{"default-runtime": ["nvidia"]}', '{"features": {"cdi": "yes"}}', '{"features": []}',
    '{"runtimes": {"1": {}}}', "{\"a\": NaN}", '{"a": 1e400}', '{"a": ' + "1" * 5000 + "}",
    "[" * 5000 + "]" * 5000, '{"id": 1, "holder": []}', '{"labels": [1]}', '{"a": 1}', "{}",
])  # fmt: skip
_NUMBERS = st.sampled_from(["", "-1", "0", "x", "1.5", "1e9", "N/A", "[N/A]", "²", "١٢", "0x10",
                            "99999999999999999999999999", " ", "--", "1 2", "+1"])  # fmt: skip


@st.composite
def garbage_line(draw, output: list[str]) -> str:
    markers = sorted({line for line in output if line.startswith(MARKER)})
    return draw(st.one_of(
        nasty_text,
        _JSON_SHAPES,
        st.sampled_from([MARKER, MARKER + " ", MARKER + "x", MARKER + "a=b", "##gpufleet", "\t",
                         "\t\t", "c\t", "i\t", "file\t", "dir\t", "x\ty\tz", "a\tb\tc\td\te\tf"]),
        st.sampled_from(markers or [MARKER]),
        nasty_text.map(lambda s: MARKER + s),
    ))  # fmt: skip


def _sections(lines: list[str]) -> list[tuple[int, int]]:
    """``(first, end)`` of each section's body in ``lines``."""
    starts = [i for i, line in enumerate(lines) if MARKER in line]
    return [(s + 1, e) for s, e in zip(starts, [*starts[1:], len(lines)], strict=False)]


@st.composite
def corrupted(draw, output: list[str]) -> list[str]:
    lines = list(output)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from([
            "truncate", "cut", "cut", "insert", "replace", "duplicate", "delete", "number",
            "number", "fields", "section", "json", "stamp",
        ]))  # fmt: skip
        if not lines:
            lines.append(draw(garbage_line(output)))
            continue
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        if how == "truncate":  # the connection dropped after a line
            lines = lines[:i]
        elif how == "cut":  # ... or in the middle of one
            lines[i] = line[: draw(st.integers(0, max(len(line) - 1, 0)))]
            if draw(st.booleans()):
                lines = lines[: i + 1]
        elif how == "insert":
            lines.insert(i, draw(garbage_line(output)))
        elif how == "replace":
            lines[i] = draw(garbage_line(output))
        elif how == "duplicate":
            lines.insert(i, lines[draw(st.integers(0, len(lines) - 1))])
        elif how == "delete":
            del lines[i]
        elif how == "number":  # a number that is not one, too big, negative, a unicode digit
            runs = list(re.finditer(r"\d+", line))
            if runs:
                run = draw(st.sampled_from(runs))
                lines[i] = line[: run.start()] + draw(_NUMBERS) + line[run.end() :]
        elif how == "fields":  # a tab-separated field more, fewer or replaced
            fields = line.split("\t")
            j = draw(st.integers(0, len(fields) - 1))
            action = draw(st.sampled_from(["drop", "add", "replace", "join"]))
            if action == "drop":
                del fields[j]
            elif action == "add":
                fields.insert(j, draw(nasty_text))
            elif action == "replace":
                fields[j] = draw(st.one_of(nasty_text, _NUMBERS))
            lines[i] = (" " if action == "join" else "\t").join(fields)
        elif how == "section":  # a section's body replaced by garbage
            spans = _sections(lines)
            if spans:
                first, end = draw(st.sampled_from(spans))
                lines[first:end] = draw(st.lists(garbage_line(output), max_size=3))
        elif how == "json":  # daemon.json, a lease, a manifest, image labels: another shape
            spans = [(f, e) for f, e in _sections(lines)
                     if any(ln.lstrip().startswith(("{", "[")) for ln in lines[f:e])]  # fmt: skip
            if spans:
                first, end = draw(st.sampled_from(spans))
                lines[first:end] = [draw(_JSON_SHAPES)]
            elif "{" in line:
                lines[i] = line[: line.index("{")] + draw(_JSON_SHAPES)
        else:  # stamp: a model file's .verified half-written, or a stat that is not one
            files = [k for k, ln in enumerate(lines) if re.match(r"file\t.*\t.*\t", ln)]
            if files:
                k = draw(st.sampled_from(files))
                parts = lines[k].split("\t")
                column = draw(st.integers(2, len(parts) - 1))
                value = parts[column]
                half = st.just(value[: len(value) // 2])
                parts[column] = draw(st.one_of(half, _NUMBERS, nasty_text))
                lines[k] = "\t".join(parts)
    # pyinfra hands a fact its stdout split into lines: no line holds a line break
    return [part for line in lines for part in line.split("\n")]


# --- the property -----------------------------------------------------------------------------

_REPR = re.compile(r"Traceback|File \"|\b\w*(Error|Exception)\(")


def parse(fact: str, lines: list[str]):
    """The fact's value, or None when it raised FactProcessError (checked: one line, short)."""
    try:
        return fact_class(fact)().process(lines)
    except FactProcessError as exc:
        message = str(exc)
        assert message.strip(), "an empty FactProcessError"
        assert "\n" not in message, f"a message over several lines: {message!r}"
        assert len(message) <= 1000, f"a message of {len(message)} characters"
        assert not _REPR.search(message), f"an exception's repr or a traceback: {message!r}"
        return None


@pytest.mark.parametrize("fact", FACTS)
def test_every_fixture_parses(fact: str) -> None:
    for _, lines in outputs(fact):
        fact_class(fact)().process(lines)


@pytest.mark.parametrize("fact", FACTS)
@fuzz(max_examples=250)
@given(data=st.data())
def test_corrupted_output_parses_or_fails_the_host_alone(fact: str, data) -> None:
    _, output = data.draw(st.sampled_from(outputs(fact)), label="fixture")
    lines = data.draw(corrupted(output), label="output")
    with CLOCKS[fact].case():
        parse(fact, lines)


# --- what a plan makes of a snapshot that still parses ---------------------------------------

GROUP_OF = {"sandbox_spark_converged": "spark", "sandbox_jetson_converged": "jetson"}


@cache
def _config(group: str, arch: str):
    config = config_for(group, gpu_arch=arch if arch in ("x86_64", "aarch64") else None)
    return config, control_for(config)


@fuzz(max_examples=300)
@given(data=st.data())
def test_a_corrupted_snapshot_that_parses_also_plans(data) -> None:
    name, output = data.draw(st.sampled_from(outputs("snapshot.HostSnapshot")), label="fixture")
    lines = data.draw(corrupted(output), label="output")
    with CLOCKS["planned snapshots"].case():
        snapshot = parse("snapshot.HostSnapshot", lines)
        if snapshot is None:
            return
        assert isinstance(snapshot, Snapshot)
        config, control = _config(GROUP_OF[name], snapshot.identity.host.arch)
        plan = plan_host(config, snapshot, control)
        assert plan.refusal is None or ("\n" not in plan.refusal and plan.refusal.strip())


@fuzz(max_examples=300)
@given(data=st.data())
def test_a_corrupted_identity_that_parses_goes_through_the_gate(data) -> None:
    _, output = data.draw(st.sampled_from(outputs("identity.HostIdentity")), label="fixture")
    lines = data.draw(corrupted(output), label="output")
    with CLOCKS["gated identities"].case():
        identity = parse("identity.HostIdentity", lines)
        if identity is None:
            return
        for group in GROUPS:
            gate = check_host(_config(group, "")[0].gpu, identity, group=group, model_bytes=1)
            for line in (*gate.failures, *gate.warnings):
                assert line.strip() and "\n" not in line, line
