"""Bad host data never shows a traceback: Hypothesis mutates each group's real data.

Every case starts from a group's shipped data (``group_data/all.py`` + ``<group>.py``, merged as
pyinfra merges them) and changes one to four things in it: a value of the wrong type, a value
just out of range, an unknown or misspelt key, a malformed URL, revision, image reference, path,
model spec or secret source, two services on one port, a service that names a model or secret
no one declared. The properties:

- ``parse`` returns a HostConfig, or raises ConfigError whose every line is
  ``<group>/<host>/<field path>: <message>``: one line per problem, no traceback, no Python
  repr of an exception;
- a HostConfig renders (``.env``, compose file, Dockerfiles) and plans, on a blank and on a
  converged host, without any other exception (a ValueError must name group/host/field too);
- a value that can only be wrong is refused, on a line that names that very field.
"""

from __future__ import annotations

import copy
import os
import re
from functools import cache
from pathlib import Path

import pytest
import yaml
from hypothesis import assume, event, given
from hypothesis import strategies as st

from gpufleet.core.render import (
    ServedModel,
    llama_command,
    render_compose,
    render_dockerfile,
    render_env,
)
from gpufleet.core.schema import (
    GROUPS,
    ConfigError,
    HostConfig,
    LlamaServer,
    Vllm,
    _known_keys,
    hub_token_needs,
    parse,
    resolve_secrets,
)
from gpufleet.core.snapshot import Snapshot
from gpufleet.plan.host import plan_host
from tests.support.fuzz import CaseClock, fuzz, nasty_text, report
from tests.support.plans import control_for, converged, group_data, identity

CLOCKS = {
    "mutated": CaseClock("host data, mutated"),
    "refused": CaseClock("host data, refused"),
    "secrets": CaseClock("secret sources"),
}


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    report(request, list(CLOCKS.values()))


@cache
def base(group: str) -> dict:
    return group_data(group)


def fresh(group: str) -> dict:
    return copy.deepcopy(base(group))


HOSTS = st.sampled_from(["h-01", "ws-1", "sandbox-spark", "gpu.lab.example", "10.0.0.7", "a+b"])


# --- what an error must look like ------------------------------------------------------------

_REPR = re.compile(r"\b\w*(Error|Exception)\(|Traceback|File \"|Value error,|errors\.pydantic")
# what pydantic puts in a location for a member of a union or a validator, not a field
_INNER_LOC = re.compile(r"literal\[|function-(after|before|wrap|plain)\[|tagged-union\[")


def error_paths(message: str, group: str, host: str) -> list[str]:
    """The field path of each line of a ConfigError (or a ValueError from a renderer), after
    checking that every line is ``group/host/path: message``."""
    assert message, "an empty error"
    lines = message.split("\n")
    assert message.splitlines() == lines, f"a line break inside one problem: {message!r}"
    assert len(lines) == len(set(lines)), f"one problem reported twice: {message!r}"
    prefix = f"{group}/{host}/"
    paths = []
    for line in lines:
        assert line.startswith(prefix), f"a line that does not name {prefix}: {line!r}"
        path, sep, text = line[len(prefix) :].partition(": ")
        assert path and sep and text.strip(), f"no field path or no message: {line!r}"
        assert not path.startswith("/"), f"an odd field path: {line!r}"
        assert not _INNER_LOC.search(path), f"a union member in the path: {line!r}"
        assert not _REPR.search(line), f"an exception's repr or a traceback: {line!r}"
        assert not re.search(r" at 0x[0-9a-f]+>", line), f"an object's repr: {line!r}"
        paths.append(path)
    return paths


def parse_or_error(host: str, group: str, data: dict) -> HostConfig | list[str]:
    """The config, or the field paths the ConfigError names (checked as ``error_paths``)."""
    try:
        return parse(host, group, data)
    except ConfigError as exc:
        return error_paths(str(exc), group, host)


def unescape(argv: list[str] | None) -> list[str] | None:
    """Arguments as compose passes them: ``$$`` is a literal ``$``."""
    return argv if argv is None else [arg.replace("$$", "$") for arg in argv]


def _renders_and_plans(config: HostConfig) -> str:
    """Everything a converge does with a valid config, short of touching a host; says how far
    the plan got."""
    group, host = config.group, config.host
    try:
        env = render_env(config, {name: "s3cret-value" for name in config.secrets})
    except ValueError as exc:  # ConfigError is one
        error_paths(str(exc), group, host)
    else:  # every line a comment or NAME='value', as compose reads it
        for line in env.rstrip("\n").split("\n"):
            assert line.startswith("#") or re.fullmatch(r"[A-Za-z_]\w*='[^'\n]*'", line), line
    models = {}
    for name, svc in config.enabled_services.items():
        if isinstance(svc, LlamaServer | Vllm):
            spec = config.models[svc.model]
            first = spec.files[0] if spec.files else "config.json"
            models[name] = ServedModel(repo=spec.repo, commit="c" * 40, file=first)
        if isinstance(svc, LlamaServer) and svc.build:
            render_dockerfile(svc.build, "0" * 64)
    compose = render_compose(project=config.project, services=config.services,
                             models=models, layout=config.layout)  # fmt: skip
    # the YAML says what was declared: no value leaked into the structure around it
    services = yaml.safe_load(compose)["services"] or {}
    assert set(services) == set(config.enabled_services)
    for name, svc in config.enabled_services.items():
        assert services[name]["image"] == svc.image.ref
        if isinstance(svc, LlamaServer):
            in_container = models[name].path_in_container()
            assert unescape(services[name]["command"]) == llama_command(svc, in_container)
            assert unescape(services[name].get("entrypoint")) == (svc.entrypoint or None)
    control = control_for(config)
    blank = Snapshot.model_validate({"identity": identity(group)})
    first = plan_host(config, blank, control)
    if first.refusal is not None:  # the gate, for a group whose minimums the host misses
        assert first.refusal.strip() and "\n" not in first.refusal, first.refusal
        return "valid: refused by the plan"
    again = plan_host(config, Snapshot.model_validate(converged(config, control)), control)
    assert again.refusal is None, again.refusal
    return "valid: planned"


