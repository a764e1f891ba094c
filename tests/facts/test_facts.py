"""
Fact tests: pyinfra-style JSON fixtures (output in, fact out), the parse functions on their own,
and the fact scripts run by a real ``sh`` against stand-in binaries.

A fixture is ``tests/facts/<module>.<Fact>/<case>.json`` with ``output`` and ``fact``, and
optionally ``arg``/``kwargs``, ``command``, ``requires_command`` and ``source`` (where its
verbatim lines were captured; lines not named there were written for the variant).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pyinfra.api import StringCommand
from pyinfra.api.exceptions import FactProcessError

from facts import docker, host, jetson, modelfiles, nvidia
from facts._sections import ENCODED, MARKER, decoded, encoded, mark, split_sections
from facts.identity import HostIdentity

FIXTURES = sorted(Path(__file__).parent.glob("*.*/*.json"))


@pytest.mark.parametrize(
    "path", FIXTURES, ids=[f"{path.parent.name}/{path.stem}" for path in FIXTURES]
)
def test_fact_fixture(path: Path) -> None:
    module_name, class_name = path.parent.name.split(".")
    fact = getattr(importlib.import_module(f"facts.{module_name}"), class_name)()
    # fixtures write markers without this run's nonce: "##gpufleet:<section>"
    data = json.loads(path.read_text().replace("##gpufleet:", MARKER))
    args = data.get("arg", [])
    args = args if isinstance(args, list) else [args]
    kwargs = data.get("kwargs", {})

    if "command" in data:
        assert str(fact.command(*args, **kwargs)) == data["command"]
    if "requires_command" in data:
        assert fact.requires_command(*args, **kwargs) == data["requires_command"]
    value = fact.process(data["output"])
    assert _plain(value) == data["fact"]


def _plain(value):
    """A fact's typed value as the JSON a fixture holds."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def test_every_fact_has_fixtures() -> None:
    fact_dirs = {path.parent.name for path in FIXTURES}
    assert fact_dirs >= {
        "nvidia.NvidiaGpus",
        "jetson.L4tRelease",
        "host.HostResources",
        "docker.DockerEngine",
        "identity.HostIdentity",
        "managed.ManagedFiles",
        "modelfiles.ModelFiles",
        "compose.ComposeState",
        "aptrepo.FlatRepoVersions",
        "images.DockerImageId",
        "health.ServiceHealth",
        "statedir.GpufleetState",
        "statedir.ReleaseRecord",
        "snapshot.HostSnapshot",
    }


@pytest.mark.parametrize(
    ("module", "lines"),
    [
        ("managed", ["/opt/gpufleet/.env\t644 root root"]),
        ("managed", ["/opt/gpufleet/.env\tnot-a-hash\t644 root root"]),
        ("modelfiles", ["file\t/m/a.gguf\t4096\t\t\t-"]),
        ("modelfiles", ["file\t/m/a.gguf\tbig 1732390000\t\t\t-"]),
        ("modelfiles", ["junk"]),
        ("compose", ["c\tllama\t3f2a\trunning"]),
        ("compose", ['i\tx:1\tsha256:1\t{"gpufleet.inputs": '], ),
        ("health", ["llama\teight-thousand\t/health\t200"]),
    ],
    ids=["managed-short", "managed-digest", "model-stat", "model-size", "model-junk",
         "compose-short", "compose-labels", "health-port"],
)  # fmt: skip
def test_output_a_parser_cannot_read_fails_the_host_alone(module: str, lines: list[str]) -> None:
    """A FactProcessError is the one error pyinfra confines to the host that printed it."""
    parser = importlib.import_module(f"facts.{module}")
    with pytest.raises(FactProcessError, match="unexpected|not JSON"):
        parser.parse_lines(lines)


# ---------------------------------------------------------------- sections


def test_split_sections_args_and_trailing_blanks() -> None:
    sections = split_sections(
        ["stray", f"{MARKER}a.one rc=3 fields=x,y", "1", "", "  ", f"{MARKER}a.two", ""]
    )
    assert sections["a.one"].args == {"rc": "3", "fields": "x,y"}
    assert sections["a.one"].lines == ["1"]
    assert sections["a.two"].lines == []


def test_a_file_without_its_final_newline_keeps_its_last_line_and_the_next_section(
    tmp_path: Path,
) -> None:
    (tmp_path / "f").write_text("{\n}")
    script = f"{mark('a')}; cat {tmp_path / 'f'}; {mark('b')}; echo x"
    sections = split_sections(_run(script))
    assert sections["a"].lines == ["{", "}"]
    assert sections["b"].lines == ["x"]


