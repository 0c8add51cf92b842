"""The admin listener: `/healthz`, `/readyz` and `/metrics`, on their own port, never proxied.

Owns: the three endpoints and what they answer. Liveness says only that the event loop
answers; readiness asks the runtime (config loaded, every provider in use holds keys, not
draining) or, with `workers`, the supervisor; metrics renders the runtime's private registry
or the workers' aggregate. Does not own: deciding readiness (runtime.py, workers.py) or any
metric (metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

__all__ = ["create_admin_app"]

Readiness = Callable[[], tuple[bool, str]]
Render = Callable[[str | None], tuple[bytes, str]]
_READINESS: web.AppKey[Readiness] = web.AppKey("readiness")
_RENDER: web.AppKey[Render] = web.AppKey("render")


def create_admin_app(*, readiness: Readiness, render: Render) -> web.Application:
    """The admin endpoints over two callables: the runtime's (one process) or the supervisor's."""
    app = web.Application()
    app[_READINESS] = readiness
    app[_RENDER] = render
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def _readyz(request: web.Request) -> web.Response:
    ready, why = request.app[_READINESS]()
    return web.json_response({"ready": ready, "reason": why}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[_RENDER](request.headers.get("Accept"))
    response = web.Response(body=body)
    # prometheus-client's content type carries parameters (version, charset): set it whole.
    response.headers["Content-Type"] = content_type
    return response
