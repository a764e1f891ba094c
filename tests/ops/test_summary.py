"""The lines a converge ends with: what it built and sent, and each failed host's step and why."""

from __future__ import annotations

from gpufleet.core.wire import Failure
from gpufleet.ops.operations import failure_lines, summary_lines


def test_builds_and_transfers_are_summed_per_run():
    tallies = {"builds": {"spark": 1}, "received": {"rtx5090": 144_000_000},
               "transferred": {"ws-2": 2**20, "jetson": 3 * 2**20}}  # fmt: skip
    assert summary_lines(tallies) == [
        "1 image build(s): spark",
        "images sent instead of built: rtx5090 137.3 MiB",
        "images sent from the control machine: jetson 3.0 MiB, ws-2 1.0 MiB",
    ]
    assert summary_lines({}) == []


def test_each_failed_host_is_named_with_its_step_and_reason():
    failed_at = {"jetson": "Models | Fetch model llama-3.2-3b", "spark": "Release | Record"}
    reasons = {"jetson": Failure(step="", why="tiny.gguf: HTTP 500 from http://hub/m; run again "
                                 "to resume")}  # fmt: skip
    assert failure_lines(failed_at, reasons) == [
        "jetson failed at 'Models | Fetch model llama-3.2-3b': tiny.gguf: HTTP 500 from "
        "http://hub/m; run again to resume",
        "spark failed at 'Release | Record': its output is above",
    ]
    assert failure_lines({}, {}) == []


def test_a_host_that_failed_before_any_operation_is_named_at_its_read():
    reasons = {"spark": Failure(step="read", why="could not be read (HostSnapshot): no answer")}
    assert failure_lines({}, reasons) == [
        "spark failed at 'read': could not be read (HostSnapshot): no answer"
    ]
