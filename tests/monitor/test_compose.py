"""The compose files monitoring writes, read by the real Compose v2 (no engine needed)."""

from __future__ import annotations

import json

import pytest

from deploys.metrics import dcgm_compose
from gpufleet.monitor import bundle
from tests.support.plans import config_for
from tests.test_services import compose, compose_bin  # noqa: F401 - the fixture


def test_dcgm_exporter_runs_as_its_own_project_with_the_gpus(compose_bin, tmp_path):  # noqa: F811
    config = config_for("rtx5090", monitor_dcgm_exporter=True, monitor_dcgm_port=9401)
    text = compose(compose_bin, tmp_path, dcgm_compose(config), "config", "--format", "json")
    doc = json.loads(text)
    assert doc["name"] == "gpufleet-monitoring"  # not the stack's: its hash is untouched
    svc = doc["services"]["dcgm-exporter"]
    assert svc["ports"][0]["published"] == "9401" and svc["ports"][0]["target"] == 9400
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.parametrize("source", ["file", "env"])
def test_prometheus_and_grafana_compose_with_the_key_as_a_secret(compose_bin, tmp_path, source):  # noqa: F811
    (tmp_path / "key").write_text("sk-value\n")
    ref = f"file:{tmp_path / 'key'}" if source == "file" else "env:LLAMA_KEY"
    text = bundle.rules.dump(bundle.compose_document({"LLAMA_API_KEY": ref}))
    doc = json.loads(compose(compose_bin, tmp_path, text, "config", "--format", "json"))
    assert set(doc["services"]) == {"prometheus", "grafana"}
    # where the scrape job's credentials_file points
    [secret] = doc["services"]["prometheus"]["secrets"]
    assert secret["target"] == f"{bundle.SECRETS_DIR}/LLAMA_API_KEY"
    assert doc["services"]["grafana"]["ports"][0]["host_ip"] == "127.0.0.1"
    assert "sk-value" not in text
