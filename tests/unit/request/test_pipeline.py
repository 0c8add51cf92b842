"""proxy/request/pipeline.py at the level of one request: `begin` run on a real `Exchange`.

Real parts throughout (tests/support/steps.py): a Runtime built from a config file with a
real key set, our HTTP/1.1 server reading the request, a recording upstream on loopback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.base.errors import InvalidRequest, NotFound, Reason, TokenMissing
from proxy.request.pipeline import begin
from proxy.telemetry.metrics import Decision
from tests.conftest import TestKey, mint
from tests.support.raw import bounded_by
from tests.support.steps import Parts, request_bytes, run_step, start_parts


@pytest.fixture
async def parts(aiohttp_server: Any, tmp_path: Path, rsa_key: TestKey) -> Any:
    made = await start_parts(aiohttp_server, tmp_path, rsa_key)
    yield made
    await made.proxy.close()


@bounded_by(10)
async def test_a_public_request_is_routed_stripped_and_forwarded_from_its_exchange(parts: Parts) -> None:
    raw = request_bytes("/public/a/./b/../c?x=1&y=%2F", "X-User-Id: root", "X-Custom: kept")
    ran = await run_step(parts, raw, begin)
    ex = ran.exchange
    assert ran.error is None and ran.status == 200
    assert ex.plan is not None and ex.route == "public"
    assert (ex.path, ex.query) == ("/public/a/c", "x=1&y=%2F")
    assert ex.outbound is not None and ex.outbound.getall("X-User-Id") == ()
    assert ex.decision is Decision.ALLOWED and ex.found is None and ex.claims is None
    seen = parts.upstream.last()
    assert seen.raw_path == "/public/a/c?x=1&y=%2F", "the path matched is the path forwarded, the query as sent"
    assert seen.header("X-User-Id") is None and seen.header("X-Custom") == "kept"
    assert seen.header("X-Request-Id") == "rid-test"


@bounded_by(10)
async def test_a_token_is_verified_once_then_admitted_in_begin_with_its_headers_rendered_once(
    parts: Parts, rsa_key: TestKey
) -> None:
    token = mint({"email": "u@example.com"}, key=rsa_key)
    raw = request_bytes("/api/orders", f"Authorization: Bearer {token}")
    first = await run_step(parts, raw, begin, seen=("claims",))
    # Not in the cache yet, its key held: verified inside begin as well, before any task (only
    # a wait for keys, a kid not seen yet, is left to the coroutine begin returns).
    assert first.begun["claims"] is not None and first.begun["claims"] is first.exchange.claims
    assert first.status == 200 and first.exchange.subject == "user-42"
    assert first.exchange.identity == ((b"X-User-Id", b"user-42"), (b"X-User-Email", b"u@example.com"))
    again = await run_step(parts, raw, begin, seen=("claims", "identity"))
    # Cached: admitted inside begin, before any task, with the headers rendered the first time.
    assert again.begun["claims"] is first.exchange.claims
    assert again.begun["identity"] is first.exchange.identity
    seen = parts.upstream.last()
    assert seen.header("Authorization") is None, "the token stops at the proxy"
    assert seen.header("X-User-Id") == "user-42" and seen.header("X-User-Email") == "u@example.com"


@bounded_by(10)
async def test_identity_takes_a_query_token_out_of_the_url_and_leaves_the_rest_as_sent(
    parts: Parts, rsa_key: TestKey
) -> None:
    token = mint(key=rsa_key)
    ran = await run_step(parts, request_bytes(f"/q/items?a=1&access_token={token}&b=%2F"), begin)
    ex = ran.exchange
    assert ran.status == 200
    assert ex.found is not None and ex.found.source.kind == "query" and ex.found.token == token
    assert ex.query == "a=1&b=%2F"
    seen = parts.upstream.last()
    assert seen.raw_path == "/q/items?a=1&b=%2F" and token not in str(seen.headers)
    assert seen.header("X-User-Id") == "user-42"


@bounded_by(10)
@pytest.mark.parametrize(
    "target, lines, reason",
    [
        # A public route forwards Authorization as sent, so two lines are refused there too.
        ("/public/x", ("Authorization: Basic YTpi", "Authorization: Bearer abc"), Reason.MALFORMED_REQUEST),
        ("/public/x", ("Authorization: Bearer abc", "Authorization: Bearer def"), Reason.MALFORMED_REQUEST),
        # On a route that reads Bearer, two Bearer lines are two tokens.
        ("/api/x", ("Authorization: Bearer abc", "Authorization: Bearer def"), Reason.MULTIPLE_TOKENS),
        ("/api/x", ("Authorization: Basic YTpi", "Authorization: Bearer abc"), Reason.MALFORMED_REQUEST),
    ],
)
async def test_two_authorization_lines_are_refused_in_begin_on_every_route(
    parts: Parts, target: str, lines: tuple[str, ...], reason: Reason
) -> None:
    ran = await run_step(parts, request_bytes(target, *lines), begin)
    assert isinstance(ran.error, InvalidRequest) and ran.error.reason == reason
    assert ran.status == 400 and parts.upstream.seen == []


@bounded_by(10)
async def test_no_route_and_no_token_are_refused_by_begin_before_any_task(parts: Parts) -> None:
    nowhere = await run_step(parts, request_bytes("/elsewhere"), begin)
    assert isinstance(nowhere.error, NotFound) and nowhere.exchange.route == "(none)"
    assert nowhere.exchange.path == "/elsewhere" and nowhere.exchange.metrics is None
    missing = await run_step(parts, request_bytes("/api/orders"), begin)
    assert isinstance(missing.error, TokenMissing) and missing.exchange.route == "api"
    assert missing.exchange.provider == "main" and missing.exchange.found is None
    assert missing.exchange.decision is Decision.REJECTED
    assert parts.upstream.seen == []


@bounded_by(10)
async def test_the_authorization_field_is_found_in_any_case_before_a_missing_token_is_told(
    parts: Parts, rsa_key: TestKey
) -> None:
    # A route whose one source is Bearer tells a request with no Authorization field before
    # the strip (RoutePlan.needs_bearer): a field name in any case is that field.
    token = mint(key=rsa_key)
    ran = await run_step(parts, request_bytes("/api/orders", f"aUtHoRiZaTiOn: Bearer {token}"), begin)
    assert ran.error is None and ran.status == 200 and ran.exchange.subject == "user-42"
    spoofed = await run_step(parts, request_bytes("/api/orders", "X-User-Id: root", "Authorizatio: x"), begin)
    assert isinstance(spoofed.error, TokenMissing) and spoofed.status == 401
    assert spoofed.exchange.decision is Decision.REJECTED and len(parts.upstream.seen) == 1, "never forwarded"
