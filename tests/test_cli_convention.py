"""One CLI convention: --json documents valid against their published schemas, one exit-code
table, pyinfra options passed through, file arguments checked before any work."""

from __future__ import annotations

import json

import jsonschema
import pytest
from click.testing import CliRunner

from gpufleet import cli
from gpufleet.core.snapshot import Lease
from gpufleet.core.wire import ChangeRecord, HostReport, Op, RunReport
from gpufleet.fleet import documents, runner
from gpufleet.fleet.runner import Run
from tests.fleet.test_wire import _planned

CHANGE = ChangeRecord(
    step="recreate",
    op=Op.RECREATE,
    resource="llama",
    reason="running but its health endpoint gave no answer",
    action="recreate",
)


def _with_state(report: HostReport, **state) -> HostReport:
    snap = report.snapshot
    new_state = snap.state.model_copy(update=state)
    return report.model_copy(update={"snapshot": snap.model_copy(update={"state": new_state})})


def _run(*reports: HostReport) -> Run:
    hosts = {r.host: r for r in reports}
    return Run(rc=0, report=RunReport(hosts=hosts, order=tuple(hosts)))


@pytest.fixture
def fleet(monkeypatch, tmp_path):
    """``runner.run`` answers with the run ``fleet.run`` holds; each call's arguments kept."""

    class Fleet:
        run: Run = _run(_planned("spark", "spark-01"))
        calls: list[dict] = []

    def fake(inventory, deploy, **kw):
        Fleet.calls.append({"inventory": inventory, "deploy": deploy, **kw})
        return Fleet.run

    monkeypatch.setattr(runner, "run", fake)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hosts.py").write_text("spark = []\n")
    Fleet.calls = []
    return Fleet


def _invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def _valid(name: str, text: str) -> dict:
    """The document parsed, and valid against its *published* schema (the file, not the model)."""
    doc = json.loads(text)
    schema = json.loads((documents.SCHEMAS / f"{name}.json").read_text())
    jsonschema.validate(doc, schema)
    assert isinstance(doc["hosts"], list)
    assert doc["schema"].startswith("gpufleet.") and doc["schema"].endswith("/1")
    return doc


# --- published schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(documents.DOCUMENTS))
def test_each_published_schema_is_what_its_model_says(name):
    path = documents.SCHEMAS / f"{name}.json"
    assert path.read_text() == documents.json_schema(name), (
        f"{path} is stale: run `python -m gpufleet.fleet.documents`"
    )


