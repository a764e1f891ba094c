"""Converge the jetson hosts: `pyinfra inventory/hosts.py deploys/jetson.py`."""

from deploys._converge import converge

converge("jetson")
