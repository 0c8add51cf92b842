"""Where a request carries its token: Bearer, a named header, a cookie or a query parameter.

Owns: finding the one token in a request under the route's token sources, and refusing a
request that offers more than one (RFC 6750 §2: "Clients MUST NOT use more than one
method to transmit the token in each request") or a malformed Bearer credential (400
invalid_request). Also removes a query-parameter or cookie token before forwarding.
Does not own: decoding or trusting the token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote_plus

from multidict import MultiMapping

from .config import TokenSource
from .errors import InvalidRequest, Reason

__all__ = ["Found", "cookie_values", "extract", "without_cookie", "without_query_param"]

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class Fields(Protocol):
    """Header fields by name, any case: a multidict, or `identity.Outbound` on the proxy's path."""

    def getall(self, name: str, default: Any = ...) -> Any: ...


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much, per request
class Found:
    token: str
    source: TokenSource


def extract(
    headers: Fields,
    query: MultiMapping[str],
    sources: Iterable[TokenSource],
) -> Found | None:
    """The token offered under `sources`, None when there is none, `InvalidRequest` when two."""
    found: list[Found] = []
    for source in sources:
        if source.kind == "bearer":
            for value in headers.getall("Authorization", ()):
                scheme, _, credentials = value.partition(" ")
                if scheme.lower() != "bearer":
                    continue  # another scheme (Basic, …) is not a bearer token
                found.append(Found(_token68(credentials, "Authorization: Bearer"), source))
        elif source.kind == "header":
            for value in headers.getall(source.name, ()):
                if not value.startswith(source.prefix):
                    raise InvalidRequest(Reason.MALFORMED_REQUEST, f"{source.name} lacks the prefix {source.prefix!r}")
                found.append(Found(_token68(value[len(source.prefix):], source.name), source))
        elif source.kind == "cookie":
            for value in cookie_values(headers, source.name):
                found.append(Found(_token68(value, f"cookie {source.name}"), source))
        elif source.kind == "query":
            for value in query.getall(source.name, ()):
                found.append(Found(_token68(value, f"query parameter {source.name}"), source))
    if len(found) > 1:
        raise InvalidRequest(Reason.MULTIPLE_TOKENS, f"{len(found)} tokens offered")
    return found[0] if found else None


def _token68(value: str, where: str) -> str:
    if value in _CHECKED:
        return value
    if _B64TOKEN.fullmatch(value) is None:
        raise InvalidRequest(Reason.MALFORMED_REQUEST, f"{where} does not hold exactly one token")
    if len(_CHECKED) >= 128:  # bounded: distinct tokens only clear it (and are scanned as before)
        _CHECKED.clear()
    _CHECKED[value] = None
    return value


# Values that matched _B64TOKEN lately. The scan is ~24k instructions for a 1 KB token, a
# lookup a few hundred (its hash is computed once per string, and reused by the token cache).
_CHECKED: dict[str, None] = {}


def without_query_param(raw_query: str, name: str) -> str:
    """The raw query string with every `name=…` removed; the rest byte for byte as sent."""
    if not raw_query:
        return raw_query
    kept = [part for part in raw_query.split("&") if unquote_plus(part.split("=", 1)[0]) != name]
    return "&".join(kept)


def _cookie_pairs(header: str) -> list[tuple[str, str]]:
    # RFC 6265 §4.2.1 separates pairs with ';'. A cookie-octet never holds ',', so splitting
    # on it too costs nothing and catches `a=1, token=…`, which some parsers read as two
    # cookies. One parser both finds the token and removes it, so they cannot disagree.
    pairs = []
    for part in header.replace(",", ";").split(";"):
        name, sep, value = part.partition("=")
        if sep:
            pairs.append((name.strip(), value.strip().strip('"')))
    return pairs


def cookie_values(headers: Fields, name: str) -> list[str]:
    """Every value of cookie `name` across all Cookie headers (two are two tokens, not one)."""
    return [value for header in headers.getall("Cookie", ()) for key, value in _cookie_pairs(header) if key == name]


def without_cookie(cookie_header: str, name: str) -> str:
    """A Cookie header value (RFC 6265 §5.4) without the named cookie."""
    kept = [part.strip() for part in cookie_header.replace(",", ";").split(";")
            if part.strip() and part.partition("=")[0].strip() != name]
    return "; ".join(kept)
