"""Where a control process's time goes, for the SIMULATED fleet's measurements.

Imported by a ``sitecustomize`` that ``tests/sim/measure.py`` puts on ``PYTHONPATH`` when
``GPUFLEET_SIM_PHASES`` names a file: every Python process of a run (gpufleet, each pyinfra it
starts) appends one JSON line there when it exits::

    {"pid": 123, "argv0": "pyinfra", "start": ..., "exit": ...,
     "connect": [start, end], "snapshot": [first start, last end],
     "plan_cpu": 0.41, "gather_cpu": 0.02}

Times are ``time.time()`` seconds. ``snapshot`` spans the ``HostSnapshot`` reads of all hosts
(each host's plan runs inside that span, between reads); ``plan_cpu``/``gather_cpu`` are the
summed time inside ``gpufleet.plan.host.plan_host`` and ``gpufleet.control.inputs.gather``
(both pure CPU, no greenlet switch). Nothing is patched unless the variable is set.
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import json
import os
import sys
import time

_record: dict = {"pid": os.getpid(), "argv0": os.path.basename(sys.argv[0] if sys.argv else "")}


def _start_time() -> float:
    """This process's start, from /proc (the interpreter starts before any hook runs)."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def _span(key: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        begin = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            span = _record.setdefault(key, [begin, begin])
            span[0], span[1] = min(span[0], begin), max(span[1], time.time())

    return wrapper


def _cpu(key: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _record[key] = _record.get(key, 0.0) + time.perf_counter() - begin

    return wrapper


def _snapshot_only(fn):
    timed = _span("snapshot", fn)

    @functools.wraps(fn)
    def wrapper(state, host, cls, *args, **kwargs):
        if getattr(cls, "__name__", "") == "HostSnapshot":
            return timed(state, host, cls, *args, **kwargs)
        return fn(state, host, cls, *args, **kwargs)

    return wrapper


_PATCHES = {
    "pyinfra.api.connect": lambda m: setattr(m, "connect_all", _span("connect", m.connect_all)),
    "pyinfra.api.facts": lambda m: setattr(m, "get_fact", _snapshot_only(m.get_fact)),
    "gpufleet.plan.host": lambda m: setattr(m, "plan_host", _cpu("plan_cpu", m.plan_host)),
    "gpufleet.control.inputs": lambda m: setattr(m, "gather", _cpu("gather_cpu", m.gather)),
}


class _Finder(importlib.abc.MetaPathFinder):
    """Patches a module of ``_PATCHES`` right after it runs, before anyone imports names."""

    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def patched(module):
            exec_module(module)
            _PATCHES[name](module)

        loader.exec_module = patched
        return spec


def _write(path: str) -> None:
    _record["exit"] = time.time()
    with open(path, "a") as fh:
        fh.write(json.dumps(_record) + "\n")


def install() -> None:
    path = os.environ.get("GPUFLEET_SIM_PHASES")
    if not path:
        return
    import importlib.util  # noqa: F401  (find_spec above)

    _record["start"] = _start_time()
    sys.meta_path.insert(0, _Finder())
    atexit.register(_write, path)  # first registered: runs last, after the report is written
