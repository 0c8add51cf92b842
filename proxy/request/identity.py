"""The headers the upstream receives: what a client sent, minus what it must not control, plus who it is.

Owns: dropping hop-by-hop headers (RFC 9110 §7.6.1), headers named in `Connection`, the
underscore spellings of those and of the framing and forwarding headers we write
(`Transfer_Encoding`, `Content_Length`, `X_Forwarded_For`...), and
every identity header the proxy may inject (configured names and prefixes, plus every claim
and payload header any provider or route writes), on every route, before any decision;
then writing the verified identity (claim headers, the payload header, the admitting
provider's name if the map asks; a claim with no
exact header form is refused as `unsafe_claim`, never sanitised), removing the token
from wherever it came (a header, a cookie, the query string: every token removal is here,
`upstream_fields` and `without_query_token`; pipeline.py's `_inject` hands them the request's
`Exchange`, so this module knows no request object and the snapshot can import it),
and the `X-Forwarded-*` and `X-Request-Id` headers.
The fields stay the bytes the client sent, end to end: `strip_inbound` makes one pass over
the request's raw fields (classifying each name once per spelling, `StripPlan.role`) into an
`Outbound`, which `extract` reads, and `upstream_fields` turns it with our fields into the header
pairs (name, value) of the upstream request, as bytes, which the HTTP layer encodes
(`upstream.Fields.of_bytes`): no multidict, no decoding and encoding again (what that saves:
bench/FIGURES.md). For a request forwarded from a prepared plan (pipeline.py's `ForwardPlan`),
`HeadPlan` is the strip and `upstream_fields` worked out once per list of field names (a
`bytes %` of the values; `StripPlan.head`), and `OurFields` writes ours after them (tested
against the field-by-field way). A verified token's identity headers are rendered once per route plan's
header map (`Renderer`), not per request. Because the strip comes first, a client's
`Connection: X-User-Id` can only remove its own spoofed copy, never the header we inject.
Does not own: sending anything (forward.py), deciding anything (pipeline.py), or finding the
token (extract.py; its removal from a cookie or the query string is written there too, so
one parser both finds and removes it).
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..auth.extract import Found, without_cookie, without_query_param
from ..auth.rules import ABSENT, claim_at
from ..base.errors import InvalidToken, Reason
from ..base.memo import Memo
from ..config.settings import HeaderMap, Settings

if TYPE_CHECKING:
    from ..auth.verify import Claims
    from ..http.http1 import Headers

__all__ = [
    "HOP_BY_HOP",
    "HeadPlan",
    "OurFields",
    "Outbound",
    "Pairs",
    "Renderer",
    "StripPlan",
    "claim_headers",
    "connection_tokens",
    "encode_headers",
    "planned_fields",
    "request_id",
    "strip_inbound",
    "upstream_fields",
    "without_query_token",
]

# RFC 9110 §7.6.1 and the de-facto ones (Keep-Alive, Proxy-Connection); Expect is answered
# by our own server, so the upstream must not be asked to answer it again.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "expect",
    }
)
# Bytes as the client sent them; decoded so that encoding back gives the same bytes.
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"
# What a client field is to the upstream request, by its name (`StripPlan.role`): plain ints,
# compared in the per-field loops of `strip_inbound` and `upstream_fields`.
#
#   code  role               the field                              what becomes of it
#   0     _FORWARD           any other field                        sent on as it came
#   1     _SOURCE            a token-source header inside the       sent on only as the token of a
#                            identity namespace (X-Auth-Token)      route that forwards it
#   2     _DROP              hop-by-hop, identity, framing, ours    never sent (strip_inbound)
#   3     _CONNECTION        Connection                             its options are dropped too
#   4     _HOST              Host                                   sent on; X-Forwarded-Host from it
#   5     _FORWARDED_FOR     X-Forwarded-For                        the client's chain, ours appended
#   6     _FORWARDED_PROTO   X-Forwarded-Proto                      the client's chain, ours appended
#   7     _FORWARDED_HOST    X-Forwarded-Host                       the client's chain, ours appended
#
# The order is part of the code: `upstream_fields` takes every role from _FORWARDED_FOR up as
# one of the three chains, indexed by `role - _FORWARDED_FOR` (so these three stay last, in
# this order), and sends every role below it as a field.
_FORWARD, _SOURCE, _DROP, _CONNECTION, _HOST, _FORWARDED_FOR, _FORWARDED_PROTO, _FORWARDED_HOST = range(8)
_ROLES = {
    "connection": _CONNECTION,
    "host": _HOST,
    "x-forwarded-for": _FORWARDED_FOR,
    "x-forwarded-proto": _FORWARDED_PROTO,
    "x-forwarded-host": _FORWARDED_HOST,
    # The framing is the upstream client's to write; our X-Request-Id replaces the client's.
    "content-length": _DROP,
    "x-request-id": _DROP,
}
# C0 controls but HTAB (CR, LF and NUL among them), DEL, and lone surrogates: JSON's
# "\ud800" escape decodes to a str no UTF-8 encoder takes, so the header could not be
# written at all (it was a 500) or, under surrogateescape, would become bytes that are not
# UTF-8, which no upstream decodes back to the claim.
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
# JSON for a header: compact, UTF-8 as is, and no NaN or Infinity (not JSON, RFC 8259 §6;
# a float too large for a double, such as 1e400, reads as inf). Built once, not per call.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class StripPlan:
    """Which client headers never reach the upstream, lower-cased, built once per config.

    The rule (`names`, `prefixes`, `sources`) is fixed when built; `roles` is a bounded memo
    of its answer per name as spelt on the wire (the same few names come on every request),
    its only mutable state."""

    __slots__ = ("heads", "names", "prefixes", "roles", "sources")

    def __init__(self, names: frozenset[str], prefixes: tuple[str, ...], sources: frozenset[str]) -> None:
        self.names = names
        self.prefixes = prefixes
        self.sources = sources
        """Token-source headers, lower-cased as configured: a client sends its token there, so they
        survive the strip long enough to be read (`upstream_fields` decides whether they go on)."""
        self.roles: Memo[bytes, tuple[int, bytes]] = Memo(_NAMES_BOUND, self._classify)
        """By name as spelt on the wire: what a client field named so is to the upstream request, and its
        lower-case name. Names are the client's choice, hence the bound."""
        self.heads: Memo[tuple[bytes, ...], HeadPlan] = Memo(_HEADS_BOUND)
        """`head`'s answers by the request's field names, in order (`head`)."""

    def head(self, names: tuple[bytes, ...]) -> HeadPlan:
        """The strip and `upstream_fields` for every request whose fields have these names, in
        this order, worked out once (`HeadPlan`); kept only for a short list of short names
        (the names are the client's choice: at most `_HEADS_BOUND` lists of `_HEAD_NAMES` bytes)."""
        found = self.heads.get(names)
        if found is not None:
            return found
        plan = HeadPlan(self, names)
        if len(names) <= _HEAD_FIELDS and sum(map(len, names)) <= _HEAD_NAMES:
            self.heads.remember(names, plan)
        return plan

    @classmethod
    def build(cls, settings: Settings) -> StripPlan:
        maps: list[HeaderMap] = [p.headers for p in settings.providers.values()]
        maps += [r.headers for r in settings.routes if r.headers is not None]
        names = {n.lower() for n in settings.strip.names}
        for header_map in maps:
            names.update(c.header.lower() for c in header_map.claims)
            if header_map.payload:
                names.add(header_map.payload.lower())
            if header_map.provider:  # only the proxy says which provider admitted a request
                names.add(header_map.provider.lower())
        sources = [s for p in settings.providers.values() for s in p.token_sources]
        sources += [s for r in settings.routes for s in (r.token_sources or ())]
        dashed = frozenset(n.replace("_", "-") for n in names)
        return cls(
            names=dashed,
            prefixes=tuple(p.lower().replace("_", "-") for p in settings.strip.prefixes),
            sources=frozenset(
                s.name.lower() for s in sources if s.kind == "header" and s.name.lower().replace("_", "-") not in dashed
            ),
        )

    def role(self, name: bytes) -> tuple[int, bytes]:
        """What a client field named `name` is to the upstream request, and its lower-case name."""
        found = self.roles.get(name)
        return found if found is not None else self.roles.make_for(name)

    def _classify(self, name: bytes) -> tuple[int, bytes]:
        low = name.lower()
        return self._role(low.decode(_ENCODING, _ERRORS)), low

    def _role(self, text: str) -> int:
        if text in HOP_BY_HOP:
            return _CONNECTION if text == "connection" else _DROP
        # `X_User_Id` is `X-User-Id` to WSGI, CGI and PHP (both become HTTP_X_USER_ID), so
        # names are compared with `_` read as `-` (the hole of oauth2-proxy CVE-2025-64484).
        dashed = text.replace("_", "-")
        if dashed != text and (dashed in HOP_BY_HOP or dashed in _ROLES):
            # The same reading makes `Transfer_Encoding` or `Content_Length` framing to such an
            # upstream (a second, unchecked body length: smuggling), `Connection`/`Upgrade`/
            # `Keep_Alive` its hop-by-hop fields, and `X_Forwarded_For` or `X_Request_Id` a
            # rival to ours: only the proxy writes these, so no spelling of them passes.
            return _DROP
        identity = dashed in self.names or dashed.startswith(self.prefixes)
        if text in self.sources:
            # A token source inside the identity namespace (X-Auth-Token under X-Auth-) goes on
            # only as the token of a route that forwards it; elsewhere it is as any header.
            return _SOURCE if identity else _FORWARD
        if any(dashed == source.replace("_", "-") for source in self.sources):
            return _DROP  # another spelling of a token source: a second token nobody checked
        return _DROP if identity else _ROLES.get(text, _FORWARD)


