#!/usr/bin/env python3
"""
The sandbox mirror: static files (the apt repositories and keys) and the Hugging Face Hub API
shapes gpufleet, ``HfApi`` and ``hf download`` use (model info, tree listing, paths-info, resolve
with its HEAD, etags and ranges), served from files that
``gpufleet.sandbox.models.build_hf_tree`` wrote. Standard library only, one file, so it runs in
a bare Debian container:

    python3 mirror.py --root /srv/www --hf-root /srv/hf --token-file /srv/hf_token --port 80

Logs one line per request to stderr; request headers (so tokens) are never logged.

Under ``/slow/<bytes-per-second>/`` the same tree is served with every file download capped at
that rate: an endpoint on a slow link, for interrupting downloads midway without a restart.

Under ``/fault/<kind>[x<n>][.<tag>]/`` file downloads (resolve and static files) go wrong the
way real servers and links do, for the first ``n`` requests of each path (every request
without ``x<n>``); ``.<tag>`` only keeps one test's count apart from another's. An ``api-``
kind applies to the Hub API instead of file downloads. Kinds:

    500, 502, 503   that status, with a Hub-style JSON error
    429             429 with ``Retry-After: 1``
    404             not found: a fault no retry mends
    reset           the headers and half the body, then the connection reset (TCP RST)
    stall           the headers and half the body, then nothing for an hour
    corrupt         the whole body, its length right and its bytes wrong
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import mimetypes
import re
import signal
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
CHUNK = 64 * 1024
MAX_BODY = 1 << 20  # a paths-info request body read at most
FAULT_RE = re.compile(r"^(api-)?(500|502|503|429|404|reset|stall|corrupt)(?:x(\d+))?(?:\.[\w-]+)?$")
STATUS_FAULTS = {"500", "502", "503", "429", "404"}


def lfs_pointer_size(sha256: str, size: int) -> int:
    """Length of the Git LFS pointer file git stores for an LFS object."""
    return len(f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """
    ``(start, end)`` inclusive for a single satisfiable byte range, ``None`` to send the whole
    file (no header, or one this server ignores: malformed or multi-range), ``False`` if
    unsatisfiable.
    """
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or m.group(1) == m.group(2) == "":
        return None
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return False
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        return False
    return start, end


class Repo:
    """One repository as ``build_hf_tree`` wrote it."""

    def __init__(self, repo_id: str, base: Path, data: dict[str, Any]) -> None:
        self.id = repo_id
        self.base = base
        self.sha: str = data["sha"]
        self.gated: bool = bool(data.get("gated"))
        self.library: str = data.get("library", "gguf")
        self.files: dict[str, dict[str, Any]] = data["files"]

    def is_lfs(self, path: str) -> bool:
        meta = self.files[path]
        return bool(meta.get("lfs", path.endswith(".gguf") or meta["size"] >= 10 * 1024 * 1024))

    def directories(self) -> set[str]:
        dirs = set()
        for path in self.files:
            parts = path.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return dirs

    def file_entry(self, path: str) -> dict[str, Any]:
        meta = self.files[path]
        entry: dict[str, Any] = {
            "type": "file",
            "oid": meta["blob"],
            "size": meta["size"],
            "path": path,
        }
        if self.is_lfs(path):
            entry["lfs"] = {
                "oid": meta["sha256"],
                "size": meta["size"],
                "pointerSize": lfs_pointer_size(meta["sha256"], meta["size"]),
            }
        return entry

    def dir_entry(self, path: str) -> dict[str, Any]:
        # a stand-in for git's tree id: stable, and changes when anything below changes
        below = "".join(
            f"{p} {m['blob']}\n" for p, m in sorted(self.files.items()) if p.startswith(path + "/")
        )
        oid = hashlib.sha1(f"tree {path}\n{below}".encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": path}

    def tree(self, prefix: str, recursive: bool) -> list[dict[str, Any]] | None:
        """Entries under ``prefix`` (``""`` for the root), or None if it is not a directory."""
        dirs = self.directories()
        if prefix and prefix not in dirs:
            return None
        head = prefix + "/" if prefix else ""

        def wanted(path: str) -> bool:
            return path.startswith(head) and (recursive or "/" not in path[len(head) :])

        entries = [self.dir_entry(d) for d in sorted(dirs) if wanted(d)]
        entries += [self.file_entry(f) for f in sorted(self.files) if wanted(f)]
        return sorted(entries, key=lambda e: e["path"])

    def sibling(self, path: str, blobs: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"rfilename": path}
        if blobs:
            meta = self.files[path]
            entry.update(size=meta["size"], blobId=meta["blob"])
            if self.is_lfs(path):
                entry["lfs"] = {
                    "sha256": meta["sha256"],
                    "size": meta["size"],
                    "pointerSize": lfs_pointer_size(meta["sha256"], meta["size"]),
                }
        return entry


class HubError(Exception):
    """An error answered as the Hub does: JSON body, X-Error-Code header."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class MirrorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], args: argparse.Namespace) -> None:
        super().__init__(address, Handler)
        self.root = Path(args.root).resolve()
        self.hf_root = Path(args.hf_root).resolve()
        self.token_file = Path(args.token_file) if args.token_file else None
        self.page_size: int = args.page_size
        self.throttle: int = args.throttle_bytes_per_sec
        self.faulted: dict[tuple[str, str], int] = {}  # (fault spec, path) -> requests faulted
        self.fault_lock = threading.Lock()

    def fault_due(self, spec: str, limit: int | None, path: str) -> bool:
        """Whether this request is one of the first ``limit`` of ``path`` under ``spec``."""
        with self.fault_lock:
            done = self.faulted.get((spec, path), 0)
            if limit is not None and done >= limit:
                return False
            self.faulted[(spec, path)] = done + 1
            return True

    def token(self) -> str:
        # read per request so the token can be written or rotated while the mirror runs
        try:
            return self.token_file.read_text().strip() if self.token_file else ""
        except OSError:
            return ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gpufleet-mirror/1"
    server: MirrorServer
    head: bool
    post: bool  # a POST: only the Hub API's paths-info answers one
    body: bytes  # a POST's body
    query: dict[str, str]
    rate: int  # bytes per second for file downloads; 0: as fast as it goes
    fault: str | None  # what goes wrong with this request's file download (see the docstring)

    # -- plumbing -------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        sys.stderr.write(f"{stamp} {self.client_address[0]} {format % args}\n")
        sys.stderr.flush()

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_POST(self) -> None:
        # only the Hub's paths-info; read the body first, so the connection can be reused
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if 0 < length <= MAX_BODY else b""
        self._dispatch(head=False, post=True)

    def _dispatch(self, head: bool, post: bool = False) -> None:
        self.head = head
        self.post = post
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        raw = url.path
        parts = [unquote(p) for p in raw.split("/")[1:]]
        self.rate = self.server.throttle
        self.fault = None
        if len(parts) > 2 and parts[0] == "slow" and parts[1].isdigit():
            self.rate = int(parts[1])
            raw = "/" + raw.split("/", 3)[3]
            parts = parts[2:]
        api_fault = None
        if len(parts) > 2 and parts[0] == "fault" and (m := FAULT_RE.match(parts[1])):
            spec = parts[1]
            raw = "/" + raw.split("/", 3)[3]
            parts = parts[2:]
            limit = int(m.group(3)) if m.group(3) else None
            is_api = parts[:2] == ["api", "models"]
            # a fault counts only the requests it is about: API calls, or file downloads
            counted = bool(m.group(1)) == is_api and raw != "/health"
            if counted and self.server.fault_due(spec, limit, raw):
                if is_api:
                    api_fault = m.group(2)
                else:
                    self.fault = m.group(2)
        try:
            if api_fault is not None:
                self._status_fault(api_fault)
                return
            if post and parts[:2] != ["api", "models"]:
                raise HubError(405, "Method Not Allowed")
            if raw == "/health":
                self._send_bytes(200, b"ok\n", "text/plain; charset=utf-8")
            elif parts[:2] == ["api", "models"]:
                self._api(parts[2:])
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(parts[0], parts[1], parts[3], "/".join(parts[4:]))
            else:
                self._static(unquote(raw))
        except HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send_json(e.status, {"error": e.message}, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_bytes(
        self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not self.head:
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        self._send_bytes(status, body, "application/json; charset=utf-8", headers)

    def _status_fault(self, kind: str) -> None:
        if kind not in STATUS_FAULTS:  # reset/stall/corrupt are about bodies; the API's is short
            kind = "500"
        status = int(kind)
        headers = {"Retry-After": "1"} if status == 429 else {}
        message = {429: "Too Many Requests", 404: "Entry not found"}.get(status, "Internal Error")
        self._send_json(status, {"error": f"{message} (sandbox fault)"}, headers)

    def _send_file(self, path: Path, ctype: str, headers: dict[str, str]) -> None:
        if self.fault in STATUS_FAULTS:
            self._status_fault(self.fault)
            return
        size = path.stat().st_size
        rng = parse_range(self.headers.get("Range"), size)
        if rng is False:
            self._send_bytes(
                416,
                b"",
                "text/plain",
                {**headers, "Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"},
            )
            return
        start, end = rng if rng else (0, size - 1)
        length = end - start + 1
        self.send_response(206 if rng else 200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.head or length <= 0:
            return
        rate = self.rate
        # about ten writes a second, so a throttled client sees a steady trickle
        chunk = max(1, min(CHUNK, rate // 10)) if rate else CHUNK
        # reset and stall send half the body first, so a client has something to resume from
        cut = start + length // 2 if self.fault in ("reset", "stall") else None
        with path.open("rb") as f:
            f.seek(start)
            while length > 0:
                data = f.read(min(chunk, length, (cut - f.tell()) if cut else length))
                if not data:
                    break
                if self.fault == "corrupt":
                    data = bytes(b ^ 0xFF for b in data)
                self.wfile.write(data)
                length -= len(data)
                if rate:
                    time.sleep(len(data) / rate)
                if cut is not None and f.tell() >= cut:
                    self._break_off()
                    return
        if length > 0:  # file shrank under us: the client must not reuse this connection
            self.close_connection = True

    def _break_off(self) -> None:
        self.wfile.flush()
        self.close_connection = True
        if self.fault == "stall":
            time.sleep(3600)  # the client gives up first; daemon threads die with the server
            return
        # SO_LINGER with a zero timeout: close() sends RST, as a dropped link or a proxy does
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    # -- static files ---------------------------------------------------------

    def _static(self, path: str) -> None:
        root = self.server.root
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if any(p == ".." or "\0" in p or "\\" in p for p in parts):
            self._send_bytes(403, b"forbidden\n", "text/plain; charset=utf-8")
            return
        target = root.joinpath(*parts).resolve()
        if not target.is_relative_to(root):  # a symlink pointing out of the root
            self._send_bytes(403, b"forbidden\n", "text/plain; charset=utf-8")
            return
        if not target.is_file():
            self._send_bytes(404, b"not found\n", "text/plain; charset=utf-8")
            return
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        mtime = self.date_time_string(int(target.stat().st_mtime))
        self._send_file(target, ctype, {"Last-Modified": mtime})

    # -- Hugging Face API -----------------------------------------------------

    def _repo(self, org: str, name: str, rev: str | None = None) -> Repo:
        repo_id = f"{org}/{name}"
        base = self.server.hf_root / org / name
        if not (NAME_RE.match(org) and NAME_RE.match(name)) or not (base / "repo.json").is_file():
            raise HubError(404, "Repository not found", "RepoNotFound")
        repo = Repo(repo_id, base, json.loads((base / "repo.json").read_text()))
        if repo.gated:
            self._check_token(repo_id)
        if rev is not None and rev not in ("main", repo.sha):
            raise HubError(404, f"Revision Not Found for url: {self.path}", "RevisionNotFound")
        return repo

    def _check_token(self, repo_id: str) -> None:
        auth = self.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        expected = self.server.token()
        if given and expected and hmac.compare_digest(given.encode(), expected.encode()):
            return
        raise HubError(
            401,
            f"Access to model {repo_id} is restricted. You must have access to it and be"
            " authenticated to access it. Please log in.",
            "GatedRepo",
        )

    def _api(self, parts: list[str]) -> None:
        if self.post:
            if len(parts) == 4 and parts[2] == "paths-info":
                self._paths_info(self._repo(parts[0], parts[1], parts[3]))
                return
            raise HubError(405, "Method Not Allowed")
        if len(parts) >= 4 and parts[2] == "tree":
            self._tree(self._repo(parts[0], parts[1], parts[3]), "/".join(parts[4:]).strip("/"))
        elif len(parts) == 2:
            self._info(self._repo(parts[0], parts[1]))
        elif len(parts) == 4 and parts[2] == "revision":
            self._info(self._repo(parts[0], parts[1], parts[3]))
        else:
            raise HubError(404, "Not Found")

    def _info(self, repo: Repo) -> None:
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        org = repo.id.split("/")[0]
        self._send_json(
            200,
            {
                "_id": repo.sha[:24],
                "id": repo.id,
                "modelId": repo.id,
                "author": org,
                "sha": repo.sha,
                "private": False,
                "disabled": False,
                "gated": "manual" if repo.gated else False,
                "library_name": repo.library,
                "tags": [repo.library],
                "siblings": [repo.sibling(p, blobs) for p in sorted(repo.files)],
                **({"usedStorage": sum(m["size"] for m in repo.files.values())} if blobs else {}),
            },
        )

    def _tree(self, repo: Repo, prefix: str) -> None:
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        entries = repo.tree(prefix, recursive)
        if entries is None:
            raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound")
        try:
            offset = int(base64.urlsafe_b64decode(self.query.get("cursor", "") + "==") or 0)
        except (ValueError, binascii.Error):
            raise HubError(400, "Invalid cursor") from None
        if offset < 0:
            raise HubError(400, "Invalid cursor")
        page = entries[offset : offset + self.server.page_size]
        headers = {}
        nxt = offset + self.server.page_size
        if nxt < len(entries):
            cursor = base64.urlsafe_b64encode(str(nxt).encode()).decode().rstrip("=")
            query = {**self.query, "cursor": cursor}
            host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
            url = f"http://{host}{quote(urlsplit(self.path).path)}?{urlencode(query)}"
            headers["Link"] = f'<{url}>; rel="next"'
        self._send_json(200, page, headers)

    def _paths_info(self, repo: Repo) -> None:
        """The entries of the paths asked for (a form or JSON body, ``paths`` repeated), as
        the tree lists them; a path that is not there is left out, as the Hub does."""
        body = self.body.decode(errors="replace")
        if self.headers.get("Content-Type", "").startswith("application/json"):
            try:
                asked = json.loads(body).get("paths", [])
            except (ValueError, AttributeError):
                raise HubError(400, "Invalid JSON body") from None
        else:
            asked = parse_qs(body).get("paths", [])
        if not isinstance(asked, list) or not all(isinstance(p, str) for p in asked):
            raise HubError(400, "paths must be a list of strings")
        dirs = repo.directories()
        entries = [
            repo.file_entry(p) if p in repo.files else repo.dir_entry(p)
            for p in dict.fromkeys(p.strip("/") for p in asked)
            if p in repo.files or p in dirs
        ]
        self._send_json(200, entries)

    def _resolve(self, org: str, name: str, rev: str, path: str) -> None:
        repo = self._repo(org, name, rev)
        meta = repo.files.get(path)
        if meta is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        headers = {
            "X-Repo-Commit": repo.sha,
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.split('/')[-1])}",
        }
        if repo.is_lfs(path):
            etag = f'"{meta["sha256"]}"'
            headers["ETag"] = headers["X-Linked-Etag"] = etag
            headers["X-Linked-Size"] = str(meta["size"])
        else:
            headers["ETag"] = f'"{meta["blob"]}"'
        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        self._send_file(repo.base / "files" / path, ctype, headers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sandbox mirror: apt files and Hub API shapes.")
    parser.add_argument("--root", required=True, help="static files (apt repositories, keys)")
    parser.add_argument("--hf-root", required=True, help="Hugging Face repos from build_hf_tree")
    parser.add_argument("--token-file", help="token required for gated repos")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=80, help="0 picks a free port")
    parser.add_argument("--page-size", type=int, default=1000, help="tree entries per page")
    parser.add_argument(
        "--throttle-bytes-per-sec",
        type=int,
        default=0,
        help="cap each file download at this rate (0: off), to interrupt downloads midway",
    )
    args = parser.parse_args(argv)
    if args.page_size < 1 or args.throttle_bytes_per_sec < 0:
        parser.error("--page-size must be >= 1 and --throttle-bytes-per-sec >= 0")

    server = MirrorServer((args.host, args.port), args)
    # PID 1 in a container ignores SIGTERM unless it handles it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    host, port = server.server_address[:2]
    sys.stderr.write(f"mirror listening on http://{host}:{port}\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