@pytest.mark.parametrize(
    "forged",
    [
        "##gpufleet:state.lease",  # a marker of another run, or of none
        f"##gpufleet:{'0' * 16}:state.lease",
        f"}}{MARKER}state.lease",  # not at the start of its line
        f" {MARKER}state.lease",
    ],
)
def test_a_marker_without_this_runs_nonce_or_not_at_a_line_start_is_data(forged) -> None:
    sections = split_sections([f"{MARKER}models.files", "dir\tx", forged, "{}"])
    assert list(sections) == ["models.files"]
    assert sections["models.files"].lines == ["dir\tx", forged, "{}"]


def test_this_runs_marker_at_a_line_start_starts_a_section() -> None:
    sections = split_sections([f"{MARKER}models.files", "dir\tx", f"{MARKER}state.lease", "{}"])
    assert sections["state.lease"].lines == ["{}"]


def test_the_nonce_is_random_per_run() -> None:
    import facts._sections as sections_module

    root = Path(__file__).parents[2]
    code = "from facts._sections import NONCE; print(NONCE)"
    again = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    ).stdout.strip()
    assert len(sections_module.NONCE) == 16 and again != sections_module.NONCE


def test_split_sections_rejects_a_repeated_section() -> None:
    with pytest.raises(FactProcessError, match="appears twice"):
        split_sections([f"{MARKER}a", f"{MARKER}a"])


@pytest.mark.parametrize("fact_module", [nvidia, jetson, host, docker])
def test_output_without_the_sections_is_unparsable(fact_module) -> None:
    with pytest.raises(FactProcessError, match="section"):
        fact_module.from_sections(split_sections(["garbage"]))


# ---------------------------------------------------------------- nvidia


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            "| NVIDIA-SMI 535.183.01         Driver Version: 535.183.01   CUDA Version: 12.2  |",
            ("535.183.01", "12.2"),
        ),
        (
            "| NVIDIA-SMI 610.43.02  KMD Version: 610.43.02  CUDA UMD Version: 13.3 |",
            ("610.43.02", "13.3"),
        ),
        (
            "| NVIDIA-SMI 580.142   Driver Version: 580.142   CUDA Version: 13.0 |",
            ("580.142", "13.0"),
        ),
        ("| NVIDIA-SMI 540.3.0   Driver Version: N/A   CUDA Version: 12.2 |", (None, "12.2")),
        (
            "| NVIDIA-SMI 580.95.05   Driver Version: 580.95.05   CUDA Version: N/A |",
            ("580.95.05", None),
        ),
    ],
    ids=["r535", "r610", "two-part", "driver-na", "cuda-na"],
)
def test_parse_smi_header(header: str, expected: tuple) -> None:
    assert nvidia.parse_smi_header(["Thu Oct 16 10:12:31 2025       ", "+---+", header]) == expected


@pytest.mark.parametrize(
    "lines",
    [
        ["+---+", "| GPU  Name |"],
        ["| NVIDIA-SMI 580.95.05  Driver Version: five  CUDA Version: 13.0 |"],
    ],
    ids=["no-header", "bad-version"],
)
def test_parse_smi_header_unparsable(lines: list[str]) -> None:
    with pytest.raises(FactProcessError):
        nvidia.parse_smi_header(lines)


def test_parse_query_csv_with_units_and_header() -> None:
    fields = ["index", "name", "memory.total", "driver_version"]
    gpus, driver = nvidia.parse_query_csv(
        [
            "index, name, memory.total [MiB], driver_version",
            "0, NVIDIA H100 80GB HBM3, 81559 MiB, 550.54.14",
        ],
        fields,
    )
    assert driver == "550.54.14"
    assert gpus[0].memory_total_mib == 81559
    assert gpus[0].name == "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize(
    "row",
    [
        "0, NVIDIA GB10, 12.1",
        "0, NVIDIA GB10, 12.1, lots, 580.95.05",
        "0, NVIDIA GB10, sm_121, [N/A], 580.95.05",
        "\r0",  # found by tests/facts/test_fuzz_facts.py: the csv module raised its own error
    ],
    ids=["short-row", "memory-not-mib", "bad-compute-cap", "carriage-return"],
)
def test_parse_query_csv_unparsable(row: str) -> None:
    with pytest.raises(FactProcessError):
        nvidia.parse_query_csv(
            [row], ["index", "name", "compute_cap", "memory.total", "driver_version"]
        )


