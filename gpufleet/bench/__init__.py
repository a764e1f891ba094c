"""
The measurement core of ``gpufleet bench``: load, figures, GPU watch, server counters, reports.

Each module does one thing and most are pure, so the CLI only wires them together:

- ``prompts``: built-in prompts of mixed lengths, a seeded sampler, JSONL prompt files.
- ``client``: the asyncio load generator (aiohttp, streaming chat completions, one pool).
- ``metrics``: figures over request records, defined as ``vllm bench serve`` defines them.
- ``gpu``: the remote sampling command and parsers for nvidia-smi, /proc/meminfo, tegrastats.
- ``servermetrics``: llama-server and vLLM ``/metrics`` scrapes, as deltas over a run.
- ``slo``: baselines and SLOs from group data, parsed strictly and checked against figures.
- ``report``: the versioned JSON document, and the table, CSV, PNG and comparison made from it.
- ``stub``: a local server that answers at once, to test the client and measure its overhead.
"""
