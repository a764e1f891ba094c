"""``gpufleet monitor``'s directory: Prometheus and Grafana configured for the fleet.

    DIR/compose.yaml                                  Prometheus and Grafana, on 127.0.0.1
    DIR/prometheus/prometheus.yml                     scrape jobs, rule files
    DIR/prometheus/targets/gpufleet.json              file_sd: one target per service
    DIR/prometheus/rules/gpufleet.rules.yml           recording rules and alerts
    DIR/prometheus/rules/gpufleet.rules.test.yml      promtool test rules: each alert fires
    DIR/grafana/dashboards/gpufleet-fleet.json        the dashboard
    DIR/grafana/provisioning/{datasources,dashboards}/gpufleet.yml

Paths inside ``prometheus.yml`` are relative to it, so ``promtool check config`` reads the
same files on the control machine as Prometheus does in its container. A keyed service's key
reaches Prometheus as a compose secret from its own source (``file:`` or ``env:``), mounted at
``/run/secrets/<NAME>``; no file here holds its value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.monitor import dashboard, rules, targets
from gpufleet.monitor.fleet import FleetHost

PROMETHEUS_IMAGE = "prom/prometheus:v2.55.1"
GRAFANA_IMAGE = "grafana/grafana:11.6.0"  # the grafana-foundation-sdk build the dashboard uses
SECRETS_DIR = "/run/secrets"


@dataclass
class Bundle:
    """What was written, and the targets left out (and why)."""

    files: list[Path] = field(default_factory=list)
    skipped: list[targets.Skipped] = field(default_factory=list)
    targets: int = 0


def prometheus_config(secrets: list[str], *, credentials_dir: str = SECRETS_DIR) -> dict:
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": ["rules/gpufleet.rules.yml"],
        "scrape_configs": targets.scrape_configs(
            secrets, file_sd="targets/gpufleet.json", credentials_dir=credentials_dir
        ),
    }


def compose_document(sources: dict[str, str], *, bind: str = "127.0.0.1") -> dict:
    """Prometheus and Grafana; each secret from its own source (never its value).

    + sources: secret name -> ``file:/path`` or ``env:VAR`` (``targets.credential_sources``)
    + bind: the address both ports are published on
    """
    prometheus: dict = {
        "image": PROMETHEUS_IMAGE,
        "restart": "unless-stopped",
        "command": [
            "--config.file=/etc/prometheus/prometheus.yml",
            "--storage.tsdb.path=/prometheus",
            "--storage.tsdb.retention.time=30d",
        ],
        "volumes": ["./prometheus:/etc/prometheus:ro", "prometheus-data:/prometheus"],
        "ports": [f"{bind}:9090:9090"],
    }
    if sources:
        prometheus["secrets"] = sorted(sources)
    grafana = {
        "image": GRAFANA_IMAGE,
        "restart": "unless-stopped",
        "depends_on": ["prometheus"],
        "volumes": [
            "./grafana/provisioning:/etc/grafana/provisioning:ro",
            "./grafana/dashboards:/var/lib/grafana/dashboards:ro",
            "grafana-data:/var/lib/grafana",
        ],
        "ports": [f"{bind}:3000:3000"],
    }
    doc: dict = {
        "name": "gpufleet-monitoring",
        "services": {"prometheus": prometheus, "grafana": grafana},
        "volumes": {"prometheus-data": {}, "grafana-data": {}},
    }
    if sources:
        doc["secrets"] = {}
        for name, source in sorted(sources.items()):
            kind, _, ref = source.partition(":")
            doc["secrets"][name] = {"file": ref} if kind == "file" else {"environment": ref}
    return doc


def write(
    out: Path,
    hosts: list[FleetHost],
    reports: dict[str, dict] | None = None,
    *,
    bind: str = "127.0.0.1",
    thresholds: rules.Thresholds | None = None,
) -> Bundle:
    """Write the whole directory; files are rewritten only when their content changed."""
    thresholds = thresholds or rules.Thresholds()
    groups, skipped = targets.targets(hosts, reports)
    sources = targets.credential_sources(hosts)
    files = {
        "compose.yaml": rules.dump(compose_document(sources, bind=bind)),
        "prometheus/prometheus.yml": rules.dump(prometheus_config(sorted(sources))),
        "prometheus/targets/gpufleet.json": json.dumps(groups, indent=2) + "\n",
        "prometheus/rules/gpufleet.rules.yml": rules.dump(rules.rules_document(thresholds)),
        "prometheus/rules/gpufleet.rules.test.yml": rules.dump(
            rules.rule_tests("gpufleet.rules.yml", thresholds)
        ),
        "grafana/dashboards/gpufleet-fleet.json": json.dumps(dashboard.build(), indent=2) + "\n",
        "grafana/provisioning/datasources/gpufleet.yml": rules.dump(
            dashboard.datasource_provisioning()
        ),
        "grafana/provisioning/dashboards/gpufleet.yml": rules.dump(
            dashboard.dashboard_provisioning()
        ),
    }
    bundle = Bundle(skipped=skipped, targets=len(groups))
    for relative, text in files.items():
        path = out / relative
        bundle.files.append(path)
        write_if_changed(path, text)
    return bundle


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` whole (temp file, rename) unless the file holds it already; Prometheus
    re-reads a file_sd file on change, so an unchanged one is left alone."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True
