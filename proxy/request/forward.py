"""The upstream client: stream a request to the upstream and its answer back, or tunnel an upgrade.

Owns: sending a request through the pooled HTTP/1.1 client (`upstream.Pool`), answers up to
64 KiB in one write, streaming larger bodies both ways in bounded memory (the upstream is
not read while the client's write buffer is full; a large Content-Length answer's rest may be
spliced, the client's `Request` given as `Response.relay`'s target), the request-body
limit (413) and deadline (408, `upstream.body_timeout`), the answer's hop-by-hop headers
(planned once per list of field names, and kept with a head that comes again: `_Head.kept`),
mapping upstream failures (502 for anything before the request was sent: refused,
unreachable, connect timeout; and for a reset or malformed answer; 504 only when the request
was sent and its answer timed out; `TimeoutError` is caught first, as it is also an OSError),
and WebSocket handshakes: sent upstream on a connection of their own, and after a 101 the
bytes relayed both ways, unparsed, until either side ends or a `websocket` limit closes the
tunnel (idle time, lifetime, the token's expiry). On a route with `cors`, the upstream's own
`Access-Control-*` answer fields are dropped and the route's CORS lines (cors.py) added to
every answer relayed. After an answer has started nothing can change its
status: a failure then aborts the connection, so the client sees a truncated answer, never
a spliced one.
A request with no body is forwarded with no task when an idle pooled connection to its
upstream is at hand (`forward_now`, `Answering`: its head written from the handler, its
answer relayed and the request ended from the upstream connection's read callback); what
stops being simple goes on as a task from there, as `forward` would do it. Its head is made
only once `Pool.send` has a connection in hand (`_head_of`; for pipeline.py's prepared
forward, `planned_head`).
Both steps take the request's `Exchange` (its route plan, path and query, and the header
pairs identity.py made, which the HTTP layer encodes: `upstream.Fields.of_bytes`).
Does not own: JWTs, routes or which headers to send (identity.py decides those), or the
client side of the wire (http1.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

import httptools

from ..base.errors import BadRequest, PayloadTooLarge, Reason, RequestTimeout, UpstreamTimeout, UpstreamUnavailable
from ..base.memo import Memo
from ..base.oplog import event
from ..config.settings import WebSocketSettings
from ..http.causes import cause
from ..http.flow import Wakeup
from ..http.http1 import BodyError, BodyTimeout, BodyTooLarge, Later, Request
from ..http.upstream import (
    BodySource,
    Fields,
    InFlight,
    Response,
    UpstreamError,
    checked_head,
    connect_host,
    encode_head,
)
from .cors import without_upstream_cors
from .identity import HOP_BY_HOP, OurFields, connection_tokens

if TYPE_CHECKING:
    from .exchange import Exchange
    from .runtime import Origin

__all__ = ["SMALL_BODY", "Answering", "forward", "forward_now", "forward_websocket", "is_websocket", "planned_head"]

SMALL_BODY = 64 * 1024
"""Answers up to this size (by Content-Length) are read whole and written in one go."""
log = logging.getLogger("jwt_sidecar.forward")


class _Limited(BodySource):
    """The request body as it arrives, failing once more than `limit` bytes came (0: no limit),
    when none come for `timeout` seconds, or when waiting for them has taken `total`
    seconds in all (a byte every few seconds would otherwise hold the upstream request).

    Relayed from the client's read callback straight to the upstream's transport
    (`Request.relay_body`): no task is woken per read (bench/FIGURES.md, "Uploads").
    """

    __slots__ = ("_limit", "_request", "_timeout", "_total")

    def __init__(self, request: Request, limit: int, timeout: float, total: float) -> None:
        self._request = request
        self._limit = limit
        self._timeout = timeout
        self._total = total

    def relay(
        self, sink: Callable[[bytes | memoryview], bool], drain: Callable[[], Awaitable[bool]], target: Any = None
    ) -> Awaitable[bool]:
        return self._request.relay_body(sink, drain, self._timeout, total=self._total, limit=self._limit, target=target)


def _answer_fields(raw: list[tuple[bytes, bytes]], request_id: str) -> tuple[bytes, int | None, bool]:
    """The upstream's header lines for the client, as they came (order, spelling, bytes), less
    hop-by-hop and Connection-named fields (RFC 9110 §7.6.1) and its X-Request-Id, plus ours;
    with its Content-Length apart (the framing is ours) and whether it sent a Date."""
    parts: list[bytes] = []
    named: set[bytes] = set()
    length: int | None = None
    dated = False
    roles = _ROLES.get
    for name, value in raw:
        role = roles(name)
        if role is None:
            role = _ROLES.make_for(name)
        if role <= _DATE:  # _KEEP or _DATE
            dated = dated or role == _DATE
            parts += (name, b": ", value, b"\r\n")
        elif role == _CONNECTION:
            named.update(token.strip().lower() for token in value.split(b","))
        elif role == _LENGTH:
            length = int(value)  # llhttp refused anything but digits
    named -= _DROPPED
    if named:  # rare: the upstream named end-to-end fields as hop-by-hop; drop those too
        parts = []
        for name, value in raw:
            if _role(name) <= _DATE and name.lower() not in named:
                parts += (name, b": ", value, b"\r\n")
    parts.append(b"X-Request-Id: %b\r\n" % request_id.encode("ascii"))  # [A-Za-z0-9._:-] only
    return b"".join(parts), length, dated


_DROPPED = frozenset(name.encode("ascii") for name in HOP_BY_HOP) | {b"x-request-id"}
# The default of `forward`'s websocket settings: frozen, so one shared instance is safe.
_DEFAULT_WEBSOCKET = WebSocketSettings()
# What an answer field is to the client's answer, by its name (`_role`): plain ints, compared
# in `_answer_fields`'s per-field loop.
#
#   code  role          the field                          what becomes of it
#   0     _KEEP         any other field                    sent on as it came
#   1     _DATE         Date                               sent on (and ours is not added)
#   2     _DROP         hop-by-hop, X-Request-Id           never sent (ours replaces X-Request-Id)
#   3     _CONNECTION   Connection                         its options are dropped too
#   4     _LENGTH       Content-Length                     read: the framing is ours to write
#
# The order is part of the code: `_answer_fields` sends every role up to _DATE (`role <= _DATE`),
# so the two roles that are sent stay first.
_KEEP, _DATE, _DROP, _CONNECTION, _LENGTH = range(5)


def _role(name: bytes) -> int:
    low = name.lower()
    if low == b"connection":
        return _CONNECTION
    if low == b"content-length":
        return _LENGTH
    if low in _DROPPED:
        return _DROP
    return _DATE if low == b"date" else _KEEP


_ROLES: Memo[bytes, int] = Memo(4096, _role)
"""An answer field's role by its name as spelt on the wire: the same few names come back on
every answer, so each is lower-cased and classified once. Names are the upstream's choice,
hence the bound."""

# What `_plan` says for a head whose fields it cannot plan: `_answer_fields`, field by field.
_UNPLANNED: tuple[bytes, bool, int] = (b"", False, -2)
# Connection values that name no end-to-end field (lower-cased): with one of these, or none,
# a head's plan holds whatever the values are.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade"})


def _plan(names: tuple[bytes, ...]) -> tuple[bytes, bool, int]:
    """`_answer_fields` for every head with these field names, in this order, done once: a
    `bytes %` format that writes each kept field as it came (`Name: %b`) and nothing for a
    dropped one (`%.0b`), then our X-Request-Id; whether it holds a Date; and where its one
    Connection field is (-1: none), whose value must name nothing else for the plan to hold.
    `_UNPLANNED` for two Connection fields, or a field named like a Connection option."""
    parts: list[bytes] = []
    dated = False
    connection = -1
    for index, name in enumerate(names):
        role = _role(name)
        if role <= _DATE:  # _KEEP or _DATE
            if name.lower() in _PLAIN_CONNECTION:
                return _UNPLANNED  # `Connection: close` would drop it
            dated = dated or role == _DATE
            parts.append(name.replace(b"%", b"%%") + b": %b\r\n")
        else:
            parts.append(b"%.0b")  # formats to nothing: the value is dropped
            if role == _CONNECTION:
                if connection >= 0:
                    return _UNPLANNED
                connection = index
    parts.append(b"X-Request-Id: %b\r\n")
    return b"".join(parts), dated, connection


_PLANS: Memo[tuple[bytes, ...], tuple[bytes, bool, int]] = Memo(256, _plan)
"""A head's plan by its field names: an upstream sends the same few heads again and again
(values aside). Names are the upstream's choice, hence the bound."""


