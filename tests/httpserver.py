"""A tiny HTTP server on 127.0.0.1 for offline tests: serves registered files and simulated faults."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    delay: float = 0.0  # seconds to sleep before answering (simulates a timeout)
    truncate_to: int | None = None  # send only this many bytes but announce the full length
    trickle: float = 0.0  # send the body one byte at a time, this many seconds apart (a stalling server)
    headers: dict[str, str] = field(default_factory=dict)  # extra headers, e.g. {"Location": ...}


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
                    for name, value in route.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    if not route.trickle:
                        self.wfile.write(body)
                    for i in range(len(body) if route.trickle else 0):
                        time.sleep(route.trickle)
                        self.wfile.write(body[i:i + 1])
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)  # a short poll: shutdown() returns at once

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


@contextmanager
def silent_server():
    """URL of a port that accepts connections (the kernel completes them) and never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        host, port = listener.getsockname()[:2]
        yield f"http://{host}:{port}/never-answers.zip"
