"""The proxy's aiohttp application: wiring, lifecycle of long-lived parts, and the one place errors become responses.

Owns: `create_app` (typed `AppKey` state; `cleanup_ctx` opening the upstream client
session and the key sources before the first request and closing them after the last),
the request entry point that wraps `pipeline.run` — every `ProxyError` becomes its status,
a fixed JSON body and, for auth errors, an RFC 6750 challenge; anything unexpected becomes
a 500 that reveals nothing — and the metrics and access-log line of every request.
Does not own: any decision (pipeline.py and the modules it calls decide).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from .clock import Clock, SystemClock
from .config import Settings
from .errors import AuthError, KeysUnavailable, ProxyError, Reason, UpstreamUnavailable
from .forward import new_session
from .identity import request_id
from .keys import KeyRing
from .metrics import Decision, Metrics
from .pipeline import Exchange, run
from .runtime import Runtime, build_snapshot

__all__ = ["RUNTIME", "create_app", "error_response"]

RUNTIME = web.AppKey("runtime", Runtime)
access_log = logging.getLogger("jwt_sidecar.access")
log = logging.getLogger("jwt_sidecar")


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    session: aiohttp.ClientSession | None = None,
    config_path: str | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """The proxy application for `settings`. `session` is for tests that bring their own client."""
    runtime = Runtime(settings=settings, clock=clock or SystemClock(), metrics=metrics or Metrics(),
                      config_path=config_path)
    # No routes: `_entry` is the app's only middleware and never calls the router's handler,
    # so every request, `OPTIONS *` and `CONNECT host:443` included, gets our answer, our
    # metrics and our log line (the router would 404 those by itself).
    app = web.Application(handler_args={"max_field_size": 16384}, middlewares=[_entry])
    app[RUNTIME] = runtime
    app.cleanup_ctx.append(_lifecycle(runtime, session))
    app.on_response_prepare.append(_server_header)
    return app


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp would announce "Python/3.x aiohttp/3.y" on our own answers: say less.
    response.headers.setdefault("Server", "jwt-sidecar")


def _lifecycle(runtime: Runtime, session: aiohttp.ClientSession | None):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        own_session = session is None
        runtime.session = session or new_session()
        keyring = KeyRing(runtime.settings.providers, session=runtime.session, clock=runtime.clock)
        # First key loads happen before the listener opens; a failed one only leaves the
        # provider not ready (503s and /readyz false) until the background refresh succeeds.
        await keyring.start()
        runtime.snapshot = build_snapshot(runtime.settings, keyring=keyring, clock=runtime.clock,
                                          metrics=runtime.metrics)
        try:
            yield
        finally:
            snapshot = runtime.snapshot
            if snapshot is not None:
                await snapshot.keyring.close()
            if own_session:
                await runtime.session.close()

    return ctx


@web.middleware
async def _entry(request: web.Request, handler: Handler) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    metrics = runtime.metrics
    exchange = Exchange(request_id=request_id(request.headers.get("X-Request-Id")), started=time.perf_counter())
    metrics.in_flight.inc()
    response: web.StreamResponse | None = None
    try:
        response = await run(request, runtime, exchange)
        return response
    except ProxyError as error:
        exchange.reason = str(error.reason)
        if exchange.decision is not Decision.ALLOWED:
            exchange.decision = Decision.DENIED if isinstance(error, (AuthError, KeysUnavailable)) else Decision.REJECTED
        if isinstance(error, UpstreamUnavailable):
            exchange.decision = Decision.UPSTREAM_ERROR
        log.log(logging.WARNING if error.status >= 500 else logging.DEBUG,
                "request %s refused: %s: %s", exchange.request_id, error.reason, error.detail)
        realm = (exchange.snapshot or runtime).settings.realm
        response = error_response(error, realm=realm, request_id_value=exchange.request_id)
        return response
    except Exception:
        # Fail closed and say nothing: the traceback is for the operator's log only.
        log.exception("request %s failed unexpectedly", exchange.request_id)
        exchange.reason = str(Reason.INTERNAL)
        if exchange.decision is Decision.ALLOWED:
            exchange.decision = Decision.UPSTREAM_ERROR
        response = web.json_response({"error": "server_error", "error_description": "Internal error"}, status=500,
                                     headers={"X-Request-Id": exchange.request_id})
        return response
    finally:
        metrics.in_flight.dec()
        exchange.status = response.status if response is not None else 499  # cancelled: client went away
        _record(runtime, request, exchange)


def error_response(error: ProxyError, *, realm: str, request_id_value: str) -> web.Response:
    headers = {"X-Request-Id": request_id_value, "Cache-Control": "no-store"}
    if isinstance(error, AuthError):
        headers["WWW-Authenticate"] = error.challenge(realm)
    if isinstance(error, KeysUnavailable):
        headers["Retry-After"] = "5"
    body = {"error": error.error_code, "error_description": error.description}
    return web.json_response(body, status=error.status, headers=headers)


def _record(runtime: Runtime, request: web.Request, exchange: Exchange) -> None:
    route_metrics = exchange.metrics
    if route_metrics is None and exchange.snapshot is not None:
        route_metrics = exchange.snapshot.unmatched
    if route_metrics is not None:
        route_metrics.count(request.method, exchange.decision, exchange.reason, exchange.status)
    if runtime.settings.access_log and access_log.isEnabledFor(logging.INFO):
        # Never the token, never the query string (it may hold one): the normalised path only.
        access_log.info(json.dumps({
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": exchange.request_id,
            "client": request.remote,
            "method": request.method,
            "path": exchange.path or request.raw_path.partition("?")[0][:256],
            "route": exchange.route,
            "status": exchange.status,
            "decision": str(exchange.decision),
            "reason": exchange.reason,
            "subject": exchange.subject,
            "latency_ms": round((time.perf_counter() - exchange.started) * 1000, 3),
        }, separators=(",", ":")))
