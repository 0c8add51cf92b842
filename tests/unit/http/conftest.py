"""The unit tests of the wire run on asyncio's own loop, but for splice.py's: on both loops (the
splice pauses and resumes a transport's reading and registers dup'd descriptors with the loop,
where uvloop and asyncio's loop differ)."""

from __future__ import annotations

import pytest

from tests.support.loops import LoopFactory, loops


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, LoopFactory]:
    if item.path.name == "test_splice.py":
        return loops("asyncio", "uvloop")
    return loops("asyncio")