def _relayed_fields(answer: Response, request_id: str) -> tuple[bytes, int | None, bool]:
    """`_answer_fields` of an upstream answer, by its head's plan when it has one: one dict
    lookup and one `bytes %` instead of Python work per field (bench/FIGURES.md, "The
    upstream client's per-answer work"); and for a head that came before (`Response.head`),
    what that gave, less our X-Request-Id, kept with the head (bench/FIGURES.md, "The
    answer's head again")."""
    head = answer.head
    if head is not None and head.kept is not None:
        fields, length, dated = head.kept
        return b"%bX-Request-Id: %b\r\n" % (fields, request_id.encode("ascii")), length, dated
    names = tuple(answer.names)
    fmt, dated, connection = _PLANS.get(names) or _PLANS.make_for(names)
    values = answer.values
    if connection == -2 or (connection >= 0 and values[connection].lower() not in _PLAIN_CONNECTION):
        fields, length, dated = _answer_fields(answer.raw_headers, request_id)
    else:
        fields, length = fmt % (*values, request_id.encode("ascii")), answer.length
    if head is not None:
        # Both ways end with our `X-Request-Id: ...\r\n` (16 bytes and the id): kept without it.
        head.kept = (fields[: len(fields) - 16 - len(request_id)], length, dated)
    return fields, length, dated