def connection_tokens(headers: Headers) -> set[str]:
    """The lower-cased options of every `Connection` header (RFC 9110 §7.6.1)."""
    return {token.strip().lower() for value in headers.getall("Connection", ()) for token in value.split(",")}


class Outbound:
    """A request's header fields on their way upstream: the client's, as bytes, less what it
    must not control (`strip_inbound`); `upstream_fields` adds ours."""

    __slots__ = ("authorization", "authorizations", "host", "kept")

    def __init__(
        self,
        kept: list[tuple[int, bytes, bytes, bytes]],
        host: bytes | None,
        authorizations: int = 0,
        authorization: bytes | None = None,
    ) -> None:
        self.kept = kept
        """(role, lower-case name, name, value) of each field kept, in the client's order."""
        self.host = host
        """The client's Host, as sent (X-Forwarded-Host is made from it)."""
        self.authorizations = authorizations
        """How many Authorization lines were kept: counted in the strip's one pass, so a request
        with at most one need not be read again for extract.authorization's singleton rule."""
        self.authorization = authorization
        """The value of the one Authorization line kept, when `authorizations` is 1 (pipeline.py
        reads a Bearer token from it without looking through the fields again)."""

    def getall(self, name: str, default: Any = ()) -> Any:
        """Every value of a kept field, decoded, by name in any case (what `extract` reads)."""
        low = _LOWER.get(name) or _LOWER.make_for(name)
        values = None
        for field in self.kept:  # a plain loop: a comprehension's own call costs more on 1-10 fields
            if field[1] == low:
                if values is None:
                    values = []
                values.append(field[3].decode(_ENCODING, _ERRORS))
        return values or default

    def items(self) -> list[tuple[str, str]]:
        """The kept fields, decoded, in order."""
        return [(name.decode(_ENCODING, _ERRORS), value.decode(_ENCODING, _ERRORS)) for _, _, name, value in self.kept]


