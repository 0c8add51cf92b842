"""Where a request carries its token: Bearer, a named header, a cookie or a query parameter.

Owns: finding the one token in a request under the route's token sources, and refusing a
request that offers more than one (RFC 6750 §2: "Clients MUST NOT use more than one
method to transmit the token in each request"), a repeated Authorization field of any
schemes (a singleton, RFC 9110 §11.6.2; checked on public routes too), or a malformed
Bearer credential (400 invalid_request; `bearer` is `extract`'s answer for a route whose one
source is Bearer and a request with one Authorization line); `authorization` is the one place the Authorization
singleton rule is checked, for `extract` and for public routes alike. Cookie and query names are compared as the most
lenient upstream reads them (percent-decoded, any case, ' ', '.' and '[' as '_'), and the
query token's name after a ';' is refused (a separator to some servers). Also parses a query
string or Cookie header without the token, so one parser both finds and removes it (identity.py
decides when and calls them). Does not own: decoding or trusting the token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, unquote_plus

from ..base.errors import InvalidRequest, Reason
from ..base.memo import Memo
from ..config.settings import TokenSource

__all__ = [
    "Found",
    "authorization",
    "bearer",
    "cookie_values",
    "extract",
    "query_values",
    "without_cookie",
    "without_query_param",
]

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
# (the rule as written; `_is_b64token` checks it faster, and the tests hold the two together)
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 9110 §5.6.2: tchar, the characters of a token such as an auth-scheme.
_TCHAR = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]")


class Fields(Protocol):
    """Header fields by name, any case: `identity.Outbound` on the proxy's path (http1's `Headers` and
    multidict's `CIMultiDict` read the same)."""

    def getall(self, name: str, default: Any = ...) -> Any: ...


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much, per request
class Found:
    token: str
    source: TokenSource


def extract(
    headers: Fields,
    query: Iterable[tuple[str, str]],
    sources: Iterable[TokenSource],
) -> Found | None:
    """The token offered under `sources`, None when there is none, `InvalidRequest` when two."""
    found: list[Found] = []
    lines = authorization(headers, sources)
    for source in sources:
        if source.kind == "bearer":
            for value in lines:
                credentials = _bearer_credentials(value)
                if credentials is None:
                    continue  # another scheme (Basic, …) is not a bearer token
                found.append(Found(_token68(credentials, "Authorization: Bearer"), source))
        elif source.kind == "header":
            for value in headers.getall(source.name, ()):
                if not value.startswith(source.prefix):
                    raise InvalidRequest(Reason.MALFORMED_REQUEST, f"{source.name} lacks the prefix {source.prefix!r}")
                found.append(Found(_token68(value[len(source.prefix) :].rstrip(" \t"), source.name), source))
        elif source.kind == "cookie":
            for value in cookie_values(headers, source.name):
                found.append(Found(_token68(value, f"cookie {source.name}"), source))
        elif source.kind == "query":
            for value in query_values(query, source.name):
                found.append(Found(_token68(value, f"query parameter {source.name}"), source))
    if len(found) > 1:
        raise InvalidRequest(Reason.MULTIPLE_TOKENS, f"{len(found)} tokens offered")
    return found[0] if found else None


def bearer(value: str, source: TokenSource) -> Found | None:
    """`extract` for a route whose one source is Bearer (`source`) and a request with one
    Authorization line, `value`: the same answer, without looking for what cannot be there.
    `Bearer ` as the RFC spells it, one space, then a token that is one b64token, is taken in
    one run (`_bearer_credentials` and `_token68` written out: a distinct token on every
    request pays them all, bench/FIGURES.md "Cache misses, session 8"); anything else as ever."""
    if value[:7] == "Bearer " and value[7:8] != " ":
        token = value[7:].rstrip(" \t")  # (trailing SP/HTAB: not part of the value)
        well_formed = _IS_TOKEN68.get(token)
        if well_formed is None:
            well_formed = _IS_TOKEN68.remember(token, _is_b64token(token))
        if well_formed:
            return Found(token, source)
    credentials = _bearer_credentials(value)
    if credentials is None:
        return None  # another scheme (Basic, …) is not a bearer token
    return Found(_token68(credentials, "Authorization: Bearer"), source)


