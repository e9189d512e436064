"""The coordinator's HTTP server: the dashboard page, its JSON API and Prometheus' /metrics.

It runs on the coordinator's own asyncio loop (aiohttp), next to the gRPC server: handlers read the
core's state directly, without locks, and each answers in well under a millisecond to a few
milliseconds (every document is bounded, see `api`), so the loop, and with it gRPC, is never held
up. The page and its static files are read once at start and served from memory.

Routes (all GET): `/` the page; `/static/<file>`; `/metrics`; `/healthz`; `/api/status`;
`/api/workers`; `/api/rounds?since=&limit=` (a page of the round log; without `since`, the newest);
`/api/series?points=` (the round log downsampled for charts); `/api/timeline?rounds=`;
`/api/events?limit=`. The dashboard only reads: pausing, resuming and evicting are operator RPCs
(`antorcha pause|resume|evict`). It has no login yet: bind it to a private address (the default is
the gRPC host, 127.0.0.1) or put it behind an authenticating proxy.
"""

from __future__ import annotations

import json
import logging
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from antorcha.dashboard.api import DashboardApi, bind_metrics

if TYPE_CHECKING:
    from antorcha.coordinator.core import CoordinatorCore

log = logging.getLogger(__name__)

_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".txt": "text/plain"}


def _static_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type) of every file the page needs, read from the installed package."""
    out = {}
    for entry in files("antorcha.dashboard").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        out[entry.name] = (entry.read_bytes(), _TYPES.get(suffix, "application/octet-stream"))
    return out


def _int_arg(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"query parameter {name!r} must be an integer, got {raw!r}") from None


def _json(doc: dict[str, Any]) -> web.Response:
    # allow_nan=False: a NaN that slipped past api.num would make the browser reject the whole answer.
    return web.Response(
        text=json.dumps(doc, allow_nan=False, separators=(",", ":")),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


class DashboardServer:
    def __init__(self, core: CoordinatorCore, host: str, port: int) -> None:
        self.core, self.host, self.port = core, host, port
        self.api = DashboardApi(core)
        self._static = _static_files()
        self._runner: web.AppRunner | None = None
        bind_metrics(core)

    def switch(self, core: CoordinatorCore) -> None:
        """Show another run (the coordinator moved to the next queued run)."""
        self.core, self.api = core, DashboardApi(core)
        bind_metrics(core)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._file)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/workers", self._workers)
        app.router.add_get("/api/rounds", self._rounds)
        app.router.add_get("/api/series", self._series)
        app.router.add_get("/api/timeline", self._timeline)
        app.router.add_get("/api/events", self._events)
        return app

    async def start(self) -> int:
        """Listen; returns the port (useful with port 0)."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- handlers --------------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.Response:
        return _json(self.api.status())

    async def _workers(self, request: web.Request) -> web.Response:
        return _json(self.api.workers())

    async def _page(self, request: web.Request) -> web.Response:
        body, content_type = self._static["index.html"]
        return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "no-cache"})

    async def _file(self, request: web.Request) -> web.Response:
        found = self._static.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound(text="no such file")
        body, content_type = found
        return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "max-age=300"})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.core.telemetry.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _rounds(self, request: web.Request) -> web.Response:
        since = _int_arg(request, "since", None)
        return _json(self.api.rounds(since, _int_arg(request, "limit", 100) or 0))

    async def _series(self, request: web.Request) -> web.Response:
        return _json(self.api.series(_int_arg(request, "points", 500) or 0))

    async def _timeline(self, request: web.Request) -> web.Response:
        return _json(self.api.timeline(_int_arg(request, "rounds", 20) or 0))

    async def _events(self, request: web.Request) -> web.Response:
        return _json(self.api.events(_int_arg(request, "limit", 100) or 0))
