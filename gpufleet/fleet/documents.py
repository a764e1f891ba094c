"""The JSON documents the fleet commands print with ``--json``: one envelope, one model each.

Every document is one JSON object on stdout with the same envelope::

    {"schema": "gpufleet.<command>/1", "hosts": [{"host": "spark-01", ...}, ...], ...}

``schema`` names the command and the document's version; ``hosts`` is a list (never a dict
keyed by host), sorted by host name. Each document is a pydantic model below; its JSON Schema
is published in ``gpufleet/fleet/schemas/<command>.json`` (``python -m
gpufleet.fleet.documents`` writes them; a unit test fails when one is stale). No document
carries a secret value: ``.env`` files are described by key names and hashes only.

Exit status, the same for every command (``ExitCode``):

    ==== ========================================================================
    0    ok: done, in sync, nothing to report
    1    a host could not be done (unreachable, refused, failed), or the run failed
    2    drift found, or changes pending (``drift``, ``rollout --dry``)
    3    an SLO missed (``bench``)
    64   usage: an unknown option, a file that is not there, a value that does not parse
    ==== ========================================================================
"""

from __future__ import annotations

import json
import sys
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ExitCode(IntEnum):
    """The exit status of every ``gpufleet`` command (the one table, above)."""

    OK = 0
    HOST_FAILED = 1
    PENDING = 2
    SLO_MISSED = 3
    USAGE = 64


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2)


HostStatus = Literal["in-sync", "drift", "refused", "unreachable"]


class ReleasePair(_Doc):
    current: str | None = Field(description="The release the host runs now (None: never).")
    declared: str | None = Field(description="The release it runs once its plan is applied.")


# --- drift --------------------------------------------------------------------------------


class DriftItem(_Doc):
    """One planned change, in the order a converge applies it."""

    step: str = Field(description="One of gpufleet.core.wire.STEPS.")
    op: str = Field(description="One of gpufleet.core.wire.Op: what applying it does.")
    resource: str
    reason: str
    expected: str | None = None
    found: str | None = None
    action: str = Field(description="The op in words, for people.")


class FileDiff(_Doc):
    """What differs in one file or image (``drift --diff``); secret values never appear."""

    kind: Literal["compose", "env", "image", "dockerfile"]
    resource: str = Field(description="The file's path on the host, or the service's name.")
    diff: str = Field(description="A unified diff (for .env, of key names only).")


class DriftHost(_Doc):
    host: str
    group: str | None
    status: HostStatus
    reason: str | None = Field(description="refused/unreachable: one line, what and why.")
    release: ReleasePair | None
    items: list[DriftItem]
    diffs: list[FileDiff] = Field(default_factory=list, description="Only with --diff.")


class DriftSummary(_Doc):
    in_sync: int = Field(alias="in-sync")
    drift: int
    refused: int
    unreachable: int


class DriftDocument(_Doc):
    schema_: Literal["gpufleet.drift/1"] = Field("gpufleet.drift/1", alias="schema")
    deep: bool = Field(description="Model files were re-hashed (--deep).")
    hosts: list[DriftHost]
    summary: DriftSummary


# --- status -------------------------------------------------------------------------------


class GpuNow(_Doc):
    index: int
    name: str
    compute_cap: str | None
    util_pct: float | None
    memory_used_mib: float | None
    memory_total_mib: float | None
    memory_source: str | None
    power_w: float | None
    unsupported: list[str] = Field(description="Values this GPU cannot give (shown as null).")


class ServiceNow(_Doc):
    name: str
    kind: str
    port: int
    model: str | None
    image: str
    address: str
    health: str | None = Field(description='"ok", "HTTP 503", "no answer (...)" or null.')
    state: str | None
    uptime: str | None


class StatusHost(_Doc):
    host: str
    group: str | None
    status: HostStatus
    reason: str | None
    release: ReleasePair | None
    changes: int
    gpus: list[GpuNow] | None = None
    driver: str | None = None
    cuda: str | None = None
    l4t: str | None = None
    toolkit: str | None = None
    services: list[ServiceNow] | None = None


class StatusDocument(_Doc):
    schema_: Literal["gpufleet.status/1"] = Field("gpufleet.status/1", alias="schema")
    hosts: list[StatusHost]