def check(host: str, group: str, data: dict) -> tuple[HostConfig | list[str], str]:
    """``parse_or_error``, then a valid config rendered and planned; and what happened."""
    result = parse_or_error(host, group, data)
    if isinstance(result, HostConfig):
        return result, _renders_and_plans(result)
    return result, f"refused: {len(result)} line(s)" if len(result) < 4 else "refused: 4+ lines"


# --- values -----------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    nasty_text,
    st.binary(max_size=4),
)
# anything a Python literal in group data or inventory could be
anything = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner),
        st.dictionaries(st.one_of(nasty_text, st.integers(-3, 3)), inner, max_size=3),
    ),
    max_leaves=6,
)

ports = st.one_of(
    st.sampled_from([0, -1, 1, 22, 8000, 8001, 11434, 65535, 65536, 2**31, 2**64]),
    st.integers(-70000, 140000),
    st.floats(-1, 70000),
    st.sampled_from(["8000", "80a", " 8000 ", "", "0x1F40", True, None, [8000]]),
)
sizes = st.one_of(
    st.sampled_from([0, -1, 1, 2**63, 2**80, 1.5, "2GB", "", None, True, "1e9"]),
    st.integers(-(2**65), 2**65),
)
modes = st.one_of(
    st.sampled_from(["0755", "755", "0777", "999", "rwx", "07555", "0o755", "", 755, 0o755]),
    nasty_text,
)
revisions = st.one_of(
    st.sampled_from(["main", "v1.0", "a" * 40, "A" * 40, "", " ", "a b", "../x", "x..y", "/main",
                     "main/", "x:y", "x~1", "x^", "x?", "x*", "x[", "a\\b", "refs/pr/1", "\n"]),
    nasty_text,
)  # fmt: skip
image_refs = st.one_of(
    st.sampled_from([
        "nvcr.io/nvidia/vllm:25.09-py3", "localhost:5000/x:1", "x", "", " ", "a b", "UPPER",
        "x:", ":tag", "x:y:z", "x@sha256:abc", "x@sha256:" + "f" * 64, "-x", "x/", "/x",
        "x//y", "x:" + "t" * 200, "x\n", "$(id)", "ghcr.io/a/b:c@sha256:" + "0" * 64,
    ]),
    nasty_text,
)  # fmt: skip
urls = st.one_of(
    st.sampled_from([
        "https://huggingface.co", "http://mirror", "http://mirror:8080/hf", "", "huggingface.co",
        "https://", "http://", "ftp://x", "https://a b", "https://x/{bogus}", "https://x/{os_id}",
        "https://x/{", "https://x/{0}", "file:/srv/repo", "file:///srv/repo", "javascript:x",
        "https://x\n", "https://[::1", "http://[::1]:80/", "//x", "https://x/$(ARCH)",
    ]),
    nasty_text.map(lambda s: "https://" + s),
    nasty_text,
)  # fmt: skip
paths = st.one_of(
    st.sampled_from([
        "/opt/gpufleet", "", "relative", "relative/dir", "./x", "../x", "/opt/../etc", "/opt/..",
        "/a:b", "C:\\x", "~/x", "/", "//x", "/x/", "/x\n", "/x y", "/x\x00", "/x'y", "/$HOME",
    ]),
    nasty_text,
    nasty_text.map(lambda s: "/" + s),
)  # fmt: skip
file_lists = st.one_of(
    st.sampled_from([[], [""], ["a.gguf", "a.gguf"], ["../a.gguf"], ["/a.gguf"], ["a\\b.gguf"],
                     ["."], ["a/"], ["a/../../b"], ["a\tb.gguf"], ["a\n.gguf"], "a.gguf", None]),
    st.lists(st.one_of(nasty_text, st.sampled_from(["x.gguf", "d/x.gguf"])), max_size=3),
)  # fmt: skip
repos = st.one_of(
    st.sampled_from(["org/name", "", "name", "a/b/c", "../x", "a/..", "a--b/c", "-a/b", "a/b ",
                     "a/b\n", "/a/b", "a/b/", "org/na me"]),
    nasty_text,
)  # fmt: skip
secret_maps = st.one_of(
    st.sampled_from([{}, {"HF_TOKEN": "env:HF_TOKEN"}, {"hf_token": "env:X"}, {"X": "vault:x"},
                     {"X": "env:"}, {"X": "file:"}, {"X": "env:A B"}, {"1X": "env:X"},
                     {"X": "file:~nobody-here/x"}, {"X": "file:/dev/null"}, {"X": ""},
                     {"": "env:X"}, {"X": "file:/x\x00"}, {"X": None}, {"X": 1}, ["HF_TOKEN"],
                     "env:HF_TOKEN"]),
    st.dictionaries(nasty_text, nasty_text, max_size=2),
)  # fmt: skip
binds = st.one_of(
    st.sampled_from(["0.0.0.0", "127.0.0.1", "::", "::1", "localhost", "", "256.0.0.1", "1.2.3",
                     "0.0.0.0:80", "[::1]", "fe80::1%eth0", " 127.0.0.1", None, 127]),
    nasty_text,
)  # fmt: skip
env_maps = st.one_of(
    st.sampled_from([{"A B": "x"}, {"1A": "x"}, {"A": "x\ny"}, {"A": "it's"}, {"A": "$HOME"},
                     {"A": "#x"}, {"": "x"}, {"A=B": "x"}, {"A": 1}, {"A": None}, ["A=x"]]),
    st.dictionaries(nasty_text, nasty_text, max_size=2),
)  # fmt: skip
durations = st.one_of(
    st.sampled_from(["10m", "0s", "1h", "10", "m", "-1m", "10d", "1.5m", "10m\n"]), nasty_text
)
versions = st.one_of(
    st.sampled_from(["13.0", "12.8", "580.95.05", "thirteen", "", "13", "13.0\n", " 13.0", "99.0",
                     "11.0", "13.0.1", "1!2", "v13", "13.0-1", None]),
    nasty_text,
)  # fmt: skip


