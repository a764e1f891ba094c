"""What ``gpufleet drift`` prints: per host, each change with its reason, as text or JSON.

The JSON document (``gpufleet drift --json``) is a stable schema, ``gpufleet.drift/1``::

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
          ]
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

from gpufleet.fleet.runner import Run

SCHEMA = "gpufleet.drift/1"
STATUSES = ("in-sync", "drift", "refused", "unreachable")
EXIT_IN_SYNC, EXIT_ERROR, EXIT_DRIFT, EXIT_USAGE = 0, 1, 2, 64


def host_entries(run: Run) -> list[dict]:
    entries = []
    for report in run.report.ordered():
        entries.append(_entry(report))
    return sorted(entries, key=lambda e: e["host"])


def _entry(r) -> dict:
    """One host's drift entry from its report."""
    if r.unreachable or not r.planned:
        why = r.unreachable or (f"could not be read: {r.failed.why}" if r.failed else "not read")
        return {"host": r.host, "group": r.group, "status": "unreachable", "reason": why,
                "release": None, "items": []}  # fmt: skip
    items = [
        {"step": c.step, "op": c.op.value, "resource": c.resource, "reason": c.reason,
         "expected": c.expected, "found": c.found, "action": c.action}
        for c in r.changes
    ]  # fmt: skip
    status = "refused" if r.refusal else ("drift" if items else "in-sync")
    return {
        "host": r.host,
        "group": r.group,
        "status": status,
        "reason": r.refusal,
        "release": {"current": r.current, "declared": r.release_id},
        "items": items,
    }


def drift_document(run: Run, *, deep: bool = False) -> dict:
    hosts = host_entries(run)
    summary = {status: sum(h["status"] == status for h in hosts) for status in STATUSES}
    return {"schema": SCHEMA, "deep": deep, "hosts": hosts, "summary": summary}


def exit_code(doc: dict, run: Run) -> int:
    summary = doc["summary"]
    if run.fatal or summary["refused"] or summary["unreachable"] or not doc["hosts"]:
        return EXIT_ERROR
    return EXIT_DRIFT if summary["drift"] else EXIT_IN_SYNC


def render_text(doc: dict) -> list[str]:
    lines = []
    for h in doc["hosts"]:
        if h["status"] == "in-sync":
            lines.append(f"{h['host']}: in sync (release {h['release']['current']})")
        elif h["status"] == "drift":
            lines.append(f"{h['host']}: {len(h['items'])} to change")
            for item in h["items"]:
                lines.append(f"  - {item['step']} {item['resource']}: {item['reason']} "
                             f"-> {item['action']}")  # fmt: skip
        else:
            lines.append(f"{h['host']}: {h['status']}: {h['reason']}")
    s = doc["summary"]
    lines.append(
        f"{s['in-sync']} in sync, {s['drift']} drifted, {s['refused']} refused, "
        f"{s['unreachable']} unreachable"
    )
    return lines
