"""Serves fixed Prometheus text on loopback ports, as exporters and servers would.

    python fake_exporter.py SPEC.json

SPEC maps a port to ``{"body": path, "key": key or null}``; with a key, ``/metrics`` answers
401 unless the request carries ``Authorization: Bearer <key>`` (llama-server's rule). Runs
until terminated; one thread per port.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def handler(body: Path, key: str | None):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path != "/metrics":
                self.send_error(404)
                return
            if key and self.headers.get("Authorization") != f"Bearer {key}":
                self.send_error(401)
                return
            data = body.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    servers = [
        ThreadingHTTPServer(("127.0.0.1", int(port)), handler(Path(s["body"]), s.get("key")))
        for port, s in spec.items()
    ]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