async def forward(ex: Exchange) -> None:
    """Send the request upstream and stream the answer back to the client."""
    request, pool, plan = ex.request, ex.runtime.pool, ex.plan
    assert pool is not None and plan is not None  # started, and routed
    origin, upstream = plan.origin, plan.upstream
    # The target goes on the request line byte for byte: the path the router matched.
    target = origin.base_path + ex.path + ("?" + ex.query if ex.query else "")
    headers = Fields.of_bytes(ex.fields, ex.added)
    length = request.content_length
    if upstream.max_body and length is not None and length > upstream.max_body:
        raise PayloadTooLarge(f"Content-Length {length} exceeds max_body {upstream.max_body}")
    # The upstream's timeout also bounds each wait for the client's body bytes, and
    # body_timeout the whole body; on either, the upstream request is aborted (Pool._exchange).
    body = (
        _Limited(request, upstream.max_body, upstream.timeout, upstream.body_timeout) if request.body_exists else None
    )
    try:
        answer = await pool.request(
            request.method,
            origin.scheme,
            origin.host,
            origin.port,
            target,
            headers,
            body,
            content_length=length,
            connect_timeout=upstream.connect_timeout,
            read_timeout=upstream.timeout,
        )
    except BodyTooLarge:
        raise PayloadTooLarge(f"body exceeds max_body {upstream.max_body}") from None
    except BodyTimeout as error:
        raise RequestTimeout(str(error)) from None
    except BodyError as error:
        raise BadRequest(Reason.MALFORMED_REQUEST, f"request body unreadable: {error}") from None
    except TimeoutError:  # before UpstreamError's OSError-like cases: a timeout is a 504
        raise _timed_out(origin, upstream.timeout) from None
    except UpstreamError as error:
        raise UpstreamUnavailable(f"{origin}: {cause(error)}") from None
    rest = _answered(ex, answer)
    if rest is not None:
        await rest


def _timed_out(origin: Origin, timeout: float) -> UpstreamTimeout:
    return UpstreamTimeout(f"{origin} did not answer within {timeout:g}s")


def _answered(ex: Exchange, answer: Response) -> Coroutine[Any, Any, None] | None:
    """The answer's head is here: relayed now if it came whole (None), else the coroutine that
    reads or streams the rest (it releases `answer`)."""
    request, plan = ex.request, ex.plan
    assert plan is not None
    try:
        cors = plan.cors
        head = answer.head
        if cors is None and head is not None and head.kept is not None:
            # `_relayed_fields` for a head that came before, written out (bench/FIGURES.md,
            # "The forwarded request, session 8").
            fields, answer_length, dated = head.kept
            fields = b"%bX-Request-Id: %b\r\n" % (fields, ex.request_id.encode("ascii"))
        elif cors is None:
            fields, answer_length, dated = _relayed_fields(answer, ex.request_id)
        else:
            fields, answer_length, dated = _answer_fields(without_upstream_cors(answer.raw_headers), ex.request_id)
            fields += cors.response_fields(request.fields)
        # It usually came whole with its head: no wait; and the connection back in the pool
        # (`whole`) before the client is even written to, in one write of head and body.
        # (None for an answer with no body too: HEAD, 204, 304, told below.)
        small = answer.whole(SMALL_BODY)
        if small is not None:
            request.relay(answer.status, answer.raw_reason, fields, small, date=not dated)
            return None
        if not answer.has_body():
            # HEAD, 204, 304: the upstream's Content-Length (if any) describes the GET; relay it.
            answer.release()
            if answer_length is not None and answer.status != 204:
                fields += b"Content-Length: %d\r\n" % answer_length
            _full(ex).respond(answer.status, answer.reason, (), None, date=not dated, fields=fields)
            return None
    except BaseException:
        answer.release()
        raise
    return _streamed(ex, answer, fields, answer_length, dated)


