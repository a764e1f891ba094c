"""The install path: a wheel carries gpufleet's deploys, facts, templates and group data, and
an installed gpufleet works from a directory that is not the clone."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # built from a copy: the build's own build/ and egg-info stay out of the clone
    src = build / "src"
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((ROOT / rel).read_bytes())
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(out)],
        check=True,
        capture_output=True,
    )
    (found,) = out.glob("gpufleet-*.whl")
    return found


def _tracked(folder: str, pattern: str) -> set[str]:
    return {p.name for p in (ROOT / folder).glob(pattern)}


def test_the_wheel_holds_every_deploy_fact_template_group_data_and_schema(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, pattern in (
        ("deploys", "*.py"),
        ("facts", "*.py"),
        ("templates", "*"),
        ("group_data", "*.py"),
    ):
        for name in _tracked(folder, pattern):
            assert f"gpufleet/_project/{folder}/{name}" in names, (folder, name)
    schemas = {p.name for p in (ROOT / "gpufleet/fleet/schemas").glob("*.json")}
    assert {f"gpufleet/fleet/schemas/{s}" for s in schemas} <= names
    # every package of the source tree is in the wheel (the packages list is explicit)
    for init in (ROOT / "gpufleet").rglob("__init__.py"):
        rel = init.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel}: add its package to pyproject's packages"
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Requires-Dist: click" in text
    assert "Requires-Dist: matplotlib" in text and 'extra == "plot"' in text
    assert "Requires-Dist: matplotlib>=3.7\n" not in text  # not a hard dependency


@pytest.mark.install
def test_an_installed_gpufleet_inits_and_plans_from_its_own_directory(wheel, tmp_path):
    """Slow (a fresh venv, its dependencies from the index): install, init, drift."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, timeout=900)
    ops = tmp_path / "ops"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    gpufleet = str(venv / "bin" / "gpufleet")

    def run(*args, cwd=tmp_path):
        return subprocess.run(
            [gpufleet, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
        )

    assert run("--help").returncode == 0
    assert run("init", str(ops)).returncode == 0
    (ops / "inventory.py").write_text('spark = [("@local", {})]\n')
    # the packaged deploy, from the ops directory: pyinfra loads gpufleet's deploys and facts
    # from the installed package; the local machine has no NVIDIA GPU, so whatever the plan
    # says, it is said as a drift document with one host, never as an import error
    env["HF_TOKEN"] = "hf_not_a_real_token"
    done = run("drift", "inventory.py", "--json", cwd=ops)
    out = done.stdout + done.stderr
    assert "Traceback" not in out and "No module named" not in out, out
    assert done.returncode in (1, 2), out
    import json

    doc = json.loads(done.stdout)
    assert doc["schema"] == "gpufleet.drift/1" and doc["hosts"][0]["host"] == "@local", out
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import gpufleet.paths as p; print(p.project_root())"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert "site-packages/gpufleet/_project" in site
