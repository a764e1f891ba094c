"""What ``gpufleet drift`` prints: per host, each change with its reason, as text or JSON.

The JSON document (``gpufleet drift --json``) is ``documents.DriftDocument``, published as
``gpufleet/fleet/schemas/drift.json``, ``gpufleet.drift/1``::

    {
      "schema": "gpufleet.drift/1",
      "deep": false,                       # model files re-hashed (--deep)
      "hosts": [
        {
          "host": "sandbox-spark",
          "group": "spark",                # null when the host could not be read
          "status": "drift",               # in-sync | drift | refused | unreachable
          "reason": null,                  # refused/unreachable: one line, what and why
          "release": {"current": "3f9c2a1b7d0e", "declared": "a1b2c3d4e5f6"},
          "items": [
            {"step": "env", "op": "write", "resource": "/opt/gpufleet/.env",
             "reason": "file 644 root:root found, file 600 root:root declared",
             "expected": "file 600 root:root", "found": "file 644 root:root",
             "action": "write (0600, atomically)"}
          ],
          "diffs": []                      # --diff: FileDiff (compose, env names, image)
        }
      ],
      "summary": {"in-sync": 2, "drift": 1, "refused": 0, "unreachable": 0}
    }

``items`` are the plan's changes in the order a converge applies them; ``step`` is one of
``gpufleet.core.wire.STEPS``, ``op`` one of ``gpufleet.core.wire.Op`` (what applying it
does; ``action`` says the same in words). No secret value appears anywhere: the ``.env`` is
compared by hash and reported by mode and owner only, and any text taken from a host is masked.

Exit status: 0 every host in sync, 2 drift found, 1 a host could not be checked (refused or
unreachable) or the run failed, 64 a usage error.
"""

from __future__ import annotations

from gpufleet.fleet.documents import (
    DriftDocument,
    DriftHost,
    DriftItem,
    DriftSummary,
    ExitCode,
    ReleasePair,
)
from gpufleet.fleet.runner import Run

SCHEMA = "gpufleet.drift/1"


def host_entries(run: Run) -> list[DriftHost]:
    return sorted((_entry(r) for r in run.report.ordered()), key=lambda e: e.host)


def _item(c) -> DriftItem:
    return DriftItem(
        step=c.step,
        op=c.op.value,
        resource=c.resource,
        reason=c.reason,
        expected=c.expected,
        found=c.found,
        action=c.action,
    )


def _entry(r) -> DriftHost:
    """One host's drift entry from its report."""
    if r.unreachable or not r.planned:
        why = r.unreachable or (f"could not be read: {r.failed.why}" if r.failed else "not read")
        return DriftHost(
            host=r.host, group=r.group, status="unreachable", reason=why, release=None, items=[]
        )
    items = [_item(c) for c in r.changes]
    status = "refused" if r.refusal else ("drift" if items else "in-sync")
    release = ReleasePair(current=r.current, declared=r.release_id)
    return DriftHost(
        host=r.host, group=r.group, status=status, reason=r.refusal, release=release, items=items
    )


def drift_document(run: Run, *, deep: bool = False) -> DriftDocument:
    hosts = host_entries(run)
    counts = {s: sum(h.status == s for h in hosts) for s in ("in-sync", "drift", "refused")}
    counts["unreachable"] = sum(h.status == "unreachable" for h in hosts)
    return DriftDocument(deep=deep, hosts=hosts, summary=DriftSummary(**counts))


def exit_code(doc: DriftDocument, run: Run) -> ExitCode:
    """1 a host could not be checked (or none was), 2 drift, 0 in sync."""
    s = doc.summary
    if run.fatal or s.refused or s.unreachable or not doc.hosts:
        return ExitCode.HOST_FAILED
    return ExitCode.PENDING if s.drift else ExitCode.OK


def render_text(doc: DriftDocument) -> list[str]:
    lines = []
    for h in doc.hosts:
        if h.status == "in-sync":
            lines.append(f"{h.host}: in sync (release {h.release.current})")
        elif h.status == "drift":
            lines.append(f"{h.host}: {len(h.items)} to change")
            lines += [f"  - {i.step} {i.resource}: {i.reason} -> {i.action}" for i in h.items]
        else:
            lines.append(f"{h.host}: {h.status}: {h.reason}")
        for d in h.diffs:
            lines += [f"    {line}" for line in d.diff.splitlines()]
    s = doc.summary
    lines.append(
        f"{s.in_sync} in sync, {s.drift} drifted, {s.refused} refused, {s.unreachable} unreachable"
    )
    return lines
