"""What the deploys apply: for each plan step, the ``Op`` values its deploy carries out.

A plan (``gpufleet.plan.host``, ``gpufleet.plan.restore``) may only emit a ``(step, op)`` listed
here, and every ``Op`` is listed for some step: ``tests/deploys/test_apply.py`` walks every
change the plan and restore fixtures emit, checks it against this table, and runs the deploys
on it to see that each change issues an operation. An ``Op`` added to ``gpufleet.core.wire``
without a deploy that applies it fails there, in seconds.
"""

from __future__ import annotations

from gpufleet.core.wire import Op

APPLIED: dict[str, frozenset[Op]] = {
    "engine": frozenset({Op.INSTALL_KEY, Op.WRITE, Op.INSTALL, Op.START}),  # docker_engine
    "toolkit": frozenset({Op.INSTALL_KEY, Op.WRITE, Op.INSTALL}),  # container_toolkit
    "daemon": frozenset({Op.CONFIGURE}),  # container_toolkit
    "cdi": frozenset({Op.GENERATE}),  # container_toolkit
    "probe": frozenset({Op.PULL, Op.TRANSFER, Op.PROBE}),  # gpu_probe
    "layout": frozenset({Op.CREATE, Op.FIX}),  # layout
    "env": frozenset({Op.WRITE, Op.RESTORE}),  # layout
    "model": frozenset({Op.WRITE, Op.FETCH, Op.MOVE, Op.LINK, Op.REMOVE}),  # models
    "image": frozenset({Op.PULL, Op.TRANSFER, Op.RETAG}),  # services
    "build": frozenset({Op.BUILD, Op.RECEIVE, Op.WRITE, Op.RESTORE}),  # services
    "compose": frozenset({Op.WRITE, Op.RESTORE}),  # services
    "recreate": frozenset({Op.RECREATE, Op.REMOVE}),  # services
    "gate": frozenset({Op.GATE}),  # services
    "release": frozenset({Op.RECORD, Op.MAKE_CURRENT, Op.WRITE}),  # release
}
