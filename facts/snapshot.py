"""The whole host in one remote command: what a plan, a drift check or a status view needs.

Each part's script prints its own sections (``facts/_sections.py``) and is parsed by its own
module, so the composite costs one round trip and no parser is written twice.
"""

from __future__ import annotations

from pyinfra.api import FactBase, QuoteString, StringCommand

from facts import compose, docker, health, identity, managed, modelfiles, statedir
from facts._sections import decoded, encoded, mark, split_sections
from gpufleet.core import gpu, snapshot
from gpufleet.core.known import STATE_DIR


class HostSnapshot(FactBase[snapshot.Snapshot]):
    """Identity, managed files, model files, compose state, health and gpufleet's state.

    + models_dir: where models live, the Hub cache (its filesystem's free space is reported)
    + paths: managed files and directories (``facts.managed``)
    + model_reads: the model store's ``hub``, ``entries`` and ``refs`` (``facts.modelfiles``);
      ``deep`` hashes the blobs
    + project/images: the compose project and the images its services run
    + probes: service -> (address, port, health path)
    + state_dir: gpufleet's directory on the host
    + gpu_now: sample the GPU once with these sources (``gpufleet status``)
    + textfile: also read this metrics textfile's last converge time (``gpufleet status``)
    + releases/audit: also read the kept releases' manifests / the audit log's last lines
    + docker_known: (binaries, version, compose version) the docker CLI printed last time: the
      host prints them back while its binaries are unchanged (``facts.docker.script``)

    .. code:: python

        Snapshot(identity=Identity(...), files={...}, models=ModelsState(...),
                 compose=ComposeState(...), health={"llama": Probe(...)}, state=StateDir(...))
    """

    def command(
        self,
        models_dir: str,
        paths: list[str] | tuple[str, ...] = (),
        model_reads: dict | None = None,
        project: str = "gpufleet",
        images: list[str] | tuple[str, ...] = (),
        probes: dict[str, tuple[str, int, str]] | None = None,
        state_dir: str = STATE_DIR,
        deep: bool = False,
        gpu_now: tuple[str, ...] = (),
        releases: bool = False,
        audit: int = 0,
        docker_known: tuple[str, str, str | None] | None = None,
        textfile: str | None = None,
    ) -> StringCommand:
        known = docker.KnownVersions(*docker_known) if docker_known else None
        parts = [
            identity.script(models_dir, known),
            managed.script(paths),
            modelfiles.script(**_store(models_dir, model_reads), deep=deep),
            compose.script(project, images),
            health.script(probes or {}),
            statedir.script(state_dir),
        ]
        if releases or audit:
            parts.append(statedir.extras_script(state_dir, releases=releases, audit=audit))
        if textfile:  # its last converge time, for the status that rewrites it as found
            from gpufleet.monitor.textfile import TIMESTAMP  # prometheus_client: status only

            line = StringCommand(
                "grep -m1", QuoteString(f"^{TIMESTAMP} "), QuoteString(textfile), "2>/dev/null"
            )
            parts.append(StringCommand(mark("metrics.textfile"), "; ", line, _separator=""))
        if gpu_now:
            sampler = gpu.sampler_command(sources=list(gpu_now), seconds=1)
            parts.append(StringCommand(mark("gpu.now"), "; ", sampler, _separator=""))
        # sent as base64: one byte that is not UTF-8 would end pyinfra's read of the rest
        return encoded(StringCommand(*parts, _separator="; "))

    def process(self, output: list[str]) -> snapshot.Snapshot:
        sections = split_sections(decoded(output))
        models = modelfiles.from_sections(sections)
        return snapshot.Snapshot(
            identity=identity.from_sections(sections),
            files=managed.from_sections(sections),
            models=models,
            compose=compose.from_sections(sections),
            health=health.from_sections(sections),
            state=statedir.from_sections(sections),
            gpu_now=tuple(sections["gpu.now"].lines) if "gpu.now" in sections else (),
            metrics_converged_at=_converged_at(sections),
            deep=any(f is not None and f.digest for f in models.files.values()),
        )


def _store(models_dir: str, reads: dict | None) -> dict:
    reads = reads or {"hub": f"{models_dir}/hub"}
    entries = [modelfiles.Entry(*e) for e in reads.get("entries", ())]
    return {"hub": reads["hub"], "entries": entries, "refs": reads.get("refs", ())}


def _converged_at(sections) -> float | None:
    """The metrics textfile's last converge time, when a status read it."""
    if "metrics.textfile" not in sections:
        return None
    from gpufleet.monitor.textfile import converged_at_of

    return converged_at_of(sections["metrics.textfile"].lines)