def authorization(headers: Fields, sources: Iterable[TokenSource] = ()) -> list[str]:
    """The Authorization field's values, or `InvalidRequest` for two or more lines: on every
    route, a public one (no `sources`) too, since it forwards the field as sent.

    Authorization is a singleton (RFC 9110 §11.6.2, §5.3): with two lines, of any schemes,
    one reader takes the first and another the last, so neither may be trusted. Two Bearer
    tokens on a route that reads Bearer are reported as two tokens, anything else as malformed.
    """
    values: list[str] = headers.getall("Authorization", ())
    if len(values) > 1:
        if any(source.kind == "bearer" for source in sources) and all(
            _bearer_credentials(value) is not None for value in values
        ):
            raise InvalidRequest(Reason.MULTIPLE_TOKENS, f"{len(values)} Authorization: Bearer lines")
        raise InvalidRequest(
            Reason.MALFORMED_REQUEST, f"Authorization sent {len(values)} times; it is a singleton field"
        )
    return values


def _bearer_credentials(value: str) -> str | None:
    """What follows `Bearer` and its spaces, or None for another scheme.

    RFC 9110 §11.4: `credentials = auth-scheme [ 1*SP ( token68 / #auth-param ) ]`, the scheme
    case-insensitive: any number of spaces, and only spaces. `Bearer<TAB>x`, `Bearer,x` or
    `Bearer=x` are not another scheme (a scheme is a token, ended only by SP or the end), so
    they are malformed Bearer credentials (400), never ignored as a missing token.
    """
    if value[:6].lower() != "bearer":
        return None
    separator = value[6:7]
    if separator == " ":
        # Trailing SP/HTAB is not part of a field value (RFC 9110 §5.5), and our parser keeps it.
        credentials = value[7:].rstrip(" \t")
        return credentials.lstrip(" ") if credentials[:1] == " " else credentials
    if separator and _TCHAR.fullmatch(separator) is not None:
        return None  # `Bearerx`: a longer scheme name, not Bearer
    return value[6:]  # `Bearer`, or Bearer then TAB or another separator: refused by _token68


def _token68(value: str, where: str) -> str:
    well_formed = _IS_TOKEN68.get(value)
    if well_formed is None:  # (every request misses under many distinct tokens: no `make` call here)
        well_formed = _IS_TOKEN68.remember(value, _is_b64token(value))
    if not well_formed:
        raise InvalidRequest(Reason.MALFORMED_REQUEST, f"{where} does not hold exactly one token")
    return value


def _is_b64token(value: str) -> bool:
    """`_B64TOKEN.fullmatch(value)`, by one `bytes.translate` and one `find` instead of the
    regex's scan (~8k instructions against ~15k for a 699-character token: bench/FIGURES.md,
    "Cache misses, session 6"): ASCII only (`isascii` reads a flag), the '=' only at the end,
    at least one character before them, and every character before them in the b64token
    alphabet (`_NOT_B64TOKEN` maps each byte outside it to 1).
    tests/unit/request/test_extract_identity.py holds the two together."""
    if not value.isascii():
        return False
    body = value.rstrip("=")
    return bool(body) and body.encode("ascii").translate(_NOT_B64TOKEN).find(1) < 0


_NOT_B64TOKEN = bytes(
    0 if byte in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/" else 1 for byte in range(256)
)
_IS_TOKEN68: Memo[str, bool] = Memo(128)
"""Whether a value is one b64token, for the values offered lately: the same token comes on
request after request, and a lookup costs far less than the scan (bench/FIGURES.md); its
hash is computed once per string and reused by the token cache."""


