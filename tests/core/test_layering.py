"""The core sits at the bottom: no module under gpufleet/core imports another layer."""

from __future__ import annotations

import ast
from pathlib import Path

import gpufleet.core

CORE = Path(gpufleet.core.__file__).parent
PACKAGE = CORE.parent
# the two top-level trees that import gpufleet; every gpufleet folder but core is above it
UPWARD = ("deploys", "facts")
# a leaf the core may use: where the templates are (it imports nothing of gpufleet's)
LEAVES = ("gpufleet.paths",)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, anywhere in the file (functions and TYPE_CHECKING too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against gpufleet.core
                base = ["gpufleet", "core"][: 3 - node.level]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            # ``from gpufleet import bench`` imports gpufleet.bench: name what is imported
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def _upward(name: str) -> bool:
    parts = name.split(".")
    if parts[0] in UPWARD:
        return True
    if any(name == leaf or name.startswith(f"{leaf}.") for leaf in LEAVES):
        return False
    return parts[0] == "gpufleet" and (len(parts) == 1 or parts[1] != "core")


def test_core_imports_no_other_layer():
    offences = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: imports {name}"
        for path in sorted(CORE.rglob("*.py"))
        for line, name in _imports(path)
        if _upward(name)
    ]
    assert not offences, "\n".join(offences)


def test_the_leaves_the_core_may_use_import_nothing_of_gpufleets():
    for leaf in LEAVES:
        path = PACKAGE.joinpath(*leaf.split(".")[1:]).with_suffix(".py")
        names = [name for _, name in _imports(path)]
        assert not [n for n in names if n.split(".")[0] in ("gpufleet", *UPWARD)], leaf


def test_the_check_sees_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from gpufleet.core.model import FrozenModel\n"
        "def late():\n"
        "    from gpufleet.bench.slo import check_slos\n"
        "    from gpufleet import plan, paths\n"
        "    import facts.gpu\n"
    )
    upward = [name for _, name in _imports(probe) if _upward(name)]
    assert upward == ["gpufleet.bench.slo.check_slos", "gpufleet.plan", "facts.gpu"]
