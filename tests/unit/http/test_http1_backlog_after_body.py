"""Requests pipelined behind a body are held to the backlog as any others are.

`_BACKLOG` says a read of tiny pipelined requests is parsed a slice at a time, held back
unparsed once 16 requests wait: one 256 KiB read would otherwise become thousands of queued
requests, each far larger than its bytes. Behind a body that limit used to go unapplied: the
rest of the body's slice (or, past a counted body, the rest of the read) went to llhttp at once,
and a 256 KiB read behind a relayed body queued 6,209 `Request`s (~3 MB). A counted body's slice
now ends where the body does, so what follows is parsed as any heads are; behind a chunked body
(whose end llhttp finds) a client that queues more than a head slice can hold past the backlog
is answered 429 after the requests before, and closed."""

from __future__ import annotations

import asyncio
import re

import pytest

from proxy.http import http1
from proxy.http.http1 import Server, _Connection
from tests.unit.http.test_http1_counted import NEXT, TURNS, Wire, _big, chunked, handler, req

KiB = 1024


async def _drive(stream: bytes, *, counted: bool) -> tuple[int, list[object]]:
    """Feed `stream` as reads of up to the read buffer's size (the first 40 KiB), honouring
    pauses, and return the most requests queued at once and what the client got."""
    events: list[object] = []
    conn = _Connection(Server(handler(events, [])))
    conn._counts_bodies = counted
    wire = Wire(events)
    wire.conn = conn
    conn.connection_made(wire)
    most = 0
    at = 0
    try:
        while at < len(stream):
            for _ in range(TURNS):  # (the relay begins; a paused connection is not read)
                if not wire.paused:
                    break
                await asyncio.sleep(0)
            if wire.paused or wire.closing:
                break
            buffer = conn.get_buffer(-1)
            size = min(len(buffer), len(stream) - at, 40 * KiB if not at else len(buffer))
            buffer[:size] = stream[at : at + size]
            conn.buffer_updated(size)
            most = max(most, len(conn._queue))
            at += size
        for _ in range(TURNS):
            await asyncio.sleep(0)
    finally:
        wire.closing = True
        conn.connection_lost(None)
        for _ in range(TURNS):
            await asyncio.sleep(0)
    return most, events


def _statuses(events: list[object]) -> list[int]:
    written = b"".join(event[1] for event in events if isinstance(event, tuple) and event[0] == "write")
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", written)]


@pytest.mark.parametrize("tail", [1, 500, 8000])
async def test_requests_after_a_counted_body_in_one_read_are_held_back_past_the_backlog(tail: int) -> None:
    most, events = await _drive(req("POST", "/relay", _big(100 * KiB)) + NEXT * tail, counted=True)
    # A read's requests beyond the backlog wait unparsed (`_unparsed`); one head slice may queue
    # that slice's worth.
    assert most <= http1._BACKLOG + http1._HEAD_SLICE // len(NEXT), most
    assert _statuses(events) == [200] * (1 + tail)  # every one answered, in its turn


async def test_requests_after_a_chunked_body_in_one_read_are_bounded_and_refused() -> None:
    stream = chunked("/relay", _big(100 * KiB)) + NEXT * 8000
    most, events = await _drive(stream, counted=True)
    assert most <= http1._MAX_QUEUED, most
    statuses = _statuses(events)
    # The body's request and those queued before the bound are answered; then a 429, and the
    # connection closed (nothing after it is answered).
    assert statuses[0] == 200 and statuses[-1] == 429, statuses[:3] + statuses[-3:]
    assert set(statuses[1:-1]) == {200} and len(statuses) <= http1._MAX_QUEUED + 1
    assert ("close",) in events or ("abort",) in events


async def test_a_few_requests_after_a_chunked_body_are_answered() -> None:
    _, events = await _drive(chunked("/relay", _big(100 * KiB)) + NEXT * 200, counted=True)
    assert _statuses(events) == [200] * 201
