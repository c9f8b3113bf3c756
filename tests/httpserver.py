"""A tiny HTTP server on 127.0.0.1 for offline tests: serves registered files and simulated faults."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    delay: float = 0.0  # seconds to sleep before answering (simulates a timeout)
    truncate_to: int | None = None  # send only this many bytes but announce the full length


class LocalServer:
    """``server.add("/a.zip", data)`` then fetch ``server.url("/a.zip")``; ``hits`` counts requests."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: dict[str, int] = {}
        routes, hits = self.routes, self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                hits[self.path] = hits.get(self.path, 0) + 1
                route = routes.get(self.path, Route(b"not found", 404))
                if route.delay:
                    time.sleep(route.delay)
                body = route.body if route.truncate_to is None else route.body[: route.truncate_to]
                try:
                    self.send_response(route.status)
                    self.send_header("Content-Length", str(len(route.body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, path: str, body: bytes | Path, **kwargs) -> str:
        """Serve ``body`` (bytes or a file) at ``path``; return its URL."""
        data = body.read_bytes() if isinstance(body, Path) else body
        self.routes[path] = Route(data, **kwargs)
        return self.url(path)

    def add_tree(self, prefix: str, folder: Path) -> str:
        """Serve every file under ``folder`` below ``prefix``; return the base URL."""
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.add(f"{prefix}/{file.relative_to(folder).as_posix()}", file)
        return self.url(prefix)

    def url(self, path: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
