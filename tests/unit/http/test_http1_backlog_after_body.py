"""Review (s8): `_BACKLOG` says a read of tiny pipelined requests is parsed a slice at a time,
held back unparsed once 16 requests wait ("one 256 KiB read of tiny pipelined requests would
become thousands of queued requests, each far larger than its bytes"). After a Content-Length
body, counted (`_Counted.feed_data`: the rest of the read fed to the fresh parser at once) or
parsed by llhttp (`_feed`'s `_BODY_SLICE` while a body is parsed), that limit is not applied:
the requests that follow the body in the same read are all queued. With a relayed body the
read is 256 KiB: ~6,500 `Request`s (~3 MB) from one read; 32 KiB reads give ~800 each."""

from __future__ import annotations

import asyncio

from proxy.http import http1
from proxy.http.http1 import Server, _Connection
from tests.unit.http.test_http1_counted import NEXT, TURNS, Wire, _big, handler, req

KiB = 1024


async def test_requests_after_a_counted_body_in_one_read_are_held_back_past_the_backlog() -> None:
    # (`_counts_bodies = False`, llhttp parsing the body, queues them all too: that way is the
    # tests' reference only; a chunked body's end is llhttp's to find, and the same holds there.)
    counted = True
    events: list[object] = []
    server = Server(handler(events, []))
    conn = _Connection(server)
    conn._counts_bodies = counted
    wire = Wire(events)
    wire.conn = conn
    conn.connection_made(wire)
    stream = req("POST", "/relay", _big(100 * KiB)) + NEXT * 8000
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
    finally:
        wire.closing = True
        conn.connection_lost(None)
        for _ in range(TURNS):
            await asyncio.sleep(0)
    # A read's requests beyond the backlog wait unparsed (`_unparsed`); a read of at most
    # `_HEAD_SLICE` (the fast path) may queue that slice's worth.
    assert most <= http1._BACKLOG + http1._HEAD_SLICE // len(NEXT), most
