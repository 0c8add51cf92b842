"""The headers the upstream receives: what a client sent, minus what it must not control, plus who it is.

Owns: dropping hop-by-hop headers (RFC 9110 §7.6.1), headers named in `Connection`, the
underscore spellings of those and of the framing and forwarding headers we write
(`Transfer_Encoding`, `Content_Length`, `X_Forwarded_For`...), and
every identity header the proxy may inject (configured names and prefixes, plus every claim
and payload header any provider or route writes), on every route, before any decision;
then writing the verified identity (claim headers, the payload header; a claim with no
exact header form is refused as `unsafe_claim`, never sanitised), removing the token
from where it came from, and the `X-Forwarded-*` and `X-Request-Id` headers.
The fields stay the bytes the client sent, end to end: `strip_inbound` makes one pass over
the request's raw fields (classifying each name once per spelling, `StripPlan.role`) into an
`Outbound`, which `extract` reads, and `inject` turns it with our fields into the encoded
lines of the upstream request (`upstream.Fields`): no multidict, no decoding and encoding
again (that was ~60k of a proxied request's ~310k instructions). Because the strip comes
first, a client's `Connection: X-User-Id` can only remove its own spoofed copy, never the
header we inject.
Does not own: sending anything (forward.py) or deciding anything (pipeline.py).
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from ..auth.extract import Found, without_cookie
from ..auth.rules import ABSENT, claim_at
from ..base.errors import InvalidToken, Reason
from ..config.settings import HeaderMap, Settings
from ..http.upstream import Fields

__all__ = [
    "HOP_BY_HOP",
    "Outbound",
    "StripPlan",
    "claim_headers",
    "connection_tokens",
    "inject",
    "request_id",
    "strip_inbound",
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
# What a client field is to the upstream request, by its name (StripPlan.role).
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


@dataclass(frozen=True, slots=True)
class StripPlan:
    """Which client headers never reach the upstream, lower-cased, built once per config."""

    names: frozenset[str]
    prefixes: tuple[str, ...]
    sources: frozenset[str]
    """Token-source headers, lower-cased as configured: a client sends its token there, so they
    survive the strip long enough to be read (`inject` decides whether they go on)."""
    _roles: dict[bytes, tuple[int, bytes]] = field(default_factory=dict, compare=False, repr=False)
    """`role` remembered per name as spelt on the wire (bounded): the same few come on every request."""

    @classmethod
    def build(cls, settings: Settings) -> StripPlan:
        maps: list[HeaderMap] = [p.headers for p in settings.providers.values()]
        maps += [r.headers for r in settings.routes if r.headers is not None]
        names = {n.lower() for n in settings.strip.names}
        for header_map in maps:
            names.update(c.header.lower() for c in header_map.claims)
            if header_map.payload:
                names.add(header_map.payload.lower())
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
        found = self._roles.get(name)
        if found is None:
            if len(self._roles) >= 4096:  # names are the client's choice: stay bounded
                self._roles.clear()
            low = name.lower()
            found = self._roles[name] = (self._role(low.decode(_ENCODING, _ERRORS)), low)
        return found

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


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """The lower-cased options of every `Connection` header (RFC 9110 §7.6.1)."""
    return {token.strip().lower() for value in headers.getall("Connection", ()) for token in value.split(",")}


class Outbound:
    """A request's header fields on their way upstream: the client's, as bytes, less what it
    must not control (`strip_inbound`); `inject` adds ours and encodes the lot."""

    __slots__ = ("host", "kept")

    def __init__(self, kept: list[tuple[int, bytes, bytes, bytes]], host: bytes | None) -> None:
        self.kept = kept
        """(role, lower-case name, name, value) of each field kept, in the client's order."""
        self.host = host
        """The client's Host, as sent (X-Forwarded-Host is made from it)."""

    def getall(self, name: str, default: Any = ()) -> Any:
        """Every value of a kept field, decoded, by name in any case (what `extract` reads)."""
        low = _LOWER.get(name)
        if low is None:
            low = name.lower().encode(_ENCODING, _ERRORS)
            if len(_LOWER) < 1024:  # the config's token-source names, on every request
                _LOWER[name] = low
        values = [value.decode(_ENCODING, _ERRORS) for _, field_low, _, value in self.kept if field_low == low]
        return values or default

    def items(self) -> list[tuple[str, str]]:
        """The kept fields, decoded, in order."""
        return [(name.decode(_ENCODING, _ERRORS), value.decode(_ENCODING, _ERRORS)) for _, _, name, value in self.kept]


_LOWER: dict[str, bytes] = {}


