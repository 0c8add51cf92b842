"""The headers the upstream receives: what a client sent, minus what it must not control, plus who it is.

Owns: dropping hop-by-hop headers (RFC 9110 §7.6.1), headers named in `Connection`, and
every identity header the proxy may inject (configured names and prefixes, plus every claim
and payload header any provider or route writes), on every route, before any decision;
then writing the verified identity (claim headers, the payload header), removing the token
from where it came from, and the `X-Forwarded-*` and `X-Request-Id` headers.
The inbound headers are never mutated: `strip_inbound` returns a new multidict, and
`inject` fills that one. Because the strip comes first, a client's `Connection: X-User-Id`
can only remove its own spoofed copy, never the header we inject.
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

from .config import HeaderMap, Settings
from .errors import InvalidToken, Reason
from .extract import Found, without_cookie
from .rules import ABSENT, claim_at

__all__ = ["HOP_BY_HOP", "Forwarded", "StripPlan", "claim_headers", "connection_tokens", "end_to_end", "inject",
           "request_id", "strip_inbound"]

# RFC 9110 §7.6.1 and the de-facto ones (Keep-Alive, Proxy-Connection); Expect is answered
# by our own server, so the upstream must not be asked to answer it again.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authorization", "proxy-authenticate", "expect",
})
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # C0 controls but HTAB: CR, LF and NUL among them
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True, slots=True)
class StripPlan:
    """Which client headers never reach the upstream, lower-cased, built once per config."""

    names: frozenset[str]
    prefixes: tuple[str, ...]
    keep: frozenset[str]
    """Token-source headers: a client sends its token there, so they survive the identity strip."""
    _verdicts: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)
    """`strips` remembered per lower-cased name (bounded): the same few names come on every request."""

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
        keep = frozenset(s.name.lower() for s in sources if s.kind == "header") - names
        return cls(names=frozenset(n.replace("_", "-") for n in names),
                   prefixes=tuple(p.lower().replace("_", "-") for p in settings.strip.prefixes),
                   keep=frozenset(k.replace("_", "-") for k in keep))

    def strips(self, lower_name: str) -> bool:
        verdict = self._verdicts.get(lower_name)
        if verdict is None:
            if len(self._verdicts) >= 4096:  # names are the client's choice: stay bounded
                self._verdicts.clear()
            verdict = self._verdicts[lower_name] = self._strips(lower_name)
        return verdict

    def _strips(self, lower_name: str) -> bool:
        # `X_User_Id` is `X-User-Id` to WSGI, CGI and PHP (both become HTTP_X_USER_ID), so
        # names are compared with `_` read as `-` (the hole of oauth2-proxy CVE-2025-64484).
        name = lower_name.replace("_", "-")
        if name in self.keep:
            return False
        return name in self.names or name.startswith(self.prefixes)


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """The lower-cased options of every `Connection` header (RFC 9110 §7.6.1)."""
    return {token.strip().lower() for value in headers.getall("Connection", ()) for token in value.split(",")}


def end_to_end(headers: CIMultiDictProxy[str] | CIMultiDict[str], plan: StripPlan | None = None) -> CIMultiDict[str]:
    """A new multidict without hop-by-hop and Connection-named headers (and what `plan` strips)."""
    named = connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    # One spelling per name (the first seen): `X-A` and `x-a` are one field (RFC 9110 §5.1),
    # and the upstream gets it under one name, every value in order.
    spelling: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in named or (plan is not None and plan.strips(low)):
            continue
        out.add(spelling.setdefault(low, name), value)
    return out


def strip_inbound(headers: CIMultiDictProxy[str] | CIMultiDict[str], plan: StripPlan) -> CIMultiDict[str]:
    """A new multidict: the client's headers less hop-by-hop, Connection-named and identity headers."""
    return end_to_end(headers, plan)


@dataclass(frozen=True, slots=True)
class Forwarded:
    """What this hop saw, appended to the X-Forwarded-* chain for the upstream."""

    client: str | None
    proto: str
    host: str | None


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
    return _random[_offset - 16:_offset].hex()


_random = b""
_offset = 0


def _append(headers: CIMultiDict[str], name: str, value: str | None) -> None:
    if value is None:
        return
    if name not in headers:
        headers.add(name, value)
        return
    headers[name] = f"{', '.join(headers.getall(name))}, {value}"


def render_claim(value: Any) -> str | None:
    """A claim as a header value: lists joined with ',', objects as JSON; None when absent."""
    if value is ABSENT or value is None:
        return None
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, list):
        if any(isinstance(v, str) and "," in v for v in value):
            # ["dev,admin"] would read upstream as two roles, dev and admin.
            raise InvalidToken(Reason.UNSAFE_CLAIM, "a list claim item holds the ',' that joins items")
        text = ",".join(v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), ensure_ascii=False)
                        for v in value)
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if _UNSAFE.search(text):
        # Header injection or response splitting through a claim: deny, never sanitise.
        raise InvalidToken(Reason.UNSAFE_CLAIM, "a claim holds CR, LF, NUL or another control character")
    if text != text.strip(" \t"):
        # Header parsers drop surrounding whitespace (RFC 9110 §5.5): " admin" would arrive
        # as "admin", a different identity.
        raise InvalidToken(Reason.UNSAFE_CLAIM, "a claim starts or ends with whitespace")
    return text


def claim_headers(payload: Mapping[str, Any], header_map: HeaderMap,
                  memo: dict[int, Any] | None = None) -> tuple[tuple[str, str], ...]:
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
        raw = json.dumps(dict(payload), separators=(",", ":"), ensure_ascii=False).encode()
        rendered.append((header_map.payload, base64.urlsafe_b64encode(raw).rstrip(b"=").decode()))
    result = tuple(rendered)
    if memo is not None and len(memo) < 16:  # a handful of routes with their own maps at most
        memo[id(header_map)] = (header_map, result)
    return result


def inject(
    headers: CIMultiDict[str],
    *,
    payload: Mapping[str, Any] | None,
    header_map: HeaderMap | None,
    found: Found | None,
    forwarded: Forwarded,
    request_id_value: str,
    memo: dict[int, Any] | None = None,
) -> CIMultiDict[str]:
    """Fill the stripped headers with identity and forwarding information; returns them.
    `memo`: where `claim_headers` may keep the rendered identity (a cached token's)."""
    if payload is not None and header_map is not None:
        for name, value in claim_headers(payload, header_map, memo):
            headers[name] = value
    if found is not None and not (header_map is not None and header_map.forward_token):
        _remove_token(headers, found)
    _append(headers, "X-Forwarded-For", forwarded.client)
    _append(headers, "X-Forwarded-Proto", forwarded.proto)
    _append(headers, "X-Forwarded-Host", forwarded.host)
    headers["X-Request-Id"] = request_id_value
    return headers


def _remove_token(headers: CIMultiDict[str], found: Found) -> None:
    source = found.source
    if source.kind in ("bearer", "header"):
        headers.popall(source.name, None)
    elif source.kind == "cookie":
        cookies = [without_cookie(v, source.name) for v in headers.getall("Cookie", ())]
        headers.popall("Cookie", None)
        for value in cookies:
            if value:
                headers.add("Cookie", value)
    # A query token is removed from the URL by the pipeline (extract.without_query_param).


