"""Test helpers for wire-level tests: a time bound per test, polling, and a hand-written TCP server.

`RawServer` is a loopback server whose every byte the test writes (a handler gets the
reader, the writer and the connection's number, from 1); it counts connections opened and
closed. The `raw_server` fixture (tests/conftest.py) starts them and stops them all after
the test.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


def bounded_by(limit: float) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., Awaitable[None]]]:
    """A decorator that fails an async test taking longer than `limit` seconds."""

    def bounded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        @functools.wraps(test)
        async def run(*args: Any, **kwargs: Any) -> None:
            await asyncio.wait_for(test(*args, **kwargs), limit)

        return run

    return bounded


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    """Poll until `condition()` holds: for what a server does after the client moved on."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


class RawServer:
    """A loopback server whose every byte a test writes; counts connections and closes."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed += 1
            self.tasks.discard(task)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()
