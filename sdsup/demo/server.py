"""The demo's HTTP server: the page (static/), its JSON API and the generated files, on the standard library.

  GET  /                    the page;  GET /static/<file>: its script and style
  GET  /api/info            the workdir: classes and palette, what its stages allow, default settings
  GET  /api/status          what the models are doing (the progress indicator) and the warm-up's state
  POST /api/layout          {prompt, mode, seed, steps, temperature, guidance} -> a layout from the prompt
  POST /api/upload_layout   {filename, data (base64), snap} -> the layout in an uploaded .png / .npy
  POST /api/photo           {filename, data (base64)} -> the evaluation segmenter's map of a photo
  POST /api/export_layout   {ids} -> download addresses of the map as .npy and palette .png
  POST /api/generate        {prompt, layout, seed, num_samples, steps, guidance, solver, layout_token}
                            -> images, the segmenter's readings, mIoU, files, the sdsup.sample commands
  GET  /files/<path>        a file the engine wrote (?download=1 to save it); GET /zip/<run>: a run's files

Errors the user can fix come back as {"error": one line} with status 400;
anything else as status 500 with one line, and the traceback in the server's
log. The server binds 127.0.0.1 unless told otherwise: it runs models on
request and is meant for the local machine.
"""

from __future__ import annotations

import base64
import binascii
import http.server
import io
import json
import mimetypes
import os
import threading
import urllib.parse
import zipfile
from typing import Optional

from absl import logging

from sdsup.cli import one_line
from sdsup.demo import engine as engine_lib
from sdsup.demo.layouts import DemoError
from sdsup.errors import SdsupError

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_BODY_BYTES = 64 * 1024 * 1024  # an upload of layouts.MAX_UPLOAD_BYTES, base64 and JSON around it


def _upload_bytes(body: dict) -> bytes:
    try:
        return base64.b64decode(body.get("data") or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise DemoError("the upload did not arrive as base64; reload the page") from None


# The POST endpoints: body -> the engine's call -> a JSON-able result.
ENDPOINTS = {
    "/api/layout": lambda engine, body: engine.layout(
        body.get("prompt"), body.get("mode", "sample"), body.get("seed", 0), body.get("steps"),
        body.get("temperature"), body.get("guidance")),
    "/api/upload_layout": lambda engine, body: engine.upload_layout(
        str(body.get("filename", "")), _upload_bytes(body), bool(body.get("snap"))),
    "/api/photo": lambda engine, body: engine.segment_photo(str(body.get("filename", "")), _upload_bytes(body)),
    "/api/export_layout": lambda engine, body: engine.export_layout(body.get("ids")),
    "/api/generate": lambda engine, body: engine.generate(
        body.get("prompt"), body.get("layout"), body.get("seed", 0), body.get("num_samples", 1), body.get("steps"),
        body.get("guidance"), body.get("solver"), body.get("layout_token")),
}


def make_handler(engine: engine_lib.Engine):
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "sdsup-demo"

        def log_message(self, format, *args):  # noqa: A002 (the base class's name)
            logging.debug("demo %s: " + format, self.address_string(), *args)

        # -- responses --------------------------------------------------------------------------
        def _send(self, status: int, payload: bytes, content_type: str, extra: Optional[dict] = None):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        def _json(self, status: int, value) -> None:
            self._send(status, json.dumps(value).encode("utf-8"), "application/json")

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": message})

        def _file(self, path: str, download: bool = False) -> None:
            try:
                with open(path, "rb") as f:
                    payload = f.read()
            except OSError:
                return self._error(404, f"no file {os.path.basename(path)}")
            kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
            extra = {"Content-Disposition": f'attachment; filename="{os.path.basename(path)}"'} if download else None
            self._send(200, payload, kind, extra)

        def _inside(self, root: str, relative: str) -> Optional[str]:
            """root/relative if it stays inside root (no '..' escapes), else None."""
            path = os.path.realpath(os.path.join(root, relative))
            return path if path.startswith(os.path.realpath(root) + os.sep) else None

        # -- routes -----------------------------------------------------------------------------
        def do_GET(self):  # noqa: N802 (the base class's name)
            url = urllib.parse.urlsplit(self.path)
            path, query = urllib.parse.unquote(url.path), urllib.parse.parse_qs(url.query)
            if path in ("/", "/index.html"):
                return self._file(os.path.join(STATIC, "index.html"))
            if path == "/api/info":
                return self._json(200, engine.info())
            if path == "/api/status":
                return self._json(200, engine.status())
            if path.startswith("/static/"):
                target = self._inside(STATIC, path[len("/static/"):])
                return self._file(target) if target else self._error(404, "not found")
            if path.startswith("/files/"):
                target = self._inside(engine.out, path[len("/files/"):])
                return self._file(target, download="download" in query) if target else self._error(404, "not found")
            if path.startswith("/zip/"):
                return self._zip(path[len("/zip/"):])
            return self._error(404, f"not found: {path}")

        def _zip(self, run: str) -> None:
            folder = self._inside(engine.out, run)
            if not folder or not os.path.isdir(folder):
                return self._error(404, f"no run {run}")
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for name in sorted(os.listdir(folder)):
                    if os.path.isfile(os.path.join(folder, name)):
                        archive.write(os.path.join(folder, name), f"{run}/{name}")
            self._send(200, buffer.getvalue(), "application/zip",
                       {"Content-Disposition": f'attachment; filename="{run}.zip"'})

        def do_POST(self):  # noqa: N802 (the base class's name)
            path = urllib.parse.urlsplit(self.path).path
            if path not in ENDPOINTS:
                return self._error(404, f"no endpoint {path}")
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    raise DemoError(f"the request is {length / 2 ** 20:.0f} MiB; the page takes up to "
                                    f"{MAX_BODY_BYTES // 2 ** 20} MiB")
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise DemoError("the request must be a JSON object")
                return self._json(200, ENDPOINTS[path](engine, body))
            except json.JSONDecodeError as e:
                return self._error(400, f"the request is not JSON: {e}")
            except SdsupError as e:
                return self._error(400, one_line(e))
            except Exception as e:  # a bug, not the user's input: one line for the page, the traceback in the log
                logging.exception("demo: %s failed", path)
                return self._error(500, f"unexpected {type(e).__name__}: {one_line(e)} (the server's log has the "
                                        "traceback)")

    return Handler


class DemoServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a request still running never keeps the process from exiting

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def make_server(engine: engine_lib.Engine, host: str = "127.0.0.1", port: int = 7860) -> DemoServer:
    """The server, bound and ready (port 0: any free port; `server.url` says which)."""
    try:
        return DemoServer((host, port), make_handler(engine))
    except OSError as e:
        raise DemoError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def serve_in_thread(server: DemoServer) -> threading.Thread:
    """Serves in a background thread (tests, notebooks); `server.shutdown()` stops it."""
    thread = threading.Thread(target=server.serve_forever, name="sdsup-demo-server", daemon=True)
    thread.start()
    return thread
