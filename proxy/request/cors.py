"""CORS, done by the sidecar: a route's policy compiled once, a preflight answered, an answer's headers.

Owns: the Fetch standard's CORS protocol as a server speaks it (fetch.spec.whatwg.org, "CORS
protocol"): `CorsPolicy`, one per route with `cors` (config/settings.py `CorsSettings`),
compiled when a snapshot is built into the byte strings it answers with; `preflight`, which
recognises a preflight (an `OPTIONS` with `Origin` and `Access-Control-Request-Method`),
finds the route the request it announces would take, and judges it (`Preflight`: a 204 with
the CORS headers, or a 403 saying what was refused); `CorsPolicy.response_fields`, the header
lines added to every answer on a CORS route (`Access-Control-Allow-Origin` and the rest for
an allowed origin, `Vary: Origin` whenever the answer depends on the origin); and the names of
the upstream's own CORS fields, which a CORS route replaces. All of it pure: nothing here
writes to a connection, logs or counts.
Does not own: the settings and their checks (config/builder.py), when these run in a request
and how the answer is written, logged and counted (the pipeline), or routing (config/routing.py).

Decisions the standard leaves to a server, made here:
- A preflight never needs a token and is never forwarded; a refused one is a 403 (any status
  outside 200-299 fails the browser's check), with a fixed phrase naming what was refused.
- `Origin: null` (sandboxed documents, data: URLs) is allowed only by `*` (the config refuses
  `null` in a list), as the standard's own `*` check allows it; a `regex:` never sees it.
- Origins are compared byte for byte as sent (browsers send lower-case ASCII, international
  names in punycode); anything that is not a serialised origin (a path, a space, non-ASCII
  bytes, over 512 bytes) or a second `Origin` field is no origin we allow.
- Methods are compared case-sensitively (browsers upper-case only DELETE, GET, HEAD, OPTIONS,
  POST and PUT); header names case-insensitively. The CORS-safelisted methods GET, HEAD and
  POST always pass a preflight, as they pass the browser's own check.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..base.errors import ProxyError, Reason
from ..config.settings import ORIGIN, CorsSettings

if TYPE_CHECKING:
    from ..config.routing import Router

__all__ = ["REFUSALS", "UPSTREAM_FIELDS", "CorsPolicy", "Preflight", "preflight", "without_upstream_cors"]

# A token (RFC 9110 §5.6.2): a method or a field name.
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_SAFELISTED_METHODS = frozenset({b"GET", b"HEAD", b"POST"})
_LONGEST_ORIGIN = 512  # a scheme, a 253-byte host and a port fit well within it

REFUSALS: dict[str, str] = {
    reason: ProxyError(reason).description for reason in (Reason.CORS_ORIGIN, Reason.CORS_METHOD, Reason.CORS_HEADERS)
}
"""The reasons a preflight is refused (`errors.Reason` values, the metric label and the log's
reason), and the fixed phrase each answer's body gives (errors.py's, like every refusal's)."""

UPSTREAM_FIELDS = frozenset(
    {
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-expose-headers",
        b"access-control-max-age",
    }
)
"""The upstream's own CORS answer fields (lower case): dropped on a route with `cors`, where
the sidecar's are the ones the browser reads (two `Access-Control-Allow-Origin` fail it)."""


@dataclass(frozen=True, slots=True)
class Preflight:
    """A preflight's answer: write `status`, then `fields` (header lines, each ending in CRLF),
    then `body` (None for the 204)."""

    route: str
    """The route whose policy judged it: the route the announced request would take."""
    status: int
    """204 when allowed, 403 when refused."""
    reason: str
    """"" when allowed; else a key of `REFUSALS`."""
    detail: str
    """For the operator's log: what was refused (the values shown escaped and bounded)."""
    fields: bytes
    body: bytes | None


class _HasCors(Protocol):
    @property
    def cors(self) -> CorsPolicy | None: ...


