"""The fleet's Grafana dashboard, built with Grafana's own grafana-foundation-sdk, and the
provisioning files that point a Grafana at it and at Prometheus.

Panels follow what the services themselves export (``gpufleet.bench.servermetrics`` names
them): llama-server's ``llamacpp:*`` counters and gauges (no histograms: latency per token is
seconds over tokens), vLLM's ``vllm:*`` with its TTFT and end-to-end histograms, as vLLM's own
dashboards chart them; GPU panels read the recording rules of ``gpufleet.monitor.rules``, so
dcgm-exporter, node_exporter's meminfo (GB10, Jetson) and gpufleet's textfile show as one
series per GPU. ``PANELS`` lists every query: the unit tests run each one against a real
Prometheus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gpufleet.monitor.rules import GPU_MEMORY, GPU_UTIL, SCRAPED

UID = "gpufleet-fleet"
DATASOURCE_UID = "gpufleet-prometheus"
WINDOW = "$__rate_interval"


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    kind: str = "timeseries"  # or "table" (an instant query per row)
    description: str = ""


def _rate(name: str) -> str:
    return f"sum by (host, service, model) (rate({name}[{WINDOW}]))"


def _per(seconds: str, tokens: str) -> str:
    return f"{_rate(seconds)} / {_rate(tokens)}"


def _quantile(q: float, name: str) -> str:
    return (
        f"histogram_quantile({q}, sum by (le, host, service, model) "
        f"(rate({name}_bucket[{WINDOW}])))"
    )


PANELS: tuple[Panel, ...] = (
    Panel(
        "Release per host",
        "none",
        (("gpufleet_release_info", "{{host}} {{release}}"),),
        kind="table",
        description="The release each host runs, from gpufleet's textfile",
    ),
    Panel(
        "Releases per group",
        "none",
        (("gpufleet:group_releases:count", "{{group}}"),),
        description="More than 1: a group runs mixed releases (a rollout half way)",
    ),
    Panel("Drift: changes to apply", "none", (("gpufleet_drift_changes", "{{host}}"),)),
    Panel(
        "Services up (scraped)",
        "none",
        (
            (f"up{{{SCRAPED}}}", "{{host}} {{service}}"),
            ("gpufleet_service_healthy", "{{host}} {{service}} health"),
        ),
    ),
    Panel("Model files verified", "none", (("gpufleet_model_verified", "{{host}} {{file}}"),)),
    Panel("GPU utilisation", "percent", ((GPU_UTIL, "{{host}} GPU {{gpu}} ({{source}})"),)),
    Panel("GPU memory used", "percentunit", ((GPU_MEMORY, "{{host}} GPU {{gpu}} ({{source}})"),)),
    Panel(
        "llama.cpp tokens/s",
        "short",
        (
            (_rate("llamacpp:prompt_tokens_total"), "{{host}} {{service}} prompt"),
            (_rate("llamacpp:tokens_predicted_total"), "{{host}} {{service}} generated"),
        ),
    ),
    Panel(
        "llama.cpp requests",
        "short",
        (
            ("llamacpp:requests_processing", "{{host}} {{service}} processing"),
            ("llamacpp:requests_deferred", "{{host}} {{service}} deferred"),
        ),
    ),
    Panel(
        "llama.cpp seconds per token",
        "s",
        (
            (
                f"{_rate('llamacpp:tokens_predicted_seconds_total')} / "
                f"{_rate('llamacpp:tokens_predicted_total')}",
                "{{host}} {{service}} decode",
            ),
            (
                _per("llamacpp:prompt_seconds_total", "llamacpp:prompt_tokens_total"),
                "{{host}} {{service}} prompt",
            ),
        ),
    ),
    Panel(
        "vLLM requests",
        "short",
        (
            ("vllm:num_requests_running", "{{host}} {{service}} running"),
            ("vllm:num_requests_waiting", "{{host}} {{service}} waiting"),
            (_rate("vllm:request_success_total"), "{{host}} {{service}} finished/s"),
        ),
    ),
    Panel(
        "vLLM tokens/s",
        "short",
        (
            (_rate("vllm:prompt_tokens_total"), "{{host}} {{service}} prompt"),
            (_rate("vllm:generation_tokens_total"), "{{host}} {{service}} generated"),
        ),
    ),
    Panel(
        "vLLM latency",
        "s",
        (
            (_quantile(0.5, "vllm:time_to_first_token_seconds"), "{{host}} TTFT p50"),
            (_quantile(0.95, "vllm:time_to_first_token_seconds"), "{{host}} TTFT p95"),
            (_quantile(0.95, "vllm:e2e_request_latency_seconds"), "{{host}} E2E p95"),
        ),
    ),
    Panel("vLLM KV cache", "percentunit", (("vllm:kv_cache_usage_perc", "{{host}} {{service}}"),)),
)


def queries() -> list[str]:
    """Every PromQL query of the dashboard, in panel order."""
    return [expr for panel in PANELS for expr, _ in panel.queries]


def build() -> dict:
    """The dashboard as Grafana's JSON model."""
    from grafana_foundation_sdk.builders import dashboard, prometheus, table, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    source = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
    board = (
        dashboard.Dashboard("gpufleet: fleet")
        .uid(UID)
        .tags(["gpufleet"])
        .refresh("1m")
        .time("now-6h", "now")
        .timezone("browser")
    )
    for panel in PANELS:
        builder = table.Panel() if panel.kind == "table" else timeseries.Panel()
        builder = builder.title(panel.title).datasource(source).unit(panel.unit).span(12)
        if panel.description:
            builder = builder.description(panel.description)
        for ref, (expr, legend) in zip("ABCDEFGH", panel.queries, strict=False):
            query = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)
            query = query.datasource(source)
            builder = builder.with_target(query.instant() if panel.kind == "table" else query)
        board = board.with_panel(builder)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def datasource_provisioning(url: str = "http://prometheus:9090") -> dict:
    """Grafana's ``provisioning/datasources`` file: Prometheus, with the uid panels name."""
    return {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "gpufleet Prometheus",
                "type": "prometheus",
                "uid": DATASOURCE_UID,
                "access": "proxy",
                "url": url,
                "isDefault": True,
                "editable": False,
            }
        ],
    }


def dashboard_provisioning(path: str = "/var/lib/grafana/dashboards") -> dict:
    """Grafana's ``provisioning/dashboards`` file: load every dashboard JSON in ``path``."""
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "gpufleet",
                "folder": "gpufleet",
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
                "options": {"path": path},
            }
        ],
    }