async def _streamed(ex: Exchange, answer: Response, fields: bytes, answer_length: int | None, dated: bool) -> None:
    """The rest of an answer that did not come whole with its head: read (up to `SMALL_BODY`)
    or streamed to the client."""
    request, plan, request_id = ex.request, ex.plan, ex.request_id
    assert plan is not None
    origin, upstream = plan.origin, plan.upstream
    try:
        small = await answer.read(SMALL_BODY)
        if small is not None:
            answer.release()
            request.relay(answer.status, answer.raw_reason, fields, small, date=not dated)
            return
        await request.start(answer.status, answer.reason, (), answer_length, date=not dated, fields=fields)
        try:
            # Each read of the upstream goes on to the client from its read callback (no task
            # woken per read: bench/FIGURES.md, "Bodies"). A client that stops reading gets the
            # upstream's timeout, then is cut; while its buffer is full the upstream is not
            # read either, so a slow client costs this process its buffer and one read,
            # whatever the upstream's pace. The rest of a large Content-Length body may be
            # spliced from a plain-TCP upstream's socket into the client's (`target`;
            # bench/FIGURES.md, "The response spliced"), with the same waits and outcomes.
            await answer.relay(request.write_now, partial(request.drain, upstream.timeout), request)
        except (TimeoutError, UpstreamError) as error:
            # Headers are gone already: all we can honestly do is cut the connection.
            event(
                log,
                logging.WARNING,
                "upstream_broke_off",
                "%(upstream)s broke off mid-response: %(cause)s",
                upstream=str(origin),
                peer=f"{origin.host}:{origin.port}",
                cause=cause(error, timeout=upstream.timeout),
                request_id=request_id,
            )
            answer.close()
            request.abort()
            return
        except (ConnectionError, asyncio.CancelledError):
            answer.close()  # the client went away: stop pulling from the upstream
            raise
        await request.finish()
    except (TimeoutError, UpstreamError) as error:
        # Failed before anything was sent to the client: still a clean 502/504.
        answer.close()
        if isinstance(error, TimeoutError):
            raise UpstreamTimeout(f"{origin} stalled mid-answer") from None
        raise UpstreamUnavailable(f"{origin}: {cause(error)}") from None
    finally:
        answer.release()


