"""One request, start to end: route → strip → extract → verify → rules → inject → forward.

Owns: the order of the steps, each of which reads and fills in the request's `Exchange`
(exchange.py). `begin` runs every step that needs no I/O at once, so a refusal (no
route, no token, a cached token the rules refuse) is raised before any task exists; the
rest (verifying a token not in the cache, forwarding) is the coroutine it returns. On a
route with `providers:` the token's unverified `iss` first chooses its provider's plan
(`ex.plan` becomes it), so every later step is that provider's. It reads
the config snapshot once, at entry, so a reload mid-request cannot mix two configs.
Does not own: building anything (runtime.py), the steps' own work (identity.py, extract.py,
verify.py, rules.py, forward.py), or turning errors into responses (app.py catches every
`ProxyError` this raises).
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import Any

from ..auth.extract import authorization, extract
from ..auth.rules import check_route
from ..auth.verify import Claims, by_issuer
from ..base.errors import NotFound, TokenMissing
from ..config.routing import normalize, split_target
from ..telemetry.metrics import Decision
from .exchange import Exchange
from .forward import forward, forward_websocket, is_websocket
from .identity import inject, strip_inbound

__all__ = ["begin"]


def begin(ex: Exchange) -> Coroutine[Any, Any, None]:
    """Every step that needs no I/O, now: a refusal raises here, before any task exists (a
    401 is answered in the same loop turn that read it). What is left (verification on a
    cache miss, and forwarding) comes back as a coroutine for the caller to run."""
    request = ex.request
    snapshot = ex.snapshot = ex.runtime.snapshot
    assert snapshot is not None  # the listener starts only after the first snapshot exists
    raw_path, ex.query = split_target(request.raw_path)
    path = ex.path = normalize(raw_path)
    route = snapshot.router.match(request.method, path)
    if route is None:
        raise NotFound(f"no route for {request.method} {path}")
    plan = ex.plan = snapshot.plans[route.name]

    # Identity headers go first, on every route, before anything is decided.
    outbound = ex.outbound = strip_inbound(request.fields, snapshot.strip)
    verifier = plan.verifier
    if verifier is None and route.auth is None:
        # A public route forwards Authorization as sent: two lines would be read differently
        # by different upstream stacks, so they are refused here as on every other route
        # (extract.authorization is the rule; the strip counted the lines).
        if outbound.authorizations > 1:
            authorization(outbound)
        return _forward(ex)
    began = time.perf_counter()
    try:
        found = ex.found = extract(outbound, request.query, plan.sources)
        if found is None:
            claims = None
        else:
            if verifier is None:
                # `providers:`: the token's unverified iss chooses its provider's plan, once,
                # by one lookup (verify.by_issuer); from here on the request is that plan's,
                # as on a `provider:` route (its keys, checks, cache entries and headers).
                assert plan.by_issuer is not None
                plan = ex.plan = by_issuer(
                    found.token, plan.by_issuer, plan.accepted, max_bytes=snapshot.settings.max_token_bytes
                )
                verifier = plan.verifier
                assert verifier is not None
            claims = verifier.cached(found.token)
            if claims is None:
                # Not verified lately: verifying may fetch keys, so it is left to the coroutine,
                # which observes the auth time once it is done.
                return _verify_and_forward(ex, began)
        _admit(ex, claims)
    except BaseException:
        plan.metrics.observe_auth(time.perf_counter() - began)
        raise
    plan.metrics.observe_auth(time.perf_counter() - began)
    return _forward(ex)


def _admit(ex: Exchange, claims: Claims | None) -> None:
    """The route's rules on a verified token (or on its absence); the identity headers to send."""
    plan = ex.plan
    assert plan is not None
    auth = plan.route.auth
    assert auth is not None  # only routes with auth get here
    if claims is None:
        if not auth.optional:
            raise TokenMissing(plan.missing)
        return
    ex.claims = claims
    check_route(auth, claims.payload)
    if plan.renderer is not None:
        ex.identity = plan.renderer.headers(claims)


async def _verify_and_forward(ex: Exchange, began: float) -> None:
    plan = ex.plan
    assert plan is not None and plan.verifier is not None and ex.found is not None
    try:
        _admit(ex, await plan.verifier.verify_uncached(ex.found.token))
    finally:
        plan.metrics.observe_auth(time.perf_counter() - began)
    await _forward(ex)


def _expires_in(ex: Exchange) -> float | None:
    """Seconds until the token would be refused (`exp` plus the provider's leeway), for a
    WebSocket tunnel that closes then; None without a token or an `exp`."""
    claims, plan = ex.claims, ex.plan
    exp = claims.payload.get("exp") if claims is not None else None
    if plan is None or plan.verifier is None or isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return exp + plan.verifier.provider.leeway - ex.runtime.clock.time()


async def _forward(ex: Exchange) -> None:
    plan = ex.plan
    assert plan is not None
    inject(ex)
    ex.decision = Decision.ALLOWED
    began = time.perf_counter()
    try:
        if is_websocket(ex.request):
            await forward_websocket(ex, expires_in=_expires_in(ex))
        else:
            await forward(ex)
    finally:
        plan.metrics.observe_upstream(time.perf_counter() - began)