def _domain(key: str) -> st.SearchStrategy | None:
    """Plausible-but-wrong values for a field, by its name (flat key or nested field)."""
    if key in ("port",):
        return ports
    if key in ("size_bytes", "ctx_size", "threads", "parallel", "max_model_len", "num_parallel",
               "releases_keep", "max_num_seqs", "max_num_batched_tokens"):  # fmt: skip
        return sizes
    if key.endswith("models_mode"):
        return modes
    if key == "revision":
        return revisions
    if key in ("ref", "base_devel", "base_runtime", "probe_image"):
        return image_refs
    if key.endswith("_url") or key in ("hf_endpoint", "hf_control_endpoint", "source_git"):
        return urls
    if key.endswith(("_dir", "keyring", "list_path", "hf_cache", "source_archive")):
        return paths
    if key == "files":
        return file_lists
    if key in ("repo", "model_id"):
        return repos
    if key == "secrets":
        return secret_maps
    if key == "bind":
        return binds
    if key == "env":
        return env_maps
    if key == "start_period":
        return durations
    if key.startswith("gpu_min") or key in ("gpu_driver_floor", "version", "toolkit_version",
                                            "cuda_version", "docker_version"):  # fmt: skip
        return versions
    return None


def _typo(key: str, draw) -> str:
    """A misspelling of ``key``: a letter dropped, doubled, swapped or changed."""
    i = draw(st.integers(0, max(len(key) - 1, 0)))
    how = draw(st.sampled_from(["drop", "double", "swap", "change", "case", "dash"]))
    if how == "drop":
        return key[:i] + key[i + 1 :]
    if how == "double":
        return key[:i] + key[i : i + 1] * 2 + key[i + 1 :]
    if how == "swap" and i + 1 < len(key):
        return key[:i] + key[i + 1] + key[i] + key[i + 2 :]
    if how == "case":
        return key.upper()
    if how == "dash":
        return key.replace("_", "-") if "_" in key else key + "-"
    return key[:i] + draw(st.sampled_from("aeioxz_")) + key[i + 1 :]


# --- mutations --------------------------------------------------------------------------------


def _nodes(value, path=()):
    yield path, value
    if isinstance(value, dict):
        for key, item in list(value.items()):
            yield from _nodes(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _nodes(item, (*path, index))


def _parent(data: dict, path: tuple):
    target = data
    for key in path[:-1]:
        target = target[key]
    return target


def _services(data: dict) -> dict:
    services = data.get("services")
    return services if isinstance(services, dict) else {}


def _named(data: dict, key: str) -> list[str]:
    value = data.get(key)
    return sorted(k for k in value if isinstance(k, str)) if isinstance(value, dict) else []


env_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
one_line = nasty_text.filter(lambda s: "\n" not in s)
good_refs = st.sampled_from([
    "ghcr.io/ggml-org/llama.cpp:server-cuda", "localhost:5000/llama:1", "local/llama",
    "nvcr.io/nvidia/vllm:25.09-py3@sha256:" + "0" * 64,
])  # fmt: skip
_FILE = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,6}"
good_files = st.lists(st.from_regex(rf"{_FILE}(/{_FILE})?\.gguf", fullmatch=True),
                      min_size=1, max_size=3, unique=True)  # fmt: skip


def _copying(draw):
    """``draw``, but each value a fresh copy: sampled lists and dicts are shared objects, and
    the next mutation changes values in place."""
    return lambda strategy: copy.deepcopy(draw(strategy))


