"""A stand-in for Label Studio's /data/upload file serving on 127.0.0.1, checking the token."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response


@contextmanager
def serve_files(files: dict[str, Path], token: str) -> Iterator[str]:
    """Serve {url path: file} on a free 127.0.0.1 port; yields the base URL. Requests log in .hits."""

    @Request.application
    def app(request: Request) -> Response:
        if request.headers.get("Authorization") != f"Token {token}":
            return Response("unauthorized", status=401)
        path = files.get(request.full_path.rstrip("?"))
        if path is None:
            return Response("not found", status=404)
        return Response(path.read_bytes(), mimetype="application/octet-stream")

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