# PHP reads ' ', '.' and '[' in a query or cookie name as '_' ($_GET, $_COOKIE): `access.token`
# is its `access_token`.
_PHP_NAME = str.maketrans(" .[", "___")


def _param_name(decoded: str) -> str:
    """A decoded query or cookie name as the most lenient upstream reads it, for comparing."""
    return decoded.lower().translate(_PHP_NAME)


def query_values(query: Iterable[tuple[str, str]], name: str) -> list[str]:
    """Every value of query parameter `name` in the query's decoded (name, value) pairs, its
    name compared after decoding and in any case.

    http1's `query_pairs` has decoded the names (with `unquote_plus`, as `without_query_param` does) (`access%5Ftoken` is `access_token`); case is folded here
    because ASP.NET and others read query names case-insensitively, so `ACCESS_TOKEN=…` next
    to our token is a second token to them, and alone it is the token; ' ', '.' and '[' are
    read as '_' as PHP reads them. The name after a ';' inside a parameter (Go before 1.17
    and Python before 3.9.2 split on ';' too) is a 400: we would neither verify nor remove it.
    """
    low = _param_name(name)
    found = []
    for key, value in query:
        if _param_name(key) == low:
            found.append(value)
        if ";" in key or ";" in value:
            for part in f"{key}={value}".split(";")[1:]:
                if _param_name(part.partition("=")[0].strip()) == low:
                    raise InvalidRequest(
                        Reason.MALFORMED_REQUEST, f"query parameter {name} follows a ';' (a separator to some servers)"
                    )
    return found


def without_query_param(raw_query: str, name: str) -> str:
    """The raw query string with every `name=…` (as `query_values` reads names) removed; the rest
    byte for byte as sent."""
    if not raw_query:
        return raw_query
    low = _param_name(name)
    kept = [part for part in raw_query.split("&") if _param_name(unquote_plus(part.split("=", 1)[0])) != low]
    return "&".join(kept)


def _cookie_pairs(header: str) -> list[tuple[str, str]]:
    # RFC 6265 §4.2.1 separates pairs with ';'. A cookie-octet never holds ',', so splitting
    # on it too costs nothing and catches `a=1, token=…`, which some parsers read as two
    # cookies. One parser both finds the token and removes it, so they cannot disagree.
    pairs = []
    for part in header.replace(",", ";").split(";"):
        name, sep, value = part.partition("=")
        if sep:
            # OWS is SP and HTAB (RFC 6265 §4.2.1), not str.strip's Unicode whitespace (NBSP
            # before a token is no part of a cookie's syntax); one pair of DQUOTEs may
            # enclose a value, and an unbalanced or doubled quote is not a token (a 400).
            value = value.strip(" \t")
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            pairs.append((_cookie_name(name), value))
    return pairs


def _cookie_name(name: str) -> str:
    # The name as the most lenient upstream reads it: PHP percent-decodes cookie names and
    # ASP.NET Core compares them case-insensitively, so `access%5Ftoken` and `ACCESS_TOKEN`
    # are the token cookie to them: here too (found, counted and removed), never a second,
    # unchecked token that the upstream reads. Compared lower-cased.
    name = name.strip()
    return _param_name(unquote(name) if "%" in name else name)


def cookie_values(headers: Fields, name: str) -> list[str]:
    """Every value of cookie `name` across all Cookie headers (two are two tokens, not one)."""
    low = _param_name(name)
    return [value for header in headers.getall("Cookie", ()) for key, value in _cookie_pairs(header) if key == low]


def without_cookie(cookie_header: str, name: str) -> str:
    """A Cookie header value (RFC 6265 §5.4) without the named cookie (in any spelling
    `cookie_values` reads as it)."""
    low = _param_name(name)
    kept = [
        part.strip()
        for part in cookie_header.replace(",", ";").split(";")
        if part.strip() and _cookie_name(part.partition("=")[0]) != low
    ]
    return "; ".join(kept)
