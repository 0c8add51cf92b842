"""One request, start to end: route → strip → extract → verify → rules → inject → forward.

Owns: the order of the steps and the per-request record (`Exchange`) that the access log
and metrics read. `begin` runs every step that needs no I/O at once, so a refusal (no
route, no token, a cached token the rules refuse) is raised before any task exists; the
rest (verifying a token not in the cache, forwarding) is the coroutine it returns. It reads the config snapshot once, at entry, so a reload mid-request
cannot mix two configs. Does not own: building anything (runtime.py), or turning errors
into responses (app.py catches every `ProxyError` this raises).
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from ..auth.extract import Found, extract, refuse_repeated_authorization, without_query_param
from ..auth.rules import check_route
from ..auth.verify import Claims
from ..base.errors import NotFound, TokenMissing
from ..config.routing import normalize, split_target
from ..http.http1 import Request
from ..telemetry.metrics import Decision, RouteMetrics
from .forward import forward, forward_websocket, is_websocket
from .identity import Outbound, claim_headers, inject, strip_inbound
from .runtime import RoutePlan, Runtime, Snapshot

__all__ = ["Exchange", "begin"]


@dataclass(slots=True)
class Exchange:
    """What happened to one request: filled in as the steps run, read by the log and metrics."""

    request_id: str
    started: float
    snapshot: Snapshot | None = None
    route: str = "(none)"
    metrics: RouteMetrics | None = None
    path: str = ""
    decision: Decision = Decision.REJECTED
    reason: str = ""
    subject: str | None = None
    status: int = 0


def begin(request: Request, runtime: Runtime, exchange: Exchange) -> Coroutine[Any, Any, None]:
    """Every step that needs no I/O, now: a refusal raises here, before any task exists (a
    401 is answered in the same loop turn that read it). What is left (verification on a
    cache miss, and forwarding) comes back as a coroutine for the caller to run."""
    snapshot = exchange.snapshot = runtime.snapshot
    assert snapshot is not None  # the listener starts only after the first snapshot exists
    raw_path, query = split_target(request.raw_path)
    path = exchange.path = normalize(raw_path)
    route = snapshot.router.match(request.method, path)
    if route is None:
        raise NotFound(f"no route for {request.method} {path}")
    plan = snapshot.plans[route.name]
    exchange.route, exchange.metrics = route.name, plan.metrics

    # Identity headers go first, on every route, before anything is decided.
    outbound = strip_inbound(request.fields, snapshot.strip)
    if plan.verifier is None or route.auth is None:
        # A public route forwards Authorization as sent: two lines would be read differently
        # by different upstream stacks, so they are refused here as on every other route.
        lines = 0
        for field in outbound.kept:  # a plain scan: this runs on every public request
            if field[1] == b"authorization":
                lines += 1
        if lines > 1:
            refuse_repeated_authorization(outbound.getall("Authorization"), bearer=False)
        return _forward(request, runtime, exchange, plan, outbound, path, query, None, ())
    began = time.perf_counter()
    try:
        found = extract(outbound, request.query, plan.sources)
        claims = None if found is None else plan.verifier.cached(found.token)
        if found is not None and claims is None:
            # Not verified lately: verifying may fetch keys, so it is left to the coroutine,
            # which observes the auth time once it is done.
            return _verify_and_forward(request, runtime, exchange, plan, outbound, path, query, found, began)
        identity = _admit(plan, exchange, claims)
    except BaseException:
        plan.metrics.observe_auth(time.perf_counter() - began)
        raise
    plan.metrics.observe_auth(time.perf_counter() - began)
    return _forward(request, runtime, exchange, plan, outbound, path, query, found, identity, claims)


def _admit(plan: RoutePlan, exchange: Exchange, claims: Claims | None) -> tuple[tuple[str, str], ...]:
    """The route's rules on a verified token (or on its absence): the identity headers to send."""
    auth = plan.route.auth
    assert auth is not None  # only routes with auth get here
    if claims is None:
        if not auth.optional:
            raise TokenMissing(plan.missing)
        return ()
    exchange.subject = claims.subject
    check_route(auth, claims.payload)
    if plan.header_map is None:
        return ()
    return claim_headers(claims.payload, plan.header_map, claims.rendered)


async def _verify_and_forward(
    request: Request,
    runtime: Runtime,
    exchange: Exchange,
    plan: RoutePlan,
    outbound: Outbound,
    path: str,
    query: str,
    found: Found,
    began: float,
) -> None:
    try:
        claims = await plan.verifier.verify_uncached(found.token)  # type: ignore[union-attr]
        identity = _admit(plan, exchange, claims)
    finally:
        plan.metrics.observe_auth(time.perf_counter() - began)
    await _forward(request, runtime, exchange, plan, outbound, path, query, found, identity, claims)


def _expires_in(plan: RoutePlan, claims: Claims | None, runtime: Runtime) -> float | None:
    """Seconds until the token would be refused (`exp` plus the provider's leeway), for a
    WebSocket tunnel that closes then; None without a token or an `exp`."""
    exp = claims.payload.get("exp") if claims is not None else None
    if plan.verifier is None or isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return exp + plan.verifier.provider.leeway - runtime.clock.time()


async def _forward(
    request: Request,
    runtime: Runtime,
    exchange: Exchange,
    plan: RoutePlan,
    outbound: Outbound,
    path: str,
    query: str,
    found: Found | None,
    identity: tuple[tuple[str, str], ...],
    claims: Claims | None = None,
) -> None:
    if found is not None and found.source.kind == "query":
        query = without_query_param(query, found.source.name)
    fields = inject(
        outbound,
        identity=identity,
        found=found,
        forward_token=plan.header_map is not None and plan.header_map.forward_token,
        client=request.remote,
        proto=request.scheme,
        request_id_value=exchange.request_id,
    )
    exchange.decision = Decision.ALLOWED
    began = time.perf_counter()
    # The target goes on the request line byte for byte: the path the router matched.
    target = plan.origin.base_path + path + ("?" + query if query else "")
    try:
        assert runtime.pool is not None
        if is_websocket(request):
            assert exchange.snapshot is not None
            await forward_websocket(
                request,
                runtime.pool,
                origin=plan.origin,
                target=target,
                headers=fields,
                upstream=plan.upstream,
                request_id=exchange.request_id,
                websocket=plan.route.websocket or exchange.snapshot.settings.websocket,
                expires_in=_expires_in(plan, claims, runtime),
            )
        else:
            await forward(
                request,
                runtime.pool,
                origin=plan.origin,
                target=target,
                headers=fields,
                upstream=plan.upstream,
                request_id=exchange.request_id,
            )
    finally:
        plan.metrics.observe_upstream(time.perf_counter() - began)
