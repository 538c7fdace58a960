"""`retrain dashboard`: the page and its data over HTTP on this machine (read-only; no login)."""

from __future__ import annotations

import json
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from worker.app.dashboard import CSP, dashboard_data, render
from worker.config import RetrainConfig
from worker.store import Store


def make_server(store: Store, config: RetrainConfig, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    allowed_hosts: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            # DNS rebinding: a page on another site can point its own name at 127.0.0.1 and read this
            # one, but its requests carry its own name in Host. Only this server's names are answered.
            if self.headers.get("Host", "").lower() not in allowed_hosts:
                self.send_error(421, "Misdirected Request: this dashboard answers only to its own address")
                return
            if self.path in ("/", "/index.html"):
                body, kind = render(dashboard_data(store, config)).encode(), "text/html; charset=utf-8"
            elif self.path == "/favicon.ico":
                self.send_response(204)
                self.end_headers()
                return
            elif self.path == "/dashboard.json":
                body, kind = json.dumps(dashboard_data(store, config), default=str).encode(), "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
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


def serve_dashboard(store: Store, config: RetrainConfig, host: str, port: int, announce: Callable[[str], None]) -> None:
    server = make_server(store, config, host, port)
    announce(f"http://{host}:{server.server_address[1]}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how the page is stopped: not an error
        return
    finally:
        server.server_close()
