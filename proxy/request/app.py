"""The proxy's request entry and lifecycle: the one place errors become responses.

Owns: `Proxy` — the handler our HTTP/1.1 server (http1.py) calls for every request, `start()`
(the upstream pool, the key fetcher, the key sources, the revocation list's follower, the first
snapshot) and `close()` — and the
entry that wraps `pipeline.begin` and the coroutine it returns: every `ProxyError` becomes
its status, a fixed JSON body (`ProxyError.fields()`) and, for auth errors, an RFC 6750
challenge built from the same fields (plus, on a route with `cors`, the CORS header lines for
the request's Origin, cors.py's, added per answer, never to a memoised one); anything
unexpected becomes a 500 that reveals nothing; every request gets its metrics and one
access-log line, from the request's `Exchange` (exchange.py), which `handle` makes. A refusal
(and a CORS preflight, which `begin` answers; and a missing token, which `begin` returns
rather than raises, answered by `_missing` as `_failed` answers a `TokenMissing`) is
answered within `handle` itself (no task);
an allowed request comes back to the server as a coroutine to run, and if the client left
before that coroutine began, it sends nothing upstream and records a 499 (`_finish`: the one
place this is handled; the server runs the coroutine regardless). One forwarded with no task
(forward.py's `Answering`, already sent upstream from `handle`) ends in `_settled`, which
forward.py calls once it is answered or has failed, as `_finish` ends.
Does not own: any decision (pipeline.py and the modules it calls decide).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

from ..auth.keys import KeyRing
from ..auth.revocationstore import start_store
from ..base.clock import Clock, SystemClock
from ..base.errors import AuthError, KeysUnavailable, ProxyError, Reason, TokenMissing, UpstreamUnavailable
from ..base.memo import Memo
from ..base.oplog import event
from ..config.settings import Settings
from ..http.fetch import Fetcher
from ..http.http1 import Prepared, Request, Server
from ..http.upstream import Pool
from ..telemetry.accesslog import AccessLog
from ..telemetry.metrics import Decision, Metrics, RouteMetrics
from .exchange import NO_ROUTE_NAME, Exchange
from .forward import Answering
from .identity import request_id
from .pipeline import begin, log_refused
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
        fetcher: Fetcher | None = None,
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
        self._own_fetcher = fetcher is None
        self._fetcher = fetcher
        self._keyring: KeyRing | None = None  # held from the start on, so a start stopped midway closes it

    async def start(self) -> None:
        runtime = self.runtime
        runtime.fetcher = self._fetcher or Fetcher()
        runtime.pool = Pool()
        keyring = self._keyring = KeyRing(runtime.settings.providers, fetcher=runtime.fetcher, clock=runtime.clock)
        # First key loads happen before the listener opens; a failed one only leaves the
        # provider not ready (503s and /readyz false) until the background refresh succeeds.
        await keyring.start()
        # The revocation list's first load, like the keys' (a store that cannot be read leaves
        # an empty list: `fail: open` serves, `fail: closed` is not ready until it loads).
        runtime.revocation = await start_store(runtime.settings.revocation, clock=runtime.clock)
        runtime.snapshot = build_snapshot(
            runtime.settings,
            keyring=keyring,
            clock=runtime.clock,
            metrics=runtime.metrics,
            revocation=runtime.revocation,
        )

    async def close(self) -> None:
        runtime = self.runtime
        if runtime.revocation is not None:
            await runtime.revocation.close()
        if runtime.snapshot is not None:
            await runtime.snapshot.keyring.close()
        elif self._keyring is not None:
            # A start stopped while the first keys load (SIGTERM): its fetches end here, before
            # the client they use closes under them (and logs a failed fetch nobody waits for).
            await self._keyring.close()
        if runtime.pool is not None:
            await runtime.pool.close()
        if self._own_fetcher and runtime.fetcher is not None:
            await runtime.fetcher.close()

    def server(self, **kwargs: Any) -> Server:
        """The HTTP/1.1 server for this proxy; `await server.listen(host, port)` opens it.

        `header_timeout`, `keepalive_timeout` and `max_connections` come from the config unless
        given (`serve` passes the connection limit derived from the open-file limit when none is set)."""
        settings = self.runtime.settings
        kwargs.setdefault("header_timeout", settings.header_timeout)
        kwargs.setdefault("keepalive_timeout", settings.keep_alive_timeout)
        kwargs.setdefault("max_connections", settings.max_connections)
        return Server(self.handle, on_refusal=self._refused, counts=self.runtime.metrics.connections, **kwargs)

    def _refused(self, status: int, client: str | None) -> None:
        # The parser refused the request (400, 414, 431, 501, 505), or its head did not arrive
        # in time (408): no route, no method we can trust; counted under the unmatched route so
        # a flood of them shows on dashboards.
        runtime = self.runtime
        reason = str(Reason.HEADER_TIMEOUT if status == 408 else Reason.MALFORMED_REQUEST)
        if runtime.snapshot is not None:
            runtime.snapshot.unmatched.count("", Decision.REJECTED, reason, status)
        if runtime.access_log is not None:
            runtime.access_log.request(
                request_id=request_id(None),
                client=client,
                method="",
                path="",
                route=NO_ROUTE_NAME,
                status=status,
                decision=str(Decision.REJECTED),
                reason=reason,
                subject=None,
                latency_ms=0.0,
            )

    def handle(self, request: Request) -> Coroutine[Any, Any, None] | Answering | None:
        """Answer `request` now (a refusal: None), or return the rest of its handling to await."""
        return _entry(request, self.runtime)


def _entry(request: Request, runtime: Runtime) -> Coroutine[Any, Any, None] | Answering | None:
    inbound = None
    for name, value in request.fields:  # (`request.header(b"x-request-id")`, written out: once per request)
        if len(name) == 12 and name.lower() == b"x-request-id":
            inbound = value.decode("latin-1")
            break
    ex = Exchange(request, runtime, request_id(inbound), time.perf_counter())
    try:
        rest = begin(ex)
        if rest is TokenMissing:  # no token where one is needed: begin said so without raising
            _missing(ex)
            rest = None
    except Exception as error:
        try:
            _failed(ex, error)
        finally:
            _record(ex)
        return None
    except BaseException:
        _record(ex)
        raise
    if rest is None:  # answered already (a refusal, a CORS preflight)
        _record(ex)
        return None
    # Counted only here: a request answered within `handle` is over before any scrape can run.
    runtime.metrics.in_flight += 1
    if rest.__class__ is Answering:  # forwarded with no task: it ends in `_settled`
        rest.settle = _settled
        return rest
    return _finish(ex, rest)  # type: ignore[arg-type]  # not TokenMissing (above): mypy does not narrow a class by `is`


async def _finish(ex: Exchange, rest: Coroutine[Any, Any, None]) -> None:
    try:
        if ex.request.transport is None:
            # The client left before this task first ran (the one place this is handled: the
            # server runs the rest regardless, see http1.Handler): send nothing upstream for
            # it (the rest would write its head to a pooled connection before its first wait).
            rest.close()
            return
        await rest
    except Exception as error:
        _failed(ex, error)
    finally:
        ex.runtime.metrics.in_flight -= 1
        _record(ex)


def _settled(ex: Exchange, error: Exception | None) -> None:
    """`_finish`'s end, for a request forwarded with no task (forward.py's `Answering`)."""
    try:
        if error is not None:
            _failed(ex, error)
    finally:
        ex.runtime.metrics.in_flight -= 1
        _record(ex)


def _missing(ex: Exchange) -> None:
    """The 401 for a request with no token on a route that needs one, as `_failed` answers a
    `TokenMissing(plan.missing)`, without one being made, raised and caught (bench/FIGURES.md,
    "The request side"): the same decision, reason, log event and answer."""
    plan, snapshot = ex.plan, ex.snapshot
    assert plan is not None and snapshot is not None
    ex.decision = _DENIED
    ex.reason = _TOKEN_MISSING
    if log.isEnabledFor(logging.DEBUG):  # (log_refused asks too: asked here, a call is saved when it is off)
        log_refused(ex, logging.DEBUG, _TOKEN_MISSING, plan.missing, 401)
    realm = snapshot.settings.realm
    if plan.cors is not None:
        respond_error(
            ex.request, TokenMissing(plan.missing), realm=realm, request_id_value=ex.request_id, cors=_cors(ex)
        )
        return
    answer = _MISSING.get(realm)
    if answer is None:
        answer = _MISSING.remember(realm, _prepare(TokenMissing(), realm))
    ex.request.send(answer, "X-Request-Id: " + ex.request_id + "\r\n")


def _failed(exchange: Exchange, error: Exception) -> None:
    """Answer a request the pipeline failed on (call it from the `except` that caught `error`)."""
    request = exchange.request
    if isinstance(error, ProxyError):
        if exchange.decision is not _WOULD_DENY or isinstance(error, UpstreamUnavailable):
            # A would-deny (report mode) keeps the reason it was forwarded with, whatever then
            # befalls its body; an upstream failure is counted as one whatever the mode.
            exchange.reason = str(error.reason)
        if exchange.decision is _REJECTED:  # not yet forwarded (allowed or would_deny)
            exchange.decision = (
                Decision.DENIED if isinstance(error, (AuthError, KeysUnavailable)) else Decision.REJECTED
            )
        if isinstance(error, UpstreamUnavailable):
            exchange.decision = Decision.UPSTREAM_ERROR
        # A key outage is keys.py's to report, once per fetch: per request it is only a count.
        level = logging.WARNING if error.status >= 500 and not isinstance(error, KeysUnavailable) else logging.DEBUG
        log_refused(exchange, level, str(error.reason), error.detail, error.status)
        realm = (exchange.snapshot or exchange.runtime).settings.realm
        respond_error(request, error, realm=realm, request_id_value=exchange.request_id, cors=_cors(exchange))
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
    if exchange.decision is not _REJECTED:  # forwarded (allowed or would_deny)
        exchange.decision = Decision.UPSTREAM_ERROR
    lines = _cors(exchange).encode("ascii")
    request.respond(
        500, None, [*_INTERNAL_HEADERS, ("X-Request-Id", exchange.request_id)], _INTERNAL_BODY, fields=lines
    )


def _cors(exchange: Exchange) -> str:
    """The CORS header lines of our own answer on a route with `cors` (cors.py), "" elsewhere:
    a page on an allowed origin must be able to read a 401's body and challenge."""
    plan = exchange.plan
    if plan is None or plan.cors is None:
        return ""
    return plan.cors.response_fields(exchange.request.fields).decode("ascii")