_NAMES_BOUND = 4096
"""How many header-name spellings a memo of them keeps: far more than any client sends, few
enough that a flood of invented names costs a bounded memory."""
_HEADS_BOUND = 256
_HEAD_FIELDS = 32
_HEAD_NAMES = 1024
"""`StripPlan.head`'s bounds: lists of field names kept, fields in one, bytes of names in one
(a few kinds of client send the same few lists; ~1.3 MB at worst, names and formats)."""
_LOWER: Memo[str, bytes] = Memo(1024, lambda name: name.lower().encode(_ENCODING, _ERRORS))
"""A field name `Outbound.getall` is asked for, as the lower-case bytes it compares: the
config's token-source names, on every request."""


def strip_inbound(fields: list[tuple[bytes, bytes]], plan: StripPlan) -> Outbound:
    """The client's fields less hop-by-hop, Connection-named and identity headers (one pass)."""
    kept: list[tuple[int, bytes, bytes, bytes]] = []
    named: set[bytes] | None = None
    host: bytes | None = None
    # One spelling per name (the first seen): `X-A` and `x-a` are one field (RFC 9110 §5.1),
    # and the upstream gets it under one name, every value in order.
    spelling: dict[bytes, bytes] = {}
    authorizations = 0
    authorization = None
    roles, classify = plan.roles.get, plan.roles.make_for
    for name, value in fields:
        found = roles(name)
        role, low = found if found is not None else classify(name)
        if role == _DROP:
            continue
        if role == _CONNECTION:
            if named is None:
                named = set()
            named.update(token.strip().lower() for token in value.split(b","))
            continue
        if role == _HOST and host is None:
            host = value
        elif low == b"authorization":
            authorizations += 1
            authorization = value
        kept.append((role, low, spelling.setdefault(low, name), value))
    if named:
        kept = [entry for entry in kept if entry[1] not in named]
        values = [entry[3] for entry in kept if entry[1] == b"authorization"]
        authorizations, authorization = len(values), values[-1] if values else None
    return Outbound(kept, host, authorizations, authorization if authorizations == 1 else None)


