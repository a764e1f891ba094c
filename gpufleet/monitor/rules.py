"""Prometheus rules for the fleet: recording rules the dashboard shares, and the alerts.

Every alert has a case for ``promtool test rules`` beside it (``rule_tests``): made-up series
that must make it fire, with the labels and annotations it fires with. ``gpufleet monitor``
writes both files; the unit tests run promtool on them.

GPU figures come from whichever source a host has, joined by recording rules so that a panel
or an alert reads one series per GPU:

- dcgm-exporter (discrete GPUs): ``DCGM_FI_DEV_GPU_UTIL``; ``FB_USED / (FB_USED + FB_FREE)``
- node_exporter on unified memory (GB10, Jetson; ``memory="unified"``): ``1 - MemAvailable /
  MemTotal``, the memory a GB10 model is loaded into
- gpufleet's textfile (no exporter): ``gpufleet_gpu_utilization_percent``,
  ``gpufleet_gpu_memory_used_bytes / gpufleet_gpu_memory_total_bytes``
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from string import Template

import yaml

GPU_UTIL = "gpufleet:gpu_utilization:percent"
GPU_MEMORY = "gpufleet:gpu_memory_used:ratio"
SCRAPED = 'job=~"gpufleet.*",kind!=""'


@dataclass(frozen=True)
class Thresholds:
    """How long before each alert fires, and how full is full.

    + down_for: a service not scraped / not healthy (5m)
    + drift_for: a host with changes to apply (30m: a rollout converges hosts one by one)
    + mixed_for: a group on two releases (1h: a gated rollout takes a while)
    + memory_for / memory_ratio: GPU memory above 0.95 for 10m
    + unverified_for: a model file not verified (5m)
    """

    down_for: str = "5m"
    drift_for: str = "30m"
    mixed_for: str = "1h"
    memory_for: str = "10m"
    memory_ratio: float = 0.95
    unverified_for: str = "5m"


RECORDING = [
    {
        "record": GPU_UTIL,
        "expr": 'label_replace(DCGM_FI_DEV_GPU_UTIL, "source", "dcgm", "", "")'
        " or gpufleet_gpu_utilization_percent",
    },
    {
        "record": GPU_MEMORY,
        "expr": "label_replace(DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE),"
        ' "source", "dcgm", "", "")'
        ' or label_replace(1 - node_memory_MemAvailable_bytes{memory="unified"}'
        ' / node_memory_MemTotal_bytes{memory="unified"}, "source", "meminfo", "", "")'
        " or gpufleet_gpu_memory_used_bytes / gpufleet_gpu_memory_total_bytes",
    },
    {
        "record": "gpufleet:group_releases:count",
        "expr": "count by (group) (count by (group, release) (gpufleet_release_info))",
    },
]


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    wait: str
    summary: str
    severity: str = "warning"
    # the promtool case: input series (name{labels} -> values), when to evaluate, and each
    # alert it fires: its labels and its summary as Prometheus renders it
    series: dict[str, str] = field(default_factory=dict)
    at: str = "20m"
    fires_with: tuple[tuple[dict[str, str], str], ...] = ()


def _info(host: str, group: str, release: str) -> str:
    return f'gpufleet_release_info{{host="{host}",group="{group}",release="{release}"}}'


_SPARK = {"host": "spark-01", "group": "spark"}
_UNIFIED = '{host="spark-01",group="spark",memory="unified"}'

# The alerts with their promtool cases. ``${name}`` in an expression or a wait stands for that
# field of ``Thresholds``, filled in by ``alerts``.
ALERTS = [
    Alert(
        "GpufleetServiceDown",
        f"up{{{SCRAPED}}} == 0",
        "${down_for}",
        "{{ $labels.host }}: {{ $labels.service }} ({{ $labels.kind }}) is not answering "
        "its /metrics",
        "critical",
        series={
            'up{job="gpufleet",host="spark-01",group="spark",service="llama",'
            'kind="llama-server",instance="spark-01:8000"}': "1 0x30",
        },
        fires_with=(
            (
                _SPARK
                | {"job": "gpufleet", "service": "llama", "kind": "llama-server"}
                | {"instance": "spark-01:8000"},
                "spark-01: llama (llama-server) is not answering its /metrics",
            ),
        ),
    ),
    Alert(
        "GpufleetServiceUnhealthy",
        "gpufleet_service_healthy == 0",
        "${down_for}",
        "{{ $labels.host }}: {{ $labels.service }} ({{ $labels.kind }}) failed its health "
        "endpoint when gpufleet last looked",
        "critical",
        series={
            'gpufleet_service_healthy{host="spark-01",group="spark",service="ollama",'
            'kind="ollama"}': "0x30",
        },
        fires_with=(
            (
                _SPARK | {"service": "ollama", "kind": "ollama"},
                "spark-01: ollama (ollama) failed its health endpoint when gpufleet last looked",
            ),
        ),
    ),
    Alert(
        "GpufleetDrift",
        "gpufleet_drift_changes > 0",
        "${drift_for}",
        "{{ $labels.host }} has {{ $value }} changes to apply (gpufleet drift says which)",
        series={'gpufleet_drift_changes{host="spark-01",group="spark"}': "0 3x60"},
        at="45m",
        fires_with=((_SPARK, "spark-01 has 3 changes to apply (gpufleet drift says which)"),),
    ),
    Alert(
        "GpufleetMixedReleases",
        "gpufleet:group_releases:count > 1",
        "${mixed_for}",
        "group {{ $labels.group }} runs {{ $value }} releases (a rollout that stopped half way?)",
        series={
            _info("spark-01", "spark", "aaaaaaaaaaaa"): "1x90",
            _info("spark-02", "spark", "bbbbbbbbbbbb"): "1x90",
            _info("ws-01", "rtx5090", "aaaaaaaaaaaa"): "1x90",
        },
        at="75m",
        fires_with=(
            (
                {"group": "spark"},
                "group spark runs 2 releases (a rollout that stopped half way?)",
            ),
        ),
    ),
    Alert(
        "GpufleetGpuMemoryNearFull",
        f"{GPU_MEMORY} > ${{memory_ratio}}",
        "${memory_for}",
        "{{ $labels.host }}: GPU memory {{ $value | humanizePercentage }} used "
        "({{ $labels.source }})",
        series={
            'DCGM_FI_DEV_FB_USED{host="ws-01",group="rtx5090",gpu="0"}': "32000x30",
            'DCGM_FI_DEV_FB_FREE{host="ws-01",group="rtx5090",gpu="0"}': "600x30",
            f"node_memory_MemAvailable_bytes{_UNIFIED}": "2000000000x30",
            f"node_memory_MemTotal_bytes{_UNIFIED}": "130000000000x30",
        },
        fires_with=(
            (
                {"host": "ws-01", "group": "rtx5090", "gpu": "0", "source": "dcgm"},
                "ws-01: GPU memory 98.16% used (dcgm)",
            ),
            (
                _SPARK | {"memory": "unified", "source": "meminfo"},
                "spark-01: GPU memory 98.46% used (meminfo)",
            ),
        ),
    ),
    Alert(
        "GpufleetModelUnverified",
        "gpufleet_model_verified == 0",
        "${unverified_for}",
        "{{ $labels.host }}: model {{ $labels.model }} file {{ $labels.file }} is not "
        "verified (size or sha256)",
        series={
            'gpufleet_model_verified{host="spark-01",group="spark",model="gpt-oss-20b",'
            'file="gpt-oss-20b-Q4_K_M.gguf"}': "0x30",
        },
        fires_with=(
            (
                _SPARK | {"model": "gpt-oss-20b", "file": "gpt-oss-20b-Q4_K_M.gguf"},
                "spark-01: model gpt-oss-20b file gpt-oss-20b-Q4_K_M.gguf is not verified "
                "(size or sha256)",
            ),
        ),
    ),
]


def alerts(t: Thresholds = Thresholds()) -> list[Alert]:
    """The fleet's alerts (``ALERTS`` with the thresholds filled in), each with a promtool case
    that makes it fire."""
    values = asdict(t)

    def fill(text: str) -> str:
        return Template(text).substitute(values)

    return [replace(a, expr=fill(a.expr), wait=fill(a.wait)) for a in ALERTS]


def rules_document(t: Thresholds = Thresholds()) -> dict:
    """The rule file: ``groups`` of recording rules and alerts."""
    return {
        "groups": [
            {"name": "gpufleet-recording", "rules": RECORDING},
            {
                "name": "gpufleet-alerts",
                "rules": [
                    {
                        "alert": a.name,
                        "expr": a.expr,
                        "for": a.wait,
                        "labels": {"severity": a.severity},
                        "annotations": {"summary": a.summary},
                    }
                    for a in alerts(t)
                ],
            },
        ]
    }


def rule_tests(rules_file: str, t: Thresholds = Thresholds()) -> dict:
    """``promtool test rules`` input: each alert fires on its made-up series, with exactly
    the labels and the rendered summary it lists."""
    tests = []
    for a in alerts(t):
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in a.series.items()],
                "alert_rule_test": [
                    {
                        "eval_time": a.at,
                        "alertname": a.name,
                        "exp_alerts": [
                            {
                                "exp_labels": labels | {"severity": a.severity},
                                "exp_annotations": {"summary": summary},
                            }
                            for labels, summary in a.fires_with
                        ],
                    }
                ],
            }
        )
    return {"rule_files": [rules_file], "evaluation_interval": "1m", "tests": tests}


def dump(document: dict) -> str:
    return yaml.safe_dump(document, sort_keys=False, width=100)
