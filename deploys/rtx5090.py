"""Converge the rtx5090 hosts: `pyinfra inventory/hosts.py deploys/rtx5090.py`."""

from deploys._converge import converge

converge("rtx5090")