class HeadPlan:
    """What the strip (`strip_inbound`) and `upstream_fields` make of a request's fields, worked
    out once per list of field names (`StripPlan.head`): for a request with no Connection
    field, no X-Forwarded-For/-Proto/-Host of its own, no token-source header inside the
    identity namespace and one Host, what goes upstream depends on the names alone, so the
    client fields that go on are one `bytes %` of the request's values (`keep`, or `drop`
    for a token taken out of its Authorization line): a kept field written `Name: %b` under its
    first spelling, a dropped one `%.0b` (nothing). None for both when the names ask for the
    field-by-field way. Whatever the names, where the first X-Request-Id is, and whether an
    Authorization field was sent at all: app.py's one look at the fields (bench/FIGURES.md,
    "The prepared forward")."""

    __slots__ = ("asked", "authorization", "authorizations", "drop", "host", "keep", "kept", "request_id")

    def __init__(self, strip: StripPlan, names: tuple[bytes, ...]) -> None:
        self.request_id = -1
        """The index of the first field named X-Request-Id (any case), -1: none."""
        self.asked = False
        """Whether a field is named Authorization (any case), before the strip."""
        self.authorization = -1
        """The index of the one Authorization field kept (-1: none, or more than one)."""
        self.authorizations = 0
        """How many Authorization fields the strip keeps (`Outbound.authorizations`)."""
        self.host = -1
        """The index of the Host field (X-Forwarded-Host is its value)."""
        self.kept = 0
        """How many lines `keep` writes (`drop` writes one fewer when `authorization` >= 0)."""
        keep: list[bytes] = []
        drop: list[bytes] = []
        spelling: dict[bytes, bytes] = {}  # (`strip_inbound`'s: the first spelling of each name)
        planned = True
        for index, name in enumerate(names):
            size = len(name)
            if size == 12 and self.request_id < 0 and name.lower() == b"x-request-id":
                self.request_id = index
            elif size == 13 and name.lower() == b"authorization":
                self.asked = True
            role, low = strip.role(name)
            if role == _DROP:
                keep.append(b"%.0b")
                drop.append(b"%.0b")
                continue
            if role in (_CONNECTION, _SOURCE) or role >= _FORWARDED_FOR:
                planned = False  # what goes on depends on the values, or on the token found
                continue
            if role == _HOST:
                if self.host >= 0:
                    planned = False  # (http1 refuses a second Host: never planned for it)
                self.host = index
            line = spelling.setdefault(low, name).replace(b"%", b"%%") + b": %b\r\n"
            keep.append(line)
            self.kept += 1
            if low == b"authorization":
                self.authorizations += 1
                self.authorization = index
                drop.append(b"%.0b")
            else:
                drop.append(line)
        if self.authorizations != 1:
            self.authorization = -1
        if self.host < 0:
            planned = False
        self.keep: bytes | None = b"".join(keep) if planned else None
        """The client's fields as the upstream gets them, Authorization kept: a format of every value."""
        self.drop: bytes | None = b"".join(drop) if planned else None
        """`keep` less the Authorization line (a Bearer token the route does not forward)."""


