"""A day of `workers: 2` at `log_level: DEBUG` in JSON: every stderr line is one valid record.

A real sidecar with two workers starts while its issuer fails, gets its keys when the issuer
comes back, is reloaded (applied, then refused), loses its config file and gets it back, and
drains: every line of its stderr, from the supervisor and both workers, must parse as one
JSON object with the documented members (RFC 3339 UTC time, an event of oplog.EVENTS at one
of its levels, numbers as numbers), and every stdout line too.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from tests.conftest import TestKey, jwks_of, mint
from tests.integration.test_oplog_json import (
    ROUTES,
    assert_every_line_is_a_full_json_record,
    config_text,
    get,
    provider,
    sidecar,
)
from tests.support.jwks_server import start_jwks_server
from tests.support.process import free_port
from tests.support.upstream import start_upstream


async def test_every_line_of_a_day_with_two_workers_is_one_json_record(
    tmp_path: Path, aiohttp_server: Any, rsa_key: TestKey
) -> None:
    upstream = await start_upstream(aiohttp_server)
    jwks = await start_jwks_server(aiohttp_server, jwks_of(rsa_key))
    jwks.mode = "fail"
    listen, admin = free_port(), free_port()
    text = config_text(
        upstream.url,
        provider("main", jwks.url(), "1s"),
        ROUTES,
        listen=listen,
        admin=admin,
        extra="workers: 2\nlog_format: json\nlog_level: DEBUG\n",
    )
    async with sidecar(tmp_path, text, listen=listen, admin=admin) as run:
        await run.wait_for("workers_started")
        await run.wait_for("key_fetch_failed", lambda line: "worker" in line)
        jwks.mode = "ok"
        await run.wait_for("provider_ready", lambda _: len(run.events("provider_ready")) >= 2, timeout=20)
        for _ in range(4):
            assert await get(listen, "/x", mint(key=rsa_key)) == 200
            assert await get(listen, "/x", mint({"exp": int(time.time()) - 60}, key=rsa_key)) == 401
        run.config.write_text(text.replace("timeout: 1s", "timeout: 2s"))
        run.proc.send_signal(signal.SIGHUP)
        await run.wait_for("reload_applied", lambda _: len(run.events("reload_applied")) >= 2)
        run.config.write_text(text + "realm: [not, a, string]\n")
        run.proc.send_signal(signal.SIGHUP)
        await run.wait_for("reload_refused", lambda _: len(run.events("reload_refused")) >= 2)
        run.config.unlink()
        await run.wait_for("config_missing", timeout=8)
        run.config.write_text(text)
        await run.wait_for("config_back", timeout=8)
    assert_every_line_is_a_full_json_record(run.err)
    seen = {line["event"] for line in run.err}
    assert {
        "workers_started",
        "listening",
        "key_fetch_failed",
        "keys_loaded",
        "provider_ready",
        "request_refused",
        "reload_applied",
        "reload_refused",
        "config_missing",
        "config_back",
        "draining",
        "stopped",
    } <= seen, seen
    assert {line["worker"] for line in run.err if "worker" in line} == {0, 1}
    assert run.out and all(
        isinstance(line["status"], int) and isinstance(line["latency_ms"], float) for line in run.out
    )
