"""`Response.whole` (one call for `complete` and `release`, bench/FIGURES.md, "The forwarded
request, session 8") against the two calls it stands for: for every answer, whole or cut short,
valid or not, each way fed to a connection of its own, the same body (or None), and the
connection left the same way (pooled, aborted, or held by the answer, nothing consumed).
No sockets: the reads go straight into the protocol."""

from __future__ import annotations

import asyncio

import pytest

from proxy.http.upstream import Pool, Response, _Connection

from .test_upstream_head_again import BASES, HAND_PICKED, ODD_BUT_COMMON, _head_of, _pool, _Transport

ANSWERS = BASES + ODD_BUT_COMMON + HAND_PICKED
# Each answer whole, and cut before its last byte (the body not yet all here).
CASES = [(answer, cut) for answer in ANSWERS for cut in (False, True) if answer]


@pytest.fixture
def pool() -> Pool:
    loop = asyncio.new_event_loop()
    yield _pool(loop)
    loop.close()


def _answered(pool: Pool, read: bytes, *, is_head: bool, kept: bool) -> tuple[_Connection, _Transport, Response | None]:
    """A pooled-to-be connection of a new origin (holding its own head when `kept`) fed `read`."""
    origin = pool._origin("http", f"w{len(pool._origins)}", 80)
    if kept:
        origin.head = _head_of(pool, read) if _keeps(pool, read) else None
    conn = _Connection(pool, origin)
    transport = _Transport()
    conn.connection_made(transport)
    conn._begin(is_head)
    conn.data_received(read)
    return conn, transport, Response(conn, 1.0) if conn._head_done and conn._error is None else None


def _keeps(pool: Pool, read: bytes) -> bool:
    origin = pool._origin("http", f"k{len(pool._origins)}", 80)
    conn = _Connection(pool, origin)
    conn.connection_made(_Transport())
    conn._begin(False)
    conn.data_received(read)
    return origin.head is not None


def _state(conn: _Connection, transport: _Transport, response: Response) -> tuple[object, ...]:
    return (
        conn in conn._origin.idle,
        transport.aborted,
        response._conn is None,
        b"".join(conn._chunks),
        conn._buffered,
        transport.paused,
    )


@pytest.mark.parametrize(("answer", "cut"), CASES)
@pytest.mark.parametrize("is_head", [False, True])
@pytest.mark.parametrize("kept", [False, True])
@pytest.mark.parametrize("limit", [0, 2, 1 << 16])
def test_whole_is_complete_then_release(
    pool: Pool, answer: bytes, cut: bool, is_head: bool, kept: bool, limit: int
) -> None:
    read = answer[:-1] if cut else answer
    two = _answered(pool, read, is_head=is_head, kept=kept)
    one = _answered(pool, read, is_head=is_head, kept=kept)
    if two[2] is None or one[2] is None:
        assert two[2] is None and one[2] is None
        return
    conn, transport, response = two
    body = response.complete(limit)
    if body is not None:
        response.release()
    expected = (body, _state(conn, transport, response))
    conn, transport, response = one
    got = response.whole(limit)
    assert (got, _state(conn, transport, response)) == expected


def test_an_answer_taken_whole_pools_its_connection(pool: Pool) -> None:
    conn, transport, response = _answered(
        pool, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", is_head=False, kept=False
    )
    assert response is not None
    assert response.whole(1024) == b"ok"
    assert list(conn._origin.idle) == [conn] and not transport.aborted
    assert response.whole(1024) is None  # released: nothing more to take


def test_nothing_is_taken_or_released_for_an_answer_not_whole(pool: Pool) -> None:
    conn, transport, response = _answered(
        pool, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok", is_head=False, kept=False
    )
    assert response is not None
    assert response.whole(1024) is None
    assert response._conn is conn and b"".join(conn._chunks) == b"ok"
    assert not conn._origin.idle and not transport.aborted