@pytest.mark.parametrize(
    ("rc", "lines", "status"),
    [
        ("9", [], "no-driver"),
        ("12", ["NVML Shared Library Not Found"], "no-driver"),
        ("255", ["Failed to initialize NVML: Driver/library version mismatch"], "mismatch"),
        (
            "15",
            ["Unable to determine the device handle for GPU0000:01:00.0: GPU is lost."],
            "error",
        ),
    ],
)
def test_classify_failure(rc: str, lines: list[str], status: str) -> None:
    assert nvidia.classify_failure(rc, lines)[0] == status


# ---------------------------------------------------------------- jetson


def test_version_json_prefers_nvcc_then_cudart() -> None:
    text = '{"cuda": {"version": "12.6.11"}, "cuda_cudart": {"version": "12.6.77"},'
    assert jetson.parse_cuda_version_json([text]) == "12.6.77"
    text += ' "cuda_nvcc": {"name": "CUDA NVCC", "version": "12.6.85"}}'
    assert jetson.parse_cuda_version_json([text]) == "12.6.85"
    assert jetson.parse_cuda_version_json(['{"cuda": {"version": "12.6.11"}}']) is None


def test_tegra_release_unparsable() -> None:
    with pytest.raises(FactProcessError):
        jetson.parse_tegra_release(["TARGET_USERSPACE_LIB_DIR=nvidia"])


# ---------------------------------------------------------------- host


def test_parse_os_release_unquotes() -> None:
    release = host.parse_os_release(
        ["# comment", 'PRETTY_NAME="Debian GNU/Linux trixie/sid"', "ID=debian"]
    )
    assert release == {"PRETTY_NAME": "Debian GNU/Linux trixie/sid", "ID": "debian"}


@pytest.mark.parametrize(
    "value",
    [
        "debian",
        "",
        '"Ubuntu 24.04.3 LTS"',
        '"two  spaces"',
        "'single quoted'",
        '"a \\"b\\""',
        'x"y"z',
        "a b",
        '"unbalanced',
        " padded ",
        '"$HOME `x`"',
        '"trailing" ',
    ],
)
def test_an_os_release_value_reads_as_the_shell_would(value) -> None:
    import shlex

    try:
        shell = " ".join(shlex.split(value))
    except ValueError:
        shell = value.strip().strip("'\"")
    assert host.parse_os_release([f"K={value}"]) == {"K": shell}


def test_parse_meminfo_and_df() -> None:
    assert host.parse_meminfo(["MemTotal:       127605060 kB"]) == {"MemTotal": 127605060 * 1024}
    with pytest.raises(FactProcessError):
        host.parse_meminfo(["MemTotal: lots"])
    df = ["Filesystem 1024-blocks Used Available Capacity Mounted on", "my fs 10 4 6 40% /mnt/a b"]
    assert host.parse_df(df) == 6 * 1024


def test_meminfo_without_memavailable_is_unparsable() -> None:
    output = [f"{MARKER}host.arch", "x86_64", f"{MARKER}host.os-release"]
    output += [f"{MARKER}host.meminfo", "MemTotal: 1 kB", f"{MARKER}host.df", "/"]
    with pytest.raises(FactProcessError, match="MemAvailable"):
        host.HostResources().process(output)


# ---------------------------------------------------------------- docker


def test_parse_daemon_json_not_an_object() -> None:
    assert docker.parse_daemon_json(["[]"]) == (
        None,
        "/etc/docker/daemon.json is not a JSON object",
    )


def test_parse_dpkg_status_installed_only() -> None:
    lines = [
        "libnvidia-container1 1.17.8-1 install ok installed",
        "libnvidia-container-tools 1.17.8-1 deinstall ok config-files",
        "nvidia-container-toolkit  unknown ok not-installed",
    ]
    assert docker.parse_dpkg_status(lines) == {"libnvidia-container1": "1.17.8-1"}


# ---------------------------------------------------------------- scripts under a real sh

