"""server.py's `freeze_start_up`: the start-up's live objects frozen out of later collections,
its garbage collected first (never frozen)."""

from __future__ import annotations

import gc
import weakref

from proxy.ops.server import freeze_start_up


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_start_up_objects_are_frozen_and_its_garbage_collected_first() -> None:
    kept = _Node()
    garbage = _Node()
    garbage.other = _Node()
    garbage.other.other = garbage  # a cycle: only the collector frees it
    gone = weakref.ref(garbage)
    del garbage
    try:
        freeze_start_up()
        assert gone() is None, "the start-up's garbage is collected, not frozen for good"
        assert gc.get_freeze_count() > 0
        assert not any(obj is kept for obj in gc.get_objects()), "live objects leave the collected generations"
    finally:
        gc.unfreeze()  # the rest of the test session collects as before
    assert any(obj is kept for obj in gc.get_objects())
