"""The admin listener: `/healthz`, `/readyz` and `/metrics`, on their own port, never proxied.

Owns: the three endpoints and what they answer. Liveness says only that the event loop
answers; readiness asks the runtime (config loaded, every provider in use holds keys, not
draining); metrics renders the runtime's private registry. Does not own: deciding
readiness (runtime.py) or any metric (metrics.py).
"""

from __future__ import annotations

from aiohttp import web

from .runtime import Runtime

__all__ = ["create_admin_app"]

_RUNTIME = web.AppKey("runtime", Runtime)


def create_admin_app(runtime: Runtime) -> web.Application:
    app = web.Application()
    app[_RUNTIME] = runtime
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def _readyz(request: web.Request) -> web.Response:
    ready, why = request.app[_RUNTIME].readiness()
    return web.json_response({"ready": ready, "reason": why}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[_RUNTIME].metrics.render(request.headers.get("Accept"))
    response = web.Response(body=body)
    # prometheus-client's content type carries parameters (version, charset): set it whole.
    response.headers["Content-Type"] = content_type
    return response