def _vary(draw, data: dict) -> None:
    """A change that may well be valid: other ports, binds, keys, arguments, models, images."""
    services = _services(data)
    names = [n for n in _named(data, "services") if isinstance(services[n], dict)]
    what = draw(st.sampled_from([
        "enable", "bind", "api-key", "args", "env", "layout", "model", "image", "build",
        "toolkit", "docker", "numbers", "hf",
    ]))  # fmt: skip
    svc = services[draw(st.sampled_from(names))] if names else {}
    kind = svc.get("kind")
    if what == "enable" and svc:
        svc.update(enabled=True, port=draw(st.integers(1024, 65535)))
    elif what == "bind":
        svc["bind"] = draw(st.sampled_from(["127.0.0.1", "::1", "::", "10.0.0.5", "0.0.0.0"]))
    elif what == "api-key" and kind in ("llama-server", "vllm"):
        if not isinstance(data.get("secrets"), dict):
            data["secrets"] = {}
        data["secrets"]["API_KEY"] = "env:API_KEY"
        svc["api_key_secret"] = "API_KEY"
    elif what == "args" and kind == "llama-server":
        svc["extra_args"] = draw(st.lists(nasty_text, max_size=3))
        svc["alias"] = draw(st.one_of(st.none(), nasty_text))
        svc["entrypoint"] = draw(st.one_of(st.none(), st.lists(nasty_text, min_size=1, max_size=2)))
    elif what == "args" and kind == "vllm":
        svc["extra_args"] = draw(st.lists(nasty_text, max_size=3))
        svc["command"] = draw(st.lists(nasty_text, max_size=2))
    elif what == "env":
        env = draw(st.dictionaries(env_names, one_line, max_size=3))
        (svc if svc and draw(st.booleans()) else data)["env"] = env
    elif what == "layout":
        data["layout_stack_dir"] = draw(st.sampled_from(["/srv/gpufleet", "/opt/x.y", "/s"]))
        data["layout_models_dir"] = draw(st.sampled_from(["/srv/models", "/opt/gpufleet/m", "/m"]))
        data["layout_models_mode"] = draw(st.sampled_from(["0750", "755", "0700"]))
        data["layout_models_owner"] = draw(st.sampled_from(["root", "ollama", "1000"]))
    elif what == "model":
        if not isinstance(data.get("models"), dict):
            data["models"] = {}
        name = draw(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,8}", fullmatch=True))
        data["models"][name] = {
            "repo": draw(st.sampled_from(["org/name", "ggml-org/gpt-oss-120b-GGUF", "a.b/c_d"])),
            "revision": draw(st.sampled_from(["main", "v1.0", "a" * 40, "refs/pr/1"])),
            "files": draw(good_files),
            "size_bytes": draw(st.one_of(st.none(), st.integers(1, 2**40))),
        }
        if kind == "llama-server":
            svc["model"] = name
    elif what == "image" and svc:
        source = draw(st.sampled_from(["pull", "transfer"]))
        svc["image"] = {"ref": draw(good_refs), "source": source}
        svc.pop("build", None)
    elif what == "build" and isinstance(svc.get("build"), dict):
        build = svc["build"]
        if draw(st.booleans()):
            archive = draw(st.sampled_from(["/tmp/l.tar.gz", "l.tgz"]))
            build.update(source_git=None, source_ref=None, source_archive=archive)
        build["cuda"] = draw(st.booleans())
        build["cuda_archs"] = draw(st.sampled_from([[], ["120a-real"], ["87", "121"]]))
        build["cmake_args"] = draw(st.lists(nasty_text, max_size=2))
        build["targets"] = draw(st.sampled_from([["llama-server"], ["llama-server", "llama-cli"]]))
    elif what == "toolkit":
        data["toolkit_cdi"] = draw(st.booleans())
        data["toolkit_set_default_runtime"] = draw(st.booleans())
        data["toolkit_version"] = draw(st.sampled_from(["1.17.8-1", "1.18.0-1", "1.19.0~rc.1-1"]))
    elif what == "docker":
        data["docker_repo_url"] = draw(st.sampled_from([None, "http://mirror/docker/deb"]))
        data["docker_version"] = draw(st.sampled_from([None, "5:28.0.0-1~ubuntu.24.04~noble"]))
        data["docker_engine_packages"] = draw(st.sampled_from([["docker.io"], ["docker-ce"]]))
    elif what == "numbers" and kind == "llama-server":
        svc["ctx_size"] = draw(st.integers(0, 2**20))
        svc["gpu_layers"] = draw(st.one_of(st.sampled_from(["all", "auto"]), st.integers(0, 200)))
        svc["threads"] = draw(st.one_of(st.none(), st.integers(1, 256)))
        svc["flash_attn"] = draw(st.sampled_from([None, "on", "off", "auto"]))
        svc["start_period"] = draw(st.sampled_from(["1s", "2h", "10m"]))
    elif what == "numbers" and kind == "vllm":
        svc["gpu_memory_utilization"] = draw(st.floats(0.01, 1))
        svc["max_model_len"] = draw(st.integers(1, 2**20))
    elif what == "hf":
        data["hf_endpoint"] = draw(st.sampled_from(["http://mirror:8080", "https://hf.co/"]))
        data["hf_control_endpoint"] = draw(st.sampled_from([None, "http://127.0.0.1:9/x"]))