def request_id(inbound: str | None) -> str:
    """The client's X-Request-Id when it is a sane token, else a new one."""
    if inbound is not None and _REQUEST_ID.fullmatch(inbound):
        return inbound
    # 128 random bits as 32 hex digits, like uuid4().hex, at a fraction of its cost: one
    # getrandom() call per 256 ids rather than per request, written in hex at once (a str
    # slice per id, not a bytes slice and its `hex()`).
    global _random, _offset
    if _offset >= len(_random):
        _random, _offset = os.urandom(16 * 256).hex(), 0
    _offset += 32
    return _random[_offset - 32 : _offset]


_random = ""
_offset = 0


def render_claim(value: Any) -> str | None:
    """A claim as a header value: lists joined with ',', objects as JSON; None when absent.

    Whatever the token holds, the answer is a str that encodes to UTF-8 and arrives as it
    is, or `InvalidToken(UNSAFE_CLAIM)`: never another exception (no token may cause a 5xx).
    """
    if value is ABSENT or value is None:
        return None
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    else:
        try:
            if isinstance(value, list):
                items = [v if isinstance(v, str) else _JSON(v) for v in value]
                # The upstream splits the field on ',' and trims SP/HTAB around each item
                # (RFC 9110 §5.6.1): ["dev,admin"] would read as dev and admin, [[0,5]] (JSON
                # "[0,5]") as "[0" and "5]", [{"a":[1,2,3]}] as a bare "2", and " admin" as
                # admin. Each item must arrive as one item, exactly.
                if any("," in item or item != item.strip(" \t") for item in items):
                    raise InvalidToken(
                        Reason.UNSAFE_CLAIM,
                        "a list claim item holds the ',' that joins items, or surrounding whitespace",
                    )
                text = ",".join(items)
            else:
                text = _JSON(value)
        except (ValueError, RecursionError) as error:
            # NaN/Infinity, an int too long to print, nesting deeper than the encoder goes.
            raise InvalidToken(Reason.UNSAFE_CLAIM, f"a claim cannot be written as JSON: {_why(error)}") from None
    if _UNSAFE.search(text):
        # Header injection or response splitting through a claim: deny, never sanitise.
        raise InvalidToken(
            Reason.UNSAFE_CLAIM, "a claim holds CR, LF, NUL or another control character, or a lone surrogate"
        )
    if text != text.strip(" \t"):
        # Header parsers drop surrounding whitespace (RFC 9110 §5.5): " admin" would arrive
        # as "admin", a different identity.
        raise InvalidToken(Reason.UNSAFE_CLAIM, "a claim starts or ends with whitespace")
    return text


def _why(error: ValueError | RecursionError) -> str:
    # Operator text only (logs, explain): neither the claim nor the library's message.
    if isinstance(error, UnicodeEncodeError):
        return "a lone surrogate (no UTF-8 form)"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return "NaN, Infinity or a number too long to write as JSON"