class Answering(Later):
    """A request with no body forwarded on an idle pooled connection with no task and no
    coroutine (bench/FIGURES.md, "The proxied request without a task"): `forward_now` writes
    its head from the handler, and the upstream connection's read callback relays the answer
    (`_answer`), observes the upstream time, and calls `settle` (app.py's: the metrics and
    the access-log line, and the refusal for an error) before the client's connection goes
    on (`Request.done`). What is not that simple goes on as a task from the point it stops
    being simple (`Request.carry_on`), as `forward` would have: the one retry on a new
    connection, an answer that did not come whole with its head. The client going away
    (`cancel`) drops the upstream connection, as a cancelled task does."""

    __slots__ = ("_began", "_conn", "_ex", "settle")

    def __init__(self, ex: Exchange, began: float) -> None:
        self._ex = ex
        self._began = began
        self._conn: InFlight = None  # type: ignore[assignment]  # set once sent (`forward_now`)
        self.settle: Callable[[Exchange, Exception | None], None] = _unsettled
        """The request's end for the caller (app.py sets it): its error, or None."""

    def _answer(self) -> None:
        """The upstream connection's callback: its answer's head came, it failed, or it timed out."""
        ex = self._ex
        try:
            conn = self._conn
            if ex.plan.cors is None:  # type: ignore[union-attr]  # (forwarded: routed)
                # The common answer: its head seen before, whole (`_answered`'s first way, with
                # no `Response` made: bench/FIGURES.md, "The public route, session 9").
                again = conn.again_whole(SMALL_BODY)
                if again is not None:
                    head, body = again
                    fields, _, dated = head.kept
                    ex.request.relay(
                        head.status,
                        head.reason,
                        b"%bX-Request-Id: %b\r\n" % (fields, ex.request_id.encode("ascii")),
                        body,
                        date=not dated,
                    )
                    self._end(None)
                    return
            try:
                answer = conn.answer()
            except TimeoutError:  # before UpstreamError's OSError-like cases: a timeout is a 504
                plan = ex.plan
                assert plan is not None
                failure: Exception = _timed_out(plan.origin, plan.upstream.timeout)
            except UpstreamError as error:
                assert ex.plan is not None
                failure = UpstreamUnavailable(f"{ex.plan.origin}: {cause(error)}")
            else:
                if not isinstance(answer, Response):  # a retry, on a new connection: a task from here
                    _full(ex).carry_on(self._resumed(_retried(ex, answer), answer.close))
                    return
                rest = _answered(ex, answer)
                if rest is not None:  # not whole: read or streamed by a task from here
                    _full(ex).carry_on(self._resumed(rest, answer.close))
                    return
                self._end(None)
                return
            self._end(failure)
        except Exception as error:  # a bug: the request still ends (a 500, as `forward`'s task would give)
            self._end(error)

    def cancel(self) -> None:
        self._conn.cancel()
        self._end(None)  # recorded as `forward`'s cancelled task is: 499, nothing written

    def _settle(self, error: Exception | None) -> None:
        ex = self._ex
        assert ex.plan is not None
        ex.plan.metrics.observe_upstream(time.perf_counter() - self._began)  # (pipeline._forward's)
        self.settle(ex, error)

    def _end(self, error: Exception | None) -> None:
        ex = self._ex
        try:
            # `_settle`, and `observe_upstream` in it, written out: two Python calls fewer per
            # answer (bench/FIGURES.md, "The forwarded answer's record").
            plan = ex.plan
            assert plan is not None
            took = time.perf_counter() - self._began
            upstream = plan.metrics.upstream
            bounds = upstream.bounds
            upstream.counts[0 if took <= bounds[0] else bisect_left(bounds, took)] += 1
            upstream.sum += took
            if error is not None:
                _full(ex)  # (a refusal or a 500 to write: any answer `Request` writes)
            self.settle(ex, error)
        except Exception:
            event(log, logging.ERROR, "request_crashed", "ending a forwarded request failed", exc_info=True)
        finally:
            ex.request.done()

    async def _resumed(self, rest: Coroutine[Any, Any, None], drop: Callable[[], object]) -> None:
        """`rest` as the connection's task, then this request's end (the server's task ends it).
        `drop`: what lets go of the upstream side (the answer, or the retry not yet begun)."""
        if self._ex.request.transport is None:
            # The client left before this task began (a cancel reaches only a task that runs):
            # nothing more is sent or pulled for it.
            rest.close()
            drop()
            self._settle(None)
            return
        try:
            await rest
        except Exception as error:
            self._settle(error)
            return
        except BaseException:
            self._settle(None)
            raise
        self._settle(None)


def _full(ex: Exchange) -> Request:
    """`ex.request` as a `Request`: one that app.py took on from its head (http1's `Ahead`,
    answered by `relay` alone) made the `Request` it stands for, for any other answer or a task."""
    request = ex.request
    if request.__class__ is not Request:
        request = ex.request = request.full()  # type: ignore[attr-defined]
    return request


def _unsettled(ex: Exchange, error: Exception | None) -> None:
    raise RuntimeError("Answering.settle was not set")


async def _retried(ex: Exchange, sent: Coroutine[Any, Any, Response]) -> None:
    """`forward`'s wait and answer, for the one retry of a request `forward_now` sent."""
    plan = ex.plan
    assert plan is not None
    try:
        answer = await sent
    except TimeoutError:  # before UpstreamError's OSError-like cases: a timeout is a 504
        raise _timed_out(plan.origin, plan.upstream.timeout) from None
    except UpstreamError as error:
        raise UpstreamUnavailable(f"{plan.origin}: {cause(error)}") from None
    rest = _answered(ex, answer)
    if rest is not None:
        await rest


