"""The control machine's inputs to a plan (``gpufleet.control.inputs``): one question asked once,
each host's Docker versions remembered."""

from __future__ import annotations


def test_hosts_asking_the_control_machine_the_same_question_at_once_start_one_process():
    import threading
    import time as clock

    from gpufleet.control.inputs import _asked_once

    calls = []

    @_asked_once
    def image_id(ref: str) -> str:
        calls.append(ref)
        clock.sleep(0.2)  # a docker process
        return f"sha256:{ref}"

    answers = []
    threads = [threading.Thread(target=lambda: answers.append(image_id("x:1"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["x:1"] and answers == ["sha256:x:1"] * 6
    assert image_id("x:2") == "sha256:x:2" and calls == ["x:1", "x:2"]  # another question asks


def test_the_control_machine_remembers_what_each_hosts_docker_printed(tmp_path, monkeypatch):
    from gpufleet.control import inputs as control
    from gpufleet.core.snapshot import DockerInfo

    monkeypatch.setenv("GPUFLEET_CACHE", str(tmp_path))
    monkeypatch.setattr(control, "_versions", {})
    monkeypatch.setattr(control, "_versions_unsaved", [])
    read = dict(present=True, version="28.3.3", compose_version="2.39.1", active=True,
                daemon_json=None, daemon_json_error=None, runtimes=(), default_runtime=None,
                toolkit_packages={})  # fmt: skip
    assert control.docker_versions("ws-1") is None  # never read: the host is asked
    control.remember_docker("ws-1", DockerInfo(**read, binaries="/usr/bin/docker 1 2 3"))
    assert control.docker_versions("ws-1") == ("/usr/bin/docker 1 2 3", "28.3.3", "2.39.1")
    assert not (tmp_path / "docker-versions.json").exists()  # written once, at the run's end
    control.remember_docker("ws-3", DockerInfo(**read, binaries="/usr/bin/docker 1 2 3"))
    control.save_docker_versions()
    written = (tmp_path / "docker-versions.json").stat().st_mtime_ns
    control.remember_docker("ws-1", DockerInfo(**read, binaries="/usr/bin/docker 1 2 3"))
    control.save_docker_versions()
    assert (tmp_path / "docker-versions.json").stat().st_mtime_ns == written  # unchanged: kept

    monkeypatch.setattr(control, "_versions", {})  # the next run reads it from the file
    assert control.docker_versions("ws-1") == ("/usr/bin/docker 1 2 3", "28.3.3", "2.39.1")
    assert control.docker_versions("ws-2") is None
    gone = {**read, "present": False, "version": None, "compose_version": None}
    control.remember_docker("ws-1", DockerInfo(**gone, binaries="/usr/libexec/x 4 5 6"))
    assert control.docker_versions("ws-1") is None  # no docker: nothing to print back
    control.save_docker_versions()
    monkeypatch.setattr(control, "_versions", {})
    assert control.docker_versions("ws-1") is None


def test_a_cache_file_gpufleet_did_not_write_is_ignored(tmp_path, monkeypatch):
    from gpufleet.control import inputs as control

    monkeypatch.setenv("GPUFLEET_CACHE", str(tmp_path))
    for junk in ('{"ws-1": ["a", 3, null]}', "[1, 2]", "{not json"):
        (tmp_path / "docker-versions.json").write_text(junk)
        monkeypatch.setattr(control, "_versions", {})
        assert control.docker_versions("ws-1") is None
