"""One request, start to end: route → strip → extract → verify → rules → inject → forward.

Owns: the order of the steps, each of which reads and fills in the request's `Exchange`
(exchange.py). `begin` runs every step that needs no I/O at once, so a refusal (no
route, no token, a token the checks or the rules refuse, cached or verified with keys held)
is raised before any task exists; the rest (verifying a token whose keys must be fetched,
forwarding) is the coroutine it returns, or, for a request forwarded with no task
(forward.py's `forward_now`), its `Answering`. On a
route with `providers:` the token's unverified `iss` first chooses its provider's plan
(`ex.plan` becomes it), so every later step is that provider's. A missing token on a route
that needs one (enforce mode) is not raised but returned (the class `TokenMissing`, which
app.py answers as if raised): the commonest refusal, without a raise and a catch. It reads
the config snapshot once, at entry, so a reload mid-request cannot mix two configs. A CORS
preflight (cors.py judges it) is answered in `begin` itself, before routing: no token, never
forwarded. The first request allowed on a (method, target) of a public route or one that
reads Bearer alone (enforce mode) prepares a `ForwardPlan` (in the config's
`Snapshot.forwards`); later ones take `begin_planned`: the same steps on the same terms (the
token from its one Authorization line, the cache, the revocation list and the rules on every
request), without routing again, their upstream head written at once from identity.py's
`HeadPlan`; what it does not plan for goes to `begin` before any step is taken.

A route in report mode (`auth.mode: report`, `RoutePlan.report`) runs every check as in
enforce mode; a refusal of the token checks (no token, a bad token, the route's rules, a key
outage: any `ProxyError` they raise, whatever its reason) is then not raised but
reported (`_would_deny`: decision `would_deny` with its reason, one operator-log event) and
the request goes on as an anonymous one: no identity headers, and no token (`_inject`).
A malformed request (`InvalidRequest`: two Authorization lines, two tokens, a malformed
token source) is refused in both modes: where its token is cannot be told, so it could be
neither checked nor taken out of what the upstream receives. Enforce-mode routes read
`plan.report` only once a check has refused.
Does not own: building anything (runtime.py), the steps' own work (identity.py, extract.py,
verify.py, rules.py, forward.py), or turning errors into responses (app.py catches every
`ProxyError` this raises).
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from collections.abc import Coroutine
from typing import Any

from ..auth.extract import Found, authorization, bearer, extract
from ..auth.rules import check_route
from ..auth.verify import Claims, by_issuer
from ..base.errors import InvalidRequest, NotFound, ProxyError, TokenMissing
from ..base.oplog import event
from ..config.routing import target
from ..telemetry.metrics import Decision
from .cors import Preflight, preflight
from .exchange import Exchange
from .forward import Answering, forward, forward_now, forward_websocket, is_websocket, planned_head
from .identity import HeadPlan, OurFields, strip_inbound, upstream_fields, without_query_token

__all__ = ["ForwardPlan", "begin", "begin_planned", "log_refused"]

log = logging.getLogger("jwt_sidecar")
# Module globals: an enum member read off its class costs a Python-level attribute lookup
# (about 150 ns on 3.11), and these are read per request.
_ALLOWED, _WOULD_DENY = Decision.ALLOWED, Decision.WOULD_DENY
_NO_QUERY: tuple[tuple[str, str], ...] = ()


def begin(ex: Exchange) -> Coroutine[Any, Any, None] | Answering | type[TokenMissing] | None:
    """Every step that needs no I/O, now: a refusal raises here, before any task exists (a
    401 is answered in the same loop turn that read it). What is left (verification on a
    cache miss whose keys must be fetched, and forwarding) comes back as a coroutine for the
    caller to run, or as an `Answering` (forwarded with no task: the caller sets its `settle`); None when
    the request was answered here (a CORS preflight); the class `TokenMissing` (not raised)
    for no token on a route that needs one in enforce mode, which the caller refuses as it
    would `TokenMissing(plan.missing)` raised (the commonest refusal, without a raise)."""
    request = ex.request
    snapshot = ex.snapshot = ex.runtime.snapshot
    assert snapshot is not None  # the listener starts only after the first snapshot exists
    path, ex.query = target(request.raw_path)
    ex.path = path
    if snapshot.cors and request.method == "OPTIONS":
        # A CORS preflight is judged by the route of the request it announces, before routing this one.
        asked = preflight(request.method, request.fields, path, snapshot.router, snapshot.plans)
        if asked is not None:
            _answer_preflight(ex, asked)
            return None
    route = snapshot.router.match(request.method, path)
    if route is None:
        raise NotFound(f"no route for {request.method} {path}")
    plan = ex.plan = snapshot.plans[route.name]
    if plan.needs_bearer:
        began = time.perf_counter()
        for name, _ in request.fields:
            if len(name) == 13 and name.lower() == b"authorization":
                break
        else:
            # No Authorization field on a route that reads Bearer alone and needs a token: a
            # 401, whatever else the request holds, told before the strip (which only shapes
            # what goes on upstream) and said by a return value, not a raised `TokenMissing`
            # (app.py answers it as one): bench/FIGURES.md, "The request side".
            plan.metrics.auth.observe(time.perf_counter() - began)  # (`observe_auth`, one call fewer)
            return TokenMissing

    # Identity headers go first, on every route, before anything is decided.
    outbound = ex.outbound = strip_inbound(request.fields, snapshot.strip)
    verifier = plan.verifier
    if verifier is None and route.auth is None:
        # A public route forwards Authorization as sent: two lines would be read differently
        # by different upstream stacks, so they are refused here as on every other route
        # (extract.authorization is the rule; the strip counted the lines).
        if outbound.authorizations > 1:
            authorization(outbound)
        return _forward_now(ex)
    began = time.perf_counter()
    if plan.bearer_only and not outbound.authorizations and not plan.report:
        # No Authorization line on a route that reads Bearer alone: `extract` would find no
        # token, so it is not called; and a missing token is said by a return value, not a
        # raised `TokenMissing` (app.py answers it as one): bench/FIGURES.md, "The request side".
        plan.metrics.auth.observe(time.perf_counter() - began)  # (`observe_auth`, one call fewer)
        assert route.auth is not None  # not a public route (above)
        return _forward_now(ex) if route.auth.optional else TokenMissing
    try:
        if plan.bearer_only and outbound.authorization is not None:
            # One Authorization line on a route whose one source is Bearer: `extract`'s answer,
            # read from that line alone (bench/FIGURES.md, "The request side").
            found = ex.found = bearer(outbound.authorization.decode("utf-8", "surrogateescape"), plan.sources[0])
        else:
            # The query's parameters are parsed (http1's `Request.query`) only where a source reads them.
            found = ex.found = extract(outbound, request.query if plan.reads_query else _NO_QUERY, plan.sources)
        if found is None:
            claims = None
        else:
            if verifier is None:
                # `providers:`: the token's unverified iss chooses its provider's plan, once,
                # by one lookup (verify.by_issuer); from here on the request is that plan's,
                # as on a `provider:` route (its keys, checks, cache entries and headers).
                assert plan.by_issuer is not None
                plan = ex.plan = by_issuer(
                    found.token,
                    plan.by_issuer,
                    plan.accepted,
                    max_bytes=snapshot.settings.max_token_bytes,
                    cache=snapshot.cache,
                )
                verifier = plan.verifier
                assert verifier is not None
            claims = verifier.cached(found.token)
            if claims is None:
                # Not verified lately: verified here when its keys are held (no coroutine for a
                # miss: bench/FIGURES.md, "Cache misses, session 5"); when they must be fetched,
                # left to the coroutine, which observes the auth time once it is done.
                claims = verifier.verify_now(found.token)
                if claims is None:
                    return _verify_and_forward(ex, began)
        _admit(ex, claims)
    except BaseException as error:
        plan.metrics.observe_auth(time.perf_counter() - began)
        if plan.report and _would_deny(ex, error):
            return _forward_now(ex, _WOULD_DENY)
        raise
    plan.metrics.observe_auth(time.perf_counter() - began)
    return _forward_now(ex)


class ForwardPlan:
    """What `begin` decided for a request allowed on one (method, request target), less what
    the request's fields and token decide: the route plan, the normalised path (the one the
    router matched and the upstream receives) and the query, and the upstream request line.
    Prepared by `_forward_now` for a route that is public or reads its token from Bearer alone
    (enforce mode, its own plan, not one a token's `iss` chose), kept in the config's
    `Snapshot.forwards` (so none outlives its config), and used by `begin_planned`
    (bench/FIGURES.md, "The prepared forward")."""

    __slots__ = ("answered", "auth", "bare", "found", "line", "ours", "path", "plan", "public", "query", "raw", "rules")

    def __init__(self, ex: Exchange) -> None:
        plan = ex.plan
        assert plan is not None
        self.plan = plan
        self.path = ex.path
        self.query = ex.query
        self.public = plan.verifier is None
        """A public route: no token looked for, Authorization forwarded as sent."""
        self.bare = self.public and plan.cors is None
        """A public route without CORS: app.py forwards it with no `Exchange` made (`_Public`)."""
        self.answered: tuple[int, Any, str | None] | None = None
        """app.py's record of this forward's last answer (`_Public`): its status, the
        `requests_total` cell and the access line's middle part, from what `_settled` prepared
        (`_Answered`). One status: answers taken the common way (`again_whole`) have the head
        of the one before, so runs of one status."""
        auth = self.auth = plan.route.auth
        self.rules = auth is not None and bool(auth.scopes.all_of or auth.scopes.any_of or auth.claims)
        """Whether the route has scopes or claim rules to check (`rules.check_route` does nothing otherwise)."""
        target = plan.origin.base_path + ex.path + ("?" + ex.query if ex.query else "")
        self.line = f"{ex.request.method} {target} HTTP/1.1\r\n".encode("utf-8", "surrogateescape")
        """The upstream request's line, as `upstream.encode_head` writes it."""
        self.ours = OurFields()
        """Our fields after the client's (identity.py's), with what the last request gave kept."""
        self.raw = b""
        self.found: Found | None = None
        """The last Authorization value (`raw`, at most `_RAW_LONGEST` bytes) and what `bearer`
        found in it: the same token comes again and again (bench/FIGURES.md, "The prepared forward")."""


_RAW_LONGEST = 4096
"""The longest Authorization value a `ForwardPlan` keeps (with its `Found`): ~2 MB at worst."""
_PLANNED_LONGEST = 256
"""The longest request target a `ForwardPlan` is kept for: targets are the client's choice, and
at most 512 plans are kept per config (`Snapshot.forwards`): ~200 KB at worst."""


def begin_planned(
    ex: Exchange, forward: ForwardPlan, head: HeadPlan, values: tuple[bytes, ...]
) -> Coroutine[Any, Any, None] | Answering | type[TokenMissing] | None:
    """`begin` for a request whose (method, target) `forward` was prepared for, in the config
    `ex.snapshot` (app.py read it at entry and found `forward` there), its field names planned
    by `head` and `values` its field values: the same steps and the same answers, without
    routing or normalising again, and with the upstream head written from `forward`, `head`
    and `values` at once (`forward.planned_head`). Whatever these do not plan for (a request
    with a body or an upgrade, fields `head` did not plan, no Authorization line or several
    on a route that needs one, two on a public one) goes to `begin`, before any step is taken."""
    request = ex.request
    if head.keep is None or request.body_exists or request.upgrade or request.remote is None:
        return begin(ex)
    plan = ex.plan = forward.plan
    ex.path = forward.path
    ex.query = forward.query
    if forward.public:
        if head.authorizations > 1:
            return begin(ex)  # refused there: forwarded as sent, two lines would be read two ways
        fields, kept = head.keep, head.kept
        began = time.perf_counter()
    else:
        if head.authorization < 0:
            return begin(ex)  # no Authorization line (a 401) or several (a 400): `begin` says which
        began = time.perf_counter()
        try:
            raw = values[head.authorization]
            if raw == forward.raw:  # (bytes compared: new bytes each request; a length apart at once)
                found = ex.found = forward.found
            else:
                found = ex.found = bearer(raw.decode("utf-8", "surrogateescape"), plan.sources[0])
                if len(raw) <= _RAW_LONGEST:
                    forward.raw, forward.found = raw, found
            if found is None:
                claims = None  # another scheme: no token (`_admit` refuses, or lets it on anonymous)
            else:
                verifier = plan.verifier
                assert verifier is not None  # (a `ForwardPlan` of a route with a token has its own)
                claims = verifier.cached(found.token)
                if claims is None:
                    claims = verifier.verify_now(found.token)
                    if claims is None:  # its keys must be fetched: `begin`'s coroutine, from its strip
                        ex.outbound = strip_inbound(request.fields, ex.snapshot.strip)  # type: ignore[union-attr]
                        return _verify_and_forward(ex, began)
            if claims is None:
                _admit(ex, None)  # refused, or anonymous on an optional route
            else:  # `_admit`, written out, its rules skipped where the route has none (`ForwardPlan.rules`)
                ex.claims = claims
                # The revocation list and the route's rules, on every request (a cached token too).
                if plan.revocation is not None:
                    plan.revocation.check(claims.provider, claims.payload)
                if forward.rules:
                    check_route(forward.auth, claims.payload)  # type: ignore[arg-type]
                renderer = plan.renderer
                # (`Renderer.headers`'s first answer, written out: a call fewer, bench/FIGURES.md,
                # "The forwarded request, session 8")
                if renderer is not None:
                    ex.identity = claims.rendered if claims.rendered_by is renderer else renderer.headers(claims)
        except BaseException:
            plan.metrics.observe_auth(time.perf_counter() - began)
            raise  # (no report mode here: `ForwardPlan` is for enforce mode)
        now = time.perf_counter()  # (the auth step's end and the upstream time's start: one reading)
        # (`observe_auth` and `Histogram.observe`, written out: two calls fewer, bench/FIGURES.md,
        # "The forwarded request, session 8")
        took = now - began
        auth = plan.metrics.auth
        bounds = auth.bounds
        auth.counts[0 if took <= bounds[0] else bisect_left(bounds, took)] += 1
        auth.sum += took
        began = now
        if found is not None and plan.forward_token:
            fields, kept = head.keep, head.kept  # the token we checked, forwarded
        else:
            # The token's line goes no further, nor one we found no token in (Basic on an
            # optional route): on a route with auth the upstream sees no Authorization we did
            # not check (`upstream_fields`, `guarded`: a `ForwardPlan` with a token is guarded).
            fields, kept = head.drop, head.kept - 1  # type: ignore[assignment]
    ex.decision = _ALLOWED
    # The upstream head, written before a connection is in hand (no `partial` made and called
    # per request: bench/FIGURES.md, "The forwarded request, session 8"); with no idle pooled
    # connection (rare: the pool keeps what the concurrency needs), made again below.
    try:
        data = planned_head(
            forward.line,
            forward.ours,
            fields,
            kept,
            values,
            head.host,
            ex.identity,
            request.remote,
            request.scheme,
            ex.request_id,
            request.content_length is not None,
        )
    except ValueError:
        data = None  # a CR or LF inside: the field-by-field way below refuses it, as before
    if data is not None:
        answering = forward_now(ex, began, data)
        if answering is not None:
            return answering
    # No idle pooled connection (or its head refused): forwarded as `_forward_now` does it.
    ex.outbound = strip_inbound(request.fields, ex.snapshot.strip)  # type: ignore[union-attr]
    _inject(ex)
    return _forwarded(ex, began)


def _admit(ex: Exchange, claims: Claims | None) -> None:
    """The revocation list and the route's rules on a verified token, cached or not (or on its
    absence); the identity headers to send."""
    plan = ex.plan
    assert plan is not None
    auth = plan.route.auth
    assert auth is not None  # only routes with auth get here
    if claims is None:
        if not auth.optional:
            raise TokenMissing(plan.missing)
        return
    ex.claims = claims
    if plan.revocation is not None:  # a route without revocation pays this one test
        plan.revocation.check(claims.provider, claims.payload)
    check_route(auth, claims.payload)
    if plan.renderer is not None:
        ex.identity = plan.renderer.headers(claims)


async def _verify_and_forward(ex: Exchange, began: float) -> None:
    plan = ex.plan
    assert plan is not None and plan.verifier is not None and ex.found is not None
    try:
        _admit(ex, await plan.verifier.verify_uncached(ex.found.token))
    except Exception as error:
        if not (plan.report and _would_deny(ex, error)):
            raise
        decision = _WOULD_DENY
    else:
        decision = _ALLOWED
    finally:
        plan.metrics.observe_auth(time.perf_counter() - began)
    await _forward(ex, decision)


def _would_deny(ex: Exchange, error: BaseException) -> bool:
    """Report mode: whether `error` is only reported, the request going on anonymous (then it
    is recorded on `ex` and logged); False for what is refused in both modes."""
    if not isinstance(error, ProxyError) or isinstance(error, InvalidRequest):
        return False  # a malformed request, or a bug: refused (or a 500) as in enforce mode
    ex.decision = _WOULD_DENY
    ex.reason = str(error.reason)
    ex.identity = ()  # never set when a check refused; said here, since the strip relies on it
    if log.isEnabledFor(logging.INFO):
        event(
            log,
            logging.INFO,
            "request_would_deny",
            "request %(request_id)s would be refused (%(would_answer)d, report mode): %(reason)s: %(detail)s; "
            "forwarded without identity headers",
            request_id=ex.request_id,
            reason=ex.reason,
            detail=error.detail,
            would_answer=error.status,
            route=ex.route,
            provider=ex.provider,
        )
    return True


def _expires_in(ex: Exchange) -> float | None:
    """Seconds until the token would be refused (`exp` plus the provider's leeway), for a
    WebSocket tunnel that closes then; None without a token or an `exp`."""
    claims, plan = ex.claims, ex.plan
    if ex.decision is not _ALLOWED:
        return None  # a would-deny (report mode) carries no identity that could expire
    exp = claims.payload.get("exp") if claims is not None else None
    if plan is None or plan.verifier is None or isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return exp + plan.verifier.provider.leeway - ex.runtime.clock.time()


def _forward_now(ex: Exchange, decision: Decision = _ALLOWED) -> Answering | Coroutine[Any, Any, None]:
    """`_forward`, with no task when forward.py can (`forward_now`: a request with no body on
    an idle pooled connection): its `Answering`; else the coroutine that forwards it. The
    first request allowed on a (method, target) that `ForwardPlan` can serve prepares it."""
    if decision is _ALLOWED:
        plan, snapshot, request = ex.plan, ex.snapshot, ex.request
        assert plan is not None and snapshot is not None
        if (
            not plan.report
            and (plan.bearer_only if plan.verifier is not None else plan.route.auth is None)
            and snapshot.plans.get(plan.route.name) is plan  # (not a plan a token's `iss` chose)
            and not (snapshot.cors and request.method == "OPTIONS")  # (a preflight is told before routing)
            and len(request.raw_path) <= _PLANNED_LONGEST
            and (request.method, request.raw_path) not in snapshot.forwards
        ):
            snapshot.forwards.remember((request.method, request.raw_path), ForwardPlan(ex))
    _inject(ex)
    ex.decision = decision
    began = time.perf_counter()
    if not ex.request.upgrade:  # (a WebSocket handshake or another upgrade: `_forwarded`)
        answering = forward_now(ex, began)
        if answering is not None:
            return answering
    return _forwarded(ex, began)


async def _forward(ex: Exchange, decision: Decision = _ALLOWED) -> None:
    _inject(ex)
    ex.decision = decision
    await _forwarded(ex, time.perf_counter())


async def _forwarded(ex: Exchange, began: float) -> None:
    plan = ex.plan
    assert plan is not None
    try:
        if is_websocket(ex.request):
            await forward_websocket(ex, expires_in=_expires_in(ex))
        else:
            await forward(ex)
    finally:
        plan.metrics.observe_upstream(time.perf_counter() - began)


def _answer_preflight(ex: Exchange, asked: Preflight) -> None:
    """A CORS preflight, answered by the sidecar as cors.py judged it: no token asked, never
    forwarded; counted and logged under the route that judged it (allowed 204, or rejected 403
    with its cors reason, logged like any refusal)."""
    snapshot = ex.snapshot
    assert snapshot is not None
    ex.plan = snapshot.plans[asked.route]
    if asked.status == 204:
        ex.decision = Decision.ALLOWED
    else:
        ex.reason = asked.reason
        log_refused(ex, logging.DEBUG, asked.reason, asked.detail, asked.status)
    fields = asked.fields + b"X-Request-Id: %b\r\n" % ex.request_id.encode("ascii")
    ex.request.respond(asked.status, None, (), asked.body, fields=fields)


def log_refused(ex: Exchange, level: int, reason: str, detail: str, status: int) -> None:
    """The `request_refused` event of a refused request (here for a preflight, app.py for
    every `ProxyError`); nothing is built when `level` is off (a refusal's cost is measured)."""
    if log.isEnabledFor(level):
        event(
            log,
            level,
            "request_refused",
            "request %(request_id)s refused: %(reason)s: %(detail)s",
            request_id=ex.request_id,
            reason=reason,
            detail=detail,
            status=status,
            route=ex.route,
            provider=ex.provider,
        )


def _inject(ex: Exchange) -> None:
    """The upstream request's header fields from the strip's `ex.outbound` and the admitted
    `ex.identity` (`ex.fields`, the client's that go on, and `ex.added`, ours), and the query
    without a token that came in it: identity.py decides each (it owns every token removal)."""
    plan = ex.plan
    out = ex.outbound
    assert plan is not None and out is not None  # routed and stripped before any forwarding
    found = ex.found
    request = ex.request
    # A would-deny of report mode never takes its token on, `forward_token` or not: the
    # upstream only ever receives a token the route admitted.
    forward_token = plan.forward_token and ex.decision is not _WOULD_DENY
    # (positional: a keyword call costs more, on every request)
    ex.fields, ex.added = upstream_fields(
        out, ex.identity, found, forward_token, request.remote, request.scheme, ex.request_id, plan.guarded
    )
    if found is not None:
        ex.query = without_query_token(ex.query, found)