@st.composite
def mutation(draw, data: dict) -> None:
    """Change one thing in ``data``, in place."""
    draw = _copying(draw)
    nodes = [(p, v) for p, v in _nodes(data) if p]
    how = draw(st.sampled_from([
        "type", "near", "near", "delete", "unknown", "flat", "typo", "ports", "refs", "copy",
        "vary", "vary", "vary", "vary",
    ]))  # fmt: skip
    if how == "vary":
        _vary(draw, data)
    elif how in ("type", "near", "delete", "unknown"):
        path, value = draw(st.sampled_from(nodes))
        parent, key = _parent(data, path), path[-1]
        if how == "type":
            parent[key] = draw(anything)
        elif how == "near":
            names = [k for k in path if isinstance(k, str)]
            domain = _domain(names[-1]) if names else None
            parent[key] = draw(domain if domain is not None else anything)
        elif how == "delete" and isinstance(parent, dict):
            del parent[key]
        elif how == "unknown" and isinstance(value, dict):
            known = [k for k in value if isinstance(k, str)]
            value[_typo(draw(st.sampled_from(known)), draw) if known else "x"] = draw(scalars)
    elif how == "flat":
        key = draw(st.sampled_from([*_known_keys(), "services"]))
        domain = _domain(key)
        data[key] = draw(domain if domain is not None and draw(st.booleans()) else anything)
    elif how == "typo":
        key = draw(st.sampled_from(_known_keys()))
        data[_typo(key, draw)] = data.get(key, draw(scalars))
    elif how == "ports":  # two services on one port, both enabled
        names = _named(data, "services")
        services = data["services"] if names else {}
        if len(names) >= 2:
            a, b = draw(st.permutations(names))[:2]
            if isinstance(services[a], dict) and isinstance(services[b], dict):
                services[b].update(port=services[a].get("port", 8000), enabled=True)
    elif how == "refs":  # a service that names a model or a secret no one declared
        names = _named(data, "services")
        if names:
            svc = data["services"][draw(st.sampled_from(names))]
            if isinstance(svc, dict):
                field = draw(st.sampled_from(["model", "api_key_secret", "hf_token_secret"]))
                declared = [*_named(data, "models"), *_named(data, "secrets")]
                svc[field] = draw(st.one_of(st.sampled_from(declared or ["x"]), nasty_text))
    elif how == "copy":  # a second service or model, under a fresh or a nasty name
        section = draw(st.sampled_from(["services", "models"]))
        names = _named(data, section)
        if names:
            original = data[section][draw(st.sampled_from(names))]
            name = draw(st.one_of(st.sampled_from(["second", "Second", "a b", "../x", ""]),
                                  nasty_text))  # fmt: skip
            data[section][name] = copy.deepcopy(original)


@st.composite
def mutated(draw) -> tuple[str, str, dict]:
    group = draw(st.sampled_from(GROUPS))
    data = fresh(group)
    if draw(st.booleans()):
        data["secrets"] = {}  # as the plan fixtures run it: no HF_TOKEN needed
    for _ in range(draw(st.integers(1, 4))):
        draw(mutation(data))
    return draw(HOSTS), group, data


@pytest.mark.parametrize("group", GROUPS)
def test_shipped_data_renders_and_plans(group: str) -> None:
    assert check(f"{group}-01", group, fresh(group))[1] == "valid: planned"


@fuzz(max_examples=2000)
@given(mutated())
def test_mutated_host_data_validates_or_names_each_field(case: tuple[str, str, dict]) -> None:
    host, group, data = case
    with CLOCKS["mutated"].case():
        _, outcome = check(host, group, data)
    event(outcome)


# --- values that can only be wrong ------------------------------------------------------------


def _service(data: dict, draw, kind: str | None = None) -> str:
    names = [n for n, s in data["services"].items() if kind is None or s["kind"] == kind]
    assume(names)
    return draw(st.sampled_from(names))


def _model(data: dict, draw) -> str:
    return draw(st.sampled_from(sorted(data["models"])))


def _build_service(data: dict, draw) -> str:
    names = [n for n, s in data["services"].items() if "build" in s]
    assume(names)
    return draw(st.sampled_from(names))


def _set(data: dict, draw, where: str, field: str, values) -> str:
    """Set ``field`` of a service (``where`` = "service"), a model or a service's build/image."""
    value = draw(values)
    if where == "model":
        name = _model(data, draw)
        data["models"][name][field] = value
        return f"models/{name}/{field}"
    if where == "build":
        name = _build_service(data, draw)
        data["services"][name]["build"][field] = value
        return f"services/{name}/build/{field}"
    name = _service(data, draw)
    target = data["services"][name]
    if where == "image":
        target["image"] = {**target.get("image", {"ref": "x"}), field: value}
        return f"services/{name}/image/{field}"
    target[field] = value
    return f"services/{name}/{field}"


def _flat(data: dict, draw, key: str, values) -> str:
    data[key] = draw(values)
    prefix, _, field = key.partition("_")
    return f"{prefix}/{field}" if prefix in ("gpu", "toolkit", "docker", "layout") else key


BAD_PORTS = st.one_of(st.integers(max_value=0), st.integers(min_value=65536),
                      st.sampled_from([8000.5, None, [8000], "eighty"]))  # fmt: skip
BAD_SIZES = st.one_of(st.integers(max_value=0), st.sampled_from([1.5, "2GB", [1]]))
BAD_MODES = st.sampled_from(["999", "rwx", "07555", "0o755", "", "75", "0758", "755\n"])
BAD_REVISIONS = st.sampled_from(["", " ", "a b", "../x", "x..y", "/main", "main/", "x:y", "x~1",
                                 "x^", "x?", "x*", "x[", "a\\b", "\n", "main\n"])  # fmt: skip
