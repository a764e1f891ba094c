"""An example real fleet. Copy it, put your hosts in, and keep secrets out of it.

    pyinfra inventory/hosts.py deploys/spark.py          # converge the Spark hosts
    pyinfra inventory/hosts.py deploys/fleet.py --dry    # what would change, every group

Per-host data overrides group data (``group_data/<group>.py``); set SSH details here or in
``~/.ssh/config``. Deploying as a sudo user: add ``"ssh_user": "ops", "_sudo": True``.
"""

spark = [
    ("spark-01.lab.example", {"ssh_user": "root"}),
    ("spark-02.lab.example", {"ssh_user": "root"}),
]

rtx5090 = [
    ("ws-5090-a.lab.example", {"ssh_user": "ops", "_sudo": True}),
]

jetson = [
    ("orin-nx-01.lab.example", {"ssh_user": "ops", "_sudo": True}),
    ("agx-orin-01.lab.example", {"ssh_user": "ops", "_sudo": True}),
]
