"""Converge the spark hosts: `pyinfra inventory/hosts.py deploys/spark.py`."""

from deploys._converge import converge

converge("spark")
