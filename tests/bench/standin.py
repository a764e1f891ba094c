"""A stand-in OpenAI-compatible server in its own process (``gpufleet.bench.stub``, NOT
llama-server): what a test benches end to end, or points another client at."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def standin_server(*args: str) -> Iterator[str]:
    """The stub serving on a free loopback port; yields its base URL, stopped on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpufleet.bench.stub", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "listening on http://127.0.0.1:PORT"
        assert line.startswith("listening on "), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