BAD_FILES = st.sampled_from([[], [""], ["a.gguf", "a.gguf"], ["../a.gguf"], ["/a.gguf"],
                             ["a\\b.gguf"], ["."], ["a/"], ["a/../../b"], ["a\tb.gguf"],
                             ["a\n.gguf"], ["x.gguf", "x.gguf"], "a.gguf", None, [1]])  # fmt: skip
BAD_REPOS = st.sampled_from(["", "name", "a/b/c", "../x", "a/..", "a--b/c", "-a/b", "a/b ", "a/b\n",
                             "/a/b", "a/b/", "org/na me", None, 3])  # fmt: skip
BAD_REFS = st.sampled_from(["", " ", "a b", "x:", ":tag", "x:y:z", "x@sha256:abc", "-x", "x/", "/x",
                            "x//y", "x:" + "t" * 200, "x\n", "$(id)", "x:-tag", "Upper/Case",
                            None, 5, ["x"]])  # fmt: skip
BAD_URLS = st.sampled_from([
    "", "huggingface.co", "https://", "http://", "ftp://x", "https://a b", "https://x\n", "//x",
    "javascript:alert(1)", "mirror:8080", None, 1,
])  # fmt: skip
BAD_DOCKER_URLS = st.sampled_from([
    "https://x/{bogus}", "https://x/{", "https://x/{0}", "https://x/{os_id.upper}", "https://x/}",
    "https://x y",
])  # fmt: skip
BAD_PATHS = st.sampled_from([
    "", "relative", "relative/dir", "./x", "../x", "/opt/../etc", "/opt/..", "/a:b", "C:\\x",
    "~/x", "/x\n", "/x\x00", "/x y", None, 1,
])  # fmt: skip
BAD_SECRETS = st.sampled_from([
    {"hf_token": "env:X"}, {"X": "vault:x"}, {"X": "env:"}, {"X": "file:"}, {"X": "env:A B"},
    {"1X": "env:X"}, {"X": ""}, {"": "env:X"}, {"X": None}, {"X": 1}, ["HF_TOKEN"],
    "env:HF_TOKEN",
])  # fmt: skip
BAD_BINDS = st.sampled_from(["localhost", "", "256.0.0.1", "1.2.3", "0.0.0.0:80", "[::1]",
                             " 127.0.0.1", "127.0.0.1\n", None, 127])  # fmt: skip
BAD_ENV = st.sampled_from([{"A B": "x"}, {"1A": "x"}, {"A": "x\ny"}, {"": "x"}, {"A=B": "x"},
                           {"A": 1}, {"A": None}, ["A=x"]])  # fmt: skip
BAD_DURATIONS = st.sampled_from(["10", "m", "-1m", "10d", "1.5m", "10m\n", "", None])
BAD_VERSIONS = st.sampled_from(["thirteen", "13.0\n", " 13.0", "v1.x", "1..2", "13.0 "])
BAD_CAPS = st.sampled_from([["12"], ["sm_121"], ["12.1\n"], [""], "12.1", [12.1], [" 12.1"]])
BAD_ARCHS = st.sampled_from([["sm_121"], ["12.1"], [""], ["1210"], "121", [121], ["121\n"]])
BAD_NAMES = st.sampled_from(["Llama", "a b", "../x", "", "-x", "x/y", "x:y", "ünï"])
BAD_MODEL_NAMES = st.sampled_from(["a b", "../x", "..", "", "x/y", "x:y", ".", "-x", "x\n"])
WRONG_FOR_STR = st.sampled_from([1, 1.5, True, [], {}, ["x"], {"a": "b"}])
WRONG_FOR_BOOL = st.sampled_from(["maybe", 2, [], {}, None, 0.5])


def _unknown_key(draw, known: list[str]) -> str:
    key = _typo(draw(st.sampled_from(known)), draw)
    assume(key not in known)
    return key


