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

from gpufleet.control import inputs as control
from gpufleet.ops.operations import run_state
from gpufleet.plan.host import choose_builders

WAIT_SECONDS = 300


class BuildRegistry:
    def __init__(self) -> None:
        self.needs: dict[str, list[tuple[str, str]]] = {}
        self.haves: dict[str, list[tuple[str, str]]] = {}
        self.own_builds: set[str] = set()  # hosts that never take an image from the control
        self.expected = {h.name for h in state.inventory.get_active_hosts()}
        self.order = [h.name for h in state.inventory]

    def register(
        self,
        host: str,
        needs: list[tuple[str, str]],
        haves: list[tuple[str, str]] = (),
        *,
        from_control: bool = True,
    ) -> None:
        """Record the ``(inputs, image ref)`` builds this host would make, and has made.

        + from_control: this host may take an image of those inputs from the control machine
        """
        self.needs.setdefault(host, list(needs))
        self.haves.setdefault(host, list(haves))
        if not from_control:
            self.own_builds.add(host)

    def builders(self) -> dict[str, tuple[str, str, bool]]:
        """Build inputs -> (host, ref, builds now) to get them from, once every host planned."""
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            failed = {h.name for h in state.failed_hosts}
            if self.expected - failed <= set(self.needs):
                break
            gevent.sleep(0.02)
        return choose_builders(self.order, self.needs, self.haves, self.from_control())

    def from_control(self) -> dict[str, str]:
        """Inputs no host has that the control machine holds an image of, for the hosts that
        need them (all of them allowing it)."""
        had = {inputs for have in self.haves.values() for inputs, _ in have}
        refused = {inputs for host in self.own_builds for inputs, _ in self.needs.get(host, ())}
        wanted = {inputs for need in self.needs.values() for inputs, _ in need}
        offered = {inputs: control.image_built_from(inputs) for inputs in wanted - had - refused}
        return {inputs: ref for inputs, ref in sorted(offered.items()) if ref}


def registry() -> BuildRegistry:
    return run_state(state, "builds", BuildRegistry)