def test_a_schema_rejects_a_dict_keyed_by_host():
    schema = json.loads((documents.SCHEMAS / "releases.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"schema": "gpufleet.releases/1", "hosts": {"a": []}}, schema)


# --- drift and status ----------------------------------------------------------------------


def test_drift_json_is_valid_and_exits_2_on_drift_0_in_sync(fleet):
    fleet.run = _run(_planned("spark", "spark-01", changes=(CHANGE,)))
    out = _invoke("drift", "hosts.py", "--json")
    doc = _valid("drift", out.stdout)
    assert out.exit_code == 2
    assert doc["hosts"][0]["status"] == "drift" and doc["summary"]["drift"] == 1
    assert doc["hosts"][0]["items"][0]["op"] == "recreate"
    fleet.run = _run(_planned("spark", "spark-01"))
    out = _invoke("drift", "hosts.py", "--json")
    assert out.exit_code == 0 and _valid("drift", out.stdout)["summary"]["in-sync"] == 1


def test_drift_and_status_exit_1_for_an_unreachable_host(fleet):
    fleet.run = _run(_planned("spark", "spark-01"), HostReport(host="gone", unreachable="timeout"))
    drift = _invoke("drift", "hosts.py", "--json")
    status = _invoke("status", "hosts.py", "--json")
    assert drift.exit_code == status.exit_code == 1
    doc = _valid("status", status.stdout)
    assert [h["status"] for h in doc["hosts"]] == ["unreachable", "in-sync"]
    assert doc["hosts"][1]["gpus"] and doc["hosts"][1]["services"]


def test_status_shows_drift_without_failing(fleet):
    fleet.run = _run(_planned("spark", "spark-01", changes=(CHANGE,)))
    out = _invoke("status", "hosts.py")
    assert out.exit_code == 0
    assert "drift (1)" in out.stdout


# --- releases, lock, audit -----------------------------------------------------------------


def test_releases_json_is_a_list_of_hosts_with_the_unreachable_named(fleet):
    a = _with_state(
        _planned("spark", "spark-01"),
        current="0123456789ab",
        releases=("aaaaaaaaaaaa", "0123456789ab"),
    )
    fleet.run = _run(a, HostReport(host="gone", unreachable="timeout"))
    out = _invoke("releases", "hosts.py", "--json")
    doc = _valid("releases", out.stdout)
    assert out.exit_code == 1
    assert [h["host"] for h in doc["hosts"]] == ["gone", "spark-01"]
    kept = doc["hosts"][1]["releases"]
    assert [(r["id"], r["current"]) for r in kept] == [
        ("aaaaaaaaaaaa", False),
        ("0123456789ab", True),
    ]


def test_a_leased_host_is_a_state_exit_0_and_a_bad_lease_file_is_1(fleet):
    lease = Lease(
        id="0123456789ab",
        holder="ann@ctl",
        control="ctl",
        pid=7,
        release="rollout",
        started=1.0,
        expires=4e9,
    )
    fleet.run = _run(_with_state(_planned("spark", "spark-01"), lease=lease))
    out = _invoke("lock", "status", "hosts.py", "--json")
    assert out.exit_code == 0, out.output
    host = _valid("lock-status", out.stdout)["hosts"][0]
    assert (host["state"], host["holder"], host["pid"]) == ("leased", "ann@ctl", 7)
    text = _invoke("lock", "status", "hosts.py")
    assert "leased by ann@ctl (pid 7)" in text.stdout and text.exit_code == 0
    fleet.run = _run(_with_state(_planned("spark", "spark-01"), lease_error="not a lease"))
    out = _invoke("lock", "status", "hosts.py", "--json")
    assert out.exit_code == 1
    assert _valid("lock-status", out.stdout)["hosts"][0]["state"] == "invalid"


def test_lock_break_json(fleet):
    fleet.run = _run(HostReport(host="a"), HostReport(host="b", unreachable="timeout"))
    out = _invoke("lock", "break", "hosts.py", "--json")
    doc = _valid("lock-break", out.stdout)
    assert [(h["host"], h["removed"]) for h in doc["hosts"]] == [("a", True), ("b", False)]
    assert out.exit_code == 1


def test_audit_json_carries_host_and_control_lines_as_objects(fleet):
    line = json.dumps({"action": "rollout", "result": "ok"})
    fleet.run = _run(_with_state(_planned("spark", "spark-01"), audit=(line, "garbage")))
    out = _invoke("audit", "hosts.py", "--json")
    doc = _valid("audit", out.stdout)
    assert out.exit_code == 0
    assert doc["hosts"][0]["lines"] == [{"action": "rollout", "result": "ok"}, {"text": "garbage"}]
    assert doc["control"]["lines"] == []


# --- rollout -------------------------------------------------------------------------------


def test_rollout_dry_json_lists_batches_and_exits_2_with_changes_pending(fleet):
    fleet.run = _run(_planned("spark", "spark-01", changes=(CHANGE,)), _planned("rtx5090", "ws"))
    out = _invoke("rollout", "hosts.py", "--dry", "--json")
    doc = _valid("rollout", out.stdout)
    assert out.exit_code == 2, out.output
    assert doc["schema"] == "gpufleet.rollout/1" and doc["batches"] == [["spark-01"]]
    outcomes = {h["host"]: h["outcome"] for h in doc["hosts"]}
    assert outcomes == {"spark-01": "planned", "ws": "in-sync"}
    # the twin: nothing to change is 0
    fleet.run = _run(_planned("spark", "spark-01"))
    out = _invoke("rollout", "hosts.py", "--dry", "--json")
    assert out.exit_code == 0 and _valid("rollout", out.stdout)["batches"] == []


def test_rollback_json_is_its_own_schema_tag(fleet):
    fleet.run = _run(_planned("spark", "spark-01"))
    out = _invoke("rollback", "hosts.py", "--dry", "--json")
    assert _valid("rollout", out.stdout)["schema"] == "gpufleet.rollback/1"


# --- pass-through and usage ----------------------------------------------------------------


def test_what_follows_the_double_dash_reaches_pyinfra(fleet):
    out = _invoke("drift", "hosts.py", "--limit", "a,b", "--", "--data", "x=1", "-v")
    assert out.exit_code == 0, out.output
    assert fleet.calls[0]["extra"] == ("--data", "x=1", "-v")
    assert fleet.calls[0]["limit"] == ("a,b",)
    _invoke("rollout", "hosts.py", "--dry", "--", "--parallel", "4")
    assert all(c["extra"] == ("--parallel", "4") for c in fleet.calls[1:])
    # without it, nothing extra
    _invoke("status", "hosts.py")
    assert fleet.calls[-1]["extra"] == ()


def test_project_group_data_goes_to_pyinfra(fleet, tmp_path):
    ops = tmp_path / "ops"
    (ops / "group_data").mkdir(parents=True)
    (ops / "fleet.py").write_text("spark = []\n")
    out = _invoke("--project", str(ops), "drift", "fleet.py", "--", "-v")
    assert out.exit_code == 0, out.output
    call = fleet.calls[0]
    assert call["inventory"] == str(ops / "fleet.py")
    assert call["extra"] == ("--group-data", str(ops / "group_data"), "-v")


@pytest.mark.parametrize(
    "args",
    [
        ("drift", "missing.py"),
        ("status", "missing.py", "--json"),
        ("lock", "status", "missing.py"),
        ("drift", "hosts.py", "--", "--dry"),
        ("rollout", "hosts.py", "--batch", "0"),
        ("bench", "hosts.py", "--compare", "missing.json"),
        ("bench", "hosts.py", "--prompts", "missing.jsonl"),
        ("bench", "hosts.py", "--json-file", "no/such/dir/out.json"),
        ("bench", "hosts.py", "--json", "out.json"),
        ("--project", "no-such-dir", "drift", "hosts.py"),
    ],
)
def test_bad_input_is_one_line_and_64_before_any_run(fleet, args):
    out = _invoke(*args)
    assert out.exit_code == 64, out.output
    assert fleet.calls == []
    assert "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1, out.output


def test_a_bad_compare_document_is_found_before_the_bench(fleet, tmp_path):
    (tmp_path / "old.json").write_text('{"schema": "something else"}')
    out = _invoke("bench", "hosts.py", "--compare", "old.json")
    assert out.exit_code == 64 and fleet.calls == []


def test_sandbox_status_not_running_is_1_never_3(monkeypatch):
    from gpufleet.sandbox import fleet as sandbox_fleet

    rows = [{"name": "s", "state": "exited", "ssh": "-", "groups": "spark"}]
    monkeypatch.setattr(sandbox_fleet, "status", lambda: rows)
    assert _invoke("sandbox", "status").exit_code == 1
    out = _invoke("sandbox", "status", "--json")
    assert out.exit_code == 1 and json.loads(out.stdout) == rows
    rows[0]["state"] = "running"
    assert _invoke("sandbox", "status").exit_code == 0


def test_the_exit_table_is_written_once_and_the_same_everywhere():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for code in documents.ExitCode:
        assert f"| {code.value} |" in readme
    assert [c.value for c in documents.ExitCode] == [0, 1, 2, 3, 64]
    assert "_GPUFLEET_COMPLETE=bash_source gpufleet" in readme


# --- init ----------------------------------------------------------------------------------


def test_init_writes_an_inventory_and_group_data_and_refuses_to_overwrite(tmp_path):
    out = _invoke("init", str(tmp_path / "ops"))
    assert out.exit_code == 0, out.output
    names = sorted(p.name for p in (tmp_path / "ops" / "group_data").iterdir())
    assert names == ["all.py", "jetson.py", "rtx5090.py", "spark.py"]
    inventory = (tmp_path / "ops" / "inventory.py").read_text()
    compile(inventory, "inventory.py", "exec")
    assert "never" in inventory and "drivers" in inventory
    again = _invoke("init", str(tmp_path / "ops"))
    assert again.exit_code == 64 and "--force" in again.output
    assert _invoke("init", str(tmp_path / "ops"), "--force").exit_code == 0


def test_drift_diff_runs_the_diff_deploy_and_its_json_carries_the_diffs(fleet):
    from gpufleet.fleet import diffs

    fleet.run = _run(_planned("spark", "spark-01", changes=(CHANGE,)))
    compose = diffs.compose_diff("a\n", "b\n", "/opt/gpufleet/compose.yaml", {})
    real = runner.run

    def writes_diffs(inventory, deploy, **kw):
        diffs.write(kw["env"][diffs.DIFF_DIR_ENV], "spark-01", [compose])
        return real(inventory, deploy, **kw)

    runner.run = writes_diffs
    out = _invoke("drift", "hosts.py", "--diff", "--json")
    doc = _valid("drift", out.stdout)
    assert out.exit_code == 2
    assert fleet.calls[0]["deploy"] == "deploys/diff.py"
    assert doc["hosts"][0]["diffs"] == [compose.model_dump()]
    text = _invoke("drift", "hosts.py", "--diff")
    assert "    +b" in text.stdout
    # the twin: a plain drift reads nothing more and carries no diffs
    runner.run = real
    plain = _invoke("drift", "hosts.py", "--json")
    assert fleet.calls[-1]["deploy"] == "deploys/fleet.py"
    assert json.loads(plain.stdout)["hosts"][0]["diffs"] == []


def test_logs_json_is_valid_masked_and_pyinfras_own_lines_left_out(fleet, monkeypatch):
    from types import SimpleNamespace

    config = SimpleNamespace(host="a", group="spark", secrets={"HF_TOKEN": "env:TEST_HF"})
    monkeypatch.setenv("TEST_HF", "hf_supersecret42")
    monkeypatch.setattr(cli, "_fleet", lambda *a: [SimpleNamespace(config=config)])
    seen = {}

    def spawn(args, env, *, on_line=None, interruptible=False):
        seen["args"] = args
        for line in ("    [a] Connected", "[a] llama-1 | key hf_supersecret42", "[a] ok"):
            on_line(line)
        return seen.get("rc", 0), "", False

    monkeypatch.setattr(runner, "spawn", spawn)
    out = _invoke("logs", "hosts.py", "--service", "llama", "--tail", "5", "--json", "--", "-v")
    doc = _valid("logs", out.stdout)
    assert out.exit_code == 0, out.output
    assert doc["hosts"] == [
        {"host": "a", "status": "ok", "reason": None, "lines": ["llama-1 | key <secret>", "ok"]}
    ]
    assert "hf_supersecret42" not in out.output
    assert "-v" in seen["args"] and seen["args"][-3:-1] == ["exec", "--"]
    assert "--tail 5" in seen["args"][-1] and "--follow" not in seen["args"][-1]
    seen["rc"] = 1
    assert _invoke("logs", "hosts.py").exit_code == 1
    assert _invoke("logs", "hosts.py", "--service", "a;b").exit_code == 64


def test_converge_streams_pyinfra_and_exits_by_the_report(fleet, monkeypatch):
    real = runner.run

    def streams(inventory, deploy, **kw):
        kw["on_line"]("    [spark-01] Step 3/9 : RUN cmake")
        return real(inventory, deploy, **kw)

    monkeypatch.setattr(runner, "run", streams)
    fleet.run = _run(_planned("spark", "spark-01"))
    out = _invoke("converge", "hosts.py", "--limit", "spark", "--", "--parallel", "4")
    assert out.exit_code == 0, out.output
    assert "[spark-01] Step 3/9 : RUN cmake" in out.stdout
    call = fleet.calls[0]
    assert (call["deploy"], call["dry"], call["extra"]) == (
        "deploys/fleet.py",
        False,
        ("--parallel", "4"),
    )
    # --dry with changes pending is 2; its no-change twin 0; a failed host 1
    fleet.run = _run(_planned("spark", "spark-01", changes=(CHANGE,)))
    assert _invoke("converge", "hosts.py", "--dry").exit_code == 2
    fleet.run = _run(_planned("spark", "spark-01"))
    assert _invoke("converge", "hosts.py", "--dry").exit_code == 0
    fleet.run = _run(HostReport(host="gone", unreachable="timeout"))
    out = _invoke("converge", "hosts.py")
    assert out.exit_code == 1 and "gone: timeout" in out.output
    # a host refused (a lease, a gate) is not done: named, and 1, in a run and a dry run
    held = _planned("spark", "spark-01").model_copy(update={"refusal": "held for maintenance"})
    fleet.run = _run(held)
    for args in ((), ("--dry",)):
        out = _invoke("converge", "hosts.py", *args)
        assert out.exit_code == 1 and "spark-01: refused: held for maintenance" in out.output


# --- bench's JSON --------------------------------------------------------------------------


@pytest.fixture
def standin_bench(fleet, monkeypatch):
    """``bench`` finds one target: a stand-in server (NOT llama-server), reached --direct."""
    from gpufleet.bench import run as bench_run
    from tests.bench.standin import standin_server
    from tests.bench.test_targets import _standin_target

    with standin_server("--template-tokens", "2") as url:
        monkeypatch.setattr(bench_run, "targets_from", lambda run, service=None: [
            _standin_target(url)])  # fmt: skip
        monkeypatch.setattr(bench_run, "Sampler", None)  # --direct without sampling below
        yield url


def _bench(*args: str):
    return _invoke("bench", "hosts.py", "--direct", "--requests", "3", "--warmup", "0", *args)


def test_bench_json_is_the_document_on_stdout_valid_against_its_schema(standin_bench, monkeypatch):
    from gpufleet.bench import run as bench_run

    real = bench_run.bench_target
    monkeypatch.setattr(bench_run, "bench_target", lambda t, **kw: real(t, **kw, sample_gpu=False))
    out = _bench("--json", "--dataset", "random", "--input-len", "12", "--output-len", "3")
    assert out.exit_code == 0, out.output
    doc = _valid("bench", out.stdout)
    assert doc["schema"] == "gpufleet.bench/1" and doc["hosts"][0]["host"] == "standin"
    assert doc["settings"]["dataset"] == {"name": "random", "input_len": 12, "output_len": 3}
    level = doc["hosts"][0]["runs"][0]["levels"][0]
    assert (level["prompt_tokens"], level["output_tokens"]) == (36, 9)  # 3 requests, exact
    assert "conc" in out.stderr  # the table went to stderr


def test_bench_json_file_in_vllms_shape(standin_bench, monkeypatch, tmp_path):
    from gpufleet.bench import run as bench_run

    real = bench_run.bench_target
    monkeypatch.setattr(bench_run, "bench_target", lambda t, **kw: real(t, **kw, sample_gpu=False))
    out = _bench("--concurrency", "1,2", "--format", "vllm", "--json-file", "v.jsonl")
    assert out.exit_code == 0, out.output
    lines = (tmp_path / "v.jsonl").read_text().splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["max_concurrency"] for r in results] == [1, 2]
    assert all(r["completed"] == 3 and r["label"] == "standin/llama" for r in results)
    assert {"median_ttft_ms", "p99_itl_ms", "request_throughput", "output_throughput"} <= set(
        results[0]
    )
    assert "conc" in out.stdout  # no --json: the table on stdout