GB10_QUERY = "0, NVIDIA GB10, GPU-0a6a8f1e, 12.1, [N/A], 580.95.05, 0000000F:01:00.0"
GB10_HEADER = "| NVIDIA-SMI 580.95.05   Driver Version: 580.95.05   CUDA Version: 13.0 |"
STUBS = {
    "current": f"""
case "$1" in
--query-gpu=*) echo '{GB10_QUERY}';;
*) echo '{GB10_HEADER}';;
esac""",
    # R470 and older refuse compute_cap, naming it in double quotes, and exit 2
    "legacy": """
case "$1" in
--query-gpu=*compute_cap*) echo 'Field "compute_cap" is not a valid field to query.'; exit 2;;
--query-gpu=*) echo '0, Tesla T4, GPU-4f8e2a1b, 15360, 470.82.01, 00000000:00:04.0';;
*) echo '| NVIDIA-SMI 470.82.01    Driver Version: 470.82.01    CUDA Version: 11.4     |';;
esac""",
    "no-driver": """
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
exit 9""",
}


def _run(command: str, path: Path | None = None) -> list[str]:
    env = None
    if path is not None:
        env = {"PATH": f"{path}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize(
    ("stub", "expected"),
    [
        ("current", {"status": "ok", "driver_version": "580.95.05", "cuda_version": "13.0"}),
        ("legacy", {"status": "ok", "driver_version": "470.82.01", "cuda_version": "11.4"}),
        ("no-driver", {"status": "no-driver", "driver_version": None, "cuda_version": None}),
    ],
)
def test_nvidia_script_under_sh(tmp_path: Path, stub: str, expected: dict) -> None:
    binary = tmp_path / "nvidia-smi"
    binary.write_text("#!/bin/sh" + STUBS[stub] + "\n")
    binary.chmod(0o755)
    fact = nvidia.NvidiaGpus().process(_run(nvidia.SCRIPT, tmp_path))
    assert {key: getattr(fact, key) for key in expected} == expected
    if stub == "legacy":
        assert fact.gpus[0].compute_cap is None
        assert fact.gpus[0].memory_total_mib == 15360


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/meminfo")
def test_host_identity_runs_in_one_sh_command(tmp_path: Path) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi; the test expects a host without one")
    command = str(HostIdentity().command(models_dir=f"{tmp_path}/not yet/it's"))
    identity = HostIdentity().process(_run(command, tmp_path))
    assert identity.host.arch == platform.machine()
    assert identity.host.disk_path == str(tmp_path)
    assert identity.host.disk_free_bytes > 0
    assert identity.nvidia.status == "absent"
    assert identity.docker.present == bool(shutil.which("docker"))


