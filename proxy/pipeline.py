"""One request, start to end: route → strip → extract → verify → rules → inject → forward.

Owns: the order of the steps and the per-request record (`Exchange`) that the access log
and metrics read. It reads the config snapshot once, at entry, so a reload mid-request
cannot mix two configs. Does not own: building anything (runtime.py), or turning errors
into responses (app.py catches every `ProxyError` this raises).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .errors import NotFound, TokenMissing
from .extract import extract, without_query_param
from .forward import forward, forward_websocket, is_websocket
from .http1 import Request
from .identity import Forwarded, inject, strip_inbound
from .metrics import Decision, RouteMetrics
from .routing import normalize, split_target
from .rules import check_route
from .runtime import Runtime, Snapshot

__all__ = ["Exchange", "run"]


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


async def run(request: Request, runtime: Runtime, exchange: Exchange) -> None:
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
    headers = strip_inbound(request.headers, snapshot.strip)
    found = None
    payload: Any = None
    memo = None
    if plan.verifier is not None and route.auth is not None:
        began = time.perf_counter()
        try:
            found = extract(headers, request.query, plan.sources)
            if found is not None:
                claims = await plan.verifier.verify(found.token)
                exchange.subject = claims.subject
                check_route(route.auth, claims.payload)
                payload, memo = claims.payload, claims.rendered
            elif not route.auth.optional:
                raise TokenMissing(plan.missing)
        finally:
            plan.metrics.observe_auth(time.perf_counter() - began)
        if found is not None and found.source.kind == "query":
            query = without_query_param(query, found.source.name)

    inject(
        headers, payload=payload, header_map=plan.header_map, found=found,
        forwarded=Forwarded(client=request.remote, proto=request.scheme, host=request.headers.get("Host")),
        request_id_value=exchange.request_id, memo=memo,
    )
    exchange.decision = Decision.ALLOWED
    began = time.perf_counter()
    # The target goes on the request line byte for byte: the path the router matched.
    target = plan.origin.base_path + path + ("?" + query if query else "")
    try:
        assert runtime.pool is not None
        if is_websocket(request):
            await forward_websocket(request, runtime.pool, origin=plan.origin, target=target, headers=headers,
                                    upstream=plan.upstream, request_id=exchange.request_id)
        else:
            await forward(request, runtime.pool, origin=plan.origin, target=target, headers=headers,
                          upstream=plan.upstream, request_id=exchange.request_id)
    finally:
        plan.metrics.observe_upstream(time.perf_counter() - began)
