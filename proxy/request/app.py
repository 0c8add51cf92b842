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
answered within `handle` itself (no task); and a 401 for no token on a (method, target) that
`_missing` refused before is answered from what it prepared then (`_Quick`: no `Exchange`,
no routing, the metric a `Cell`, the log line's middle part built once); the request's
fields are looked at once, by identity.py's `HeadPlan` for their names (its X-Request-Id,
whether it sent an Authorization), and a (method, target) forwarded before goes to
`pipeline.begin_planned` with what it prepared (`Snapshot.forwards`), from the request's head
when the server asks (`Proxy._head`, with http1's `Ahead` for the `Request`: none is made for
one forwarded on an idle pooled connection; `_handed_over` for the rest; on a public route
without CORS no `Exchange` either until something else than the common answer needs one:
`_Public`);
an allowed request comes back to the server as a coroutine to run, and if the client left
before that coroutine began, it sends nothing upstream and records a 499 (`_finish`: the one
place this is handled; the server runs the coroutine regardless). One forwarded with no task
(forward.py's `Answering`, already sent upstream from `handle`) ends in `_settled`, which
forward.py calls once it is answered or has failed, as `_finish` ends; an answer relayed is
recorded there from what the first of its (route plan, method, status, decision, reason)
prepared (`_Answered`, per config in `Snapshot.answered`: the count a `Cell`, the log line's
parts around the path).
Does not own: any decision (pipeline.py and the modules it calls decide).
"""

from __future__ import annotations

import json
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from ..auth.keys import KeyRing
from ..auth.revocationstore import start_store
from ..base.clock import Clock, SystemClock
from ..base.errors import AuthError, KeysUnavailable, ProxyError, Reason, TokenMissing, UpstreamUnavailable
from ..base.memo import Memo
from ..base.oplog import event
from ..config.settings import Settings
from ..http.fetch import Fetcher
from ..http.http1 import Ahead, Later, Prepared, Request, Send, Server
from ..http.upstream import Pool
from ..telemetry.accesslog import AccessLog
from ..telemetry.metrics import Decision, Metrics, ProviderMetrics, RouteMetrics
from .exchange import NO_ROUTE_NAME, Exchange
from .forward import SMALL_BODY, Answering, planned_head
from .identity import request_id
from .pipeline import ForwardPlan, begin, begin_planned, log_refused
from .runtime import Runtime, Snapshot, build_snapshot

__all__ = ["Proxy", "respond_error"]

log = logging.getLogger("jwt_sidecar")
# Whether DEBUG is on, from the logger's own cache of `isEnabledFor` (a dict that `logging`
# clears, never replaces, when a level changes): a dict lookup where the Python call cost ~700
# instructions on every prepared 401 (bench/FIGURES.md, "The 401 path, session 8"). None: not
# known since the last change, so asked (`log.isEnabledFor`, which fills it in).
_debug_known: Callable[[int], bool | None] = log._cache.get  # type: ignore[attr-defined]
_DEBUG = logging.DEBUG


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
        # `_entry` itself with the runtime bound (a C partial): `handle`'s own frame costs every request.
        runtime = self.runtime
        return Server(
            partial(_entry, runtime),
            on_refusal=self._refused,
            counts=runtime.metrics.connections,
            quick=self._head,  # (a bound method: called with no argument array made, where a partial of six would)
            **kwargs,
        )

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
        return _entry(self.runtime, request)

    def _head(
        self,
        method: str,
        target: str,
        fields: list[tuple[bytes, bytes]],
        remote: str | None,
        send: Send,
        take: Callable[[str, str, list[tuple[bytes, bytes]]], Ahead],
    ) -> bool | Later:
        """The server's `Quick`: a request to a target forwarded before (`Snapshot.forwards`),
        taken on as `_entry` takes it (`begin_planned`), with an http1 `Ahead` for the `Request`
        (`take`): forwarded on an idle pooled connection, its `Answering` (the common case: no
        `Request` made and queued, bench/FIGURES.md, "The forward from the head"), else gone on
        as a `Request` made then (`_handed_over`: True); a 401 that a `_Quick` prepared, answered
        from the request's head alone (no `Request` made, bench/FIGURES.md, "The 401 from the
        head"); False, with nothing done, for any other request (or one `begin_planned` would
        hand to `begin`), which goes to `_entry`. `_entry`'s first part and `_refuse`, written
        for a head."""
        runtime = self.runtime
        snapshot = runtime.snapshot
        if snapshot is None:
            return False
        key = (method, target)
        forward = snapshot.forwards.get(key)
        if forward is not None and remote is not None:
            # `_entry` for it, from its head, with an `Ahead` for the `Request` (`take`).
            started = time.perf_counter()
            # (every field is a (name, value) pair: `strict` has nothing to check, and with it
            # `zip` is called through its keyword path, ~twice the cost)
            names, values = zip(*fields) if fields else _NO_FIELDS  # noqa: B905
            strip = snapshot.strip
            head = strip.heads.get(names) or strip.head(names)
            if head.keep is not None and not (head.authorizations > 1 if forward.public else head.authorization < 0):
                # (else what `begin_planned` hands to `begin`, before any step: `_entry` takes it)
                inbound = None if head.request_id < 0 else values[head.request_id].decode("latin-1")
                ahead = take(method, target, fields)
                if forward.bare:
                    # A public route without CORS: `begin_planned`'s public way, `planned_head` and
                    # `forward_now` written out, and no `Exchange` made (`_Public`).
                    request_id_value = request_id(inbound)
                    try:
                        began = time.perf_counter()  # (the upstream time's start, as `begin_planned` reads it)
                        try:
                            data = planned_head(
                                forward.line,
                                forward.ours,
                                head.keep,
                                head.kept,
                                values,
                                head.host,
                                (),
                                remote,
                                ahead.scheme,
                                request_id_value,
                                False,  # (`Ahead`: no Content-Length)
                            )
                        except ValueError:
                            data = None  # a CR or LF inside: `begin_planned` refuses it, below
                        if data is not None:
                            plan = forward.plan
                            origin, upstream = plan.origin, plan.upstream
                            answering = _new_public(_Public)  # (its attributes set here: `_Public`)
                            answering._runtime = runtime
                            answering._snapshot = snapshot
                            answering._forward = forward
                            answering._ahead = ahead
                            answering._request_id = request_id_value
                            answering._started = started
                            answering._began = began
                            answering._ex = None  # type: ignore[assignment]  # (made when needed: `_exchange`)
                            conn = runtime.pool.send(  # type: ignore[union-attr]  # (started)
                                method,
                                origin.scheme,
                                origin.host,
                                origin.port,
                                data,
                                connect_timeout=upstream.connect_timeout,
                                read_timeout=upstream.timeout,
                                notify=answering._answer,
                            )
                            if conn is not None:
                                answering._conn = conn
                                runtime.metrics.in_flight += 1
                                return answering
                    except Exception as error:  # (a bug: answered as `begin_planned`'s would be)
                        ex = _planned(runtime, snapshot, forward, ahead, request_id_value, started)
                        return _handed_over(ex, ahead, None, error)
                    # (no idle pooled connection, or a CR or LF: the general way, from its start)
                    ex = Exchange(ahead, runtime, request_id_value, started)  # type: ignore[arg-type]
                else:
                    ex = Exchange(ahead, runtime, request_id(inbound), started)  # type: ignore[arg-type]  # (what is read of a `Request`)
                ex.snapshot = snapshot
                try:
                    rest = begin_planned(ex, forward, head, values)
                except Exception as error:
                    return _handed_over(ex, ahead, None, error)
                if rest.__class__ is Answering:  # forwarded with no task: it ends in `_settled`
                    runtime.metrics.in_flight += 1
                    rest.settle = _settled
                    return rest
                return _handed_over(ex, ahead, rest, None)  # type: ignore[arg-type]  # (a coroutine)
        quick = snapshot.refusals.get(key)
        if quick is None:
            return False  # (every other request: these lookups are all it costs here)
        started = time.perf_counter()
        inbound = None
        for name, value in fields:
            size = len(name)
            if size == 12 and inbound is None and name.lower() == b"x-request-id":
                inbound = value.decode("latin-1")
            elif size == 13 and name.lower() == b"authorization":
                return False
        if _debug_known(_DEBUG) is not False and log.isEnabledFor(_DEBUG):
            return False  # (a DEBUG log names the route: `_missing` writes it)
        request_id_value = request_id(inbound)
        # as `begin` observes the auth step of a missing token (`_Durations.observe`, written out)
        decided = time.perf_counter()  # (and the Date's second told from it: `send`)
        auth, took = quick.auth, decided - started
        bounds = auth.bounds
        auth.counts[0 if took <= bounds[0] else bisect_left(bounds, took)] += 1
        auth.sum += took
        send(quick.answer, f"X-Request-Id: {request_id_value}\r\n", method == "HEAD", decided)
        quick.cell.n += 1
        access_log = runtime.access_log
        if access_log is not None and quick.line is not None:
            now = time.perf_counter()
            access_log.line_from(request_id_value, remote, quick.line, (now - started) * 1000, now)
        return True


def _entry(runtime: Runtime, request: Request) -> Coroutine[Any, Any, None] | Answering | None:
    started = time.perf_counter()
    snapshot = runtime.snapshot
    assert snapshot is not None  # the listener starts only after the first snapshot exists
    # The request's fields looked at once, by their names (identity.py's `HeadPlan`, worked out
    # once per list of names): where its X-Request-Id is, whether it sent an Authorization
    # field, and what goes upstream (bench/FIGURES.md, "The prepared forward").
    fields = request.fields
    names, values = zip(*fields) if fields else _NO_FIELDS  # noqa: B905  # (pairs: as in `Proxy._head`)
    strip = snapshot.strip
    head = strip.heads.get(names) or strip.head(names)
    inbound = None if head.request_id < 0 else values[head.request_id].decode("latin-1")
    key = (request.method, request.raw_path)
    # A 401 for no token, decided, counted and logged before for this method and target: only
    # the absence of an Authorization field is left to tell (`_Quick`).
    quick = None if head.asked else snapshot.refusals.get(key)
    if quick is not None and (
        _debug_known(_DEBUG) is False or not log.isEnabledFor(_DEBUG)
    ):  # (a DEBUG log names the route: below)
        _refuse(request, runtime, quick, request_id(inbound), started)
        return None
    ex = Exchange(request, runtime, request_id(inbound), started)
    # Forwarded before for this method and target: routed and prepared (`ForwardPlan`).
    forward = snapshot.forwards.get(key)
    try:
        if forward is None:
            rest = begin(ex)
        else:
            ex.snapshot = snapshot  # (the config `forward` was prepared under)
            rest = begin_planned(ex, forward, head, values)
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


def _handed_over(ex: Exchange, ahead: Ahead, rest: Coroutine[Any, Any, None] | None, error: Exception | None) -> bool:
    """The end of `Proxy._head`'s forward for a request `begin_planned` did not forward on an
    idle pooled connection (a refusal raised, `error`; a token whose keys must be fetched, or
    no idle connection: the coroutine `rest`): it goes on as `_entry` has it go on, with the
    `Request` made now (`Ahead.full`, `Ahead.hand_over`)."""
    ex.request = ahead.full()
    if error is not None:
        try:
            _failed(ex, error)
        finally:
            _record(ex)
        ahead.hand_over(None)
        return True
    assert rest is not None
    ex.runtime.metrics.in_flight += 1
    ahead.hand_over(_finish(ex, rest))
    return True


def _planned(
    runtime: Runtime, snapshot: Snapshot, forward: ForwardPlan, ahead: Ahead, request_id_value: str, started: float
) -> Exchange:
    """The `Exchange` of a request `_Public` forwarded, as `begin_planned` leaves it for a
    public route forwarded on an idle pooled connection: routed by `forward`, allowed."""
    ex = Exchange(ahead, runtime, request_id_value, started)  # type: ignore[arg-type]  # (what is read of a `Request`)
    ex.snapshot = snapshot
    ex.plan = forward.plan
    ex.path = forward.path
    ex.query = forward.query
    ex.decision = _ALLOWED
    return ex


class _Public(Answering):
    """`Answering` for a request to a public route without CORS (`ForwardPlan.bare`) that
    `Proxy._head` forwarded on an idle pooled connection, with no `Exchange` made: the few
    things its record reads (the config, the forward's plan and path, the `Ahead`, the request
    id, when it started) kept here. The common answer (its head seen before, whole:
    `again_whole`) is relayed and recorded here, `_end` and `_settled` written out, from what
    `_settled` prepared for the forward's answers with that status (`ForwardPlan.answered`: the
    `requests_total` cell and the access line's middle part), with one clock reading for the
    upstream time's end, the latency's end and the log's stamp. Anything else (another answer,
    a failure, the client gone, another status than the last) makes the `Exchange` `begin_planned`
    would have made (`_planned`) and goes on as `Answering` does, to `_settled`
    (bench/FIGURES.md, "The public route, session 10")."""

    __slots__ = ("_ahead", "_forward", "_request_id", "_runtime", "_snapshot", "_started")

    # Set by `Proxy._head` itself, with `Answering`'s `_began` and `_ex` (None) and, once sent,
    # `_conn`: no `__init__` frame per request (~700 instructions, bench/FIGURES.md, "The public
    # route, session 10").
    _runtime: Runtime
    _snapshot: Snapshot
    """The config the request came in on (a reload mid-request records it under this one)."""
    _forward: ForwardPlan
    _ahead: Ahead
    _request_id: str
    _started: float
    """`time.perf_counter()` when `_head` took it on: the access log's latency starts here."""

    def _exchange(self) -> Exchange:
        ex = self._ex
        if ex is None:
            ex = self._ex = _planned(
                self._runtime, self._snapshot, self._forward, self._ahead, self._request_id, self._started
            )
            self.settle = _settled
        return ex

    def _answer(self) -> None:
        try:
            again = self._conn.again_whole(SMALL_BODY)
            if again is None:  # (nothing done: `Answering._answer` asks again, and takes it)
                self._exchange()
                Answering._answer(self)
                return
            head, body = again
            fields, _, dated = head.kept
            ahead = self._ahead
            request_id_value = self._request_id
            ahead.relay(
                head.status,
                head.reason,
                b"%bX-Request-Id: %b\r\n" % (fields, request_id_value.encode("ascii")),
                body,
                date=not dated,
            )
            forward = self._forward
            known = forward.answered
        except Exception as error:  # a bug: the request still ends (as `Answering._answer`)
            self._end(error)
            return
        if known is None or known[0] != ahead.status or (known[2] is None and self._runtime.access_log is not None):
            # (another status than the last, or a log since: `_settled` prepares it)
            self._end(None)
            try:
                _remember(forward, self._ex)
            except Exception:
                event(log, logging.ERROR, "request_crashed", "ending a forwarded request failed", exc_info=True)
            return
        try:
            # `Answering._end` and `_settled`, written out for this answer (no error, routed,
            # the cell and middle known): the same histogram, count and line.
            now = time.perf_counter()
            took = now - self._began
            plan = forward.plan
            upstream = plan.metrics.upstream
            bounds = upstream.bounds
            upstream.counts[0 if took <= bounds[0] else bisect_left(bounds, took)] += 1
            upstream.sum += took
            runtime = self._runtime
            runtime.metrics.in_flight -= 1
            _, cell, middle = known
            cell.n += 1
            access_log = runtime.access_log
            if access_log is not None:
                # (`middle` is not None: a log there since it was remembered went the general way, above)
                access_log.line_middle(request_id_value, ahead.remote, middle, None, (now - self._started) * 1000, now)  # type: ignore[arg-type]
        except Exception:
            event(log, logging.ERROR, "request_crashed", "ending a forwarded request failed", exc_info=True)
        finally:
            ahead.done()

    def _end(self, error: Exception | None) -> None:
        self._exchange()
        Answering._end(self, error)