def _docker_stand_in(tmp_path: Path, version: str = "28.3.3") -> tuple[Path, Path]:
    """A ``docker`` CLI and its compose plugin (shell scripts) that log each time they run."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    plugins = home / ".docker" / "cli-plugins"
    plugins.mkdir(parents=True)
    bin_dir.mkdir()
    log = tmp_path / "ran"
    (bin_dir / "docker").write_text(
        f'#!/bin/sh\necho "$*" >> {log}\n'
        f'[ "$1" = --version ] && echo "Docker version {version}, build 980b856"\n'
        f'[ "$1" = compose ] && exec {plugins}/docker-compose "$@"\nexit 0\n'
    )
    (plugins / "docker-compose").write_text("#!/bin/sh\necho 2.39.1\n")
    for tool in (bin_dir / "docker", plugins / "docker-compose"):
        tool.chmod(0o755)
    return bin_dir, log


def _docker_read(tmp_path: Path, bin_dir: Path, known=None):
    tools = tmp_path / "tools"  # stat, and no docker of this machine's
    if not tools.exists():
        tools.mkdir()
        (tools / "stat").symlink_to(shutil.which("stat"))
    env = {"PATH": f"{bin_dir}:{tools}", "HOME": str(tmp_path / "home")}
    result = subprocess.run(["/bin/sh", "-c", docker.script(known)], capture_output=True, text=True,
                            env=env)  # fmt: skip
    return docker.DockerEngine().process(result.stdout.splitlines())


def test_unchanged_docker_binaries_are_not_asked_their_versions_again(tmp_path: Path) -> None:
    bin_dir, log = _docker_stand_in(tmp_path)
    first = _docker_read(tmp_path, bin_dir)
    assert (first.version, first.compose_version) == ("28.3.3", "2.39.1")
    assert log.read_text().split("\n")[:2] == ["--version", "compose version --short"]
    assert (
        f"{bin_dir}/docker " in first.binaries and "cli-plugins/docker-compose " in first.binaries
    )
    log.unlink()
    known = docker.KnownVersions(first.binaries, first.version, first.compose_version)
    again = _docker_read(tmp_path, bin_dir, known)
    assert again == first  # the same fact, printed back by the host
    assert not log.exists()  # and the docker CLI never ran


def test_an_upgraded_docker_is_asked_again(tmp_path: Path) -> None:
    bin_dir, log = _docker_stand_in(tmp_path)
    first = _docker_read(tmp_path, bin_dir)
    known = docker.KnownVersions(first.binaries, first.version, first.compose_version)
    (tmp_path / "new").mkdir()
    new_bin, new_log = _docker_stand_in(tmp_path / "new", version="29.0.1")
    os.replace(new_bin / "docker", bin_dir / "docker")  # a package upgrade: a new file
    upgraded = _docker_read(tmp_path, bin_dir, known)
    assert upgraded.version == "29.0.1" and upgraded.binaries != first.binaries
    assert new_log.read_text().split("\n")[0] == "--version"  # asked again


def test_a_host_whose_docker_went_is_not_told_a_version(tmp_path: Path) -> None:
    bin_dir, _ = _docker_stand_in(tmp_path)
    first = _docker_read(tmp_path, bin_dir)
    known = docker.KnownVersions(first.binaries, first.version, first.compose_version)
    (bin_dir / "docker").unlink()  # its compose plugin stays
    gone = _docker_read(tmp_path, bin_dir, known)
    assert not gone.present and gone.version is None


# ---------------------------------------------------------------- bytes and names from the host


def test_a_byte_that_is_not_utf8_reaches_the_parser_whole_and_the_rest_follows(tmp_path) -> None:
    (tmp_path / "current").write_bytes(b"r-\xff\xfe1\n")
    inner = StringCommand(f"{mark('a')}; cat {tmp_path / 'current'}; {mark('b')}; echo after")
    result = subprocess.run(["sh", "-c", str(encoded(inner))], capture_output=True, check=True)
    # as pyinfra hands it over: text lines (base64 is ASCII, so nothing is cut)
    lines = result.stdout.decode("ascii").splitlines()
    sections = split_sections(decoded(lines))
    assert sections["a"].lines == ["r-\udcff\udcfe1"]
    assert sections["a"].lines[0].encode("utf-8", "surrogateescape") == b"r-\xff\xfe1"
    assert sections["b"].lines == ["after"]


def test_output_that_is_not_encoded_is_read_as_it_is() -> None:
    assert decoded([f"{MARKER}a", "x"]) == [f"{MARKER}a", "x"]


def test_encoded_output_that_is_not_base64_fails_the_host_alone() -> None:
    with pytest.raises(FactProcessError, match="not the base64 it should be"):
        decoded([ENCODED, "not base64!"])


def test_a_directory_named_like_a_marker_cannot_forge_a_section(tmp_path) -> None:
    forged = f"x\n{MARKER}state.lease"  # even one that knows this run's nonce
    snapshots = tmp_path / "hub" / "models--org--m" / "snapshots"
    (snapshots / forged).mkdir(parents=True)
    (snapshots / ("c" * 40)).mkdir()
    (tmp_path / "hub" / f"models--{forged}" / "snapshots" / ("d" * 40)).mkdir(parents=True)
    sections = split_sections(_run(str(modelfiles.script(str(tmp_path / "hub"), []))))
    assert list(sections) == ["models.files"]
    state = modelfiles.parse_lines(sections["models.files"].lines)
    assert state.snapshots == (f"models--org--m/{'c' * 40}",)  # the rest is no snapshot key


def _host_output(os_release: list[str]) -> list[str]:
    arch = [f"{MARKER}host.arch", "x86_64"]
    memory = [f"{MARKER}host.meminfo", "MemTotal: 2 kB", "MemAvailable: 1 kB"]
    disk = [f"{MARKER}host.df", "/dev/sda1 100 50 50 50% /"]
    return [*arch, f"{MARKER}host.os-release", *os_release, *memory, *disk]


@pytest.mark.parametrize(
    "line", ['ID="ubuntu stable"', "VERSION_CODENAME=noble$(id)", 'UBUNTU_CODENAME="a/b"']
)
def test_an_os_release_word_that_would_reach_an_apt_url_is_refused(line) -> None:
    with pytest.raises(FactProcessError, match="is not an os-release word"):
        host.from_sections(split_sections(_host_output(["ID=ubuntu", line])))


def test_os_release_words_pass() -> None:
    info = host.from_sections(split_sections(_host_output(["ID=ubuntu", "UBUNTU_CODENAME=noble"])))
    assert (info.os_id, info.os_codename) == ("ubuntu", "noble")
