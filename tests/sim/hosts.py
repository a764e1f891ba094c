"""What each SIMULATED host says: a recorded host's snapshot, re-labelled and converged.

``converged_host(name, group)`` is a ``SimHost``: the recorded identity sections of a real
(sandbox) host of that group, and the state gpufleet manages (files, model files, compose
project, health, releases) exactly as the group data declares it, computed with gpufleet's own
plan. ``SimHost.answer(command, stdin)`` answers a command the way a shell on that host would,
for the commands a drift check, a no-change converge, ``status`` and a rollout send.

The host data a simulated host is declared with (``host_data``) is the group's shipped data and
what the sandbox inventory sets for these recordings (``gpu_arch`` of the recording machine),
with each model pinned to a commit whose metadata is pre-seeded in the control machine's Hub
cache (``seed_hub_cache``): the control side needs no network.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import json
import re
import runpy
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.control.inputs import ControlInputs, gather, hf
from gpufleet.core import known
from gpufleet.core.hubcache import ref_path, repo_folder
from gpufleet.core.render import FETCH_SCRIPT
from gpufleet.core.schema import SHA1_RE, HostConfig, parse
from gpufleet.plan.container_toolkit import toolkit_source
from gpufleet.plan.host import plan_host
from gpufleet.plan.models import cached_files
from gpufleet.plan.types import PlanOptions

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "facts"
GROUPS = ("spark", "rtx5090", "jetson")
# nothing listens there: a model missing from the seeded cache fails at once, never online
HUB = "http://127.0.0.1:9/simulated-hub"
MARKER = "##gpufleet:"
ENCODED = "##gpufleet-base64"  # facts._sections.ENCODED
IDENTITY_END = "managed.files"  # the first section gpufleet's own state fills
_GPU_UUID = re.compile(r"GPU-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- the recordings ----------------------------------------------------------------------


def _sections(lines: list[str]) -> list[tuple[str, list[str]]]:
    """Output split at its markers: (marker line, the lines after it), in order."""
    out: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.startswith(MARKER):
            out.append((line, []))
        elif out:
            out[-1][1].append(line)
    return out


def _name(marker: str) -> str:
    return marker[len(MARKER) :].split()[0]


@functools.cache
def recorded_identity(group: str) -> tuple[str, ...]:
    """The identity sections a host of ``group`` prints (everything before managed.files)."""
    snap = "sandbox_jetson_converged" if group == "jetson" else "sandbox_spark_converged"
    output = json.loads((FIXTURES / "snapshot.HostSnapshot" / f"{snap}.json").read_text())
    sections = _sections(output["output"])
    end = next(i for i, (m, _) in enumerate(sections) if _name(m) == IDENTITY_END)
    sections = sections[:end]
    if group == "rtx5090":
        # the sandbox's rtx5090 was recorded bare (no Docker); its GPU and memory, with the
        # Docker sections of the converged spark (the same Docker, toolkit and compose)
        own = json.loads((FIXTURES / "identity.HostIdentity" / "sandbox_rtx5090.json").read_text())
        gpu = {_name(m): (m, lines) for m, lines in _sections(own["output"])}
        sections = [
            gpu.get(_name(m), (m, lines))
            if _name(m).startswith(("nvidia.", "host.mem"))
            else (m, lines)
            for m, lines in sections
        ]
    return tuple(line for marker, lines in sections for line in (marker, *lines))


# --- the host data they are declared with -----------------------------------------------


@functools.cache
def _group_data(group: str) -> dict:
    data: dict = {}
    for name in ("all", group):
        values = runpy.run_path(str(ROOT / "group_data" / f"{name}.py"))
        data.update({k: v for k, v in values.items() if not k.startswith("_")})
    return data


def _recorded_arch(group: str) -> str:
    lines = recorded_identity(group)
    return lines[lines.index(f"{MARKER}host.arch") + 1].strip()


def pinned_models(group: str) -> dict:
    """The group's models, each pinned to a made-up commit (its Hub metadata is seeded)."""
    models = copy.deepcopy(_group_data(group)["models"])
    for name, spec in models.items():
        spec["revision"] = _sha(f"simulated commit of {spec['repo']}")[:40]
        models[name] = spec
    return models


def host_data(group: str) -> dict:
    """What the inventory sets on a simulated host of ``group``, beside its SSH settings."""
    return {
        "secrets": {},  # no token: the shipped repos are public, the hub is the seeded cache
        "hf_endpoint": HUB,
        "models": pinned_models(group),
        # as the sandbox inventory sets it: the recordings come from an x86_64 machine
        "gpu_arch": _recorded_arch(group),
    }


def resolved_models(group: str) -> list[hf.ResolvedModel]:
    out = []
    for spec in pinned_models(group).values():
        each = spec["size_bytes"] // len(spec["files"])
        files = [
            hf.ModelFile(
                path=p,
                size=each,
                etag=_sha(f"simulated {spec['repo']}/{p}"),
                url=known.hub_file_url(HUB, spec["repo"], spec["revision"], p),
            )
            for p in spec["files"]
        ]
        out.append(
            hf.ResolvedModel(
                repo=spec["repo"], revision=spec["revision"], commit=spec["revision"], files=files
            )
        )
    return out


