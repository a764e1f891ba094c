"""Fleet monitoring: Prometheus targets, the host textfile, dashboards, alerts, one bundle.

Everything here is computed from what gpufleet already knows (the inventory, its group data,
a status or drift report, a host's snapshot and plan) without connecting to a host:

- ``fleet``: the inventory and group data, validated as a converge validates them
- ``targets``: Prometheus ``file_sd`` JSON and ``scrape_configs``, one target per service
- ``textfile``: the metrics a converge leaves for node_exporter's textfile collector
- ``dashboard``: the Grafana dashboard (grafana-foundation-sdk) and its provisioning
- ``rules``: the alert rules, and ``promtool test rules`` cases that make each one fire
- ``bundle``: ``gpufleet monitor``'s directory: all of the above and a compose file
"""