# --- releases -----------------------------------------------------------------------------


class KeptRelease(_Doc):
    id: str
    current: bool
    recorded: float | None = Field(description="Epoch seconds it was recorded, if known.")
    manifest: dict[str, Any] | None = Field(description="The release manifest (no secrets).")


class ReleasesHost(_Doc):
    host: str
    status: Literal["ok", "unreachable", "failed"]
    reason: str | None = None
    releases: list[KeptRelease] = Field(description="Oldest first; the current one marked.")


class ReleasesDocument(_Doc):
    schema_: Literal["gpufleet.releases/1"] = Field("gpufleet.releases/1", alias="schema")
    hosts: list[ReleasesHost]


# --- rollout and rollback -----------------------------------------------------------------

# changed: on its new release; planned: has changes (--dry); unreachable: could not be reached
# or checked, left alone; refused: its gate refused it, left alone
Outcome = Literal[
    "changed", "rolled-back", "failed", "in-sync", "refused", "unreachable", "untouched", "planned"
]


class RolloutHost(_Doc):
    host: str
    outcome: Outcome = Field(description="Where the host stands after the run.")
    detail: str = Field(description="The same in words, for people.")


class RolloutDocument(_Doc):
    schema_: Literal["gpufleet.rollout/1", "gpufleet.rollback/1"] = Field(alias="schema")
    dry: bool
    batches: list[list[str]] = Field(description="Hosts in the order they are changed.")
    stopped: str | None = Field(description="Why the run stopped early, if it did.")
    hosts: list[RolloutHost]


# --- audit --------------------------------------------------------------------------------


class AuditHost(_Doc):
    host: str
    status: Literal["ok", "unreachable", "failed"]
    reason: str | None = None
    lines: list[dict[str, Any]] = Field(description="The host's audit lines, oldest first.")


class ControlAudit(_Doc):
    path: str
    lines: list[dict[str, Any]]


class AuditDocument(_Doc):
    schema_: Literal["gpufleet.audit/1"] = Field("gpufleet.audit/1", alias="schema")
    hosts: list[AuditHost]
    control: ControlAudit


# --- lock ---------------------------------------------------------------------------------


class LockHost(_Doc):
    host: str
    state: Literal["free", "leased", "expired", "invalid", "unreachable"]
    holder: str | None = None
    pid: int | None = None
    release: str | None = None
    message: str | None = Field(None, description="A maintenance window's reason.")
    expires: float | None = Field(None, description="Epoch seconds.")
    reason: str | None = Field(None, description="invalid/unreachable: one line, why.")


class LockStatusDocument(_Doc):
    schema_: Literal["gpufleet.lock-status/1"] = Field("gpufleet.lock-status/1", alias="schema")
    hosts: list[LockHost]


class LockWindowHost(_Doc):
    host: str
    state: Literal["held", "released", "free", "refused", "unreachable"]
    reason: str | None = Field(None, description="held: the reason; refused/unreachable: why.")


class LockAcquireDocument(_Doc):
    schema_: Literal["gpufleet.lock-acquire/1"] = Field("gpufleet.lock-acquire/1", alias="schema")
    held: bool = Field(description="True when every host is held (all or none).")
    lease: str = Field(description="The window's lease id.")
    message: str
    expires: float = Field(description="Epoch seconds.")
    hosts: list[LockWindowHost]


class LockReleaseDocument(_Doc):
    schema_: Literal["gpufleet.lock-release/1"] = Field("gpufleet.lock-release/1", alias="schema")
    hosts: list[LockWindowHost]


class LockBreakHost(_Doc):
    host: str
    removed: bool
    reason: str | None = None


class LockBreakDocument(_Doc):
    schema_: Literal["gpufleet.lock-break/1"] = Field("gpufleet.lock-break/1", alias="schema")
    hosts: list[LockBreakHost]


# --- logs ---------------------------------------------------------------------------------


class LogsHost(_Doc):
    host: str
    status: Literal["ok", "unreachable", "failed"]
    reason: str | None = None
    lines: list[str] = Field(description="The compose project's log lines, secrets masked.")


