"""Time gpufleet against SIMULATED fleets of growing size; print a markdown table.

    nice -n 5 python -m tests.sim measure --hosts 1,16,64,256,1024 --latency-ms 0,50

For each fleet size (smallest first) and latency, a simulated fleet is started (its own
process), one unmeasured drift warms the control machine's caches (the docker CLI's versions,
as on any fleet run twice), then each command runs ``--repeat`` times:

    drift     gpufleet drift INVENTORY
    converge  pyinfra -y INVENTORY deploys/fleet.py        (no change to make)
    status    gpufleet status INVENTORY
    rollout   gpufleet rollout INVENTORY --batch 25%       (no change: one plan, then the verdict)

Per run: wall time, CPU of the control process tree (``wait4``: the command and every pyinfra
it waited for), the peak RSS of its largest process, the phases (``tests/sim/phases.py``: the
interpreter's start-up and imports, connecting, snapshots with planning, and the rest: report,
disconnect, exit) and the simulator's own CPU over the run. Medians when ``--repeat`` > 1.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.sim.server import fd_needed, raise_fd_limit

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMMANDS = {
    "drift": lambda inv: [str(BIN / "gpufleet"), "drift", inv],
    "converge": lambda inv: [str(BIN / "pyinfra"), "-y", inv, "deploys/fleet.py"],
    "status": lambda inv: [str(BIN / "gpufleet"), "status", inv],
    "rollout": lambda inv: [str(BIN / "gpufleet"), "rollout", inv, "--batch", "25%"],
}
HOOK = "from tests.sim import phases\nphases.install()\n"


def _ticks(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_sim(count: int, latency: float, folder: Path) -> subprocess.Popen:
    (folder / "ready").unlink(missing_ok=True)
    log = folder.with_suffix(".log")
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-W",
                "ignore",
                "-m",
                "tests.sim",
                "serve",
                "--hosts",
                str(count),
                "--latency-ms",
                str(latency),
                "--dir",
                str(folder),
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60 + count * 0.2
    while not (folder / "ready").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the simulated fleet did not start: see {log}")
        time.sleep(0.2)
    return proc


def run_once(argv: list[str], env: dict, sim_pid: int, phases: Path) -> dict:
    phases.unlink(missing_ok=True)
    sim_before = _ticks(sim_pid)
    began = time.time()
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**env, "GPUFLEET_SIM_PHASES": str(phases)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - began
    sim_cpu = _ticks(sim_pid) - sim_before
    records = (
        [json.loads(line) for line in phases.read_text().splitlines()] if phases.exists() else []
    )
    runs = [r for r in records if "connect" in r]
    rc = os.waitstatus_to_exitcode(status)
    result = {
        "rc": rc,
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mib": usage.ru_maxrss / 1024,
        "sim_cpu": sim_cpu,
        "pyinfra_runs": len(runs),
        "startup": sum(r["connect"][0] - r["start"] for r in runs),
        "connect": sum(r["connect"][1] - r["connect"][0] for r in runs),
        "snapshot": sum(r["snapshot"][1] - r["connect"][1] for r in runs if "snapshot" in r),
        "plan_cpu": sum(r.get("plan_cpu", 0) + r.get("gather_cpu", 0) for r in runs),
    }
    ends = [r["snapshot"][1] if "snapshot" in r else r["connect"][1] for r in runs]
    result["rest"] = wall - result["startup"] - result["connect"] - result["snapshot"]
    result["rest_pyinfra"] = sum(r["exit"] - end for r, end in zip(runs, ends, strict=True))
    if rc not in (0,):
        result["error"] = stderr.decode(errors="replace")[-400:]
    return result


def _median(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], int | float)]
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["rc"] = max(r["rc"] for r in runs)
    return out


def table(rows: list[dict]) -> str:
    head = (
        "| command | hosts | RTT | wall s | control CPU s | CPU ms/host | peak RSS MiB "
        "| start-up s | connect s | snapshot+plan s (plan CPU) | rest s | sim CPU ms/host |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        n = r["hosts"]
        lines.append(
            f"| {r['command']} | {n} | {r['latency']:g} ms | {r['wall']:.2f} | {r['cpu']:.2f} "
            f"| {1000 * r['cpu'] / n:.1f} | {r['rss_mib']:.0f} | {r['startup']:.2f} "
            f"| {r['connect']:.2f} | {r['snapshot']:.2f} ({r['plan_cpu']:.2f}) "
            f"| {r['rest']:.2f} | {1000 * r['sim_cpu'] / n:.1f} |"
            + ("" if r["rc"] == 0 else f" exit {r['rc']}")
        )
    return "\n".join(lines)


def main(args) -> int:
    sizes = [int(n) for n in args.hosts.split(",")]
    latencies = [float(x) for x in args.latency_ms.split(",")]
    commands = args.commands.split(",")
    # the control side holds one connection per host, the same as the simulator
    raise_fd_limit(fd_needed(max(sizes)), f"the control process for {max(sizes)} hosts")
    args.dir.mkdir(parents=True, exist_ok=True)
    hook = args.dir / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    began, rows, skipped = time.monotonic(), [], []
    for count in sizes:
        for latency in latencies:
            label = f"{count} hosts at {latency:g} ms"
            if time.monotonic() - began > args.budget_s:
                skipped.append(label)
                continue
            folder = args.dir / f"n{count}-l{latency:g}"
            sim = start_sim(count, latency, folder)
            env = {
                **os.environ,
                "GPUFLEET_CACHE": str(folder / "cache"),
                "XDG_STATE_HOME": str(folder / "state"),
                "PYTHONPATH": f"{ROOT}{os.pathsep}{hook}",
            }
            try:
                run_once(
                    COMMANDS["drift"](str(folder / "inventory.py")),
                    env,
                    sim.pid,
                    folder / "phases.jsonl",
                )
                for command in commands:
                    argv = COMMANDS[command](str(folder / "inventory.py"))
                    runs = [
                        run_once(argv, env, sim.pid, folder / "phases.jsonl")
                        for _ in range(args.repeat)
                    ]
                    row = {"command": command, "hosts": count, "latency": latency, **_median(runs)}
                    if "error" in runs[-1]:
                        row["error"] = runs[-1]["error"]
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
            finally:
                sim.send_signal(signal.SIGINT)
                sim.wait(30)
    print()
    print(table(rows))
    if skipped:
        print(f"\nnot reached within --budget-s {args.budget_s:g}: {', '.join(skipped)}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1))
    return 0