def claim_headers(
    payload: Mapping[str, Any], header_map: HeaderMap, provider: str | None = None
) -> tuple[tuple[str, str], ...]:
    """The identity headers for a verified payload: each claim header present, the payload
    header if configured, and the header naming `provider` (the admitting one) if configured."""
    values = [(c.header, render_claim(claim_at(payload, c.path))) for c in header_map.claims]
    rendered = [(name, value) for name, value in values if value is not None]
    if header_map.payload:
        try:
            # Strict UTF-8: a lone surrogate anywhere (a value, a member name, however deep)
            # has no UTF-8 form, so the upstream could not get this payload back exactly.
            raw = _JSON(dict(payload)).encode("utf-8")
        except (ValueError, RecursionError) as error:  # UnicodeEncodeError is a ValueError
            raise InvalidToken(Reason.UNSAFE_CLAIM, f"the payload cannot be forwarded exactly: {_why(error)}") from None
        rendered.append((header_map.payload, base64.urlsafe_b64encode(raw).rstrip(b"=").decode()))
    if header_map.provider and provider is not None:
        name = render_claim(provider)  # a config name, made header-safe as a claim is
        if name is not None:
            rendered.append((header_map.provider, name))
    return tuple(rendered)


def encode_headers(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[bytes, bytes], ...]:
    """Header pairs as the bytes that go on the wire (`claim_headers` made each value UTF-8-safe)."""
    return tuple([(name.encode(_ENCODING, _ERRORS), value.encode(_ENCODING, _ERRORS)) for name, value in headers])


class Renderer:
    """A header map's identity headers per verified token, for the route plans that use the map.

    A cached token comes back as the same `Claims` object, so its headers are rendered and
    encoded once and then looked up (`headers`); a reload builds new renderers with its
    new snapshot, so a changed map never serves an old rendering.

    The first renderer to render a token keeps its headers on the `Claims` itself
    (`rendered_by`, `rendered`), so they live and die with the cache entry at no memo slot's
    cost; any other renderer of the same token (a route with its own map) keeps them in its
    memo (`rendered`). Header names are encoded once per map and shared by every token's
    headers (bench/FIGURES.md: what a cached token costs)."""

    __slots__ = ("_claims", "_names", "header_map", "rendered")

    def __init__(self, header_map: HeaderMap, bound: int) -> None:
        self.header_map = header_map
        self.rendered: Memo[Claims, tuple[tuple[bytes, bytes], ...]] = Memo(bound)
        """By `Claims` object (compared by identity). `bound` is the token cache's size: the
        tokens that can come back as the same `Claims`; 0 (no cache) keeps nothing."""
        self._names: dict[str, bytes] = {}
        self._claims: tuple[tuple[bytes, str | None, tuple[str, ...]], ...] | None = None
        """For a map of claim headers alone (no payload or provider header, the usual map):
        each claim header's name as bytes, the claim's name when its path is one name (else
        None) and its path, so `_render` reads each claim by one lookup (`_render_claims`)."""
        if not header_map.payload and not header_map.provider:
            self._claims = tuple(
                (c.header.encode(_ENCODING, _ERRORS), c.path[0] if len(c.path) == 1 else None, c.path)
                for c in header_map.claims
            )

    def headers(self, claims: Claims) -> tuple[tuple[bytes, bytes], ...]:
        """The identity headers for `claims`, encoded; `InvalidToken(UNSAFE_CLAIM)` when a claim has no exact header form."""
        if claims.rendered_by is self:
            return claims.rendered
        found = self.rendered.get(claims)
        if found is None:  # every request misses when each verifies its own token: no `make` call
            found = self._render(claims)
            if not self.rendered.bound:
                return found  # no cache: no token comes back as the same Claims
            if claims.rendered_by is None:
                claims.rendered_by, claims.rendered = self, found
            else:
                self.rendered.remember(claims, found)
        return found

    def _render(self, claims: Claims) -> tuple[tuple[bytes, bytes], ...]:
        if self._claims is not None:
            return self._render_claims(claims.payload, self._claims)
        names = self._names
        pairs = []
        for name, value in claim_headers(claims.payload, self.header_map, claims.provider):
            encoded = names.get(name)
            if encoded is None:
                encoded = names[name] = name.encode(_ENCODING, _ERRORS)
            pairs.append((encoded, value.encode(_ENCODING, _ERRORS)))
        return tuple(pairs)

    @staticmethod
    def _render_claims(
        payload: Mapping[str, Any], plan: tuple[tuple[bytes, str | None, tuple[str, ...]], ...]
    ) -> tuple[tuple[bytes, bytes], ...]:
        """`claim_headers` for a map of claim headers alone, encoded: the same headers, and the
        same refusals, with the usual claim (a printable ASCII string with no space at either
        end, which `render_claim` returns as it is) taken without its checks: `isascii` and
        `isprintable` hold only for characters 0x20-0x7E, none of which `_UNSAFE` matches and
        of which `strip(" \t")` removes only the space. Anything else goes through
        `render_claim` (a new token's headers: bench/FIGURES.md, "Cache misses, session 6")."""
        pairs = []
        for name, claim, path in plan:
            value = claim_at(payload, path) if claim is None else payload.get(claim, ABSENT)
            if value.__class__ is str and value.isascii() and value.isprintable() and value.strip(" ") == value:
                pairs.append((name, value.encode()))
                continue
            text = render_claim(value)
            if text is not None:
                pairs.append((name, text.encode(_ENCODING, _ERRORS)))
        return tuple(pairs)


