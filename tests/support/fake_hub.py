"""A local HTTP server that plays the Hugging Face Hub's file routes for `huggingface_hub`.

It answers `HEAD` and `GET /{owner}/{repo}/resolve/{revision}/{file}` with the headers the
client reads (X-Repo-Commit, ETag as the file's SHA-256, Content-Length) and honours
`Range`, so downloads can resume. Point HF_ENDPOINT at `url`.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    """Files served by path `owner/repo/file`; `corrupt` serves other bytes under the same
    SHA-256; `cut_after` ends the next whole-file GET after that many bytes (a dropped
    connection); `requests` records (method, path, Range header)."""

    url: str = ""
    files: dict[str, Path] = field(default_factory=dict)
    corrupt: bool = False
    cut_after: int | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _file(self) -> tuple[bytes, str] | None:
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return None
            path = hub.files.get("/".join([parts[0], parts[1], *parts[4:]]))
            if path is None:
                return None
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if hub.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            return data, digest

        def _answer(self, body: bool) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Range")))
            found = self._file()
            if found is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data, digest = found
            start = 0
            wanted = self.headers.get("Range")
            if wanted and wanted.startswith("bytes=") and body:
                start = int(wanted.removeprefix("bytes=").split("-")[0] or 0)
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{digest}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if body and not start and hub.cut_after is not None:
                self.wfile.write(data[: hub.cut_after])
                hub.cut_after = None
                self.close_connection = True
                return
            if body:
                self.wfile.write(data[start:])

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

    return Handler


@contextmanager
def fake_hub(files: dict[str, Path]) -> Iterator[FakeHub]:
    """Serve `files` (by `owner/repo/file`) on a free local port until the block ends."""
    hub = FakeHub(files=dict(files))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
