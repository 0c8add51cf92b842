"""The admin port on our own HTTP/1.1 server answers as aiohttp's web server did when it served it.

Statuses, bodies, content types, the methods allowed (GET, HEAD) and refused (405 with
`Allow`), any other path a 404, the query string ignored, keep-alive, the Prometheus content
type negotiated by `Accept`. Probes and scrapers must see no change.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.integration.conftest import Sidecar


async def exchange(admin_url: str, *requests: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send `requests` on one connection (keep-alive) and read each answer."""
    host, port = admin_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    answers = []
    try:
        for request in requests:
            writer.write(request)
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 5)
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = b"" if request.startswith(b"HEAD ") else await reader.readexactly(length)
            answers.append((int(status_line.split()[1]), headers, body))
    finally:
        writer.close()
    return answers


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: admin\r\n{extra}\r\n".encode()


async def test_healthz_readyz_and_metrics_answer_on_one_connection(sidecar: Any) -> None:
    s: Sidecar = await sidecar()
    (h, hh, hb), (r, rh, rb), (m, mh, mb) = await exchange(
        s.admin_url, get("/healthz"), get("/readyz?verbose=1"), get("/metrics")
    )
    assert (h, hh["content-type"], json.loads(hb)) == (200, "application/json; charset=utf-8", {"status": "alive"})
    assert hb == b'{"status": "alive"}'
    assert (r, rh["content-type"], json.loads(rb)) == (
        200,
        "application/json; charset=utf-8",
        {"ready": True, "reason": "ready"},
    )
    assert m == 200 and mh["content-type"].startswith("text/plain; version=0.0.4")
    assert b"jwt_sidecar_requests_total" in mb or b"# HELP" in mb
    assert "connection" not in mh  # kept alive


async def test_readyz_is_503_with_its_reason_while_draining(sidecar: Any) -> None:
    s: Sidecar = await sidecar()
    s.runtime.draining = True
    [(status, headers, body)] = await exchange(s.admin_url, get("/readyz"))
    assert (status, json.loads(body)) == (503, {"ready": False, "reason": "draining: shutting down"})
    assert headers["content-type"] == "application/json; charset=utf-8"


async def test_metrics_in_openmetrics_when_asked(sidecar: Any) -> None:
    s: Sidecar = await sidecar()
    [(status, headers, body)] = await exchange(
        s.admin_url, get("/metrics", extra="Accept: application/openmetrics-text; version=1.0.0\r\n")
    )
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_head_answers_the_get_head_without_a_body(sidecar: Any, path: str) -> None:
    s: Sidecar = await sidecar()
    [(status, headers, _), (after, _, _)] = await exchange(s.admin_url, get(path, "HEAD"), get("/healthz"))
    assert status == 200 and int(headers["content-length"]) > 0
    assert after == 200  # the connection's framing held: no body came after the HEAD's head


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
async def test_any_other_method_is_405_with_allow(sidecar: Any, method: str) -> None:
    s: Sidecar = await sidecar()
    [(status, headers, body)] = await exchange(s.admin_url, get("/readyz", method, "Content-Length: 0\r\n"))
    assert (status, headers["allow"], body) == (405, "GET,HEAD", b"405: Method Not Allowed")
    assert headers["content-type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize("path", ["/", "/healthz/", "/readyzz", "/api/orders", "/metrics/x", "/HEALTHZ"])
async def test_any_other_path_is_404(sidecar: Any, path: str) -> None:
    s: Sidecar = await sidecar()
    [(status, headers, body)] = await exchange(s.admin_url, get(path))
    assert (status, body, headers["content-type"]) == (404, b"404: Not Found", "text/plain; charset=utf-8")


async def test_a_malformed_request_is_400_and_the_port_keeps_answering(sidecar: Any) -> None:
    s: Sidecar = await sidecar()
    [(status, _, _)] = await exchange(s.admin_url, b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert status == 400
    [(again, _, _)] = await exchange(s.admin_url, get("/healthz"))
    assert again == 200