def _remember(forward: ForwardPlan, ex: Exchange) -> None:
    """`forward.answered`, the record of the status `_settled` just recorded for `ex` (what its
    `_Answered` holds, with the middle part for the forward's path), when that is what `_Public`
    can use again: a `Cell` (not a provider's count)."""
    plan, snapshot = ex.plan, ex.snapshot
    assert plan is not None and snapshot is not None
    series = snapshot.answered.get((plan.metrics, ex.request.method, ex.status, ex.decision, ex.reason))
    if series is None or series.cell is None:
        return
    middle = None
    access_log = ex.runtime.access_log
    if access_log is not None:
        # (the series keeps the middle part of its first `_MIDDLES` paths only; a forward is
        # one path, and at most 512 are kept per config: ~0.5 MB at worst)
        path = ex.path or ex.request.raw_path.partition("?")[0][:256]
        middle = series.middles.get(path) or access_log.middle(series.before, path, series.after)
    forward.answered = (ex.status, series.cell, middle)


class _Quick:
    """The 401 for no token on one (method, request target), prepared by `_missing` the first
    time: what `begin`, `_missing` and `_record` would do for it, less what varies per request.

    Only for a route that tells a missing token before anything else (`RoutePlan.needs_bearer`:
    a request with no Authorization field is refused whatever else it holds) and that has no
    CORS, and for a target that is no CORS preflight: then the target and the method alone
    (routing, normalising) decide it, and `_entry` only looks for an Authorization field.
    (c) 83,275 -> 64,565 instructions per request (bench/FIGURES.md, "The 401 from the head")."""

    __slots__ = ("answer", "auth", "cell", "line", "metrics")

    def __init__(self, ex: Exchange, answer: Prepared) -> None:
        plan = ex.plan
        assert plan is not None
        self.answer = answer
        self.metrics: RouteMetrics = plan.metrics
        self.auth = plan.metrics.auth
        self.cell = plan.metrics.cell(ex.request.method, _DENIED, _TOKEN_MISSING, 401)
        """`requests_total`'s series for this 401 (a `Cell`: `_record`'s count is one `+= 1`)."""
        access_log = ex.runtime.access_log
        provider = plan.verifier.provider.name if plan.verifier is not None else None
        self.line = (
            None
            if access_log is None
            else access_log.constant(
                ex.request.method, ex.path, plan.route.name, provider, 401, _DENIED, _TOKEN_MISSING, None
            )
        )
        """The access-log line's part from method to subject (`AccessLog.constant`)."""


