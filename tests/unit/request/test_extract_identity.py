"""extract.py and identity.py: finding the one token; stripping and injecting headers."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.auth import extract as extract_module
from proxy.auth.extract import Found, bearer, extract, without_cookie, without_query_param
from proxy.auth.verify import Claims
from proxy.base.errors import InvalidRequest, InvalidToken, Reason
from proxy.config import builder as config
from proxy.config.builder import BEARER, HeaderMap, TokenSource
from proxy.http.upstream import Fields
from proxy.request.identity import (
    Renderer,
    StripPlan,
    claim_headers,
    encode_headers,
    render_claim,
    request_id,
    strip_inbound,
    upstream_fields,
)

QUERY = TokenSource(kind="query", name="access_token")
COOKIE = TokenSource(kind="cookie", name="at")
HEADER = TokenSource(kind="header", name="X-Api-Token", prefix="Token ")


def find(
    headers: list[tuple[str, str]],
    sources: tuple[TokenSource, ...] = (BEARER,),
    *,
    cookies: dict[str, str] | None = None,
    query: list[tuple[str, str]] | None = None,
) -> Found | None:
    if cookies:
        headers = [*headers, ("Cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()))]
    return extract(CIMultiDict(headers), query or [], sources)


def test_bearer_scheme_is_case_insensitive() -> None:
    assert find([("Authorization", "bearer abc.def-_~+/=")]).token == "abc.def-_~+/="
    assert find([("authorization", "BEARER x")]).token == "x"


def test_other_schemes_are_not_tokens() -> None:
    assert find([("Authorization", "Basic dXNlcjpwdw==")]) is None
    assert find([("Authorization", "Bearerx abc")]) is None  # a longer scheme name
    assert find([("Authorization", "Bear abc")]) is None


@pytest.mark.parametrize(
    "value",
    ["Bearer  abc", "Bearer   abc", "bEaReR       abc", "BEARER abc", "Bearer abc ", "Bearer abc\t", "Bearer  abc \t "],
)
def test_any_number_of_spaces_separates_the_scheme(value: str) -> None:
    # RFC 9110 §11.4: credentials = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
    assert find([("Authorization", value)]).token == "abc"


@pytest.mark.parametrize("value", ["Bearer abc=", "Bearer abc==", "Bearer  a.b.c=="])
def test_b64token_padding_is_a_token_for_the_verifier_to_judge(value: str) -> None:
    assert find([("Authorization", value)]).token == value.split()[-1]


# The token's shape (RFC 6750 §2.1 b64token), checked by `extract._is_b64token`, must be the
# rule as written (`_B64TOKEN`) on every input: '=' only at the end, at least one character
# before it, the alphabet alone, no whitespace, ASCII only. Empty segments ('a..b') are a
# b64token: the verifier judges them (401), not the shape (400).
SHAPES = [
    "abc",
    "a.b.c",
    "abc.def-_~+/",
    "abc=",
    "abc==",
    "a.b.c==",
    "=",
    "==",
    "=abc",
    "a=bc",
    "abc=d",
    "abc=d=",
    "ab=.c",
    "a..b",
    ".",
    "..",
    "a.",
    ".a",
    "",
    " abc",
    "abc ",
    "a b",
    "a\tb",
    "abc\t",
    "a\nb",
    "abc\n",
    "abc\r",
    "\x00",
    "abc\x7f",
    "é",
    "abc\u00e9",
    "\uff41bc",  # a fullwidth 'a'
    "\u0661\u0662",  # Arabic-Indic digits: not DIGIT
    "a\udc80b",  # a non-UTF-8 byte as the header's decoding keeps it
    "\u212a",  # the Kelvin sign, which lower-cases to 'k'
    "abc%",
    "abc,",
    "a;b",
    'a"b',
    "x" * 9000,
]


@pytest.mark.parametrize("value", SHAPES, ids=ascii)
def test_b64token_shape_is_the_rule_as_written(value: str) -> None:
    assert extract_module._is_b64token(value) is (extract_module._B64TOKEN.fullmatch(value) is not None)
    # As a credential (what follows `Bearer` and its spaces, trailing SP/HTAB removed: the
    # field's own whitespace), a header token, a cookie's or a query parameter's value.
    if extract_module._B64TOKEN.fullmatch(value) is None:
        with pytest.raises(InvalidRequest) as caught:
            extract_module._token68(value, "Authorization: Bearer")
        assert caught.value.reason is Reason.MALFORMED_REQUEST
    else:
        assert extract_module._token68(value, "Authorization: Bearer") == value
        found = bearer("Bearer " + value, BEARER)
        assert found is not None and found.token == value


@settings(deadline=None, max_examples=500)
@given(st.text(st.one_of(st.sampled_from("Aa0-._~+/= \t"), st.characters(exclude_categories=())), max_size=12))
def test_b64token_shape_on_any_text(value: str) -> None:
    assert extract_module._is_b64token(value) is (extract_module._B64TOKEN.fullmatch(value) is not None)


@pytest.mark.parametrize(
    "values, sources, reason",
    [
        (["Bearer a", "Basic dXNlcjpwdw=="], (BEARER,), Reason.MALFORMED_REQUEST),
        (["Basic dXNlcjpwdw==", "Bearer a"], (BEARER,), Reason.MALFORMED_REQUEST),
        (["Basic dXNlcjpwdw==", "Basic dXNlcjpwdw=="], (BEARER,), Reason.MALFORMED_REQUEST),
        (["Digest x", "Negotiate y"], (BEARER,), Reason.MALFORMED_REQUEST),
        (["Bearer a", "Bearer b"], (BEARER,), Reason.MULTIPLE_TOKENS),
        (["Bearer a", "bearer  a"], (BEARER,), Reason.MULTIPLE_TOKENS),
        (["Bearer a", "Bearer a", "Bearer a"], (BEARER,), Reason.MULTIPLE_TOKENS),
        (["Bearer a", ""], (BEARER,), Reason.MALFORMED_REQUEST),
        # A route that reads its token elsewhere still refuses an ambiguous Authorization.
        (["Bearer a", "Bearer b"], (COOKIE,), Reason.MALFORMED_REQUEST),
        (["Basic x", "Basic y"], (QUERY,), Reason.MALFORMED_REQUEST),
    ],
    ids=[
        "bearer-basic",
        "basic-bearer",
        "basic-twice",
        "digest-negotiate",
        "bearer-twice",
        "bearer-casings",
        "bearer-thrice",
        "bearer-and-empty",
        "cookie-route",
        "query-route",
    ],
)
def test_authorization_is_a_singleton_whatever_its_schemes(values: list[str], sources: tuple, reason: Reason) -> None:
    for names in (["Authorization"] * len(values), ["authorization", "AUTHORIZATION", "Authorization"][: len(values)]):
        with pytest.raises(InvalidRequest) as caught:
            find(list(zip(names, values, strict=True)), sources, cookies={"at": "c"} if COOKIE in sources else None)
        assert caught.value.reason is reason and caught.value.status == 400


@pytest.mark.parametrize(
    "value",
    [
        "Bearer",
        "Bearer ",
        "Bearer  ",
        "Bearer a b",
        "Bearer a,b",
        "Bearer é",
        "Bearer\tx",
        "Bearer \tx",
        "Bearer\t x",
        "Bearer x\ty",
        "Bearer,x",
        "Bearer=x",
        "Bearer\x0bx",
        "Bearer\xa0x",
        "bearer\tx",
    ],
)
def test_malformed_bearer_is_invalid_request(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        find([("Authorization", value)])
    assert caught.value.reason is Reason.MALFORMED_REQUEST and caught.value.status == 400


@pytest.mark.parametrize(
    "headers, cookies, query",
    [
        ([("Authorization", "Bearer a"), ("Authorization", "Bearer a")], {}, []),
        ([("Authorization", "Bearer a")], {}, [("access_token", "b")]),
        ([("Authorization", "Bearer a")], {"at": "b"}, []),
        ([], {}, [("access_token", "a"), ("access_token", "a")]),
        ([("Authorization", "Bearer a"), ("X-Api-Token", "Token b")], {}, []),
    ],
    ids=["two headers", "header and query", "header and cookie", "query twice", "bearer and custom header"],
)
def test_more_than_one_token_is_invalid_request(headers: list, cookies: dict, query: list) -> None:
    with pytest.raises(InvalidRequest) as caught:
        find(headers, (BEARER, QUERY, COOKIE, HEADER), cookies=cookies, query=query)
    assert caught.value.reason is Reason.MULTIPLE_TOKENS


def test_each_source_alone() -> None:
    sources = (BEARER, QUERY, COOKIE, HEADER)
    assert find([], sources, query=[("access_token", "q")]) == Found("q", QUERY)
    assert find([], sources, cookies={"at": "c"}) == Found("c", COOKIE)
    assert find([("X-Api-Token", "Token h")], sources) == Found("h", HEADER)
    with pytest.raises(InvalidRequest):
        find([("X-Api-Token", "h")], sources)  # the prefix is required


def test_two_cookies_of_the_token_name_are_two_tokens() -> None:
    with pytest.raises(InvalidRequest):
        find([("Cookie", "at=a; at=b")], (COOKIE,))
    with pytest.raises(InvalidRequest):
        find([("Cookie", "at=a"), ("Cookie", "at=b")], (COOKIE,))


@pytest.mark.parametrize("header", ["at =T; lang=en", "lang=en, at=T", 'at="T"'])
def test_cookie_spellings_are_found_and_removed_by_the_same_parser(header: str) -> None:
    assert find([("Cookie", header)], (COOKIE,)).token == "T"
    assert "T" not in without_cookie(header, "at").replace("lang", "")


def test_query_and_cookie_removal_keep_everything_else_as_sent() -> None:
    assert without_query_param("a=1&access_token=T&b=%2F&access_token=U", "access_token") == "a=1&b=%2F"
    assert without_query_param("", "access_token") == ""
    assert without_cookie("x=1; at=T; y=2", "at") == "x=1; y=2"


def plan(**strip: object) -> StripPlan:
    settings = config.parse(
        "providers: {m: {issuer: i, audiences: [a], jwks: {url: 'https://x'}, "
        "token_sources: [bearer, {header: X-Auth-Token}], headers: {claims: {sub: X-User-Id, org: X-Org}, payload: X-Payload}}}\n"
        "strip_headers: {names: [X-Internal-Secret]}\n"
    )
    return StripPlan.build(settings)


def raw(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


def lines(pairs: tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]) -> list[str]:
    """The header lines an upstream would receive (the pairs as the HTTP layer encodes them),
    checked to be exactly `count` CRLF lines."""
    fields = encoded(pairs)
    text = fields.lines.decode()
    assert text.endswith("\r\n") and text.count("\r\n") == fields.count
    return text.split("\r\n")[:-1]


def encoded(pairs: tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]) -> Fields:
    kept, ours = pairs
    return Fields.of_bytes(kept, ours)


def test_strip_drops_hop_by_hop_connection_named_and_identity_headers() -> None:
    inbound = raw(
        [
            ("Host", "h"),
            ("Connection", "keep-alive, X-Custom"),
            ("Keep-Alive", "5"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "x"),
            ("X-Custom", "1"),
            ("x-user-id", "root"),
            ("X-USER-ROLES", "admin"),
            ("X-Jwt-Claims", "{}"),
            ("X-Org", "evil"),
            ("X-Payload", "e30"),
            ("X-Internal-Secret", "s"),
            ("X-Auth-Token", "tok"),
            ("Accept", "*/*"),
            ("accept", "text/html"),
            ("Content-Length", "3"),
            ("X-Request-Id", "client-chosen"),
        ]
    )
    out = strip_inbound(inbound, plan())
    # Duplicates go out under the first spelling seen, in order; framing and request ids are ours.
    assert out.items() == [("Host", "h"), ("X-Auth-Token", "tok"), ("Accept", "*/*"), ("Accept", "text/html")]
    assert out.getall("accept") == ["*/*", "text/html"] and out.getall("X-Custom") == ()
    fields = upstream_fields(
        out, identity=(), found=None, forward_token=False, client="10.1.1.1", proto="http", request_id_value="rid"
    )
    # X-Auth-Token is a token source, read by extract, but it is also under the X-Auth- prefix:
    # with no token found in it here, a client-chosen X-Auth-* must not reach the upstream.
    assert lines(fields) == [
        "Host: h",
        "Accept: */*",
        "Accept: text/html",
        "X-Forwarded-For: 10.1.1.1",
        "X-Forwarded-Proto: http",
        "X-Forwarded-Host: h",
        "X-Request-Id: rid",
    ]
    assert encoded(fields).has_host


def test_another_spelling_of_a_token_source_header_is_dropped_and_never_read() -> None:
    # A WSGI app reads X_Auth_Token as X-Auth-Token: a second token that nobody verified.
    out = strip_inbound(raw([("X-Auth-Token", "good"), ("X_Auth_Token", "evil"), ("x_auth-token", "evil")]), plan())
    assert out.getall("X-Auth-Token") == ["good"]
    assert out.items() == [("X-Auth-Token", "good")]


@pytest.mark.parametrize(
    "forward_token, found, expected",
    [
        (False, True, []),
        (True, True, ["X-Auth-Token: tok"]),
        (True, False, []),
        (False, False, []),
    ],
)
def test_a_token_source_in_the_identity_namespace_goes_on_only_as_a_forwarded_token(
    forward_token: bool, found: bool, expected: list[str]
) -> None:
    source = TokenSource(kind="header", name="X-Auth-Token")
    out = strip_inbound(raw([("X-Auth-Token", "tok")]), plan())
    fields = upstream_fields(
        out,
        identity=(),
        found=Found("tok", source) if found else None,
        forward_token=forward_token,
        client=None,
        proto="http",
        request_id_value="r",
    )
    assert [line for line in lines(fields) if line.startswith("X-Auth")] == expected


def test_a_field_the_client_names_in_connection_goes_even_if_it_is_host_or_a_forwarded_chain() -> None:
    out = strip_inbound(
        raw([("Host", "h"), ("Connection", "Host, X-Forwarded-For"), ("X-Forwarded-For", "6.6.6.6")]), plan()
    )
    fields = upstream_fields(
        out, identity=(), found=None, forward_token=False, client="10.1.1.1", proto="https", request_id_value="rid"
    )
    assert lines(fields) == [
        "X-Forwarded-For: 10.1.1.1",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: h",
        "X-Request-Id: rid",
    ]
    assert not encoded(fields).has_host, "the upstream client then writes the origin's Host"


def test_inject_writes_identity_after_the_strip_and_removes_the_token() -> None:
    out = strip_inbound(
        raw(
            [
                ("Host", "api.test"),
                ("Authorization", "Bearer t"),
                ("X-Forwarded-For", "10.0.0.1"),
                ("X-Forwarded-Proto", "https"),
            ]
        ),
        plan(),
    )
    header_map = HeaderMap(
        claims=(
            config.ClaimHeader(claim="sub", path=("sub",), header="X-User-Id"),
            config.ClaimHeader(claim="r", path=("realm", "roles"), header="X-Roles"),
        ),
        payload="X-Payload",
    )
    payload = {"sub": "u1", "realm": {"roles": ["a", "b"]}}
    fields = upstream_fields(
        out,
        identity=encode_headers(claim_headers(payload, header_map)),
        found=Found("t", BEARER),
        forward_token=False,
        client="127.0.0.1",
        proto="http",
        request_id_value="rid",
    )
    sent = lines(fields)
    encoded = next(line for line in sent if line.startswith("X-Payload: ")).removeprefix("X-Payload: ")
    assert json.loads(base64.urlsafe_b64decode(encoded + "==")) == payload
    assert [line for line in sent if not line.startswith("X-Payload: ")] == [
        "Host: api.test",
        "X-User-Id: u1",
        "X-Roles: a,b",
        "X-Forwarded-For: 10.0.0.1, 127.0.0.1",
        "X-Forwarded-Proto: https, http",
        "X-Forwarded-Host: api.test",
        "X-Request-Id: rid",
    ]


def test_a_cookie_token_leaves_only_its_own_cookie() -> None:
    cookie = TokenSource(kind="cookie", name="at")
    out = strip_inbound(raw([("Host", "h"), ("Cookie", "a=1; at=tok; b=2"), ("Cookie", "at=tok")]), plan())
    fields = upstream_fields(
        out,
        identity=(),
        found=Found("tok", cookie),
        forward_token=False,
        client=None,
        proto="http",
        request_id_value="r",
    )
    assert lines(fields)[:2] == ["Host: h", "Cookie: a=1; b=2"]
    assert not any(line.startswith("Cookie: at") for line in lines(fields))


def test_forward_token_keeps_it() -> None:
    out = strip_inbound(raw([("Authorization", "Bearer t")]), plan())
    fields = upstream_fields(
        out, identity=(), found=Found("t", BEARER), forward_token=True, client=None, proto="http", request_id_value="r"
    )
    assert lines(fields) == ["Authorization: Bearer t", "X-Forwarded-Proto: http", "X-Request-Id: r"]
    assert not encoded(fields).has_host


def test_a_cached_tokens_identity_is_rendered_once_per_header_map_and_never_shared_between_maps() -> None:
    # Two routes with their own header maps share one cached token (one Claims object).
    payload = {"sub": "u1", "email": "u1@example.com"}
    claims = Claims(provider="m", header={}, payload=payload)
    by_sub = Renderer(HeaderMap(claims=(config.ClaimHeader(claim="sub", path=("sub",), header="X-User-Id"),)), 8)
    by_email = Renderer(HeaderMap(claims=(config.ClaimHeader(claim="email", path=("email",), header="X-User-Id"),)), 8)
    first = by_sub.headers(claims)
    assert first == ((b"X-User-Id", b"u1"),)
    assert by_sub.headers(claims) is first, "a cached token is rendered once"
    assert by_email.headers(claims) == ((b"X-User-Id", b"u1@example.com"),)
    # The same token verified again (after the cache let it go) is another Claims: rendered afresh.
    again = Claims(provider="m", header={}, payload={"sub": "u2"})
    assert by_sub.headers(again) == ((b"X-User-Id", b"u2"),)
    # Without a token cache (bound 0) nothing is kept: no token comes back as the same Claims.
    uncached = Renderer(by_sub.header_map, 0)
    assert uncached.headers(claims) == first and len(uncached.rendered) == 0


@pytest.mark.parametrize(
    "value, text",
    [
        ("alice", "alice"),
        (True, "true"),
        (3, "3"),
        (1.5, "1.5"),
        (["a", 1, {"b": 2}], 'a,1,{"b":2}'),
        ({"id": 7}, '{"id":7}'),
        (None, None),
        ("tab\there", "tab\there"),
        ("café", "café"),
    ],
)
def test_render_claim(value: object, text: str | None) -> None:
    assert render_claim(value) == text


@pytest.mark.parametrize("value", ["a\r\nX-Admin: 1", "a\nb", "a\x00", ["ok", "bad\r"], {"k": "v\n"}, "\x1b[31m"])
def test_a_claim_with_control_characters_is_refused_not_sanitised(value: object) -> None:
    if isinstance(value, dict):
        # JSON escapes control characters inside objects, so those are safe to send.
        assert "\n" not in render_claim(value)
        return
    with pytest.raises(InvalidToken) as caught:
        render_claim(value)
    assert caught.value.reason is Reason.UNSAFE_CLAIM


def test_request_id_is_kept_when_sane_and_replaced_otherwise() -> None:
    assert request_id("abc-123:x.y_z") == "abc-123:x.y_z"
    assert len(request_id(None)) == 32
    assert request_id("evil\r\nheader") != "evil\r\nheader"
    assert len(request_id("x" * 500)) == 32


@pytest.mark.parametrize(
    "query",
    [
        [("access_token", "a"), ("ACCESS_TOKEN", "b")],
        [("access_token", "a"), ("Access_Token", "a")],
    ],
    ids=["upper-case-name", "mixed-case-same-value"],
)
def test_a_query_name_in_another_case_is_a_second_token(query: list) -> None:
    with pytest.raises(InvalidRequest) as caught:
        find([], (QUERY,), query=query)
    assert caught.value.reason is Reason.MULTIPLE_TOKENS


def test_a_query_name_in_another_case_alone_is_the_token_and_is_removed() -> None:
    assert find([], (QUERY,), query=[("ACCESS_TOKEN", "q")]) == Found("q", QUERY)
    assert without_query_param("a=1&ACCESS_TOKEN=q&Access%5FToken=r&b=2", "access_token") == "a=1&b=2"


@pytest.mark.parametrize(
    "cookies",
    [
        ["at=a; %61t=b"],
        ["at=a; AT=b"],
        ["at=a", "a%74=b"],
        ["At=a", "aT=a"],
        ["at=a, at=b"],
    ],
    ids=["percent-encoded-name", "upper-case-name", "two-headers-encoded", "two-casings", "comma"],
)
def test_cookie_name_variants_are_the_token_cookie(cookies: list[str]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        find([("Cookie", value) for value in cookies], (COOKIE,))
    assert caught.value.reason is Reason.MULTIPLE_TOKENS


def test_a_cookie_name_variant_alone_is_the_token_and_is_removed() -> None:
    assert find([("Cookie", "lang=en; %61T=c")], (COOKIE,)) == Found("c", COOKIE)
    assert without_cookie("lang=en; %61T=c; x=1", "at") == "lang=en; x=1"


@pytest.mark.parametrize(
    "value",
    [
        "Bearer abc.def-_~+/=",
        "bearer  abc",
        "BEARER abc \t",
        "Bearer",
        "Bearer ",
        "Bearer\tabc",
        "Bearer,abc",
        "Bearerx abc",
        "Basic dXNlcjpwdw==",
        "Bearer abc def",
        "Bearer a\udcffb",
        "",
    ],
)
def test_bearer_alone_answers_as_extract_does_for_one_authorization_line(value: str) -> None:
    # pipeline.py reads the token of a route whose one source is Bearer from the request's one
    # Authorization line (`extract.bearer`, from what the strip kept): the same token, or none,
    # or the same refusal as `extract` over the stripped fields.
    fields = [(b"Host", b"x"), (b"Authorization", value.encode("utf-8", "surrogateescape"))]
    out = strip_inbound(fields, StripPlan(frozenset(), (), frozenset()))
    assert out.authorizations == 1 and out.authorization is not None

    def answer(find: Callable[[], Found | None]) -> object:
        try:
            return find()
        except InvalidRequest as error:
            return (error.reason, error.detail)

    via_extract = answer(lambda: extract(out, (), (BEARER,)))
    assert answer(lambda: bearer(out.authorization.decode("utf-8", "surrogateescape"), BEARER)) == via_extract


def test_the_strip_keeps_the_one_authorization_value_and_none_for_two_or_a_connection_named_one() -> None:
    plan = StripPlan(frozenset(), (), frozenset())
    one = strip_inbound([(b"authorization", b"Bearer a"), (b"X-A", b"1")], plan)
    assert (one.authorizations, one.authorization) == (1, b"Bearer a")
    two = strip_inbound([(b"Authorization", b"Bearer a"), (b"AUTHORIZATION", b"Bearer b")], plan)
    assert (two.authorizations, two.authorization) == (2, None)
    named = strip_inbound([(b"Authorization", b"Bearer a"), (b"Connection", b"authorization")], plan)
    assert (named.authorizations, named.authorization) == (0, None)


@pytest.mark.parametrize(
    ("found", "forward_token", "guarded", "authorization"),
    [
        (Found("tok", COOKIE), True, True, None),  # cookie token forwarded; the client's Authorization is not
        (Found("tok", COOKIE), False, True, None),
        (Found("tok", HEADER), True, True, None),
        (Found("tok", HEADER), False, True, None),  # two fields go: the token's header and Authorization
        (Found("t", BEARER), True, True, "Bearer t"),  # the checked token, forwarded
        (Found("t", BEARER), False, True, None),
        (None, False, True, None),  # an optional route that admitted no token
        (None, False, False, "Bearer t"),  # a public route: as sent
    ],
    ids=["cookie-fwd", "cookie", "header-fwd", "header", "bearer-fwd", "bearer", "optional", "public"],
)
def test_authorization_goes_on_only_as_the_checked_forwarded_token(
    found: Found | None, forward_token: bool, guarded: bool, authorization: str | None
) -> None:
    sent = [("Authorization", "Bearer t"), ("Cookie", "at=tok"), ("X-Api-Token", "Token tok"), ("X-Other", "1")]
    out = strip_inbound(raw(sent), plan())
    fields = upstream_fields(out, (), found, forward_token, None, "http", "r", guarded)
    got = [line.removeprefix("Authorization: ") for line in lines(fields) if line.startswith("Authorization")]
    assert got == ([authorization] if authorization else [])
    assert "X-Other: 1" in lines(fields)
