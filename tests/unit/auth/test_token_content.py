"""Whatever a token holds, the answer is a 401 with a reason or a request the upstream can read exactly.

Property tests (hypothesis) over arbitrary JSON values and JSON texts, for three things
issue 10 asks of token content:

- item 2: a claim header (`identity.render_claim`) and the payload header
  (`identity.claim_headers`) are either bytes an upstream decodes back to exactly the claim
  or the payload, or an `unsafe_claim` refusal; never another exception (which was a 500);
- item 4: the JOSE header and the claims set are strict JSON: a duplicate member name at
  any depth, or NaN/Infinity, is `malformed`, and anything else parses as Python's json does;
- both through the whole verifier: a correctly signed token with any payload ends in a
  Claims or an InvalidToken, nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import re
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.auth.keys import key_source_for
from proxy.auth.verify import Claims, Verifier, parse_payload, read_header
from proxy.base.errors import InvalidToken, Reason
from proxy.config.builder import ClaimHeader, HeaderMap, Provider, StaticKeys
from proxy.http.upstream import Fields
from proxy.request.identity import Outbound, Renderer, claim_headers, encode_headers, render_claim, upstream_fields
from tests.conftest import AUDIENCE, ISSUER, FakeClock

# No deadline: the machine is shared, and a slow example is not a wrong one.
PROPERTY = settings(
    deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
FEWER = settings(PROPERTY, max_examples=150)  # each example is a whole payload, or a whole verification

# -- strategies -----------------------------------------------------------------------------
# Every code point, lone surrogates included (hypothesis leaves out category Cs by default).
ANY_CHAR = st.characters(exclude_categories=())
TRICKY = [
    "\ud800",
    "\udfff",
    "a\udc80b",
    "\ud83d",
    "\ude00\ud83d",
    "\ud83d\ude00",
    "\x00",
    "\r\n",
    "\t",
    " x",
    "x ",
    "\u2028",
    "\x85",
    "\ufeff",
    "a,b",
    "",
    "\x7f",
    "\u00e9",
    "\U0010ffff",
]
TEXT = st.one_of(
    st.text(ANY_CHAR, max_size=10),
    st.sampled_from(TRICKY),
    st.lists(st.sampled_from(TRICKY), min_size=1, max_size=3).map("".join),
)
NUMBER = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),  # NaN and ±inf included: Python's json reads NaN, Infinity and 1e400 (inf)
    st.sampled_from([0, -0.0, 0.0, 1e308, 5e-324, 2**53 + 1, -(2**63), 10**4299]),
)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
VALUE = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=25,
)
PAYLOAD = st.dictionaries(TEXT, VALUE, max_size=6)


def _leaves(value: Any) -> Iterator[Any]:
    """Every str (member names included) and number inside a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _has_utf8_form(value: Any) -> bool:
    """No lone surrogate anywhere, and every float finite (JSON has no NaN or Infinity)."""
    for leaf in _leaves(value):
        if isinstance(leaf, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in leaf):
            return False
        if isinstance(leaf, float) and not math.isfinite(leaf):
            return False
    return True