def strip_inbound(fields: list[tuple[bytes, bytes]], plan: StripPlan) -> Outbound:
    """The client's fields less hop-by-hop, Connection-named and identity headers (one pass)."""
    kept: list[tuple[int, bytes, bytes, bytes]] = []
    named: set[bytes] | None = None
    host: bytes | None = None
    # One spelling per name (the first seen): `X-A` and `x-a` are one field (RFC 9110 §5.1),
    # and the upstream gets it under one name, every value in order.
    spelling: dict[bytes, bytes] = {}
    for name, value in fields:
        role, low = plan.role(name)
        if role == _DROP:
            continue
        if role == _CONNECTION:
            if named is None:
                named = set()
            named.update(token.strip().lower() for token in value.split(b","))
            continue
        if role == _HOST and host is None:
            host = value
        kept.append((role, low, spelling.setdefault(low, name), value))
    if named:
        kept = [entry for entry in kept if entry[1] not in named]
    return Outbound(kept, host)


def request_id(inbound: str | None) -> str:
    """The client's X-Request-Id when it is a sane token, else a new one."""
    if inbound is not None and _REQUEST_ID.fullmatch(inbound):
        return inbound
    # 128 random bits as 32 hex digits, like uuid4().hex, at a fraction of its cost: one
    # getrandom() call per 256 ids rather than per request.
    global _random, _offset
    if _offset >= len(_random):
        _random, _offset = os.urandom(16 * 256), 0
    _offset += 16
    return _random[_offset - 16 : _offset].hex()


_random = b""
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
    payload: Mapping[str, Any], header_map: HeaderMap, memo: dict[int, Any] | None = None
) -> tuple[tuple[str, str], ...]:
    """The identity headers for a verified payload: each claim header present, and the
    payload header if configured. `memo` (a cached token's `Claims.rendered`) keeps them per
    header map, so a token seen again is not rendered again."""
    if memo is not None:
        entry = memo.get(id(header_map))
        # The entry holds the map itself, so its id cannot be reused while the entry lives.
        if entry is not None and entry[0] is header_map:
            return entry[1]
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
    result = tuple(rendered)
    if memo is not None and len(memo) < 16:  # a handful of routes with their own maps at most
        memo[id(header_map)] = (header_map, result)
    return result


def inject(
    out: Outbound,
    *,
    identity: tuple[tuple[str, str], ...],
    found: Found | None,
    forward_token: bool,
    client: str | None,
    proto: str,
    request_id_value: str,
) -> Fields:
    """The upstream request's header lines: the kept client fields, less the token unless
    `forward_token`, then `identity` (`claim_headers`), X-Forwarded-For/Proto/Host (the
    client's values first, then the peer address, our scheme and the client's Host) and our
    X-Request-Id."""
    drop = b""  # the field the token came in, when it must not reach the upstream
    source = b""  # the field the token came in
    cookie: str | None = None  # the cookie that held it
    if found is not None and found.source.kind in ("bearer", "header"):
        source = found.source.name.lower().encode(_ENCODING, _ERRORS)
    if found is not None and not forward_token:
        if source:
            drop = source
        elif found.source.kind == "cookie":
            cookie = found.source.name
        # A query token is removed from the URL by the pipeline (extract.without_query_param).
    parts: list[bytes] = []
    count = 0
    has_host = False
    chains: list[list[bytes]] | None = None  # the client's X-Forwarded-For, -Proto, -Host
    for role, low, name, value in out.kept:
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
        has_host = has_host or role == _HOST
        parts += (name, b": ", value, b"\r\n")
        count += 1
    ours = [f"{name}: {value}\r\n" for name, value in identity]
    host = None if out.host is None else out.host.decode(_ENCODING, _ERRORS)
    if chains is None and client is not None and host is not None:
        ours.append(f"X-Forwarded-For: {client}\r\nX-Forwarded-Proto: {proto}\r\nX-Forwarded-Host: {host}\r\n")
        count += 3
    else:
        chains = chains or [[], [], []]
        for header, chain, given in (
            ("X-Forwarded-For", chains[0], client),
            ("X-Forwarded-Proto", chains[1], proto),
            ("X-Forwarded-Host", chains[2], host),
        ):
            if chain:
                previous = b", ".join(chain).decode(_ENCODING, _ERRORS)
                given = previous if given is None else f"{previous}, {given}"
            if given is not None:
                ours.append(f"{header}: {given}\r\n")
                count += 1
    ours.append(f"X-Request-Id: {request_id_value}\r\n")
    parts.append("".join(ours).encode(_ENCODING, _ERRORS))
    return Fields(b"".join(parts), count + len(identity) + 1, has_host=has_host)
