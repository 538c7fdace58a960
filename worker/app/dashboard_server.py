"""`retrain dashboard`: the console's pages and their data over HTTP on this machine (read-only; no login)."""

from __future__ import annotations

from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from worker.app.dashboard import CSP, respond
from worker.config import RetrainConfig
from worker.ports import BlobStore
from worker.store import Store

MAX_URL = 4096


def make_server(
    store: Store, config: RetrainConfig, host: str = "127.0.0.1", port: int = 0, manifests: BlobStore | None = None
) -> ThreadingHTTPServer:
    """The console on `host:port` (0: a free port); `manifests` is where frozen manifests are read."""
    allowed_hosts: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            # DNS rebinding: a page on another site can point its own name at 127.0.0.1 and read this
            # one, but its requests carry its own name in Host. Only this server's names are answered.
            if self.headers.get("Host", "").lower() not in allowed_hosts:
                self.send_error(421, "Misdirected Request: this dashboard answers only to its own address")
                return
            if len(self.path) > MAX_URL:
                self.send_error(414)
                return
            url = urlsplit(self.path)
            query = dict(parse_qsl(url.query, keep_blank_values=True))
            if url.path == "/favicon.ico":
                self.send_response(204)
                self.end_headers()
                return
            if url.path == "/dashboard.json":  # the overview's data (kept for scripts that read it)
                query = {**query, "format": "json"}
            elif url.path not in ("/", "/index.html"):
                self.send_error(404)
                return
            status, kind, text = respond(query, store, config, manifests)
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # quiet: the terminal is for the worker's own lines

    server = ThreadingHTTPServer((host, port), Handler)
    bound = server.server_address[1]
    names = {"127.0.0.1", "localhost", "[::1]", host if ":" not in host else f"[{host}]"}
    allowed_hosts.update(f"{name.lower()}:{bound}" for name in names)
    return server


def serve_dashboard(
    store: Store, config: RetrainConfig, host: str, port: int, announce: Callable[[str], None], manifests: BlobStore | None = None
) -> None:
    server = make_server(store, config, host, port, manifests)
    announce(f"http://{host}:{server.server_address[1]}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how the page is stopped: not an error
        return
    finally:
        server.server_close()