def _refuse(request: Request, runtime: Runtime, quick: _Quick, request_id_value: str, started: float) -> None:
    """`_missing` and `_record` for a request `_Quick` decides, with no `Exchange`."""
    quick.auth.observe(time.perf_counter() - started)  # as `begin` observes the auth step of a missing token
    request.send(quick.answer, "X-Request-Id: " + request_id_value + "\r\n")
    if request.status == 401:  # (always: `send` answers a request not yet answered)
        quick.cell.n += 1
    else:
        quick.metrics.count(request.method, _DENIED, _TOKEN_MISSING, request.status or 499)
    access_log = runtime.access_log
    if access_log is not None and quick.line is not None:
        now = time.perf_counter()
        access_log.line_from(request_id_value, request.remote, quick.line, (now - started) * 1000, now)


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
    """`_finish`'s end, for a request forwarded with no task (forward.py's `Answering`). For an
    answer relayed (no error), `_record` from what `_Answered` prepared for its series
    (bench/FIGURES.md, "The forwarded answer's record"; once `_relayed`, a call of its own:
    "The forward from the head")."""
    if error is not None:
        try:
            _failed(ex, error)
        finally:
            ex.runtime.metrics.in_flight -= 1
            _record(ex)
        return
    runtime, request, plan = ex.runtime, ex.request, ex.plan
    runtime.metrics.in_flight -= 1
    status = ex.status = request.status or 499  # nothing written: the client went away
    method = request.method
    assert plan is not None and ex.snapshot is not None  # (forwarded: routed)
    key = (plan.metrics, method, status, ex.decision, ex.reason)
    answered = ex.snapshot.answered
    series = answered.get(key)
    if series is None:
        series = answered.remember(key, _Answered(ex, status))
    cell = series.cell
    if cell is not None:
        cell.n += 1
    else:
        plan.metrics.count(method, ex.decision, ex.reason, status)
    access_log = runtime.access_log
    if access_log is not None:
        path = ex.path or request.raw_path.partition("?")[0][:256]
        middles = series.middles
        middle = middles.get(path)
        if middle is None:
            middle = access_log.middle(series.before, path, series.after)
            if len(middles) < _MIDDLES:  # (paths are the client's choice: the first few kept)
                middles[path] = middle
        claims = ex.claims
        now = time.perf_counter()
        access_log.line_middle(
            ex.request_id,
            request.remote,
            middle,
            claims.subject if claims is not None else None,
            (now - ex.started) * 1000,
            now,
        )