_AUTHORIZATION = b"authorization"
Pairs = list[tuple[bytes, bytes]]
"""Header fields as (name, value) bytes, in order: what this module makes and the HTTP layer encodes."""
_PROTO = {"http": b"http", "https": b"https"}


def without_query_token(query: str, found: Found | None) -> str:
    """The query string without the token, when the token came in it; always, forward_token
    or not: a token in a URL ends up in every log it passes."""
    if found is not None and found.source.kind == "query":
        return without_query_param(query, found.source.name)
    return query


def upstream_fields(
    out: Outbound,
    identity: tuple[tuple[bytes, bytes], ...],
    found: Found | None,
    forward_token: bool,
    client: str | None,
    proto: str,
    request_id_value: str,
    guarded: bool = False,
) -> tuple[Pairs, Pairs]:
    """The upstream request's header fields, as (name, value) pairs the HTTP layer encodes
    (`upstream.Fields.of_bytes(kept, ours)`): the kept client fields as the client sent them,
    less the token (from its header or its cookie) unless `forward_token`; then ours:
    `identity` (`Renderer.headers`), X-Forwarded-For/Proto/Host (the client's values first,
    then the peer address, our scheme and the client's Host) and our X-Request-Id. None of
    ours is Host or a framing field (config/builder.py refuses those names for claims).

    On a route with auth (`guarded`, or a token `found`), the client's Authorization reaches
    the upstream only as the token we checked, forwarded (`forward_token`, the token having
    come in Authorization): a token from a cookie, the query or another header, or none on
    an optional route, never takes an unchecked Authorization (Basic, another Bearer) with it.
    A public route passes Authorization on as sent."""
    drop = b""  # the field the token came in, when it must not reach the upstream
    source = b""  # the field the token came in
    cookie: str | None = None  # the cookie that held it
    if found is not None and found.source.kind in ("bearer", "header"):
        source = _LOWER.get(found.source.name) or _LOWER.make_for(found.source.name)
    if found is not None and not forward_token:
        if source:
            drop = source
        elif found.source.kind == "cookie":
            cookie = found.source.name
    kept = out.kept
    if (
        out.authorizations
        and drop != _AUTHORIZATION
        and (guarded or found is not None)
        and not (forward_token and source == _AUTHORIZATION)  # the one Authorization we checked, forwarded
    ):
        if drop:  # another header held the token (rare): both go
            kept = [field for field in kept if field[1] != _AUTHORIZATION]
        else:
            drop = _AUTHORIZATION
    fields: Pairs = []
    chains: list[list[bytes]] | None = None  # the client's X-Forwarded-For, -Proto, -Host
    for role, low, name, value in kept:
        if role >= _FORWARDED_FOR:
            if chains is None:
                chains = [[], [], []]
            chains[role - _FORWARDED_FOR].append(value)
            continue
        if low == drop or (role == _SOURCE and not (forward_token and found is not None and low == source)):
            continue
        if cookie is not None and low == b"cookie":
            value = without_cookie(value.decode(_ENCODING, _ERRORS), cookie).encode(_ENCODING, _ERRORS)
            if not value:
                continue
        fields.append((name, value))
    host = out.host
    scheme = _PROTO.get(proto) or proto.encode(_ENCODING, _ERRORS)
    peer = None if client is None else client.encode(_ENCODING, _ERRORS)
    request_id = (b"X-Request-Id", request_id_value.encode(_ENCODING, _ERRORS))
    if chains is None and peer is not None and host is not None:
        return fields, [
            *identity,
            (b"X-Forwarded-For", peer),
            (b"X-Forwarded-Proto", scheme),
            (b"X-Forwarded-Host", host),
            request_id,
        ]
    ours = [*identity]
    chains = chains or [[], [], []]
    for header, chain, given in (
        (b"X-Forwarded-For", chains[0], peer),
        (b"X-Forwarded-Proto", chains[1], scheme),
        (b"X-Forwarded-Host", chains[2], host),
    ):
        if chain:
            previous = b", ".join(chain)
            given = previous if given is None else previous + b", " + given
        if given is not None:
            ours.append((header, given))
    ours.append(request_id)
    return fields, ours


