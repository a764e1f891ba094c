"""Converge every host as its group declares: `pyinfra inventory/hosts.py deploys/fleet.py`."""

from deploys._converge import converge

converge()
