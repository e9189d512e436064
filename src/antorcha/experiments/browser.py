"""A real headless Chromium driven over the Chrome DevTools Protocol, to load the dashboard as an
operator's browser does: for tests, the dashboard benchmark and the README's screenshot.

Only what those need: open a page, evaluate JavaScript, wait for a condition, take a full-page
screenshot. Chromium runs as root here, hence `--no-sandbox`; it gets a throw-away profile and its own
process group, and is killed with it. The binary is `$ANTORCHA_CHROMIUM`, else the first of chromium,
chromium-browser, google-chrome on PATH (Debian: `apt-get install chromium`).

    python -m antorcha.experiments.browser http://127.0.0.1:8080/ dashboard.png
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(RuntimeError):
    """Chromium is missing, did not start, or a page did not do what was waited for."""


def find_chromium() -> str | None:
    explicit = os.environ.get("ANTORCHA_CHROMIUM")
    if explicit:
        return explicit
    return next((path for name in _CANDIDATES if (path := shutil.which(name))), None)


class HeadlessChromium:
    def __init__(self, width: int = 1400, height: int = 1000, binary: str | None = None) -> None:
        self.width, self.height = width, height
        self.binary = binary or find_chromium()
        self._proc: subprocess.Popen[bytes] | None = None
        self._profile: tempfile.TemporaryDirectory[str] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 0

    async def __aenter__(self) -> HeadlessChromium:
        if self.binary is None:
            raise BrowserError("no Chromium found: apt-get install chromium, or set ANTORCHA_CHROMIUM")
        self._profile = tempfile.TemporaryDirectory(prefix="antorcha-chromium-")
        log_path = Path(self._profile.name) / "stderr.log"
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    "--headless",
                    "--no-sandbox",  # root in a container: the sandbox cannot start
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--hide-scrollbars",
                    "--remote-debugging-address=127.0.0.1",
                    "--remote-debugging-port=0",
                    f"--user-data-dir={self._profile.name}",
                    f"--window-size={self.width},{self.height}",
                    "about:blank",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        port = await self._devtools_port(log_path)
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page = next((t for t in targets if t.get("type") == "page"), None)
        if page is None:
            raise BrowserError(f"Chromium offers no page target: {targets}")
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def _devtools_port(self, log_path: Path, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", text)
            if found:
                return int(found.group(1))
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise BrowserError(f"Chromium exited with {self._proc.returncode}: {text[-2000:]}")
            await asyncio.sleep(0.05)
        raise BrowserError(f"Chromium did not open its DevTools port in {timeout_s}s")

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)
        if self._profile is not None:
            self._profile.cleanup()

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events arriving meanwhile are dropped)."""
        assert self._ws is not None
        self._next_id += 1
        call_id = self._next_id
        await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = await self._ws.receive()
            if message.type != aiohttp.WSMsgType.TEXT:
                raise BrowserError(f"DevTools connection closed during {method}: {message.type}")
            data = json.loads(message.data)
            if data.get("id") == call_id:
                if "error" in data:
                    raise BrowserError(f"{method} failed: {data['error']}")
                return dict(data.get("result", {}))

    async def navigate(self, url: str) -> None:
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"cannot open {url}: {result['errorText']}")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout_s: float, poll_s: float = 0.1) -> Any:
        """Evaluate `expression` until it is truthy; its value."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(BrowserError):  # e.g. while the page is still loading
                last = await self.evaluate(expression)
                if last:
                    return last
            await asyncio.sleep(poll_s)
        raise BrowserError(f"{expression!r} still {last!r} after {timeout_s}s")

    async def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """A PNG of the page (all of it, not just the window, with `full_page`)."""
        if full_page:
            metrics = await self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            await self.send(
                "Emulation.setDeviceMetricsOverride",
                width=self.width,
                height=max(self.height, int(size["height"])),
                deviceScaleFactor=1,
                mobile=False,
            )
            await asyncio.sleep(0.3)  # let the charts follow the new size
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=full_page)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


async def _screenshot(url: str, out: Path, timeout_s: float) -> None:
    async with HeadlessChromium() as browser:
        await browser.navigate(url)
        await browser.wait_for("document.body && document.body.dataset.ready === '1'", timeout_s)
        await asyncio.sleep(1.0)
        await browser.screenshot(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m antorcha.experiments.browser DASHBOARD_URL OUT.png", file=sys.stderr)
        return 2
    asyncio.run(_screenshot(args[0], Path(args[1]), 60.0))
    print(args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
