"""Decisions that span hosts: which host builds an image that several hosts of a run need.

pyinfra loads a deploy for every host at once (one greenlet each). A host whose plan builds an
image registers the build's inputs here and waits until every host of the run has planned;
then a host that already has an image of those inputs sends it, or else the first host in
inventory order that needs them builds them, and the others receive the image from it
(``docker save`` over SSH into ``docker load``): at most one build per set of identical
inputs per run, whatever the number of hosts.
"""

from __future__ import annotations

import time

import gevent
from pyinfra.context import state

from gpufleet.ops import run_state
from gpufleet.plan import choose_builders

WAIT_SECONDS = 300


class BuildRegistry:
    def __init__(self) -> None:
        self.needs: dict[str, list[tuple[str, str]]] = {}
        self.haves: dict[str, list[tuple[str, str]]] = {}
        self.expected = {h.name for h in state.inventory.get_active_hosts()}
        self.order = [h.name for h in state.inventory]

    def register(self, host: str, needs: list[tuple[str, str]],
                 haves: list[tuple[str, str]] = ()) -> None:  # fmt: skip
        """Record the ``(inputs, image ref)`` builds this host would make, and has made."""
        self.needs.setdefault(host, list(needs))
        self.haves.setdefault(host, list(haves))

    def builders(self) -> dict[str, tuple[str, str, bool]]:
        """Build inputs -> (host, ref, builds now) to get them from, once every host planned."""
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            failed = {h.name for h in state.failed_hosts}
            if self.expected - failed <= set(self.needs):
                break
            gevent.sleep(0.02)
        return choose_builders(self.order, self.needs, self.haves)


def registry() -> BuildRegistry:
    return run_state(state, "builds", BuildRegistry)
