"""The inference stack's layout: base and model directories, and the ``.env`` file."""

from __future__ import annotations

from pathlib import Path

import jinja2
from pyinfra.api.deploy import deploy
from pyinfra.operations import files

from gpufleet import ops
from gpufleet.schema import HostConfig

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


def render(template: str, **context) -> str:
    return _env.get_template(template).render(**context)


def env_path(config: HostConfig) -> str:
    return f"{config.layout.stack_dir}/.env"


def render_env(config: HostConfig, secrets: dict[str, str]) -> str:
    values = {**config.env, **secrets}
    for name, value in values.items():
        # Single-quoted: compose reads the value literally (no $ expansion, no # comments).
        if "\n" in value or "'" in value:
            raise ValueError(
                f"{config.group}/{config.host}/env/{name}: a value may hold neither a newline "
                "nor a single quote"
            )
    return render("env.j2", group=config.group, values=values)


def _dir_matches(current: dict | None, mode: str, owner: str, group: str) -> bool:
    return (
        bool(current)
        and current["sha256"] == "dir"
        and (current["mode"], current["owner"], current["group"])
        == (mode.lstrip("0") or "0", owner, group)
    )


@deploy("Stack layout")
def layout(config: HostConfig, secrets: dict[str, str], current: dict):
    """Directories and the ``.env`` file (0600, written atomically, content never shown).

    + config: validated host config (``layout_*``, ``env``, ``secrets``)
    + secrets: resolved secret values, from the control machine
    + current: ``facts.managed.ManagedFiles`` of the managed paths
    """
    lay = config.layout
    if not _dir_matches(current.get(lay.stack_dir), "755", "root", "root"):
        files.directory(name="Stack directory", path=lay.stack_dir, mode="755",
                        user="root", group="root")  # fmt: skip
    if not _dir_matches(current.get(lay.models_dir), lay.models_mode, lay.models_owner,
                        lay.models_group):  # fmt: skip
        files.directory(
            name="Models directory",
            path=lay.models_dir,
            mode=lay.models_mode,
            user=lay.models_owner,
            group=lay.models_group,
        )
    path = env_path(config)
    ops.secret_file(
        name=f"Environment file {path}",
        path=path,
        content=ops.Secret(render_env(config, secrets)),
        current=current.get(path),
    )