class _Answered:
    """What `_record` does for every forwarded answer of one (route plan, method, status,
    decision, reason), less what varies per request, prepared by the first (per config, in
    `Snapshot.answered`): `requests_total`'s series as a `Cell` (None for a provider's metrics,
    which count by provider too), the access line's parts around the path (`AccessLog.around`)
    and, for the first `_MIDDLES` paths, the part with the path between them (`middles`)."""

    __slots__ = ("after", "before", "cell", "middles")

    def __init__(self, ex: Exchange, status: int) -> None:
        plan = ex.plan
        assert plan is not None
        method = ex.request.method
        metrics = plan.metrics
        self.cell = (
            None if isinstance(metrics, ProviderMetrics) else metrics.cell(method, ex.decision, ex.reason, status)
        )
        access_log = ex.runtime.access_log
        verifier = plan.verifier
        provider = verifier.provider.name if verifier is not None else None
        self.before, self.after = (
            ("", "")
            if access_log is None
            else access_log.around(method, plan.route.name, provider, status, ex.decision, ex.reason)
        )
        self.middles: dict[str, str] = {}


def _missing(ex: Exchange) -> None:
    """The 401 for a request with no token on a route that needs one, as `_failed` answers a
    `TokenMissing(plan.missing)`, without one being made, raised and caught (bench/FIGURES.md,
    "The request side"): the same decision, reason, log event and answer. Prepares the
    `_Quick` that answers the next such request for this method and target."""
    plan, snapshot, request = ex.plan, ex.snapshot, ex.request
    assert plan is not None and snapshot is not None
    ex.decision = _DENIED
    ex.reason = _TOKEN_MISSING
    log_refused(ex, logging.DEBUG, _TOKEN_MISSING, plan.missing, 401)
    realm = snapshot.settings.realm
    if plan.cors is not None:
        respond_error(request, TokenMissing(plan.missing), realm=realm, request_id_value=ex.request_id, cors=_cors(ex))
        return
    answer = _ANSWERS.get(realm)  # the realm-only entry: this 401's
    if answer is None:
        answer = _ANSWERS.remember(realm, _prepare(TokenMissing(), realm))
    request.send(answer, "X-Request-Id: " + ex.request_id + "\r\n")
    if (
        plan.needs_bearer  # (told before anything else: see `_Quick`)
        and not (snapshot.cors and request.method == "OPTIONS")
        and len(request.raw_path) <= _QUICK_LONGEST
        and not isinstance(plan.metrics, ProviderMetrics)
    ):
        snapshot.refusals.remember((request.method, request.raw_path), _Quick(ex, answer))