# An enum member read off its class costs a Python-level attribute lookup (about 150 ns on
# 3.11); a module global, a fraction of it: the two _failed reads on every refusal.
_REJECTED, _WOULD_DENY, _DENIED = Decision.REJECTED, Decision.WOULD_DENY, Decision.DENIED
_TOKEN_MISSING = str(Reason.TOKEN_MISSING)
_INTERNAL_BODY = json.dumps(ProxyError(Reason.INTERNAL).fields()).encode()
_INTERNAL_HEADERS = (
    ("Content-Type", "application/json; charset=utf-8"),
    ("Cache-Control", "no-store"),
    ("Server", "jwt-sidecar"),
)


def respond_error(request: Request, error: ProxyError, *, realm: str, request_id_value: str, cors: str = "") -> None:
    # The answer to a refusal depends only on its kind, reason, scope and realm (a closed set
    # and config values), so it is built and encoded once; only X-Request-Id, Date and the
    # CORS lines vary. `cors` (header lines, each ending in CRLF) depends on the request's
    # Origin: it is added to this answer only, never to the prepared one another origin gets.
    key = (type(error), error.reason, getattr(error, "scope", None), realm)
    answer = _ANSWERS.get(key)
    if answer is None:
        answer = _ANSWERS.remember(key, _prepare(error, realm))
    request.send(answer, f"X-Request-Id: {request_id_value}\r\n{cors}")