@st.composite
def refused(draw) -> tuple[str, str, dict, str, str]:
    """Host data with one value that can only be wrong: host, group, data, what was made wrong,
    and the field path it must be named by."""
    group = draw(st.sampled_from(GROUPS))
    data = fresh(group)
    data["secrets"] = {"HF_TOKEN": "env:HF_TOKEN"}
    target = draw(st.sampled_from([
        "port", "dup-port", "size", "mode", "releases", "revision", "files", "repo", "ref",
        "probe-ref", "base-image", "url", "docker-url", "path", "service-path", "secrets", "bind",
        "model-ref", "key-ref", "unknown-flat", "unknown-service", "unknown-model",
        "unknown-build", "unknown-image", "unknown-probe", "env", "service-env", "str-type",
        "bool-type", "kind", "service-name", "model-name", "gpu-version", "caps", "archs",
        "packages", "duration", "ctx", "service-type", "model-type", "services-type",
        "models-type",
    ]))  # fmt: skip
    if target == "port":
        path = _set(data, draw, "service", "port", BAD_PORTS)
    elif target == "dup-port":
        services = data["services"]
        first = _service(data, draw)
        name = draw(st.sampled_from(["zz-second", "llama2"]))
        assume(name not in services)
        services[name] = {**copy.deepcopy(services[first]), "enabled": True}
        services[first]["enabled"] = True
        path = f"services/{name}/port"
    elif target == "size":
        path = _set(data, draw, "model", "size_bytes", BAD_SIZES)
    elif target == "mode":
        path = _flat(data, draw, "layout_models_mode", BAD_MODES)
    elif target == "releases":
        path = _flat(data, draw, "releases_keep",
                     st.one_of(st.integers(max_value=0), st.integers(min_value=101)))  # fmt: skip
    elif target == "revision":
        path = _set(data, draw, "model", "revision", BAD_REVISIONS)
    elif target == "files":
        path = _set(data, draw, "model", "files", BAD_FILES)
    elif target == "repo":
        path = _set(data, draw, "model", "repo", BAD_REPOS)
    elif target == "ref":
        path = _set(data, draw, "image", "ref", BAD_REFS)
    elif target == "probe-ref":
        data["probe_image"] = {"ref": draw(BAD_REFS), "source": "pull"}
        path = "probe/image/ref"
    elif target == "base-image":
        field = draw(st.sampled_from(["base_devel", "base_runtime"]))
        path = _set(data, draw, "build", field, BAD_REFS.filter(lambda r: r not in ("", None)))
    elif target == "url":
        key = draw(st.sampled_from([
            "hf_endpoint", "hf_control_endpoint", "toolkit_repo_url", "toolkit_key_url",
            "docker_repo_url", "docker_key_url",
        ]))  # fmt: skip
        path = _flat(data, draw, key, BAD_URLS)
        assume(not (key in ("hf_control_endpoint", "docker_repo_url") and data[key] is None))
    elif target == "docker-url":
        key = draw(st.sampled_from(["docker_repo_url", "docker_key_url", "docker_repo_dist"]))
        path = _flat(data, draw, key, BAD_DOCKER_URLS)
        assume(not (key == "docker_repo_dist" and " " in data[key] and "{" not in data[key]))
    elif target == "path":
        key = draw(st.sampled_from(["layout_stack_dir", "layout_models_dir", "layout_hf_home",
                                    "toolkit_keyring",
                                    "toolkit_list_path", "docker_keyring"]))  # fmt: skip
        path = _flat(data, draw, key, BAD_PATHS)
    elif target == "service-path":
        name = _service(data, draw, "ollama")  # vLLM reads the shared Hub cache: no path
        field = "models_dir"
        data["services"][name][field] = draw(BAD_PATHS)
        path = f"services/{name}/{field}"
    elif target == "secrets":
        data["secrets"] = draw(BAD_SECRETS)
        path = "secrets"
    elif target == "bind":
        path = _set(data, draw, "service", "bind", BAD_BINDS)
    elif target == "model-ref":
        name = _service(data, draw, "llama-server")
        data["services"][name]["model"] = draw(st.sampled_from(["undeclared", "", "GPT"]))
        path = f"services/{name}/model"
    elif target == "key-ref":
        name = _service(data, draw)
        assume(data["services"][name]["kind"] != "ollama")
        data["services"][name].update(api_key_secret="UNDECLARED", enabled=True)
        path = f"services/{name}/api_key_secret"
    elif target == "unknown-flat":
        key = _unknown_key(draw, _known_keys())
        prefix = key.split("_", 1)[0] + "_"
        assume(prefix in ("gpu_", "toolkit_", "docker_", "layout_", "probe_") and "-" not in key)
        data[key] = draw(scalars)
        path = key
    elif target == "unknown-service":
        name = _service(data, draw)
        key = _unknown_key(draw, [k for k in data["services"][name] if k != "kind"])
        data["services"][name][key] = draw(scalars)
        path = f"services/{name}/{key}"
    elif target == "unknown-model":
        name = _model(data, draw)
        key = _unknown_key(draw, list(data["models"][name]))
        data["models"][name][key] = draw(scalars)
        path = f"models/{name}/{key}"
    elif target == "unknown-build":
        name = _build_service(data, draw)
        key = _unknown_key(draw, list(data["services"][name]["build"]))
        data["services"][name]["build"][key] = draw(scalars)
        path = f"services/{name}/build/{key}"
    elif target == "unknown-image":
        name = _service(data, draw)
        image = data["services"][name].setdefault("image", {"ref": "x"})
        key = _unknown_key(draw, ["ref", "source"])
        image[key] = draw(scalars)
        path = f"services/{name}/image/{key}"
    elif target == "unknown-probe":
        key = _unknown_key(draw, ["ref", "source"])
        data["probe_image"] = {"ref": "x", key: draw(scalars)}
        path = f"probe/image/{key}"
    elif target == "env":
        data["env"] = draw(BAD_ENV)
        path = "env"
    elif target == "service-env":
        path = _set(data, draw, "service", "env", BAD_ENV)
    elif target == "str-type":
        key = draw(st.sampled_from(["toolkit_version", "hf_endpoint", "layout_models_owner",
                                    "docker_repo_dist", "gpu_min_l4t"]))  # fmt: skip
        path = _flat(data, draw, key, WRONG_FOR_STR)
    elif target == "bool-type":
        key = draw(st.sampled_from(["toolkit_cdi", "models_keep_unused", "gpu_unified_memory"]))
        path = _flat(data, draw, key, WRONG_FOR_BOOL)
    elif target == "kind":
        name = _service(data, draw)
        data["services"][name]["kind"] = draw(st.sampled_from(["tgi", "", None, 1, "Vllm"]))
        path = f"services/{name}"
    elif target == "service-name":
        services = data["services"]
        first = _service(data, draw)
        services[draw(BAD_NAMES)] = {**services.pop(first), "enabled": False}
        path = "services/"
    elif target == "model-name":
        name = _model(data, draw)
        data["models"][draw(BAD_MODEL_NAMES)] = data["models"].pop(name)
        for svc in data["services"].values():  # the service follows its model's new name
            svc["enabled"] = False
        path = "models"
    elif target == "gpu-version":
        key = draw(st.sampled_from(["gpu_min_cuda", "gpu_min_driver", "gpu_driver_floor",
                                    "gpu_min_l4t"]))  # fmt: skip
        path = _flat(data, draw, key, BAD_VERSIONS)
    elif target == "caps":
        path = _flat(data, draw, "gpu_compute_caps", BAD_CAPS)
    elif target == "archs":
        path = _set(data, draw, "build", "cuda_archs", BAD_ARCHS)
    elif target == "packages":
        key = draw(st.sampled_from(["docker_engine_packages", "docker_compose_packages"]))
        path = _flat(data, draw, key, st.sampled_from([[], "docker-ce", [""], ["a b"], [1]]))
        assume(not (key == "docker_compose_packages" and data[key] == []))
    elif target == "duration":
        path = _set(data, draw, "service", "start_period", BAD_DURATIONS)
    elif target == "ctx":
        name = _service(data, draw, "llama-server")
        field = draw(st.sampled_from(["ctx_size", "threads", "parallel"]))
        data["services"][name][field] = draw(st.sampled_from([-1, -100, "big", 1.5, [4]]))
        path = f"services/{name}/{field}"
    elif target == "service-type":
        name = _service(data, draw)
        data["services"][name] = draw(st.sampled_from(["llama", 1, None, ["kind"], True]))
        path = f"services/{name}"
    elif target == "model-type":
        name = _model(data, draw)
        data["models"][name] = draw(st.sampled_from(["org/name", 1, None, ["a.gguf"]]))
        path = f"models/{name}"
    elif target == "services-type":
        data["services"] = draw(st.sampled_from([["llama"], "llama", 1, True, 2.5]))
        path = "services"
    else:  # models-type
        data["models"] = draw(st.sampled_from([["gpt"], "gpt", 1, True, [{"repo": "a/b"}]]))
        path = "models"
    return draw(HOSTS), group, data, target, path


