"""A SIMULATED fleet: many SSH endpoints on loopback, one asyncio process, no real host behind.

    python -m tests.sim serve --hosts 64 --latency-ms 50 --dir /tmp/simfleet
    gpufleet drift /tmp/simfleet/inventory.py          # (with the environment serve prints)

Each simulated host answers gpufleet's one-command snapshot with a recorded host's output (the
sandbox's converged spark and jetson hosts, ``tests/facts/snapshot.HostSnapshot``; rtx5090 from
the sandbox's rtx5090 identity), re-labelled with its own name, and the parts gpufleet manages
(file hashes, compose labels, the release) set to what the group data declares, so a plan of it
lists nothing. It also takes the lease and audit writes of a rollout. It is a SIMULATION: it
measures what the control machine spends per host (SSH, pyinfra, planning, reporting), nothing
about the hosts themselves; it replaces nothing in the sandbox.

It lives under ``tests/`` because it needs what only a checkout and the dev extras have: the
recorded fixtures, the facts' parsers (to check its own answers) and asyncssh.
"""
