"""``make fresh-check``: the README's two commands, as written, on a bare Debian machine.

The machine is a container made with ``debootstrap --variant=minbase bookworm`` plus only what
the README asks a user to have (``python3`` and ``make``), holding a clean clone of this
repository's HEAD. It runs ``make demo`` and then ``make test`` there, as root, and prints each
command's time and result. Slow (both commands from nothing, Docker engine included), so it is
not part of CI.

What the container gets besides: the capabilities a Docker engine needs (the sandbox's own
run arguments, a volume for ``/var/lib/docker``), and this machine's CA bundle with the
variables that point at it (``PIP_CERT``, ``REQUESTS_CA_BUNDLE``, ...), because these machines
reach PyPI through an intercepting proxy whose certificate only that bundle holds: a machine
behind such a proxy has the same. Nothing of this machine's pip cache or configuration goes in.

Everything it starts is removed at the end, by name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpufleet.sandbox import docker, images
from gpufleet.sandbox.containers import SYSTEMD_ARGS, capability_args
from gpufleet.sandbox.docker import SandboxError
from gpufleet.sandbox.roster import Sandbox

ROOT = Path(__file__).resolve().parents[2]
NAME = "gpufleet-fresh-check"
README_PACKAGES = ("python3", "make")
COMMANDS = ("make demo", "make test")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
FRESH_CA = "/etc/gpufleet-fresh/ca.crt"  # the bundle, as the container sees it
IN_CLONE = ["docker", "exec", "-w", "/root/gpufleet", NAME]
CA_VARS = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE")


def log(message: str) -> None:
    print(f"fresh-check: {message}", flush=True)


def bare_image(cache: Path) -> str:
    """bookworm minbase with the README's prerequisites, imported as an image once."""
    tag = f"gpufleet-fresh/bare:{images._digest(images.SUITE, *README_PACKAGES)}"
    if docker.image_exists(tag):
        return tag
    log(f"debootstrap --variant=minbase {images.SUITE} + {', '.join(README_PACKAGES)}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="bare-") as rootfs:
        cmd = images.debootstrap(README_PACKAGES, rootfs)
        proc = subprocess.run(cmd, capture_output=True, check=False)
        if proc.returncode != 0:
            raise SandboxError("debootstrap failed: " + proc.stdout.decode()[-500:])
        imp = images.import_rootfs(rootfs, tag)
        if imp.returncode != 0:
            raise SandboxError(f"docker import failed: {imp.stderr.decode().strip()}")
    return tag


def clean_clone(dest: Path) -> str:
    """HEAD of this checkout, cloned: what a newcomer gets, without uncommitted changes."""
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(dest)], check=True)
    return subprocess.run(
        ["git", "-C", str(dest), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _cleanup() -> None:
    docker.run(["rm", "-f", "-v", NAME], check=False)
    docker.run(["volume", "rm", "-f", f"{NAME}-docker"], check=False)


def main() -> int:
    started = time.monotonic()
    image = bare_image(Sandbox().state / "cache")
    _cleanup()
    results = []
    with tempfile.TemporaryDirectory(prefix="gpufleet-fresh-") as tmp:
        commit = clean_clone(Path(tmp) / "gpufleet")
        log(f"a bare {images.SUITE} container with {', '.join(README_PACKAGES)}; clone of {commit}")
        env = [a for var in CA_VARS for a in ("-e", f"{var}={FRESH_CA}")]
        machine = ["--hostname", "fresh", *capability_args(), *SYSTEMD_ARGS]
        volumes = ["-v", f"{NAME}-docker:/var/lib/docker", "-v", f"{CA_BUNDLE}:{FRESH_CA}:ro"]
        # an init as PID 1, as a machine has: it reaps orphans (sleep would keep zombies)
        init = ["--init", image, "sleep", "infinity"]
        docker.run(["run", "-d", "--name", NAME, *machine, *volumes, *env, *init])
        try:
            docker.run(["cp", f"{tmp}/gpufleet", f"{NAME}:/root/gpufleet"])
            logs = ROOT / ".sandbox" / "fresh-check"
            logs.mkdir(parents=True, exist_ok=True)
            for command in COMMANDS:
                out = logs / (command.replace(" ", "-") + ".log")
                log(f"{command} (output in {out})")
                t0 = time.monotonic()
                with out.open("wb") as fh:
                    argv = [*IN_CLONE, "bash", "-c", f"{command} 2>&1"]
                    rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT).returncode
                minutes, seconds = divmod(int(time.monotonic() - t0), 60)
                tail = out.read_text(errors="replace").strip().splitlines()[-3:]
                results.append((command, rc, f"{minutes}m{seconds:02d}s", tail))
                log(f"{command}: exit {rc} in {minutes}m{seconds:02d}s")
                if rc != 0:
                    break
            leftover = docker.out(["exec", NAME, "sh", "-c", "pgrep -a dockerd || true"])
        finally:
            _cleanup()
    print()
    print(f"{'command':<12} {'exit':<5} {'time':<9} last line")
    for command, rc, took, tail in results:
        print(f"{command:<12} {rc:<5} {took:<9} {tail[-1] if tail else ''}")
    if leftover.strip():
        print(f"left running after make test: {leftover.strip()}")
    total = int(time.monotonic() - started)
    print(f"whole check: {total // 60}m{total % 60:02d}s")
    ok = len(results) == len(COMMANDS) and all(rc == 0 for _, rc, _, _ in results)
    return 0 if ok and not leftover.strip() else 1


if __name__ == "__main__":
    if not shutil.which("debootstrap") or not os.path.exists("/proc/self/status"):
        sys.exit("fresh-check needs debootstrap and Docker: run `make system-deps` first")
    sys.exit(main())