class CorsPolicy:
    """One route's `cors` settings, compiled: every answer's header lines are bytes made here."""

    __slots__ = (
        "_allow_headers",
        "_any_header",
        "_any_method",
        "_exact",
        "_methods",
        "_no_origin",
        "_patterns",
        "_preflight_exact",
        "_preflight_tail",
        "_refused_fields",
        "_static",
        "_tail",
        "any_origin",
        "settings",
        "vary",
    )

    def __init__(self, settings: CorsSettings) -> None:
        self.settings = settings
        self.any_origin = settings.any_origin
        credentials = settings.allow_credentials
        # The answer depends on the origin unless it is `*` for everyone (the config refuses
        # `*` with credentials). Then every answer says so (Fetch: "CORS protocol and HTTP
        # caches"): a cache must not give one origin's answer, or a no-Origin one, to another.
        self.vary = not self.any_origin
        vary = b"Vary: Origin\r\n" if self.vary else b""
        expose = _list_field(b"Access-Control-Expose-Headers", settings.expose_headers)
        allow_credentials = b"Access-Control-Allow-Credentials: true\r\n" if credentials else b""
        self._tail = allow_credentials + expose + vary
        # Actual requests: `*` is the same answer for every request, Origin or not, so it is
        # sent on all of them and nothing varies; listed origins get their answer made now.
        self._static = b"Access-Control-Allow-Origin: *\r\n" + expose if self.any_origin else None
        self._no_origin = vary
        self._exact = {o.encode("ascii"): _allow_origin(o.encode("ascii")) + self._tail for o in settings.allow_origins}
        self._patterns = settings.origin_patterns
        # Preflights.
        self._methods = frozenset(m.encode("ascii") for m in settings.allow_methods if m != "*")
        self._any_method = "*" in settings.allow_methods
        self._allow_headers = frozenset(h.lower().encode("ascii") for h in settings.allow_headers if h != "*")
        self._any_header = "*" in settings.allow_headers
        max_age = b"" if settings.max_age is None else b"Access-Control-Max-Age: %d\r\n" % int(settings.max_age)
        self._preflight_tail = (
            allow_credentials
            + _list_field(b"Access-Control-Allow-Methods", settings.allow_methods)
            + _list_field(b"Access-Control-Allow-Headers", settings.allow_headers)
            + max_age
            + vary
            + b"Server: jwt-sidecar\r\n"
        )
        self._preflight_exact = {origin: _allow_origin(origin) + self._preflight_tail for origin in self._exact}
        self._refused_fields = (
            b"Content-Type: application/json; charset=utf-8\r\nCache-Control: no-store\r\n"
            + vary
            + b"Server: jwt-sidecar\r\n"
        )

    def __repr__(self) -> str:
        return f"<CorsPolicy {self.settings}>"

    # -- every answer on the route ------------------------------------------------------
    def response_fields(self, fields: Iterable[tuple[bytes, bytes]]) -> bytes:
        """The header lines (each ending in CRLF) to add to any answer on this route, the
        upstream's or ours: the CORS headers for an allowed origin, and `Vary: Origin`
        whenever the answer depends on it (a disallowed origin's and a no-Origin answer too).
        b"" only when there is nothing to add."""
        static = self._static
        if static is not None:
            return static
        origin = _only_origin(fields)
        if origin is None:
            return self._no_origin
        found = self._exact.get(origin)
        if found is not None:
            return found
        if self._patterns and self._matches_pattern(origin):
            return _allow_origin(origin) + self._tail
        return self._no_origin

    def _matches_pattern(self, origin: bytes) -> bool:
        if len(origin) > _LONGEST_ORIGIN or not origin.isascii():
            return False
        text = origin.decode("ascii")
        if ORIGIN.fullmatch(text) is None:
            return False
        return any(pattern.fullmatch(text) is not None for pattern in self._patterns)

    # -- preflights ---------------------------------------------------------------------
    def judge(
        self, route: str, origins: Sequence[bytes], methods: Sequence[bytes], headers: Sequence[bytes]
    ) -> Preflight:
        """A preflight's answer on this route, from its `Origin`, `Access-Control-Request-Method`
        and `Access-Control-Request-Headers` field values (each as many as were sent)."""
        if len(origins) != 1:
            return self._refuse(route, "cors_origin", f"{len(origins)} Origin fields; a browser sends one")
        origin = origins[0]
        if self.any_origin:
            allow = b"Access-Control-Allow-Origin: *\r\n" + self._preflight_tail
        else:
            found = self._preflight_exact.get(origin)
            if found is None and origin != b"null" and self._patterns and self._matches_pattern(origin):
                found = _allow_origin(origin) + self._preflight_tail
            if found is None:
                return self._refuse(route, "cors_origin", f"origin {_shown(origin)} is not in allow_origins")
            allow = found
        if len(methods) != 1:
            return self._refuse(route, "cors_method", f"{len(methods)} Access-Control-Request-Method fields")
        method = methods[0]
        if not _is_token(method):
            return self._refuse(route, "cors_method", f"method {_shown(method)} is not a method name")
        if not (method in self._methods or method in _SAFELISTED_METHODS or self._any_method):
            return self._refuse(route, "cors_method", f"method {_shown(method)} is not in allow_methods")
        for value in headers:
            for item in value.split(b","):
                name = item.strip(b" \t").lower()
                if not name:
                    continue
                if not _is_token(name):
                    return self._refuse(route, "cors_headers", f"{_shown(name)} is not a header name")
                if name in self._allow_headers:
                    continue
                if self._any_header and name != b"authorization":
                    continue
                why = (
                    " (`*` never covers Authorization: list it)"
                    if name == b"authorization" and self._any_header
                    else ""
                )
                return self._refuse(route, "cors_headers", f"header {_shown(name)} is not in allow_headers{why}")
        return Preflight(route=route, status=204, reason="", detail="", fields=allow, body=None)

    def _refuse(self, route: str, reason: str, detail: str) -> Preflight:
        body = json.dumps({"error": "cors_refused", "error_description": REFUSALS[reason]}).encode()
        return Preflight(route=route, status=403, reason=reason, detail=detail, fields=self._refused_fields, body=body)


