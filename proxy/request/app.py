"""The proxy's request entry and lifecycle: the one place errors become responses.

Owns: `Proxy` — the handler our HTTP/1.1 server (http1.py) calls for every request, `start()`
(the upstream client session, the key sources, the first snapshot) and `close()` — and the
entry that wraps `pipeline.begin` and the coroutine it returns: every `ProxyError` becomes
its status, a fixed JSON body (`ProxyError.fields()`) and, for auth errors, an RFC 6750
challenge built from the same fields; anything
unexpected becomes a 500 that reveals nothing; every request gets its metrics and one
access-log line. A refusal is answered within `handle` itself (no task); an allowed request
comes back to the server as a coroutine to run.
Does not own: any decision (pipeline.py and the modules it calls decide).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

import aiohttp

from ..auth.keys import KeyRing
from ..base.clock import Clock, SystemClock
from ..base.errors import AuthError, KeysUnavailable, ProxyError, Reason, UpstreamUnavailable
from ..base.oplog import event
from ..config.settings import Settings
from ..http.http1 import Prepared, Request, Server
from ..http.upstream import Pool
from ..telemetry.accesslog import AccessLog
from ..telemetry.metrics import Decision, Metrics
from .forward import new_session
from .identity import request_id
from .pipeline import Exchange, begin
from .runtime import Runtime, build_snapshot

__all__ = ["Proxy", "respond_error"]

log = logging.getLogger("jwt_sidecar")


class Proxy:
    """The proxy: one request handler for the HTTP/1.1 server, and its lifecycle.

    Every request reaches `handle`, `OPTIONS *` and `CONNECT` included (the router refuses
    them). `start()` opens what `close()` closes.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        session: aiohttp.ClientSession | None = None,
        config_path: str | None = None,
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.runtime = Runtime(
            settings=settings,
            clock=clock or SystemClock(),
            metrics=metrics or Metrics(),
            config_path=config_path,
            access_log=access_log,
        )
        self._own_session = session is None
        self._session = session

    async def start(self) -> None:
        runtime = self.runtime
        runtime.session = self._session or new_session()
        runtime.pool = Pool()
        keyring = KeyRing(runtime.settings.providers, session=runtime.session, clock=runtime.clock)
        # First key loads happen before the listener opens; a failed one only leaves the
        # provider not ready (503s and /readyz false) until the background refresh succeeds.
        await keyring.start()
        runtime.snapshot = build_snapshot(
            runtime.settings, keyring=keyring, clock=runtime.clock, metrics=runtime.metrics
        )

    async def close(self) -> None:
        runtime = self.runtime
        if runtime.snapshot is not None:
            await runtime.snapshot.keyring.close()
        if runtime.pool is not None:
            await runtime.pool.close()
        if self._own_session and runtime.session is not None:
            await runtime.session.close()

    def server(self, **kwargs: Any) -> Server:
        """The HTTP/1.1 server for this proxy; `await server.listen(host, port)` opens it.

        `header_timeout` and `max_connections` come from the config unless given (`serve`
        passes the connection limit derived from the open-file limit when none is set)."""
        settings = self.runtime.settings
        kwargs.setdefault("header_timeout", settings.header_timeout)
        kwargs.setdefault("max_connections", settings.max_connections)
        return Server(self.handle, on_refusal=self._refused, counts=self.runtime.metrics.connections, **kwargs)

    def _refused(self, status: int, client: str | None) -> None:
        # The parser refused the request (400, 414, 431, 501, 505), or its head did not arrive
        # in time (408): no route, no method we can trust; counted under the unmatched route so
        # a flood of them shows on dashboards.
        runtime = self.runtime
        reason = Reason.HEADER_TIMEOUT if status == 408 else Reason.MALFORMED_REQUEST
        exchange = Exchange(request_id=request_id(None), started=time.perf_counter(), status=status, reason=str(reason))
        if runtime.snapshot is not None:
            runtime.snapshot.unmatched.count("", exchange.decision, exchange.reason, status)
        if runtime.access_log is not None:
            runtime.access_log.request(
                request_id=exchange.request_id,
                client=client,
                method="",
                path="",
                route=exchange.route,
                status=status,
                decision=str(exchange.decision),
                reason=exchange.reason,
                subject=None,
                latency_ms=0.0,
            )

    def handle(self, request: Request) -> Coroutine[Any, Any, None] | None:
        """Answer `request` now (a refusal: None), or return the rest of its handling to await."""
        return _entry(request, self.runtime)


def _entry(request: Request, runtime: Runtime) -> Coroutine[Any, Any, None] | None:
    inbound = request.header(b"x-request-id")
    exchange = Exchange(
        request_id=request_id(None if inbound is None else inbound.decode("latin-1")), started=time.perf_counter()
    )
    runtime.metrics.in_flight += 1
    try:
        rest = begin(request, runtime, exchange)
    except Exception as error:
        try:
            _failed(request, runtime, exchange, error)
        finally:
            _end(runtime, request, exchange)
        return None
    except BaseException:
        _end(runtime, request, exchange)
        raise
    return _finish(rest, request, runtime, exchange)