def seed_hub_cache(cache: Path) -> None:
    """Write every simulated model's resolution where ``gpufleet.control.hf`` looks for pinned ones
    (``$GPUFLEET_CACHE/hf``), so the control machine never asks a Hub."""
    for group in GROUPS:
        for model in resolved_models(group):
            spec = hf.ModelSpec(
                repo=model.repo, revision=model.revision, files=[f.path for f in model.files]
            )
            hf._cache_write(hf._cache_path(cache / "hf", HUB, spec), model)


def config_for(name: str, group: str) -> HostConfig:
    return parse(name, group, {**_group_data(group), **host_data(group)})


# --- a host in its converged state ------------------------------------------------------


@dataclass
class SimHost:
    """One simulated host: its recorded identity and the state gpufleet keeps on it.

    + files: path -> ``digest<TAB>mode owner group`` (as ``facts.managed`` prints it)
    + model_lines: the ``facts.modelfiles`` section of a converged host (its blobs, stamps,
      links, refs and snapshots)
    + containers/images: the ``facts.compose`` lines after ``c``/``i``
    + probes: service -> (port, the ``facts.health`` columns after it, but the chat's)
    """

    name: str
    group: str
    identity: tuple[str, ...]
    files: dict[str, str]
    model_lines: list[str]
    containers: dict[str, str]
    images: dict[str, str]
    probes: dict[str, tuple[int, str]]
    current: str | None
    history: list[str]
    kept_models: list[str]
    lease: str | None = None
    audit: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # commands it did not recognise

    # -- answers ------------------------------------------------------------------------

    def answer(self, command: str, stdin: bytes = b"") -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of ``command`` (an ``sh -c '...'`` as pyinfra sends)."""
        text = _unwrap(command)
        # the run's markers carry its nonce: read them without it, answer with it
        nonce = re.search(r"##gpufleet:([0-9a-f]+):host\.arch", text)
        if nonce:
            plain = self.snapshot(text.replace(f"{MARKER}{nonce.group(1)}:", MARKER))
            out = plain.replace(f"\n{MARKER}", f"\n{MARKER}{nonce.group(1)}:")
            if out.startswith(MARKER):
                out = f"{MARKER}{nonce.group(1)}:" + out[len(MARKER) :]
            if ENCODED in text:  # facts._sections.encoded: the output as base64
                out = f"{ENCODED}\n" + base64.encodebytes(out.encode()).decode()
            return 0, out, ""
        if "lease.json" in text:
            return self._lease(text, stdin)
        if "audit.jsonl" in text and "cat >>" in text:
            self.audit.append(stdin.decode(errors="replace").rstrip("\n"))
            return 0, "", ""
        self.unknown.append(text)
        return 0, "", ""

    def _lease(self, text: str, stdin: bytes) -> tuple[int, str, str]:
        """gpufleet.fleet.lease's scripts: take (ours, or none held), release or break by id, or
        break whatever is there."""
        held = json.loads(self.lease)["id"] if self.lease else None
        ours = re.search(r'\[ "\$id" != \'?([0-9a-f]+)', text)
        if 'cat > "$t"' in text:  # take
            if held and (ours is None or held != ours.group(1)):
                return 3, self.lease, ""
            self.lease = stdin.decode()
            return 0, "", ""
        if ours is None or held == ours.group(1):  # break, or release/break of this lease
            self.lease = None
            return 0, "", ""
        return (3, self.lease, "") if held else (0, "", "")

    def snapshot(self, text: str) -> str:
        asked = _loop_paths(text, "managed.files")
        out = list(self.identity)
        out.append(f"{MARKER}managed.files")
        out += [f"{p}\t{self.files[p]}" if p in self.files else f"{p}\t-\t-" for p in asked]
        out.append(f"{MARKER}models.files")
        out += self.model_lines
        out.append(f"{MARKER}compose.state")
        out += [f"c\t{name}\t{rest}" for name, rest in self.containers.items()]
        for ref in _images_asked(text):
            out.append(f"i\t{ref}\t{self.images[ref]}" if ref in self.images else f"i\t{ref}")
        out.append(f"{MARKER}health.probes")
        for name, (port, rest) in self.probes.items():
            chat = "ok" if f":{port}/v1/chat/completions" in text else "-"
            out.append(f"{name}\t{port}\t{rest}\t{chat}")
        out += [
            f"{MARKER}state.current",
            self.current or "",
            f"{MARKER}state.history",
            *self.history,
            f"{MARKER}state.models",
            *self.kept_models,
        ]
        if self.lease:
            out += [f"{MARKER}state.lease", self.lease]
        if f"{MARKER}state.audit" in text:
            out += [f"{MARKER}state.audit", *self.audit]
        if f"{MARKER}state.kept" in text:
            out.append(f"{MARKER}state.kept")
        if f"{MARKER}gpu.now" in text:
            out.append(f"{MARKER}gpu.now")
        return "\n".join(out) + "\n"


def _unwrap(command: str) -> str:
    """The script inside pyinfra's ``sh -c '...'`` (and ``sudo ... sh -c``), else as sent."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    if len(words) >= 3 and words[-3:-1] == ["sh", "-c"]:
        return words[-1]
    return command