_ANSWERS: Memo[tuple[object, ...], Prepared] = Memo(1024)
"""Prepared refusals by (kind, reason, scope, realm): a few dozen with any sane config; the
bound is for a config with a great many realms."""
_MISSING: Memo[str, Prepared] = Memo(64)
"""The prepared 401 for no token (`_missing`), by realm: one per config's realm."""


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


def _record(exchange: Exchange) -> None:
    # The plan's parts are read here, not through Exchange's properties: this runs on every request.
    runtime, request, plan = exchange.runtime, exchange.request, exchange.plan
    status = exchange.status = request.status or 499  # nothing written: the client went away
    if plan is not None:
        route_metrics: RouteMetrics | None = plan.metrics
    else:
        route_metrics = exchange.snapshot.unmatched if exchange.snapshot is not None else None
    if route_metrics is not None:
        route_metrics.count(request.method, exchange.decision, exchange.reason, status)
    access_log = runtime.access_log
    if access_log is not None:
        if plan is not None:
            verifier = plan.verifier
            route, provider = plan.route.name, verifier.provider.name if verifier is not None else None
        else:
            route, provider = NO_ROUTE_NAME, None
        claims = exchange.claims
        # Never the token, never the query string (it may hold one): the normalised path only.
        # (positional: a keyword call costs more, on every request)
        access_log.line(
            exchange.request_id,
            request.remote,
            request.method,
            exchange.path or request.raw_path.partition("?")[0][:256],
            route,
            provider,
            status,
            exchange.decision,
            exchange.reason,
            claims.subject if claims is not None else None,
            (time.perf_counter() - exchange.started) * 1000,
        )
