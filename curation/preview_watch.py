"""`m3-curate preview … --watch`: the preview page served on 127.0.0.1, rendered again when a
template, a phrasing, a model card or the manifest changes, and reloaded in the browser.

    edit prompts/vista3d/my_draft.j2 → save → the page shows the new text (about a second)

The server holds one page and its version number. A watcher polls the modification times of
every file under the template folders (templates, phrasings, model cards), the `--template`
file and the manifest; on a change it renders the page again (findings from the caches, so no
expert runs twice) and bumps the version. The page asks `/version` a few times a second and
reloads itself when it changed. A mistake that stops the whole page (a template that does not
compile, a manifest typo) is shown as the page, and the next save that fixes it brings the
samples back. Only 127.0.0.1 is served: the page holds pictures of the archive.
"""

from __future__ import annotations

import argparse
import html
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from curation.atomic import write_text
from curation.errors import CurationError

log = logging.getLogger(__name__)
POLL_S = 0.25
WATCHED_SUFFIXES = (".j2", ".yaml", ".yml", ".jinja", ".txt")


class LivePage:
    """The page the server hands out, replaced whole on each render."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.version = 0
        self.html = ""

    def set(self, text: str, version: int) -> None:
        with self.lock:
            self.html, self.version = text, version


def watched_files(args: argparse.Namespace) -> dict[Path, float]:
    """Modification time of every file a re-render reads: the manifest, the `--template` file
    and everything under the template folders (the manifest's and the built-in ones)."""
    from curation.render.templates import BUILTIN_PROMPTS

    roots = [BUILTIN_PROMPTS]
    try:
        from curation.manifest import load_manifest

        roots += list(load_manifest(args.manifest).prompts)
    except CurationError:
        pass  # a manifest mid-edit: its own time is still watched
    files = [Path(args.manifest), *([Path(args.template)] if args.template else [])]
    if args.template:
        roots.append(Path(args.template).resolve().parent)
    for root in roots:
        files += [p for p in Path(root).rglob("*") if p.suffix in WATCHED_SUFFIXES]
    times = {}
    for f in files:
        try:
            times[f] = f.stat().st_mtime_ns
        except OSError:
            times[f] = -1.0
    return times


def _render(args: argparse.Namespace, page: LivePage, version: int) -> None:
    from curation.preview import make_page, page_html

    started = time.perf_counter()
    try:
        made = make_page(args, live=True, version=version)
        page.set(made.html, version)
        print(made.summary(Path(args.html), time.perf_counter() - started), flush=True)
        write_text(Path(args.html), made.html)
    except CurationError as e:
        body = f"<div class='error'>{html.escape(str(e))}</div><p>Fix it and save: this page reloads.</p>"
        page.set(page_html("m3-curate preview · error", body, attrs="data-failed='1'", live=True, version=version), version)
        print(f"m3-curate: error: {e}", flush=True)


def _handler(page: LivePage) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            with page.lock:
                text, version = page.html, page.version
            if self.path.split("?")[0] == "/version":
                self._send(str(version).encode(), "text/plain")
            elif self.path.split("?")[0] in ("/", "/index.html"):
                self._send(text.encode("utf-8"), "text/html; charset=utf-8")
            else:
                self.send_error(404)

        def _send(self, data: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
            log.debug("preview server: " + format, *args)

    return Handler


def _server(port: int, page: LivePage) -> ThreadingHTTPServer:
    try:
        return ThreadingHTTPServer(("127.0.0.1", port), _handler(page))
    except OSError as e:
        raise CurationError(f"--port {port}: cannot serve on 127.0.0.1 there ({e.strerror or e}): give another port, "
                            "or 0 for any free one") from None


def watch(args: argparse.Namespace) -> int:
    """Serve until interrupted (Ctrl-C: exit status 130)."""
    page = LivePage()
    version = 1
    server = _server(args.port, page)  # before the first render: a port in use is said at once
    _render(args, page, version)
    thread = threading.Thread(target=server.serve_forever, name="preview-server", daemon=True)
    thread.start()
    seen = watched_files(args)
    print(f"serving http://127.0.0.1:{server.server_address[1]}/ (watching {len(seen)} files; Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(POLL_S)
            now = watched_files(args)
            if now != seen:
                changed = sorted(str(p) for p in set(now) | set(seen) if now.get(p) != seen.get(p))
                log.info("changed: %s", ", ".join(changed[:3]) + (" …" if len(changed) > 3 else ""))
                seen = now
                version += 1
                _render(args, page, version)
    finally:
        server.shutdown()
        server.server_close()