def _loop_paths(text: str, section: str) -> list[str]:
    """The paths a section's ``for p in ... ; do`` loop asks about."""
    match = re.search(re.escape(f"{MARKER}{section}'") + r".*?for p in (.*?) ; do", text)
    return [p for p in shlex.split(match.group(1)) if p] if match else []


def _images_asked(text: str) -> list[str]:
    match = re.search(r"for i in (.*?); do", text.split(f"{MARKER}compose.state", 1)[-1])
    return shlex.split(match.group(1)) if match else []


@functools.cache
def _group_state(group: str) -> tuple[dict, ControlInputs]:
    """What a converged host of ``group`` holds (the same for every host of the group)."""
    from facts._sections import MARKER as RUN_MARKER
    from facts.snapshot import HostSnapshot  # the parser the control machine uses

    config = config_for(f"sim-{group}", group)
    control = gather(config, {})
    if control.hub_error:
        raise RuntimeError(f"simulated hub metadata missing ({control.hub_error}): seed it first")
    blank = SimHost("sim", group, recorded_identity(group), {}, [], {}, {}, {}, None, [], [])
    # the parser reads this process's markers: the readable ones, with its nonce
    lines = blank.snapshot("").replace(MARKER, RUN_MARKER).splitlines()
    identity_only = HostSnapshot().process(lines)
    first = plan_host(config, identity_only, control, PlanOptions())
    if first.refusal or first.release is None:
        raise RuntimeError(f"a simulated {group} host is refused: {first.refusal}")
    lay, tk = config.layout, config.toolkit
    files = {
        tk.keyring: f"{_sha('simulated keyring')}\t644 root root",
        tk.list_path: f"{_sha(toolkit_source(config).line)}\t644 root root",
        lay.stack_dir: "dir\t755 root root",
        lay.hf_home: f"dir\t{lay.models_mode.lstrip('0')} {lay.models_owner} {lay.models_group}",
        lay.env_path: f"{control.env_sha256}\t600 root root",
        lay.compose_path: f"{_sha(first.compose)}\t644 root root",
        known.FETCH_MODEL: f"{_sha(FETCH_SCRIPT.read_text())}\t755 root root",
    }
    if tk.cdi:
        files[known.CDI_SPEC] = f"{_sha('simulated cdi spec')}\t644 root root"
    if config.monitor.textfile:  # written by the converge that left it in sync
        files[config.monitor.textfile_path] = f"{_sha('simulated metrics')}\t644 root root"
    images = {config.probe.image.ref: f"sha256:{_sha('probe')}\tnull"}
    for name, svc in config.enabled_services.items():
        build = first.builds.get(name)
        if build:
            files[f"{build.context}/Dockerfile"] = f"{_sha(build.dockerfile)}\t644 root root"
            labels = json.dumps({"gpufleet.inputs": build.inputs})
            images[build.ref] = f"sha256:{_sha(build.inputs)}\t{labels}"
        else:
            images[svc.image.ref] = f"sha256:{_sha(svc.image.ref)}\tnull"
    model_lines = []
    for name, cached in cached_files(config, control).items():
        key = f"{repo_folder(cached[0].repo)}/{cached[0].commit}"
        model_lines += [f"snap\t{key}", f"placed\t{key}"]
        for f in cached:
            model_lines.append(
                f"blob\t{f.blob}\t{f.size} 1764000000\t{f.stamp_text}\t1764000001\t-"
            )
            model_lines.append(f"link\t{f.link}\t{f.target}")
        revision = control.models[name].revision
        if not SHA1_RE.fullmatch(revision):
            ref = ref_path(lay.hf_home, cached[0].repo, revision)
            model_lines.append(f"ref\t{ref}\t{cached[0].commit}")
    release = first.release
    state = {
        "files": files,
        "model_lines": model_lines,
        "containers": {
            name: f"{_sha(name)[:12]}\trunning\t{svc.inputs}\tUp 2 hours (healthy)"
            for name, svc in release.services.items()
        },
        "images": images,
        "probes": {
            name: (svc.port, f"{known.HEALTH_PATHS[svc.kind]}\t200\t0")
            for name, svc in config.enabled_services.items()
        },
        "current": release.id,
        "history": [release.id],
        "kept_models": sorted(
            {f.snapshot_key() for s in release.services.values() for f in s.model_files}
        ),
    }
    return state, control


def converged_host(name: str, group: str) -> SimHost:
    """A simulated host of ``group`` called ``name``, exactly as its group data declares."""
    state, _ = _group_state(group)
    # re-labelled: each simulated GPU has its own UUID, derived from the host's name
    uuid = _sha(name)
    uuid = f"GPU-{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:32]}"
    identity = tuple(_GPU_UUID.sub(uuid, line) for line in recorded_identity(group))
    return SimHost(name=name, group=group, identity=identity, **copy.deepcopy(state))
