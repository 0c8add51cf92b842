"""http1.py's `Later`: a handler that answers a request from callbacks of its own, with no task,
ends it with `Request.done`, hands the rest to a task with `Request.carry_on`, and is told
(`cancel`) when the client goes away first."""

from __future__ import annotations

import asyncio
import socket
import struct

from proxy.http.http1 import Later, Request, Server
from tests.support.raw import bounded_by


class Soon(Later):
    """Answers its request on the loop's next turns, then ends it."""

    def __init__(self, request: Request, cancels: list[str]) -> None:
        self.request = request
        self.cancels = cancels
        self.handle = asyncio.get_running_loop().call_later(0.02, self.answer)

    def answer(self) -> None:
        self.request.respond(200, None, (), self.request.raw_path.encode())
        self.request.done()

    def cancel(self) -> None:
        self.handle.cancel()
        self.cancels.append(self.request.raw_path)
        self.request.done()


async def serve(handler: object) -> tuple[Server, asyncio.StreamReader, asyncio.StreamWriter]:
    server = Server(handler)  # type: ignore[arg-type]
    await server.listen("127.0.0.1", 0)
    host, port = server.sockets[0]
    reader, writer = await asyncio.open_connection(host, port)
    return server, reader, writer


async def answers(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    got = []
    for _ in range(count):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        got.append(await reader.readexactly(length))
    return got


@bounded_by(10)
async def test_pipelined_requests_answered_later_come_back_in_order() -> None:
    cancels: list[str] = []
    server, reader, writer = await serve(lambda request: Soon(request, cancels))
    try:
        writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(4)))
        assert await answers(reader, 4) == [b"/0", b"/1", b"/2", b"/3"]
        writer.close()
    finally:
        await server.shutdown(1)
    assert cancels == []


@bounded_by(10)
async def test_a_client_gone_before_the_answer_cancels_it_and_the_connection_ends() -> None:
    cancels: list[str] = []
    made: list[Soon] = []

    def handler(request: Request) -> Soon:
        soon = Soon(request, cancels)
        soon.handle.cancel()  # never answers by itself
        made.append(soon)
        return soon

    server, _reader, writer = await serve(handler)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        while not made:
            await asyncio.sleep(0.01)
    # A reset: a FIN alone may be a half-close, whose request is still answered
    # (tests/unit/http/test_http1.py, test_a_fin_while_a_request_runs_is_answered_then_closed).
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    async with asyncio.timeout(5):
        while not cancels:
            await asyncio.sleep(0.01)
    await server.shutdown(1)
    assert cancels == ["/a"] and len(made) == 1
    assert not server._connections, "its `done` ended the connection's last request"


@bounded_by(10)
async def test_the_rest_handed_to_a_task_answers_and_ends_the_request() -> None:
    class ToTask(Later):
        def __init__(self, request: Request) -> None:
            async def rest() -> None:
                await asyncio.sleep(0.01)
                request.respond(200, None, (), b"from a task")

            asyncio.get_running_loop().call_soon(request.carry_on, rest())

        def cancel(self) -> None:
            raise AssertionError("not cancelled")

    server, reader, writer = await serve(ToTask)
    try:
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await answers(reader, 2) == [b"from a task", b"from a task"]
        writer.close()
    finally:
        await server.shutdown(1)


@bounded_by(10)
async def test_a_drain_waits_for_a_request_answered_later_and_closes_after_it() -> None:
    cancels: list[str] = []
    made: list[Soon] = []

    def handler(request: Request) -> Soon:
        soon = Soon(request, cancels)
        soon.handle.cancel()
        soon.handle = asyncio.get_running_loop().call_later(0.3, soon.answer)
        made.append(soon)
        return soon

    server, reader, writer = await serve(handler)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        while not made:
            await asyncio.sleep(0.01)
    draining = asyncio.create_task(server.shutdown(5))
    answer = await asyncio.wait_for(reader.read(), 5)
    await draining
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close\r\n" in answer and answer.endswith(b"/a")
    assert cancels == []