def forward_now(ex: Exchange, began: float, head: Callable[[bytes], bytes] | bytes | None = None) -> Answering | None:
    """`forward` with no task, for a request with no body (not an upgrade) when an idle pooled
    connection to its upstream is at hand: its head written now (`Answering` does the rest);
    None (nothing sent) when that is not the case, for `forward` to do it all. `began`: when
    the upstream time starts (pipeline.py's `observe_upstream`). `head`: what writes the head
    (`Pool.send`'s, called once a connection is in hand), by default from `ex.fields` and
    `ex.added` (`_head_of`); pipeline.py's prepared forward gives its own, written already
    (`planned_head`'s bytes)."""
    request = ex.request
    if request.body_exists:
        return None
    pool, plan = ex.runtime.pool, ex.plan
    assert pool is not None and plan is not None  # started, and routed
    origin, upstream = plan.origin, plan.upstream
    answering = Answering(ex, began)
    conn = pool.send(
        request.method,
        origin.scheme,
        origin.host,
        origin.port,
        partial(_head_of, ex) if head is None else head,
        connect_timeout=upstream.connect_timeout,
        read_timeout=upstream.timeout,
        notify=answering._answer,
    )
    if conn is None:
        return None
    answering._conn = conn
    return answering


def _head_of(ex: Exchange, host_line: bytes) -> bytes:
    """The upstream request's head from `ex.fields` and `ex.added` (`forward`'s, for no body)."""
    request, plan = ex.request, ex.plan
    assert plan is not None
    return encode_head(
        request.method,
        plan.origin.base_path + ex.path + ("?" + ex.query if ex.query else ""),
        Fields.of_bytes(ex.fields, ex.added),
        host_line,
        b"" if request.content_length is None else b"Content-Length: 0\r\n",
    )


def planned_head(
    line: bytes,
    ours: OurFields,
    fields: bytes,
    kept: int,
    values: tuple[bytes, ...],
    host: int,
    identity: tuple[tuple[bytes, bytes], ...],
    remote: str,
    scheme: str,
    request_id: str,
    framed: bool,
) -> bytes:
    """The head `_head_of` writes, for a request pipeline.py's prepared forward and identity.py's
    `HeadPlan` planned: `line`, its request line (prepared); the header fields `ours` writes
    (`OurFields.head`, the whole head at once) after the client's, from the format `fields` (`kept` lines) and the
    request's `values`, its Host `values[host]`, the `identity` headers, X-Forwarded-* for
    `remote` and `scheme`, X-Request-Id; `framed`: `Content-Length: 0` (a request that sent one,
    with no body, as `request` frames it). The same CR/LF check (`checked_head`), its count of
    lines told here once for both callers (pipeline's `begin_planned`, app's `_Public` way):
    bench/FIGURES.md, "The prepared forward"."""
    head = ours.head(
        line,
        fields % values,
        identity,
        remote,
        scheme,
        values[host],
        request_id,
        b"Content-Length: 0\r\n" if framed else b"",
    )
    return checked_head(head, 6 + kept + len(identity) + framed)


def is_websocket(request: Request) -> bool:
    """A WebSocket handshake (RFC 6455 §4.1) that the parser has marked as an upgrade."""
    return (
        request.upgrade
        and request.method == "GET"
        and "upgrade" in connection_tokens(request.headers)
        and request.headers.get("Upgrade", "").lower() == "websocket"
    )


