"""identity.py's `HeadPlan`: what the strip and `upstream_fields` make of a request's fields,
worked out once per list of field names, must be what they make of every request with those
names, whatever its values: the same bytes upstream (`planned_fields` against
`strip_inbound` + `upstream_fields` + `Fields.of_bytes`), the same X-Request-Id, the same
Authorization; and no plan at all where the values or the token decide (Connection, a client's
X-Forwarded-*, a token-source header in the identity namespace, no Host)."""

from __future__ import annotations

import random

import pytest

from proxy.auth.extract import Found
from proxy.config.builder import BEARER
from proxy.http.upstream import Fields
from proxy.request.identity import HeadPlan, OurFields, StripPlan, planned_fields, strip_inbound, upstream_fields

STRIP = StripPlan(
    frozenset({"x-user-id", "x-user-email", "x-jwt-payload"}),
    ("x-auth-",),
    frozenset({"x-auth-token", "x-api-token"}),
)
# Names a client may send, in many spellings: ordinary fields, ours, identity ones, their
# underscore forms, hop-by-hop and framing ones, a `%` (the plan is a `bytes %` format).
NAMES = [
    b"Host",
    b"host",
    b"HOST",
    b"Authorization",
    b"authorization",
    b"Accept",
    b"accept",
    b"User-Agent",
    b"X-Request-Id",
    b"x-request-id",
    b"X_Request_Id",
    b"X-User-Id",
    b"x_user_id",
    b"X-Auth-Role",
    b"X-Api-Token",
    b"X_Api_Token",
    b"Content-Length",
    b"Content_Length",
    b"Transfer_Encoding",
    b"Te",
    b"Keep-Alive",
    b"Proxy-Authorization",
    b"Expect",
    b"Upgrade",
    b"Cookie",
    b"X-%s%d",
    b"X-Thing",
    b"x-thing",
    b"Forwarded",
    b"X-Real-IP",
]
# Names that leave the values or the token to decide: never planned.
UNPLANNED = [b"Connection", b"X-Forwarded-For", b"x-forwarded-proto", b"X-Forwarded-Host", b"X-Auth-Token"]
IDENTITY = ((b"X-User-Id", b"alice"), (b"X-User-Email", b"alice@example.com"))


def general(fields: list[tuple[bytes, bytes]], found: Found | None, forward_token: bool, identity: tuple) -> bytes:  # type: ignore[type-arg]
    out = strip_inbound(fields, STRIP)
    kept, ours = upstream_fields(out, identity, found, forward_token, "10.0.0.7", "http", "rid-1")
    return Fields.of_bytes(kept, ours).lines


def value(rng: random.Random) -> bytes:
    return rng.choice([b"", b"v", b"a, b", b"%s %d %%", b"Bearer tok.en.x", b"evil", b"1"]) + b"%d" % rng.randrange(9)


@pytest.mark.parametrize("seed", range(300))
def test_a_plan_writes_what_the_strip_and_upstream_fields_write(seed: int) -> None:
    rng = random.Random(seed)
    names = [rng.choice(NAMES) for _ in range(rng.randrange(0, 9))]
    if rng.random() < 0.9:
        names.insert(rng.randrange(len(names) + 1), b"Host")
    if rng.random() < 0.15:
        names.insert(rng.randrange(len(names) + 1), rng.choice(UNPLANNED))
    fields = [(name, value(rng)) for name in names]
    values = tuple(v for _, v in fields)
    head = HeadPlan(STRIP, tuple(names))
    # What app.py reads off it, planned or not.
    ids = [i for i, name in enumerate(names) if name.lower() == b"x-request-id"]
    assert head.request_id == (ids[0] if ids else -1)
    assert head.asked == any(name.lower() == b"authorization" for name in names)
    out = strip_inbound(fields, STRIP)
    if head.keep is None:
        hosts = sum(name.lower() == b"host" for name in names)
        assert hosts != 1 or any(name in UNPLANNED for name in names)
        return
    assert head.drop is not None
    assert head.authorizations == out.authorizations
    if out.authorizations == 1:
        assert values[head.authorization] == out.authorization
    else:
        assert head.authorization == -1
    host = values[head.host]
    assert host == out.host
    for identity in ((), IDENTITY):
        # No token found (a public route, another scheme): Authorization goes on as sent.
        assert planned_fields(head.keep % values, identity, "10.0.0.7", "http", host, "rid-1") == general(
            fields, None, False, identity
        )
        if head.authorization >= 0:
            found = Found("tok.en.x", BEARER)
            # A Bearer token the route does not forward, and one it does.
            assert planned_fields(head.drop % values, identity, "10.0.0.7", "http", host, "rid-1") == general(
                fields, found, False, identity
            )
            assert planned_fields(head.keep % values, identity, "10.0.0.7", "http", host, "rid-1") == general(
                fields, found, True, identity
            )
            assert head.keep.count(b"\r\n") == head.kept == head.drop.count(b"\r\n") + 1
        else:
            assert head.keep.count(b"\r\n") == head.kept


def test_identity_and_spoofed_fields_never_reach_the_plan() -> None:
    names = (b"Host", b"X-User-Id", b"x_user_id", b"X-Auth-Role", b"Te", b"Transfer_Encoding", b"Accept")
    head = HeadPlan(STRIP, names)
    assert head.keep == head.drop == b"Host: %b\r\n" + b"%.0b" * 5 + b"Accept: %b\r\n"


@pytest.mark.parametrize("name", UNPLANNED)
def test_names_whose_values_or_token_decide_are_not_planned(name: bytes) -> None:
    head = HeadPlan(STRIP, (b"Host", name, b"Authorization"))
    assert head.keep is None and head.drop is None
    assert head.asked  # (still read by app.py)


def test_no_host_or_two_is_not_planned() -> None:
    assert HeadPlan(STRIP, (b"Accept",)).keep is None
    assert HeadPlan(STRIP, (b"Host", b"host")).keep is None


def test_only_short_lists_of_short_names_are_kept() -> None:
    strip = StripPlan(frozenset(), (), frozenset())
    usual = (b"Host", b"Accept")
    assert strip.head(usual) is strip.head(usual)
    many = tuple(b"X-%d" % i for i in range(100))
    assert strip.head(many) is not strip.head(many)  # worked out each time, never kept
    long = (b"Host", b"X-" + b"a" * 2000)
    assert strip.head(long) is not strip.head(long)
    assert len(strip.heads) == 1


def test_our_fields_write_the_whole_head_as_the_parts_would() -> None:
    """`OurFields.head` (the planned forward's head in one `bytes %`) is its request line, the
    fields `planned_fields` writes, its framing and the blank line; an `OurFields` kept from
    one request to the next writes what a fresh one would, whatever changed between them."""
    ours = OurFields()
    line = b"GET /api/a?q=1 HTTP/1.1\r\n"
    fields = b"Host: h\r\nAccept: */*\r\n"
    other = ((b"X-User-Id", b"u2"),)
    for identity, client, framing in [
        (IDENTITY, "10.0.0.7", b""),
        (IDENTITY, "10.0.0.7", b"Content-Length: 0\r\n"),
        (other, "10.0.0.7", b""),
        ((), "10.0.0.8", b""),
        (IDENTITY, "::1", b"Content-Length: 0\r\n"),
    ]:
        expected = line + planned_fields(fields, identity, client, "https", b"h", "rid-2") + framing + b"\r\n"
        assert ours.head(line, fields, identity, client, "https", b"h", "rid-2", framing) == expected
        assert OurFields().head(line, fields, identity, client, "https", b"h", "rid-2", framing) == expected
