"""One request, start to end: route → strip → extract → verify → rules → inject → forward.

Owns: the order of the steps and the per-request record (`Exchange`) that the access log
and metrics read. It reads the config snapshot once, at entry, so a reload mid-request
cannot mix two configs. Does not own: building anything (runtime.py), or turning errors
into responses (app.py catches every `ProxyError` this raises).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from .errors import NotFound, TokenMissing
from .extract import extract, without_query_param
from .forward import forward, forward_websocket, is_websocket
from .http1 import Request
from .identity import claim_headers, inject, strip_inbound
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
    outbound = strip_inbound(request.fields, snapshot.strip)
    found = None
    identity: tuple[tuple[str, str], ...] = ()
    if plan.verifier is not None and route.auth is not None:
        began = time.perf_counter()
        try:
            found = extract(outbound, request.query, plan.sources)
            if found is not None:
                claims = await plan.verifier.verify(found.token)
                exchange.subject = claims.subject
                check_route(route.auth, claims.payload)
                if plan.header_map is not None:
                    identity = claim_headers(claims.payload, plan.header_map, claims.rendered)
            elif not route.auth.optional:
                raise TokenMissing(plan.missing)
        finally:
            plan.metrics.observe_auth(time.perf_counter() - began)
        if found is not None and found.source.kind == "query":
            query = without_query_param(query, found.source.name)

    fields = inject(
        outbound, identity=identity, found=found,
        forward_token=plan.header_map is not None and plan.header_map.forward_token,
        client=request.remote, proto=request.scheme, request_id_value=exchange.request_id,
    )
    exchange.decision = Decision.ALLOWED
    began = time.perf_counter()
    # The target goes on the request line byte for byte: the path the router matched.
    target = plan.origin.base_path + path + ("?" + query if query else "")
    try:
        assert runtime.pool is not None
        if is_websocket(request):
            await forward_websocket(request, runtime.pool, origin=plan.origin, target=target, headers=fields,
                                    upstream=plan.upstream, request_id=exchange.request_id)
        else:
            await forward(request, runtime.pool, origin=plan.origin, target=target, headers=fields,
                          upstream=plan.upstream, request_id=exchange.request_id)
    finally:
        plan.metrics.observe_upstream(time.perf_counter() - began)