def planned_fields(
    fields: bytes,
    identity: tuple[tuple[bytes, bytes], ...],
    client: str | None,
    proto: str,
    host: bytes,
    request_id_value: str,
) -> bytes:
    """`upstream_fields` and then `upstream.Fields.of_bytes`, for a request `HeadPlan` planned:
    `fields`, its client fields encoded (`HeadPlan.keep` or `drop`, formatted), then ours as
    `upstream_fields` writes them for a request with no X-Forwarded-* of its own and a Host
    (`host`, its value): `identity`, X-Forwarded-For, -Proto, -Host and our X-Request-Id
    (`OurFields.lines`, with nothing kept from before)."""
    return OurFields().lines(fields, identity, client, proto, host, request_id_value)


class OurFields:
    """`planned_fields` for the requests of one prepared forward (pipeline.py's `ForwardPlan`),
    keeping what the last one gave that the next one usually gives again: its identity lines
    (a cached token's `Renderer.headers` is the same tuple, request after request) and its
    peer address encoded (the same str for every request of a connection); each is used again
    only for the very same object (`is`), which cannot have changed (bench/FIGURES.md, "The
    prepared forward")."""

    __slots__ = ("_client", "_identity", "_lines", "_peer")

    def __init__(self) -> None:
        self._identity: tuple[tuple[bytes, bytes], ...] = ()
        self._lines = b""
        self._client: str | None = None
        self._peer = b""

    def lines(
        self,
        fields: bytes,
        identity: tuple[tuple[bytes, bytes], ...],
        client: str | None,
        proto: str,
        host: bytes,
        request_id_value: str,
    ) -> bytes:
        """`planned_fields`: `fields`, then ours (`head`'s, with no request line, no framing and
        no blank line)."""
        return self.head(b"", fields, identity, client, proto, host, request_id_value, b"")[:-2]

    def head(
        self,
        line: bytes,
        fields: bytes,
        identity: tuple[tuple[bytes, bytes], ...],
        client: str | None,
        proto: str,
        host: bytes,
        request_id_value: str,
        framing: bytes,
    ) -> bytes:
        """A whole upstream head in one `bytes %`: `line` (the request line), `fields` (the
        client's, formatted), ours (`lines`), `framing` (a `Content-Length: 0` line, or none),
        the blank line (one `bytes %` fewer than `lines` inside another: bench/FIGURES.md,
        "The forwarded request, session 8")."""
        if identity is not self._identity:
            self._lines = b"".join([b"%b: %b\r\n" % pair for pair in identity])
            self._identity = identity
        if client is not self._client:
            assert client is not None  # (pipeline.py plans nothing for a request without a peer)
            self._peer = client.encode(_ENCODING, _ERRORS)
            self._client = client
        return (
            b"%b%b%bX-Forwarded-For: %b\r\nX-Forwarded-Proto: %b\r\nX-Forwarded-Host: %b\r\nX-Request-Id: %b\r\n%b\r\n"
            % (
                line,
                fields,
                self._lines,
                self._peer,
                _PROTO.get(proto) or proto.encode(_ENCODING, _ERRORS),
                host,
                request_id_value.encode(_ENCODING, _ERRORS),
                framing,
            )
        )
