"""The event loops a test runs on, for pytest-asyncio's `pytest_asyncio_loop_factories` hook.

`jwt-sidecar run` serves on uvloop where it is installed (a regular dependency on Linux and
macOS: proxy/ops/server.py's `_loop_runner`) and on asyncio's own loop where it is not. The two
differ where the proxy is most particular (when a protocol object is made, a memoryview kept by
a transport, `add_reader` on a transport's fd, timers in whole milliseconds, a reset delivered
with the bytes before it), so the wire is tested on the loop users run, and where chosen on both.

A conftest's hook returns `loops(...)`: each async test then runs once per loop, its id ending
in `[uvloop]` or `[asyncio]` (a test on one loop keeps its id unchanged).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

# asyncio's: what asyncio.run makes on Linux and macOS (the default policy's loop).
FACTORIES: dict[str, LoopFactory] = {"asyncio": asyncio.SelectorEventLoop}
try:
    import uvloop
except ImportError:  # Windows: `run` falls back to asyncio's loop, and so do the tests
    pass
else:
    FACTORIES["uvloop"] = uvloop.new_event_loop


def loops(*names: str) -> dict[str, LoopFactory]:
    """The loops named ("uvloop", "asyncio") that are installed; asyncio's if none is."""
    return {name: FACTORIES[name] for name in names if name in FACTORIES} or {"asyncio": asyncio.SelectorEventLoop}