@fuzz(max_examples=1200)
@given(refused())
def test_a_value_that_can_only_be_wrong_is_refused_by_its_path(case) -> None:
    host, group, data, target, path = case
    event(f"target: {target}")
    with CLOCKS["refused"].case():
        result, _ = check(host, group, data)
    assert not isinstance(result, HostConfig), f"{path} passed validation"
    assert any(p == path or p.startswith(path if path.endswith("/") else path + "/")
               for p in result), f"no line names {path}: {result}"  # fmt: skip


# --- secrets: resolved on the control machine -------------------------------------------------


@pytest.fixture(scope="module")
def secret_files(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("secrets")
    (tmp / "ok").write_text("s3cret\n")
    (tmp / "empty").write_text("")
    (tmp / "binary").write_bytes(b"\xff\xfe\x00garbage")
    (tmp / "dir").mkdir()
    return {
        "ok": str(tmp / "ok"), "empty": str(tmp / "empty"), "binary": str(tmp / "binary"),
        "dir": str(tmp / "dir"), "missing": str(tmp / "missing"), "nul": str(tmp / "ok\x00"),
        "nobody": "~nobody-at-all/token", "home": "~/.gpufleet-fuzz-none", "root": "/",
        "long": "/" + "x" * 5000, "relative": "relative/token",
    }  # fmt: skip


@fuzz(max_examples=300)
@given(st.data())
def test_secret_sources_resolve_or_name_the_secret(secret_files, data) -> None:
    group = data.draw(st.sampled_from(GROUPS))
    names = data.draw(st.lists(st.sampled_from(["HF_TOKEN", "API_KEY", "X1"]), unique=True,
                               min_size=1, max_size=3))  # fmt: skip
    sources = {}
    for name in names:
        kind = data.draw(st.sampled_from(["env", "file"]))
        if kind == "env":
            ref = data.draw(st.one_of(st.sampled_from(["GPUFLEET_FUZZ_UNSET", "", "A=B", "PATH"]),
                                      nasty_text))  # fmt: skip
        else:
            ref = data.draw(st.one_of(st.sampled_from(sorted(secret_files.values())), nasty_text))
        sources[name] = f"{kind}:{ref}"
    host = "h-01"
    with CLOCKS["secrets"].case():
        config = parse_or_error(host, group, {**fresh(group), "secrets": sources})
        if isinstance(config, HostConfig):
            try:
                values = resolve_secrets(config)
            except ConfigError as exc:
                for path in error_paths(str(exc), group, host):
                    assert path.startswith("secrets/"), path
            else:
                # every secret, but a hub token nothing needs may be unset (public models)
                left_out = set(config.secrets) - set(values)
                assert set(values) <= set(config.secrets) and left_out <= {"HF_TOKEN"}
                assert not left_out or not hub_token_needs(config)
    assert "GPUFLEET_FUZZ_UNSET" not in os.environ
    assert Path(secret_files["ok"]).read_text() == "s3cret\n"
