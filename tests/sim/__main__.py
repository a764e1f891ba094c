"""``python -m tests.sim serve|measure``: the SIMULATED fleet (see ``tests/sim/__init__.py``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.sim", description="A SIMULATED fleet on loopback (not real hosts)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve N simulated hosts until stopped")
    serve.add_argument("--hosts", type=int, default=16)
    serve.add_argument("--latency-ms", type=float, default=0.0)
    serve.add_argument("--dir", type=Path, required=True)
    measure = sub.add_parser("measure", help="time gpufleet against simulated fleets")
    measure.add_argument("--hosts", default="1,16,64,256,1024")
    measure.add_argument("--latency-ms", default="0,50")
    measure.add_argument("--commands", default="drift,converge,status,rollout")
    measure.add_argument("--repeat", type=int, default=1)
    measure.add_argument("--dir", type=Path, default=Path("/tmp/gpufleet-sim"))
    measure.add_argument(
        "--budget-s", type=float, default=3600, help="skip runs once this much time has passed"
    )
    measure.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    if args.command == "serve":
        from tests.sim.server import main as serve_main

        serve_main(args.hosts, args.latency_ms, args.dir)
    else:
        from tests.sim.measure import main as measure_main

        sys.exit(measure_main(args))


if __name__ == "__main__":
    main()
