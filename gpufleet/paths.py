"""Where gpufleet's own deploys, facts and templates are: the clone, or the installed copy.

In a clone they sit at the repository's top level (``deploys/``, ``facts/``, ``templates/``,
beside ``gpufleet/``). An installed distribution carries the same three directories inside
the package, as ``gpufleet/_project/`` (``pyproject.toml`` maps them there). Everything that
needs one of them asks here, so both layouts work and an ops repository holds only its
inventories and ``group_data/``.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CLONE = _PACKAGE.parent
_INSTALLED = _PACKAGE / "_project"


def project_root() -> Path:
    """The directory holding ``deploys/``, ``facts/`` and ``templates/``."""
    if (_CLONE / "deploys" / "fleet.py").is_file() and (_CLONE / "templates").is_dir():
        return _CLONE
    return _INSTALLED


TEMPLATES = project_root() / "templates"


def resolve_deploy(deploy: str) -> str:
    """``deploy`` as given when it is a file; else gpufleet's own (``deploys/fleet.py`` from
    any directory). Unchanged when neither exists, for the caller's one-line error."""
    if Path(deploy).is_file():
        return deploy
    own = project_root() / deploy
    return str(own) if own.is_file() else deploy