def _field_safe(text: str) -> bool:
    """What a header value may hold and arrive unchanged (RFC 9110 §5.5): no control but
    HTAB, no DEL, no surrogate, no surrounding SP or HTAB."""
    return (not re.search(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]", text)) and text == text.strip(" \t")


def _on_the_wire(name: str, value: str) -> bytes:
    """The bytes of the field value in the upstream request `inject` writes."""
    kept, ours = upstream_fields(
        Outbound([], None),
        identity=encode_headers(((name, value),)),
        found=None,
        forward_token=False,
        client=None,
        proto="http",
        request_id_value="r",
    )
    line = Fields.of_bytes(kept, ours).lines.split(b"\r\n")[0]
    prefix = name.encode() + b": "
    assert line.startswith(prefix), line
    return line[len(prefix) :]


def _strict_loads(text: str) -> Any:
    """An independent strict reader: duplicate names and NaN/Infinity raise."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [n for n, _ in items]
        if len(set(names)) != len(names):
            raise ValueError("duplicate")
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


# -- item 2: one claim as one header ---------------------------------------------------------
@PROPERTY
@given(VALUE)
def test_a_claim_is_rendered_exactly_or_refused_as_unsafe(value: Any) -> None:
    try:
        text = render_claim(value)
    except InvalidToken as error:
        assert error.reason is Reason.UNSAFE_CLAIM
        refused = True
    else:
        refused = False
    if value is None:
        assert not refused and text is None
        return
    # What must be refused, and only that.
    if isinstance(value, str):
        expected: str | None = value if _field_safe(value) else None
    elif isinstance(value, bool):
        expected = "true" if value else "false"
    elif isinstance(value, list):
        parts = [v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), ensure_ascii=False) for v in value]
        # An item must reach the upstream as one item: no ',' inside (a string's, or a nested
        # list's or object's JSON), no SP/HTAB around it (a list parser trims them).
        if any("," in p or p != p.strip(" \t") for p in parts) or not _has_utf8_form(value):
            expected = None
        else:
            joined = ",".join(parts)
            expected = joined if _field_safe(joined) else None
    else:
        # JSON escapes C0 controls but not DEL, which no header value may hold either.
        as_json = json.dumps(value, separators=(",", ":"), ensure_ascii=False) if _has_utf8_form(value) else ""
        expected = as_json if as_json and _field_safe(as_json) else None
    assert refused is (expected is None), (value, None if refused else text)
    if refused:
        return
    assert text == expected
    wire = _on_the_wire("X-Claim", text)
    assert wire.decode("utf-8") == text, "the upstream decodes the bytes back to the claim"
    assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", wire) and wire == wire.strip(b" \t")
    if isinstance(value, (dict, int, float)) and not isinstance(value, bool):
        assert _strict_loads(wire.decode("utf-8")) == value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        assert wire.decode("utf-8").split(",") == value
    if isinstance(value, list) and value:
        # As a list-field parser reads it (RFC 9110 §5.6.1): one item per claim item, exactly.
        items = [item.strip(" \t") for item in wire.decode("utf-8").split(",")]
        assert items == [
            v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), ensure_ascii=False) for v in value
        ]


@pytest.mark.parametrize(
    "value",
    [
        "\ud800",
        "user-\udfff",
        "\udc80",
        "\ud83d",
        "ok\ude00\ud83d",
        ["dev", "\ud800"],
        {"name": "\ud800"},
        {"\ud800": 1},
        [{"a": ["\udc80"]}],
        float("nan"),
        float("inf"),
        -float("inf"),
        [1, float("nan")],
        {"x": float("-inf")},
        10**4400,
    ],
    ids=lambda v: "10**4400" if isinstance(v, int) else ascii(v),
)
def test_what_has_no_exact_header_form_is_an_unsafe_claim(value: Any) -> None:
    with pytest.raises(InvalidToken) as caught:
        render_claim(value)
    assert caught.value.reason is Reason.UNSAFE_CLAIM
    assert caught.value.detail and "\ud800" not in caught.value.detail


@pytest.mark.parametrize(
    "value, text",
    [
        ("\ud83d\ude00", "\U0001f600"),  # a surrogate pair is one character, not two lone ones
        (-0.0, "-0.0"),
        (0, "0"),
        (10**300, "1" + "0" * 300),
        (1e308, "1e+308"),
        (5e-324, "5e-324"),
        ({"a": {"b": [None, True, 1.5]}}, '{"a":{"b":[null,true,1.5]}}'),
        ("\u2028x\x85", "\u2028x\x85"),
    ],
    ids=lambda v: ascii(v)[:40],
)
def test_what_has_one_is_rendered(value: Any, text: str) -> None:
    assert render_claim(json.loads(json.dumps(value))) == text


# A map of claim headers alone: `Renderer` takes the usual claim (printable ASCII) by a
# shortcut, and must give what `claim_headers` gives, refusals included.
CLAIMS_ONLY_MAP = HeaderMap(
    claims=(
        ClaimHeader(claim="sub", path=("sub",), header="X-User-Id"),
        ClaimHeader(claim="email", path=("email",), header="X-User-Email"),
        ClaimHeader(claim="org.team", path=("org", "team"), header="X-Team"),
    )
)
ABSENT_CLAIM = object()
ASCII_EDGES = st.sampled_from(
    ["", " ", "a b", " a", "a ", "a\t", "\ta", "a\x7f", "\x1fa", "~!", "a,b", "\x00", "x" * 300]
)


@PROPERTY
@given(
    sub=st.one_of(VALUE, ASCII_EDGES, st.text(st.characters(max_codepoint=0x7F), max_size=12)),
    email=st.one_of(VALUE, ASCII_EDGES, st.none(), st.just(ABSENT_CLAIM)),
    team=VALUE,
    nested=st.booleans(),
)
def test_the_renderer_gives_what_claim_headers_gives(sub: Any, email: Any, team: Any, nested: bool) -> None:
    payload: dict[str, Any] = {"sub": sub, "org": {"team": team} if nested else team}
    if email is not ABSENT_CLAIM:
        payload["email"] = email
    claims = Claims("p", MappingProxyType({}), MappingProxyType(payload))
    try:
        expected: Any = encode_headers(claim_headers(claims.payload, CLAIMS_ONLY_MAP))
    except InvalidToken as error:
        expected = error.reason
    try:
        got: Any = Renderer(CLAIMS_ONLY_MAP, 1).headers(claims)
    except InvalidToken as error:
        got = error.reason
    assert got == expected


# -- item 2: the whole payload as one header ---------------------------------------------------
PAYLOAD_MAP = HeaderMap(claims=(), payload="X-Jwt-Payload")


@FEWER
@given(PAYLOAD)
def test_the_payload_header_is_the_payload_exactly_or_refused_as_unsafe(payload: dict[str, Any]) -> None:
    try:
        ((name, value),) = claim_headers(payload, PAYLOAD_MAP)
    except InvalidToken as error:
        assert error.reason is Reason.UNSAFE_CLAIM
        assert not _has_utf8_form(payload), "refused only what has no exact form"
        return
    assert _has_utf8_form(payload)
    wire = _on_the_wire(name, value)
    assert re.fullmatch(rb"[A-Za-z0-9_-]*", wire), "base64url, unpadded"
    decoded = base64.urlsafe_b64decode(wire + b"=" * (-len(wire) % 4)).decode("utf-8")  # strict UTF-8
    assert _strict_loads(decoded) == payload


def test_a_nested_lone_surrogate_in_a_name_or_a_value_refuses_the_payload_header() -> None:
    for payload in ({"sub": "u", "x": {"\ud800": 1}}, {"sub": "u", "x": [[["\udfff"]]]}, {"\udc80": 0}):
        with pytest.raises(InvalidToken) as caught:
            claim_headers(payload, PAYLOAD_MAP)
        assert caught.value.reason is Reason.UNSAFE_CLAIM


@pytest.mark.parametrize("depth", [10, 200, 500, 2000, 20000])
def test_deep_nesting_is_rendered_or_refused_never_a_recursion_error(depth: int) -> None:
    value: Any = "leaf"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    value = {"k": value}  # an object: rendered as JSON (a list would be joined with ',')
    payload = {"sub": "u", "deep": value}
    header_map = HeaderMap(claims=(ClaimHeader(claim="deep", path=("deep",), header="X-Deep"),), payload="X-P")
    try:
        rendered = claim_headers(payload, header_map)
    except InvalidToken as error:
        assert error.reason is Reason.UNSAFE_CLAIM
        assert depth > 500, "refused only past what the encoder can nest"
    else:
        assert json.loads(dict(rendered)["X-Deep"]) == value


# -- item 4: strict JSON in the header and the claims set --------------------------------------
NAMES = st.sampled_from(["sub", "a", "\\u0073ub", "s\\u0075b", "Sub", "\\u00e9", "\u00e9", "e\u0301", ""])


def _json_text(depth: int = 3) -> st.SearchStrategy[str]:
    scalar = st.one_of(
        st.sampled_from(
            ["1", "-0", "1.5e3", "1e400", "true", "null", '"x"', '"\\ud800"', "NaN", "Infinity", "-Infinity", '"a\\"b"']
        ),
        st.integers().map(str),
    )
    if depth == 0:
        return scalar
    inner = _json_text(depth - 1)
    members = st.lists(st.tuples(NAMES, inner), max_size=4)
    obj = members.map(lambda ms: "{" + ",".join(f'"{n}" : {v}' for n, v in ms) + "}")
    array = st.lists(inner, max_size=3).map(lambda vs: " [" + ", ".join(vs) + "]")
    return st.one_of(scalar, obj, array)


OBJECT_TEXT = st.lists(st.tuples(NAMES, _json_text()), max_size=5).map(
    lambda ms: "{" + ",".join(f'"{n}":{v}' for n, v in ms) + "}"
)


@PROPERTY
@given(OBJECT_TEXT)
def test_the_claims_set_parses_as_strict_json_or_is_malformed(text: str) -> None:
    try:
        expected = _strict_loads(text)
    except ValueError:
        expected = None
    try:
        got = parse_payload(text.encode())
    except InvalidToken as error:
        assert error.reason is Reason.MALFORMED
        assert expected is None, f"refused strict JSON: {text}"
        return
    assert got == expected and expected is not None, text


@PROPERTY
@given(OBJECT_TEXT)
def test_the_jose_header_parses_as_strict_json_or_is_malformed(text: str) -> None:
    token = base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode() + ".e30.c2ln"
    try:
        expected = _strict_loads(text)
    except ValueError:
        expected = None
    try:
        got = read_header(token, max_bytes=65536).fields
    except InvalidToken as error:
        assert error.reason is Reason.MALFORMED
        assert expected is None, f"refused strict JSON: {text}"
        return
    assert got == expected and expected is not None, text


@pytest.mark.parametrize(
    "text, detail",
    [
        ('{"sub":"a","sub":"admin"}', "duplicate member name 'sub'"),
        ('{"sub":"a","\\u0073ub":"admin"}', "duplicate member name 'sub'"),  # the same name, escaped
        ('{"realm_access":{"roles":["x"],"roles":["admin"]}}', "duplicate member name 'roles'"),
        ('{"x":[1,{"a":1,"b":2,"a":3}]}', "duplicate member name 'a'"),
        ('{"exp":NaN}', "NaN is not JSON"),
        ('{"exp":Infinity}', "Infinity is not JSON"),
        ('{"a":[-Infinity]}', "-Infinity is not JSON"),
    ],
)
def test_duplicate_names_at_any_depth_and_nan_are_malformed(text: str, detail: str) -> None:
    with pytest.raises(InvalidToken) as caught:
        parse_payload(text.encode())
    assert caught.value.reason is Reason.MALFORMED and caught.value.detail == f"payload: {detail}"


@pytest.mark.parametrize(
    "text",
    [
        '{"sub":"a","Sub":"b"}',  # names are case-sensitive
        '{"\u00e9":1,"e\u0301":2}',  # and compared as code points, never normalised (RFC 7159 §8.3)
        '{"a":{"x":1},"b":{"x":2}}',  # one name in two objects is no duplicate
        '{"a":[{"x":1},{"x":2}]}',
        '{"n":1e400,"m":-0}',
    ],
)
def test_what_is_no_duplicate_parses(text: str) -> None:
    assert parse_payload(text.encode()) == json.loads(text)


# -- items 2 and 4 together: any payload, correctly signed, through the verifier ------------------
SECRET = bytes(range(7, 71))  # 64 bytes, not a pattern anyone would choose
_PROVIDER = Provider(
    name="p",
    issuers=(ISSUER,),
    audiences=(AUDIENCE,),
    algorithms=("HS256",),
    keys=StaticKeys(
        kind="secret",
        origin="test",
        jwks={"keys": [{"kty": "oct", "k": base64.urlsafe_b64encode(SECRET).rstrip(b"=").decode()}]},
    ),
)
_MAP = HeaderMap(
    claims=(
        ClaimHeader(claim="sub", path=("sub",), header="X-User-Id"),
        ClaimHeader(claim="roles", path=("roles",), header="X-Roles"),
        ClaimHeader(claim="org", path=("org", "name"), header="X-Org"),
    ),
    payload="X-Jwt-Payload",
)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _signed(payload_text: str) -> str:
    signing_input = _b64(b'{"alg":"HS256"}') + "." + _b64(payload_text.encode("utf-8", "surrogatepass"))
    return signing_input + "." + _b64(hmac.new(SECRET, signing_input.encode(), hashlib.sha256).digest())


@FEWER
@given(extra=PAYLOAD, sub=VALUE, ascii_only=st.booleans())
def test_any_signed_payload_ends_in_claims_or_a_401_reason(extra: dict[str, Any], sub: Any, ascii_only: bool) -> None:
    clock = FakeClock()
    now = int(clock.time())
    payload = {**extra, "iss": ISSUER, "aud": AUDIENCE, "exp": now + 60, "sub": sub}
    # ensure_ascii=False writes a lone surrogate as itself; _signed then writes it as the
    # 3 bytes no UTF-8 decoder takes, so both spellings reach the parser.
    text = json.dumps(payload, ensure_ascii=ascii_only)
    verifier = Verifier(_PROVIDER, key_source_for(_PROVIDER, fetcher=None, clock=clock), clock=clock)
    try:
        claims = asyncio.run(verifier.verify(_signed(text)))
        rendered = claim_headers(claims.payload, _MAP)
        assert Renderer(_MAP, 1).headers(claims) == encode_headers(rendered)
    except InvalidToken as error:
        assert error.status == 401 and error.reason in set(Reason)
        return
    for name, value in rendered:
        assert _on_the_wire(name, value).decode("utf-8") == value
    encoded = dict(rendered)["X-Jwt-Payload"]
    assert _strict_loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()) == claims.payload
