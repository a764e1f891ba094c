"""Live progress: pyinfra's lines reach people as they come; no decision reads them."""

from __future__ import annotations

import sys
import textwrap
import time

from gpufleet.core.wire import RunOptions
from gpufleet.fleet import logs, rollout, runner

# a child that prints host lines over time, then exits 0
CHILD = textwrap.dedent(
    """
    import sys, time
    for i in range(3):
        print(f"    [spark-01] download: {i * 50}%", file=sys.stderr, flush=True)
        time.sleep(0.4)
    print("--> Disconnecting from hosts...", file=sys.stderr, flush=True)
    print("stdout is drained, not shown", flush=True)
    """
)


def test_each_line_arrives_while_the_child_still_runs():
    seen: list[tuple[float, str]] = []
    started = time.monotonic()
    rc, output, interrupted = runner.spawn(
        [sys.executable, "-c", CHILD],
        {},
        on_line=lambda line: seen.append((time.monotonic(), line)),
    )
    ended = time.monotonic()
    assert rc == 0 and not interrupted
    assert [line for _, line in seen][:3] == [
        f"    [spark-01] download: {p}%" for p in (0, 50, 100)
    ]
    # the first line came long before the end: streamed, not collected
    assert seen[0][0] - started < ended - started - 0.6
    assert "stdout is drained" not in output and "Disconnecting" in output


def test_without_a_callback_the_output_is_still_kept_whole():
    rc, output, _ = runner.spawn([sys.executable, "-c", CHILD], {})
    assert rc == 0 and output.count("[spark-01]") == 3


def test_a_host_line_is_shown_prefixed_and_other_lines_are_not():
    hosts = {"spark-01", "ws-a"}
    assert rollout.progress_line("\x1b[1m    [spark-01] \x1b[0mStep 3/9 : RUN cmake", hosts) == (
        "  spark-01 | Step 3/9 : RUN cmake"
    )
    assert rollout.progress_line("--> Preparing operations...", hosts) is None
    assert rollout.progress_line("    [other-host] Success", hosts) is None  # not in the batch
    assert rollout.progress_line("    [spark-01]   ", hosts) is None


def test_a_rollout_converge_streams_its_hosts_lines(monkeypatch):
    calls = []

    def fake_run(inventory, deploy, **kw):
        calls.append(kw)
        for line in ("--> Starting operation", "    [ws-a] fetch: 10% 1.2 GB", "[ws-b] no"):
            kw["on_line"](line)
        return runner.Run(rc=0)

    monkeypatch.setattr(runner, "run", fake_run)
    shown: list[str] = []
    r = rollout.Rollout(inventory="hosts.py", progress=shown.append, extra=("-v",))
    rollout.Runner(r).converge(("ws-a",), restore=None)
    assert shown == ["  ws-a | fetch: 10% 1.2 GB"]
    assert calls[0]["extra"] == ("-v",) and calls[0]["interruptible"]
    # --quiet: no callback at all
    r = rollout.Rollout(inventory="hosts.py", progress=None)
    calls.clear()
    monkeypatch.setattr(runner, "run", lambda i, d, **kw: calls.append(kw) or runner.Run(rc=0))
    rollout.Runner(r).converge(("ws-a",))
    assert calls[0]["on_line"] is None


def test_the_run_decides_from_the_report_not_from_the_lines(monkeypatch, tmp_path):
    """A child that prints 'failed' lines but reports an in-sync host: the run is in sync."""
    (tmp_path / "hosts.py").write_text("")
    (tmp_path / "deploy.py").write_text("")
    child = textwrap.dedent(
        """
        import json, os, sys
        print("    [a] FAILED: unreachable, error, refused", file=sys.stderr)
        with open(os.environ["GPUFLEET_REPORT"], "w") as fh:
            json.dump({"hosts": {"a": {"host": "a"}}, "order": ["a"]}, fh)
        """
    )
    monkeypatch.setattr(runner, "command", lambda *a, **k: [sys.executable, "-c", child])
    lines: list[str] = []
    run = runner.run(
        str(tmp_path / "hosts.py"),
        str(tmp_path / "deploy.py"),
        dry=True,
        options=RunOptions(),
        on_line=lines.append,
    )
    assert lines == ["    [a] FAILED: unreachable, error, refused"]
    assert run.unreachable == {} and run.failures == {} and run.fatal is None


def test_logs_mask_every_secret_value_and_values_after_secret_names():
    mask = logs.masker({"a": {"HF_TOKEN": "hf_abcdef123456", "LLAMA_API_KEY": ""}})
    line = "[a] llama-1 | token hf_abcdef123456 LLAMA_API_KEY=sk-live-999 ok"
    shown = logs.shown(line, {"a"}, mask)
    assert shown == "  a | llama-1 | token <secret> LLAMA_API_KEY=<secret> ok"
    # the twin: a line with no secret is shown as it is
    assert logs.shown("[a] llama-1 | listening on 8000", {"a"}, mask) == (
        "  a | llama-1 | listening on 8000"
    )
    # pyinfra's own status lines for the host are indented: not log lines
    assert logs.shown("    [a] Connected", {"a"}, mask) is None
    assert logs.shown("--> Starting operation: server.shell (...)", {"a"}, mask) is None


def test_logs_command_is_bounded_unless_followed_and_quotes_the_service():
    bounded = logs.remote_command(service="llama", tail=50, follow=False)
    assert "--tail 50" in bounded and "--follow" not in bounded and bounded.endswith("llama; done")
    assert "--follow" in logs.remote_command(service=None, tail=10, follow=True)
    assert not logs.SERVICE_RE.fullmatch("llama; rm -rf /")