async def _finish(rest: Coroutine[Any, Any, None], request: Request, runtime: Runtime, exchange: Exchange) -> None:
    try:
        if request.transport is None:
            # The client left before this task first ran: send nothing upstream for it (the
            # rest would write its head to a pooled connection before its first wait).
            rest.close()
            return
        await rest
    except Exception as error:
        _failed(request, runtime, exchange, error)
    finally:
        _end(runtime, request, exchange)


def _failed(request: Request, runtime: Runtime, exchange: Exchange, error: Exception) -> None:
    """Answer a request the pipeline failed on (call it from the `except` that caught `error`)."""
    if isinstance(error, ProxyError):
        exchange.reason = str(error.reason)
        if exchange.decision is not Decision.ALLOWED:
            exchange.decision = (
                Decision.DENIED if isinstance(error, (AuthError, KeysUnavailable)) else Decision.REJECTED
            )
        if isinstance(error, UpstreamUnavailable):
            exchange.decision = Decision.UPSTREAM_ERROR
        # A key outage is keys.py's to report, once per fetch: per request it is only a count.
        level = logging.WARNING if error.status >= 500 and not isinstance(error, KeysUnavailable) else logging.DEBUG
        if log.isEnabledFor(level):  # a refused request's cost is measured: no fields built for nothing
            event(
                log,
                level,
                "request_refused",
                "request %(request_id)s refused: %(reason)s: %(detail)s",
                request_id=exchange.request_id,
                reason=str(error.reason),
                detail=error.detail,
                status=error.status,
                route=exchange.route,
                provider=_provider(exchange),
            )
        realm = (exchange.snapshot or runtime).settings.realm
        respond_error(request, error, realm=realm, request_id_value=exchange.request_id)
        return
    # Fail closed and say nothing: the traceback is for the operator's log only.
    event(
        log,
        logging.ERROR,
        "request_crashed",
        "request %(request_id)s failed unexpectedly",
        request_id=exchange.request_id,
        route=exchange.route,
        exc_info=True,
    )
    exchange.reason = str(Reason.INTERNAL)
    if exchange.decision is Decision.ALLOWED:
        exchange.decision = Decision.UPSTREAM_ERROR
    request.respond(500, None, [*_INTERNAL_HEADERS, ("X-Request-Id", exchange.request_id)], _INTERNAL_BODY)


def _provider(exchange: Exchange) -> str | None:
    """The provider of the request's route; None before routing or on a public route."""
    plan = exchange.snapshot.plans.get(exchange.route) if exchange.snapshot is not None else None
    return plan.route.auth.provider if plan is not None and plan.route.auth is not None else None


def _end(runtime: Runtime, request: Request, exchange: Exchange) -> None:
    runtime.metrics.in_flight -= 1
    exchange.status = request.status or 499  # nothing written: the client went away
    _record(runtime, request, exchange)


_INTERNAL_BODY = json.dumps(ProxyError(Reason.INTERNAL).fields()).encode()
_INTERNAL_HEADERS = (
    ("Content-Type", "application/json; charset=utf-8"),
    ("Cache-Control", "no-store"),
    ("Server", "jwt-sidecar"),
)


def respond_error(request: Request, error: ProxyError, *, realm: str, request_id_value: str) -> None:
    # The answer to a refusal depends only on its kind, reason, scope and realm (a closed set
    # and config values), so it is built and encoded once; only X-Request-Id and Date vary.
    key = (type(error), error.reason, getattr(error, "scope", None), realm)
    answer = _ANSWERS.get(key)
    if answer is None:
        if len(_ANSWERS) > 1024:  # only a pathological config could get here; stay bounded
            _ANSWERS.clear()
        answer = _ANSWERS[key] = _prepare(error, realm)
    request.send(answer, f"X-Request-Id: {request_id_value}\r\n")


_ANSWERS: dict[tuple[object, ...], Prepared] = {}


def _prepare(error: ProxyError, realm: str) -> Prepared:
    # Server: our own answers name us, and no versions.
    headers = {"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store", "Server": "jwt-sidecar"}
    if isinstance(error, AuthError):
        headers["WWW-Authenticate"] = error.challenge(realm)
    if isinstance(error, KeysUnavailable):
        headers["Retry-After"] = "5"
    # The body's error and error_description are the challenge's (errors.py builds both from
    # `fields()`): for no token at all both are absent (RFC 6750 §3.1) and the body is {}.
    body = json.dumps(error.fields()).encode()
    return Prepared(error.status, headers.items(), body)


def _record(runtime: Runtime, request: Request, exchange: Exchange) -> None:
    route_metrics = exchange.metrics
    if route_metrics is None and exchange.snapshot is not None:
        route_metrics = exchange.snapshot.unmatched
    if route_metrics is not None:
        route_metrics.count(request.method, exchange.decision, exchange.reason, exchange.status)
    if runtime.access_log is not None:
        # Never the token, never the query string (it may hold one): the normalised path only.
        runtime.access_log.request(
            request_id=exchange.request_id,
            client=request.remote,
            method=request.method,
            path=exchange.path or request.raw_path.partition("?")[0][:256],
            route=exchange.route,
            status=exchange.status,
            decision=str(exchange.decision),
            reason=exchange.reason,
            subject=exchange.subject,
            latency_ms=(time.perf_counter() - exchange.started) * 1000,
            provider=_provider(exchange),
        )
