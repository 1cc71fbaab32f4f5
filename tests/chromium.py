"""Headless Debian Chromium driven over the DevTools protocol, for tests of pages a person
would look at (`m3-curate preview --watch`).

No browser download and no driver package: `/usr/bin/chromium` (`apt-get install -y chromium`)
is started with remote debugging on a free port (it writes the port to `DevToolsActivePort`
in its fresh profile folder), and the page is read with `Runtime.evaluate` over the DevTools
websocket, through aiohttp (already installed with Ray's dashboard).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic", "--hide-scrollbars", "--window-size=1280,1600"]


class Chromium:
    """One headless browser showing one page; `evaluate` runs JavaScript in it."""

    def __init__(self, url: str, profile: Path, timeout: float = 60.0):
        self.proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", url],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start its DevTools server")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        while True:
            pages = [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list")) if t["type"] == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.ws_url = pages[0]["webSocketDebuggerUrl"]
        self._id = 0

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        import aiohttp

        self._id += 1
        async with aiohttp.ClientSession() as session, session.ws_connect(self.ws_url, max_msg_size=0) as ws:
            await ws.send_json({"id": self._id, "method": method, "params": params})
            async for msg in ws:
                data = json.loads(msg.data)
                if data.get("id") == self._id:
                    return data.get("result")
        return None

    def evaluate(self, expression: str) -> Any:
        result = asyncio.run(self._call("Runtime.evaluate", {"expression": expression, "returnByValue": True}))
        return (result or {}).get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Poll `expression` until it is truthy; its last value either way."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except Exception:  # the page is reloading: ask again
                value = None
            if value:
                return value
            time.sleep(0.2)
        return value

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