class LogsDocument(_Doc):
    schema_: Literal["gpufleet.logs/1"] = Field("gpufleet.logs/1", alias="schema")
    service: str | None
    hosts: list[LogsHost]


# --- bench --------------------------------------------------------------------------------
# The document gpufleet.bench.report.build_document makes (its docstring gives every field's
# unit); figures are named in gpufleet.bench.metrics.FIGURES.

Rate = float | Literal["inf"]


class BenchDataset(_Doc):
    name: Literal["random"]
    input_len: int = Field(description="Prompt tokens per request, chat template included.")
    output_len: int = Field(description="Completion tokens per request (ignore_eos).")


class BenchSettings(_Doc):
    levels: list[int | None] = Field(description="Concurrency per level (null: uncapped).")
    rate: Rate = Field(description="Poisson arrivals per second, or inf.")
    requests: int | None
    duration_s: float | None
    warmup: int
    max_tokens: int
    timeout_s: float
    seed: int
    body: dict[str, Any] = Field(description="Merged into every request (--body).")
    prompts: str = Field(description='"builtin", a prompt file\'s name, or "random".')
    dataset: BenchDataset | None = None
    auth: bool = Field(description="An API key was sent (never the key).")


class BenchTargetDoc(_Doc):
    host: str
    service: str
    kind: str
    model: str
    port: int


class BenchLevel(_Doc):
    concurrency: int | None
    rate: Rate
    started_at: float = Field(description="Epoch seconds.")
    ended_at: float = Field(description="Epoch seconds.")
    duration_s: float
    warmup_failures: int
    stopped: str | None = Field(description="Why the level stopped sending early, if it did.")
    prompt_tokens: int
    output_tokens: int
    usage_missing: int
    figures: dict[str, float | None] = Field(description="gpufleet.bench.metrics.FIGURES.")
    failures: dict[str, int] = Field(description="Failed requests per class.")
    server: dict[str, Any] | None = Field(description="The server's own counters, if any.")
    gpu: list[dict[str, Any]] | None = Field(description="GPU figures in this level's window.")
    requests: list[dict[str, Any]] | None = Field(None, description="Only with --save-requests.")


class BenchRun(_Doc):
    target: BenchTargetDoc
    release: str | None
    error: str | None = Field(description="Why this target was not benched, if it was not.")
    levels: list[BenchLevel]
    gpu: dict[str, Any] | None
    baseline: list[dict[str, Any]]
    slo: list[dict[str, Any]]
    slo_missed: bool


class BenchHost(_Doc):
    host: str
    runs: list[BenchRun] = Field(description="One per service, in the order benched.")


class BenchDocument(_Doc):
    schema_: Literal["gpufleet.bench/1"] = Field("gpufleet.bench/1", alias="schema")
    created: str = Field(description="UTC, ISO 8601.")
    gpufleet: str = Field(description="The gpufleet version that measured.")
    settings: BenchSettings
    slo_missed: bool = Field(description="A run missed an SLO (bench exits 3).")
    hosts: list[BenchHost]


# --- the published schemas ----------------------------------------------------------------

DOCUMENTS: dict[str, type[_Doc]] = {
    "drift": DriftDocument,
    "status": StatusDocument,
    "releases": ReleasesDocument,
    "rollout": RolloutDocument,
    "audit": AuditDocument,
    "lock-status": LockStatusDocument,
    "lock-break": LockBreakDocument,
    "lock-acquire": LockAcquireDocument,
    "lock-release": LockReleaseDocument,
    "logs": LogsDocument,
    "bench": BenchDocument,
}
SCHEMAS = Path(__file__).with_name("schemas")


def json_schema(name: str) -> str:
    """The published text of one document's JSON Schema (stable: sorted keys, one newline)."""
    schema = DOCUMENTS[name].model_json_schema(by_alias=True)
    schema["$id"] = f"https://gpufleet.invalid/schemas/{name}.json"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(directory: Path = SCHEMAS) -> list[Path]:
    """Write every document's schema; returns the files that changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = []
    for name in DOCUMENTS:
        path = directory / f"{name}.json"
        text = json_schema(name)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


if __name__ == "__main__":
    for path in write_schemas():
        print(f"wrote {path}", file=sys.stderr)