_new_public = object.__new__
"""A `_Public` made with no `__init__` call (`Proxy._head` sets its attributes)."""
_NO_FIELDS: tuple[tuple[bytes, ...], tuple[bytes, ...]] = ((), ())
"""`zip(*fields)` of a request with no fields (which unpacks to nothing)."""
_MIDDLES = 4
"""Paths an `_Answered` keeps its access-line middle for: at most 1,024 series per config
(`Snapshot.answered`), ~1.8 MB at worst; a route's first few paths are what a sidecar in front
of one service mostly sees (bench/FIGURES.md, "The public route, session 9")."""
_QUICK_LONGEST = 256
"""The longest request target a `_Quick` is kept for: targets are the client's choice, and at
most 512 are kept per config (`Snapshot.refusals`): ~150 KB at worst."""


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
_REJECTED, _WOULD_DENY, _DENIED, _ALLOWED = Decision.REJECTED, Decision.WOULD_DENY, Decision.DENIED, Decision.ALLOWED
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


_ANSWERS: Memo[object, Prepared] = Memo(1024)
"""Prepared refusals by (kind, reason, scope, realm): a few dozen with any sane config; the
bound is for a config with a great many realms. The 401 for no token at all is kept by its
realm alone (a str: `_missing` looks it up without building a key or a `TokenMissing`)."""


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
