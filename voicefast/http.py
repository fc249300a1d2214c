"""Plain HTTP routes on the WebSocket port (sans-I/O): path -> (status, content type, body)."""

from __future__ import annotations

import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".json": "application/json", ".svg": "image/svg+xml", ".wasm": "application/wasm",
          ".png": "image/png", ".ico": "image/x-icon", ".txt": "text/plain; charset=utf-8"}


@dataclass(slots=True)
class HttpReply:
    status: int
    content_type: str
    body: bytes

    @staticmethod
    def json(obj, status: int = 200) -> HttpReply:
        return HttpReply(status, "application/json", json.dumps(obj).encode())

    @staticmethod
    def text(msg: str, status: int) -> HttpReply:
        return HttpReply(status, "text/plain; charset=utf-8", (msg + "\n").encode())


def static_file(root: Path, url_path: str) -> HttpReply:
    """Serve a file under `root` (the demo folder); '/' -> index.html; never anything outside root."""
    rel = unquote(urlsplit(url_path).path).lstrip("/") or "index.html"
    if "\x00" in rel or rel.startswith(("/", "\\")) or any(p in ("..", "") for p in rel.split("/")[:-1]) \
            or ".." in rel.split("/"):
        return HttpReply.text("not found", 404)
    base = root.resolve()
    try:
        p = (base / rel).resolve()
    except (OSError, RuntimeError):
        return HttpReply.text("not found", 404)
    if base not in p.parents or not p.is_file():
        return HttpReply.text("not found", 404)
    ctype = _TYPES.get(p.suffix.lower()) or mimetypes.guess_type(p.name)[0] or "application/octet-stream"
    return HttpReply(200, ctype, p.read_bytes())
