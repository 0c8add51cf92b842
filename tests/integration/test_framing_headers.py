"""Through the real proxy: the framing headers, both ways (proxy/http/http1.py for the client's
Transfer-Encoding, proxy/request/identity.py for spellings that only some upstreams read as framing,
proxy/http/upstream.py for the upstream's Transfer-Encoding).

Requests are raw bytes on a socket (`send_raw`), so each header goes out exactly as written.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.integration.conftest import BASE_CONFIG
from tests.integration.test_security import first_response, send_raw, upstream_paths
from tests.support.raw import bounded_by

bounded = bounded_by(10.0)
SMUGGLED = b"GET /admin/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
BODY = b"5\r\nhello\r\n0\r\n\r\n"


def post(*fields: bytes, version: bytes = b"1.1", body: bytes = BODY) -> bytes:
    return b"POST /public/upload HTTP/%b\r\nHost: x\r\n%b\r\n%b" % (
        version,
        b"".join(f + b"\r\n" for f in fields),
        body,
    )


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        # chunked is the last coding, so the length is known, but we would have to decode the
        # others: RFC 9112 §6.1's 501. The upstream must never be told only `chunked`.
        pytest.param([b"Transfer-Encoding: gzip, chunked"], 501, id="gzip-chunked"),
        pytest.param([b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"], 501, id="gzip-then-chunked-lines"),
        pytest.param([b"Transfer-Encoding: deflate,chunked"], 501, id="deflate-chunked"),
        pytest.param([b"Transfer-Encoding: x-custom, CHUNKED"], 501, id="unknown-chunked"),
        pytest.param([b"Transfer-Encoding: identity, chunked"], 501, id="identity-chunked"),
        # chunked not last (or not there): no length can be known, RFC 9112 §6.3's 400.
        pytest.param([b"Transfer-Encoding: identity"], 400, id="identity"),
        pytest.param([b"Transfer-Encoding: gzip"], 400, id="gzip"),
        pytest.param([b"Transfer-Encoding: chunked, gzip"], 400, id="chunked-gzip"),
        pytest.param([b"Transfer-Encoding: chunked, chunked"], 400, id="chunked-twice"),
        pytest.param([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"], 400, id="chunked-two-lines"),
        pytest.param([b"Transfer-Encoding: xchunked"], 400, id="xchunked"),
        pytest.param([b"Transfer-Encoding: chunked;q=1"], 400, id="chunked-with-a-parameter"),
        pytest.param([b"Transfer-Encoding: chunked\t"], 400, id="trailing-tab"),
        pytest.param([b"Transfer-Encoding: chunked,"], 400, id="trailing-comma"),
    ],
)
@bounded
async def test_transfer_codings_other_than_chunked_alone_are_refused(
    sidecar: Any, fields: list[bytes], status: int
) -> None:
    s = await sidecar()
    raw = await send_raw(s, post(*fields) + SMUGGLED, timeout=2.0)
    answer = first_response(raw)
    assert answer.status == status, raw[:300]
    if status == 501:
        assert answer.body == b'{"error":"invalid_request","error_description":"Not Implemented"}'
    assert answer.headers.get("Connection") == "close"
    assert raw.count(b"HTTP/1.1 ") == 1, "nothing after the refusal is read as a request"
    assert upstream_paths(s) == []


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b"CHUNKED", b"\tchunked", b"chunked  ", b", chunked"])
@bounded
async def test_chunked_alone_in_any_case_is_chunked(sidecar: Any, value: bytes) -> None:
    s = await sidecar()
    raw = await send_raw(s, post(b"Transfer-Encoding: " + value, b"Connection: close"), timeout=2.0)
    assert first_response(raw).status == 200, raw[:300]
    seen = s.upstream.last()
    assert seen.body_size == 5 and seen.headers["transfer-encoding"] == ["chunked"]


@bounded
async def test_transfer_encoding_in_http10_is_refused(sidecar: Any) -> None:
    # RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
    s = await sidecar()
    for fields in ([b"Transfer-Encoding: chunked"], [b"Transfer-Encoding: chunked", b"Connection: keep-alive"]):
        raw = await send_raw(s, post(*fields, version=b"1.0") + SMUGGLED, timeout=2.0)
        assert first_response(raw).status == 400, raw[:300]
        assert raw.count(b"HTTP/1.1 ") == 1
    assert upstream_paths(s) == []


@bounded
async def test_underscore_spellings_of_framing_and_forwarding_headers_never_reach_the_upstream(sidecar: Any) -> None:
    # WSGI, CGI and PHP read `_` as `-` (both are HTTP_TRANSFER_ENCODING): such an upstream
    # would take these as its framing (smuggling), its hop-by-hop fields, or rivals to ours.
    s = await sidecar()
    spoofed = [
        b"Transfer_Encoding: chunked",
        b"transfer_encoding: gzip",
        b"Content_Length: 100",
        b"CONTENT_LENGTH: 0",
        b"Keep_Alive: timeout=5",
        b"Proxy_Connection: keep-alive",
        b"Proxy_Authorization: Basic eDp5",
        b"X_Forwarded_For: 6.6.6.6",
        b"x_forwarded_proto: https",
        b"X_Forwarded_Host: evil",
        b"X_Request_Id: evil",
        b"X_Forwarded-For: 6.6.6.7",
    ]
    raw = await send_raw(
        s,
        post(b"Content-Length: 5", *spoofed, b"X_Custom_Name: kept", b"Connection: close", body=b"hello"),
        timeout=2.0,
    )
    assert first_response(raw).status == 200, raw[:300]
    seen = s.upstream.last()
    assert seen.body_size == 5
    names = set(seen.headers)
    assert not {n for n in names if "_" in n} - {"x_custom_name"}, names
    assert seen.headers["content-length"] == ["5"] and "transfer-encoding" not in names
    assert "6.6.6.6" not in seen.header("x-forwarded-for") and "6.6.6.7" not in seen.header("x-forwarded-for")
    assert seen.header("x-request-id") != "evil"


RAW_CONFIG = BASE_CONFIG.replace("{upstream}", "{raw}")


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"chunked, gzip", b"identity", b"chunked\t"])
@bounded
async def test_an_upstream_answer_with_another_transfer_coding_is_a_502(
    sidecar: Any, raw_server: Any, coding: bytes
) -> None:
    # We decode chunked and nothing else, and Transfer-Encoding is hop-by-hop: relayed without
    # it, the coded bytes would reach the client as the content. A 502, never a guess.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %b\r\n\r\n5\r\nhello\r\n0\r\n\r\n" % coding)
        await reader.read()

    upstream = await raw_server(handler)
    s = await sidecar(RAW_CONFIG, raw=f"http://127.0.0.1:{upstream.port}")
    raw = await send_raw(s, b"GET /public/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=2.0)
    answer = first_response(raw)
    assert answer.status == 502, raw[:300]
    assert b"hello" not in raw