class _Tunnel(asyncio.Protocol):
    """The upstream side of an upgraded connection: parse its answer's head, then relay bytes."""

    def __init__(self, request: Request) -> None:
        self._request = request
        # Made in `connection_made`: it holds our bound callbacks, a cycle that `connection_lost`
        # breaks; a connect that fails calls neither (the tunnel is made before it connects).
        self._parser: httptools.HttpResponseParser = None  # type: ignore[assignment]
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.answered = False  # the head (101) or the whole non-101 answer is here
        self.upgraded = False
        self.failed: str | None = None
        self.closed = False
        self._taken = 0  # bytes read before the answer was known
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._loop = asyncio.get_running_loop()
        self._wakeup = Wakeup(self._loop)  # `wait`: the answer's head, or bytes to relay, or the end
        self.active = self._loop.time()
        """When a byte last went through the tunnel, either way (loop time): the idle timeout's start."""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._parser = httptools.HttpResponseParser(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # It holds our bound callbacks: a cycle left for the garbage collector. Typed as never
        # None (ignore below): asyncio calls nothing on a protocol after connection_lost, and an
        # Optional would put a check on every data_received.
        self._parser = None  # type: ignore[assignment]
        if not self.answered:
            self.failed = self.failed or "closed before answering"
        self._request.resume_reading()
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            self.active = self._loop.time()
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > _TUNNEL_HIGH_WATER and not self._paused:
                self._paused = True
                self.transport.pause_reading()
        else:
            self._taken += len(data)
            if self._taken > _TUNNEL_HIGH_WATER:  # an endless head, or a refusal far past SMALL_BODY
                self.failed = self.failed or "answer too large"
                self.transport.abort()
                self._wake()
                return
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                self.upgraded = self.answered = True
                rest = data[upgrade.args[0] :]
                if rest:
                    self._chunks.append(rest)
                    self._buffered += len(rest)
            except httptools.HttpParserError:
                if not self.answered:
                    self.failed = "malformed answer"
                self.transport.abort()
        self._wake()

    def pause_writing(self) -> None:
        self._request.pause_reading()  # the upstream is not reading: stop reading the client

    def resume_writing(self) -> None:
        self._request.resume_reading()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.answered:
            # A second answer in the same read: the first one (a refusal) is the answer; what
            # follows it is garbage, never a late 101 (upstream.py stops the same way).
            raise UpstreamError("data after the end of the answer")
        self.reason = b""  # a 100 Continue may come first; its phrase is not the answer's

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status >= 200:
            return  # a trailer field of a chunked refusal: never merged into its head (RFC 9110 §6.5.1)
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if 100 <= self.status < 200 and self.status != 101:
            self.headers.clear()  # an interim answer: the final one follows

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > SMALL_BODY:
            self.failed = "refusal body too large"
            self.transport.abort()
        else:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.status >= 200:
            self.answered = True

    # the relay

    def _wake(self) -> None:
        self._wakeup.wake()

    async def wait(self) -> None:
        await self._wakeup.wait()

    def send(self, data: bytes) -> None:
        """The client's bytes to the upstream; b"" when the client half-closed (`Request.tunnel`):
        the upstream's write side is shut too, and what it still sends goes on reaching the client."""
        if not self.closed:
            self.active = self._loop.time()
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    async def relay(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                data = b"".join(self._chunks)
                self._chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    self.transport.resume_reading()
                yield data
            elif self.closed:
                return
            else:
                await self.wait()


class _TunnelLimits:
    """Closes a tunnel that has been idle `idle_timeout`, open `max_lifetime`, or has outlived
    its token: one timer, set again for the next time any of them could be due.

    Both sides are cut (`abort`): the frames are not parsed, so no close frame can be slipped
    in between two of theirs; a client that is not reading would never let a graceful close
    finish; and the upstream must not keep serving a tunnel whose token ran out."""

    def __init__(
        self, request: Request, tunnel: _Tunnel, settings: WebSocketSettings, expires_in: float | None, origin: Origin
    ) -> None:
        self._request = request
        self._tunnel = tunnel
        self._idle = settings.idle_timeout
        self._origin = origin
        loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        ends: list[tuple[float, str]] = []
        if settings.max_lifetime:
            ends.append((now + settings.max_lifetime, f"open for max_lifetime {settings.max_lifetime:g}s"))
        if settings.close_on_token_expiry and expires_in is not None:
            ends.append((now + expires_in, "its token expired"))
        self._end = min(ends) if ends else None
        self._timer: asyncio.TimerHandle | None = None
        self.closed_because: str | None = None
        self._arm()

    def _arm(self) -> None:
        due = self._end[0] if self._end is not None else None
        if self._idle:
            idle_at = self._tunnel.active + self._idle
            due = idle_at if due is None else min(due, idle_at)
        if due is not None:
            self._timer = self._loop.call_at(due, self._check)

    def _check(self) -> None:
        now = self._loop.time() + 0.001  # call_at may run a hair early
        if self._end is not None and now >= self._end[0]:
            because = self._end[1]
        elif self._idle and now >= self._tunnel.active + self._idle:
            because = f"idle for idle_timeout {self._idle:g}s"
        else:
            self._arm()  # bytes went through since the timer was set
            return
        self.closed_because = because
        event(
            log,
            logging.DEBUG,
            "websocket_closed",
            "websocket %(upstream)s closed: %(because)s",
            upstream=str(self._origin),
            because=because,
        )
        self._tunnel.transport.abort()
        self._request.abort()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def forward_websocket(ex: Exchange, *, expires_in: float | None = None) -> None:
    """Send the handshake upstream; relay its answer; on 101, relay raw bytes both ways.

    Like Envoy, the frames are not parsed: after the 101 the connection is the two
    endpoints' own, and the authentication was done on the handshake. The route's (else the
    config's) `websocket` settings bound the tunnel's idle time and lifetime; `expires_in` is
    how long the token that opened it stays acceptable (None: no token, or no `exp`), for
    `close_on_token_expiry`.
    """
    request, pool, plan = ex.request, ex.runtime.pool, ex.plan
    assert pool is not None and plan is not None  # started, and routed
    origin, upstream, request_id = plan.origin, plan.upstream, ex.request_id
    target = origin.base_path + ex.path + ("?" + ex.query if ex.query else "")
    headers = Fields.of_bytes(ex.fields, ex.added)
    settings = ex.snapshot.settings.websocket if ex.snapshot is not None else _DEFAULT_WEBSOCKET
    websocket = plan.route.websocket or settings
    loop = asyncio.get_running_loop()
    tunnel = _Tunnel(request)
    context = pool.tls_context() if origin.scheme == "https" else None
    try:
        async with asyncio.timeout(upstream.connect_timeout):
            await loop.create_connection(
                lambda: tunnel,
                connect_host(origin.host.strip("[]")),  # type: ignore[arg-type] # bytes: both loops take them
                origin.port,
                ssl=context,
                server_hostname=origin.host.strip("[]") if context else None,  # a str: `ssl` encodes it
            )
    except TimeoutError:
        # Nothing was sent: an unreachable upstream is a 502, as in `forward` (504 is for an answer that is late).
        raise UpstreamUnavailable(f"websocket {origin}: no connection within {upstream.connect_timeout:g}s") from None
    except OSError as error:
        raise UpstreamUnavailable(f"websocket {origin}: {cause(error)}") from None
    try:
        tunnel.send(
            pool.upgrade_head(origin.scheme, origin.host, origin.port, target, headers, request.headers["Upgrade"])
        )
        try:
            async with asyncio.timeout(upstream.timeout):
                while not tunnel.answered and tunnel.failed is None:
                    await tunnel.wait()
        except TimeoutError:
            raise UpstreamTimeout(f"websocket {origin} did not answer within {upstream.timeout:g}s") from None
        if tunnel.failed is not None:
            raise UpstreamUnavailable(f"websocket {origin}: {tunnel.failed}")
        reason = tunnel.reason.decode("utf-8", "surrogateescape")
        # On a route with `cors`, the handshake's answer is treated as any other answer there
        # (browsers apply no CORS to WebSockets: the upstream judges the Origin it receives).
        cors = plan.cors
        raw = tunnel.headers if cors is None else without_upstream_cors(tunnel.headers)
        added = b"" if cors is None else cors.response_fields(request.fields)
        if not tunnel.upgraded:
            # Refused upstream (401, 403, 426...): relay the answer as any other.
            fields, _, dated = _answer_fields(raw, request_id)
            request.respond(tunnel.status, reason, (), b"".join(tunnel.body), date=not dated, fields=fields + added)
            return
        # The 101's own hop-by-hop fields go, as on any answer; the two that make it a switch
        # are ours to say (RFC 9110 §7.8).
        fields, _, _ = _answer_fields(raw, request_id)
        fields += added
        upgrade = next((v for n, v in tunnel.headers if n.lower() == b"upgrade"), b"websocket")
        fields += b"Connection: Upgrade\r\nUpgrade: %b\r\n" % upgrade
        tunnel.active = loop.time()
        limits = _TunnelLimits(request, tunnel, websocket, expires_in, origin)
        try:
            await request.tunnel(101, reason, (), tunnel.send, tunnel.relay(), fields=fields)
        finally:
            limits.cancel()
    finally:
        tunnel.transport.close()


_TUNNEL_HIGH_WATER = 256 * 1024