def preflight(
    method: str, fields: Iterable[tuple[bytes, bytes]], path: str, router: Router, plans: Mapping[str, _HasCors]
) -> Preflight | None:
    """The answer to a CORS preflight for a route with `cors`, or None when the request is no
    such preflight (handled like any request, then).

    A preflight is an `OPTIONS` with `Origin` and `Access-Control-Request-Method` (an OPTIONS
    without either is an ordinary request). It is judged by the route the request it
    announces would take: that method on this normalised path, so a route that lists
    `methods: [GET, PUT]` answers the preflights of its own requests. No such route, or one
    without `cors`, and it is no preflight of ours.
    """
    if method != "OPTIONS":
        return None
    origins: list[bytes] = []
    methods: list[bytes] = []
    headers: list[bytes] = []
    for name, value in fields:
        size = len(name)
        if size == 6:
            if name.lower() == b"origin":
                origins.append(value)
        elif size == 29:
            if name.lower() == b"access-control-request-method":
                methods.append(value)
        elif size == 30 and name.lower() == b"access-control-request-headers":
            headers.append(value)
    if not origins or not methods:
        return None
    route = router.match(methods[0].decode("latin-1"), path)
    if route is None:
        return None
    policy = plans[route.name].cors
    if policy is None:
        return None
    return policy.judge(route.name, origins, methods, headers)


def without_upstream_cors(fields: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's answer fields less its own CORS fields (`UPSTREAM_FIELDS`), for a route with `cors`."""
    return [(name, value) for name, value in fields if name.lower() not in UPSTREAM_FIELDS]


def _only_origin(fields: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The request's one `Origin` value; None without one, or with two (no origin is allowed then)."""
    found = None
    for name, value in fields:
        if len(name) == 6 and name.lower() == b"origin":
            if found is not None:
                return None
            found = value
    return found


def _allow_origin(origin: bytes) -> bytes:
    return b"Access-Control-Allow-Origin: " + origin + b"\r\n"


def _list_field(name: bytes, values: Sequence[str]) -> bytes:
    return name + b": " + ", ".join(values).encode("ascii") + b"\r\n" if values else b""


def _is_token(value: bytes) -> bool:
    return bool(value) and _TCHAR.issuperset(value)


def _shown(value: bytes) -> str:
    """A client's value for the operator's log: escaped, and at most 100 bytes of it."""
    text = repr(value[:100])[1:]
    return text + ("…" if len(value) > 100 else "")
