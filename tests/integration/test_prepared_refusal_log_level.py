"""The prepared 401 (`app._Quick`, answered from the head) follows the operator log's level as
it is now, not as it was: at DEBUG every refused request is logged naming its route (the
prepared answer steps aside for the full way), whenever DEBUG is switched on or off. The
handler tells DEBUG from the logger's own cache of `isEnabledFor`, which `logging` clears on
every level change: this holds it to that."""

from __future__ import annotations

import logging
from typing import Any

import pytest


def _refused(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if getattr(record, "event", None) == "request_refused"]


async def test_a_prepared_401_is_logged_at_debug_whenever_debug_is_on(
    sidecar: Any, caplog: pytest.LogCaptureFixture
) -> None:
    s = await sidecar()
    logger = logging.getLogger("jwt_sidecar")
    before = logger.level
    try:
        logger.setLevel(logging.INFO)
        for _ in range(3):  # the first prepares the `_Quick`; the others are answered from it
            response = await s.get("/api/orders")
            assert response.status == 401
        assert s.runtime.snapshot is not None and ("GET", "/api/orders") in s.runtime.snapshot.refusals
        assert _refused(caplog) == []
        with caplog.at_level(logging.DEBUG, logger="jwt_sidecar"):
            for _ in range(2):
                response = await s.get("/api/orders")
                assert response.status == 401
            records = _refused(caplog)
            assert len(records) == 2, [record.getMessage() for record in records]
            assert all(getattr(record, "fields", {}).get("route") == "api" for record in records)
        caplog.clear()
        logger.setLevel(logging.INFO)
        response = await s.get("/api/orders")
        assert response.status == 401
        assert _refused(caplog) == []
    finally:
        logger.setLevel(before)
