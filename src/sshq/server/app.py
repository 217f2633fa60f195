"""The FastAPI application of ``sshq serve``.

- ``/api/v1``: the native API (:mod:`sshq.server.api`), farm runs under
  ``/api/v1/farm`` (:mod:`sshq.server.farm`);
- ``/firecrest``: the FirecREST v2 subset (:mod:`sshq.server.firecrest`);
- ``/``: the web page (``sshq/server/static``, shipped in the package);
- ``/openapi.json`` and ``/docs``: FastAPI's.

Every route but the page and the docs needs ``Authorization: Bearer
<token>`` (401 otherwise, saying nothing about jobs or platforms).  Request
bodies larger than ``max_body`` bytes are refused with 413 before they are
read whole.  Every response says how long the application took to start it
(``Server-Timing: app;dur=<ms>``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .. import __version__
from . import DEFAULT_FARM_RETENTION
from .gateway import ApiError, Gateway

__all__ = ["create_app", "MAX_BODY"]

#: The largest request body accepted, in bytes (16 MiB).
MAX_BODY = 16 * 1024 * 1024

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]


class _BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes (by its
    Content-Length, or counted as it streams in)."""

    def __init__(self, app: Callable[[_Scope, _Receive, _Send], Awaitable[None]],
                 limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _too_large(scope, send, self.limit)
                    return
        seen = 0
        started = False

        async def counting_receive() -> _Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        t0 = time.perf_counter()

        async def tracking_send(message: _Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                # the time the application took, for clients and benchmarks
                ms = (time.perf_counter() - t0) * 1000
                message = dict(message, headers=[*message.get("headers", []),
                                                 (b"server-timing", b"app;dur=%.2f" % ms)])
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _too_large(scope, send, self.limit)


class _TooLarge(Exception):
    pass


async def _too_large(scope: _Scope, send: _Send, limit: int) -> None:
    path = str(scope.get("path", ""))
    resp = error_response(path, 413, f"request body larger than {limit} bytes")
    await resp(scope, _no_receive, send)


async def _no_receive() -> _Message:
    return {"type": "http.disconnect"}


def error_response(path: str, status: int, message: str) -> JSONResponse:
    """An error in the shape of the API the path belongs to.

    ``/firecrest``: FirecREST's ``{"errorType", "message", "causedBy",
    "data", "user"}``; elsewhere ``{"detail": message}``.  A 401 also
    carries ``WWW-Authenticate: Bearer``.
    """
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if path.startswith("/firecrest"):
        body: dict[str, Any] = {"errorType": "error", "message": message, "causedBy": None,
                                "data": None, "user": None}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def static_file(name: str) -> bytes:
    """A file of the page, shipped in ``sshq/server/static``."""
    return resources.files("sshq.server").joinpath("static", name).read_bytes()


_STATIC_TYPES = {"app.js": "text/javascript; charset=utf-8",
                 "style.css": "text/css; charset=utf-8"}


def create_app(gateway: Gateway, *, max_body: int = MAX_BODY,
               background: bool = True,
               farm_retention: float = DEFAULT_FARM_RETENTION) -> FastAPI:
    """The application over one :class:`Gateway`.

    Args:
        gateway: the server's core (client, database, poller).
        max_body: the largest request body, in bytes (413 above).
        background: start the poller, the webhook sender and the farm runs'
            expiry with the app.
        farm_retention: seconds a farm run that ended is kept
            (:class:`~sshq.server.farm.FarmRuns`).

    With ``SSHQ_SERVE_LAG_PROBE`` set in the environment, an event-loop lag
    probe runs beside the application, with its debug route
    (:mod:`sshq.server.lagprobe`; benchmarks only).
    """

    from .farm import FarmRuns
    from .lagprobe import from_env

    farms = FarmRuns(gateway, retention=farm_retention)
    probe = from_env()  # benchmarks only (SSHQ_SERVE_LAG_PROBE)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if background:
            gateway.start()
            farms.start()
        if probe is not None:
            probe.start()
        try:
            yield
        finally:
            if probe is not None:
                await probe.stop()
            await farms.stop()
            await gateway.stop()
            farms.close()

    app = FastAPI(title="sshq", version=__version__, lifespan=lifespan,
                  description="An HTTP gateway to clusters reached by SSH (`sshq serve`):"
                  " the native API under /api/v1 and a FirecREST v2 subset under"
                  " /firecrest.  Every route needs `Authorization: Bearer <token>`"
                  " (`sshq token create`).")
    app.state.gateway = gateway
    app.state.farms = farms

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error_response(request.url.path, exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        if request.url.path.startswith("/firecrest"):
            msg = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
            return JSONResponse({"errorType": "validation", "message": msg,
                                 "causedBy": None, "data": None, "user": None},
                                status_code=400)
        return JSONResponse({"detail": errors}, status_code=422)

    from .api import router as api_router
    from .farm import router as farm_router
    from .firecrest import router as firecrest_router

    app.include_router(api_router, prefix="/api/v1")
    if probe is not None:
        from .api import require_token

        @app.get("/api/v1/debug/loop-lag", include_in_schema=False,
                 dependencies=[Depends(require_token)])
        async def loop_lag(reset: bool = False) -> dict[str, Any]:
            assert probe is not None
            return probe.stats(reset=reset)

    app.include_router(farm_router, prefix="/api/v1")
    app.include_router(firecrest_router, prefix="/firecrest")

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(static_file("index.html"))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in _STATIC_TYPES:
            raise ApiError(404, "not found")
        return Response(static_file(name), media_type=_STATIC_TYPES[name],
                        headers={"Cache-Control": "no-cache"})

    app.add_middleware(_BodyLimit, limit=max_body)
    return app
