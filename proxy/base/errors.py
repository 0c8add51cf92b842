"""The one exception tree of jwt-sidecar and the RFC 6750 challenge it implies.

Owns: every error the request path can raise, its HTTP status, its closed `Reason`, the
fixed client-safe phrase for that reason, and the `WWW-Authenticate` value (RFC 6750 §3).
Does not own: turning errors into responses (the app's error middleware does that),
logging, or any knowledge of routes.

Clients only ever see `status`, `fields()` (the JSON body: `error_code` and the fixed
`description`) and, for an `AuthError`, the challenge, built from the same `fields()` so the
body and `WWW-Authenticate` never disagree (RFC 6750 §3: 400 `invalid_request`, 401
`invalid_token`, 403 `insufficient_scope`, and neither code nor description when the
request carries no token at all, §3.1).
`detail` is operator text for logs and `token explain`; it may name a claim or a key id but
never holds the token, a key or a library message verbatim.
"""

from __future__ import annotations

import enum

from .safetext import one_line

__all__ = [
    "AuthError",
    "BadRequest",
    "ConfigError",
    "ConfigIssue",
    "InsufficientScope",
    "InvalidRequest",
    "InvalidToken",
    "KeysUnavailable",
    "NotFound",
    "PayloadTooLarge",
    "ProxyError",
    "Reason",
    "RequestTimeout",
    "RevocationUnavailable",
    "TokenMissing",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "bearer_challenge",
]


class Reason(enum.StrEnum):
    """Why a request was refused: shared by logs, the metric label and `token explain`."""

    # the request itself
    TOKEN_MISSING = "token_missing"
    MULTIPLE_TOKENS = "multiple_tokens"
    MALFORMED_REQUEST = "malformed_request"
    # the token's form and header
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    TYP = "typ"
    CRIT = "crit"
    # keys and signature
    UNKNOWN_KID = "unknown_kid"
    BAD_SIGNATURE = "bad_signature"
    # claims
    MALFORMED_CLAIM = "malformed_claim"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    ISSUED_IN_FUTURE = "issued_in_future"
    TOO_OLD = "too_old"
    ISSUER = "issuer"
    AUDIENCE = "audience"
    MISSING_CLAIM = "missing_claim"
    # route rules
    SCOPE = "scope"
    CLAIM_RULE = "claim_rule"
    UNSAFE_CLAIM = "unsafe_claim"
    # the request, before authentication
    BAD_PATH = "bad_path"
    NO_ROUTE = "no_route"
    BODY_TOO_LARGE = "body_too_large"
    BODY_TIMEOUT = "body_timeout"
    HEADER_TIMEOUT = "header_timeout"
    # our side, not the client's
    NO_KEYS = "no_keys"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    INTERNAL = "internal"
    # a CORS preflight the route's `cors` refuses (request/cors.py judges it)
    CORS_ORIGIN = "cors_origin"
    CORS_METHOD = "cors_method"
    CORS_HEADERS = "cors_headers"
    # the revocation list (auth/revocation.py): after the signature and claims
    REVOKED = "revoked"
    REVOCATION_UNAVAILABLE = "revocation_unavailable"


# The only text a client ever reads about a refused token (RFC 6750 §3 error_description:
# "human-readable ASCII text"). Fixed phrases, so nothing from the token or a library leaks.
_DESCRIPTIONS: dict[Reason, str] = {
    Reason.TOKEN_MISSING: "No access token was presented",
    Reason.MULTIPLE_TOKENS: "More than one access token was presented",
    # Said of a malformed Authorization, token source or request body alike (one reason).
    Reason.MALFORMED_REQUEST: "The request is malformed",
    Reason.TOO_LARGE: "The access token is too large",
    Reason.MALFORMED: "The access token is malformed",
    Reason.ALG_NOT_ALLOWED: "The token's signing algorithm is not accepted",
    Reason.TYP: "The token's type is not accepted",
    Reason.CRIT: "The token uses an unsupported critical header",
    Reason.UNKNOWN_KID: "The token's signing key is not known",
    Reason.BAD_SIGNATURE: "The token's signature is invalid",
    Reason.MALFORMED_CLAIM: "The token has a malformed claim",
    Reason.EXPIRED: "The access token expired",
    Reason.NOT_YET_VALID: "The access token is not valid yet",
    Reason.ISSUED_IN_FUTURE: "The access token was issued in the future",
    Reason.TOO_OLD: "The access token's lifetime is too long",
    Reason.ISSUER: "The token's issuer is not accepted",
    Reason.AUDIENCE: "The token's audience is not accepted",
    Reason.MISSING_CLAIM: "The access token lacks a required claim",
    Reason.SCOPE: "The access token lacks a required scope",
    Reason.CLAIM_RULE: "The access token does not grant access to this resource",
    Reason.UNSAFE_CLAIM: "The token has a claim that cannot be forwarded safely",
    Reason.BAD_PATH: "The request path is not allowed",
    Reason.NO_ROUTE: "No route matches this request",
    Reason.BODY_TOO_LARGE: "The request body is too large",
    Reason.BODY_TIMEOUT: "The request body did not arrive in time",
    Reason.HEADER_TIMEOUT: "The request head did not arrive in time",
    Reason.NO_KEYS: "Signing keys are unavailable; try again later",
    Reason.UPSTREAM_UNAVAILABLE: "The upstream service is unavailable",
    Reason.UPSTREAM_TIMEOUT: "The upstream service did not answer in time",
    Reason.INTERNAL: "Internal error",
    Reason.CORS_ORIGIN: "This origin may not call this resource",
    Reason.CORS_METHOD: "This method is not allowed from another origin",
    Reason.CORS_HEADERS: "A requested header is not allowed from another origin",
    Reason.REVOKED: "The access token has been revoked",
    Reason.REVOCATION_UNAVAILABLE: "The revocation list is unavailable; try again later",
}


def _quote(value: str) -> str:
    # RFC 6750 §3 auth-params are quoted-strings; realm and scope come from our own config,
    # but escape anyway so a config value can never break the header's syntax.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def bearer_challenge(
    realm: str,
    *,
    error: str | None = None,
    description: str | None = None,
    scope: str | None = None,
) -> str:
    """The `WWW-Authenticate` value for a Bearer refusal (RFC 6750 §3)."""
    parts = [f"realm={_quote(realm)}"]
    if error is not None:
        parts.append(f"error={_quote(error)}")
    if description is not None:
        parts.append(f"error_description={_quote(description)}")
    if scope is not None:
        parts.append(f"scope={_quote(scope)}")
    return "Bearer " + ", ".join(parts)


class ProxyError(Exception):
    """Root of everything the request path can raise on purpose."""

    status: int = 500
    error_code: str | None = "server_error"

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self.reason]

    def fields(self) -> dict[str, str]:
        """What the client reads: the members of the JSON body, and the `error` and
        `error_description` of an `AuthError`'s challenge (the same, so they cannot disagree)."""
        if self.error_code is None:
            return {}
        return {"error": self.error_code, "error_description": self.description}


class AuthError(ProxyError):
    """The client's credentials do not let it through: answered with a Bearer challenge."""

    def challenge(self, realm: str) -> str:
        fields = self.fields()
        return bearer_challenge(realm, error=fields.get("error"), description=fields.get("error_description"))


class InvalidRequest(AuthError):
    status = 400
    error_code = "invalid_request"


class TokenMissing(AuthError):
    """No token at all: 401 and a bare challenge. RFC 6750 §3.1: a request without
    authentication information gets no error code or other error information, so the body
    (`{}`) claims none either: a client must not read "invalid_token" and discard a token it
    never sent."""

    status = 401
    error_code = None

    def __init__(self, detail: str = "") -> None:
        super().__init__(Reason.TOKEN_MISSING, detail)


class InvalidToken(AuthError):
    status = 401
    error_code = "invalid_token"


class InsufficientScope(AuthError):
    status = 403
    error_code = "insufficient_scope"

    def __init__(self, reason: Reason, detail: str = "", *, scope: str | None = None) -> None:
        super().__init__(reason, detail)
        self.scope = scope

    def challenge(self, realm: str) -> str:
        fields = self.fields()
        return bearer_challenge(
            realm, error=fields.get("error"), description=fields.get("error_description"), scope=self.scope
        )


class BadRequest(ProxyError):
    """The request itself is unacceptable before any question of identity (a bad path)."""

    status = 400
    error_code = "invalid_request"


class RequestTimeout(ProxyError):
    """The client stopped sending its body: 408, and the connection closes."""

    status = 408
    error_code = "request_timeout"

    def __init__(self, detail: str = "") -> None:
        super().__init__(Reason.BODY_TIMEOUT, detail)


class NotFound(ProxyError):
    status = 404
    error_code = "not_found"

    def __init__(self, detail: str = "") -> None:
        super().__init__(Reason.NO_ROUTE, detail)


class PayloadTooLarge(ProxyError):
    status = 413
    error_code = "payload_too_large"

    def __init__(self, detail: str = "") -> None:
        super().__init__(Reason.BODY_TOO_LARGE, detail)


class KeysUnavailable(ProxyError):
    """Our key source is down: a 503, never a 401, so an outage does not look like a bad token."""

    status = 503
    error_code = "temporarily_unavailable"

    def __init__(self, detail: str = "", reason: Reason = Reason.NO_KEYS) -> None:
        super().__init__(reason, detail)


class RevocationUnavailable(KeysUnavailable):
    """`revocation.fail: closed` and the list is older than `max_staleness`: the verdict cannot
    be given, so a 503 answered as a key outage is (`Retry-After`, counted as denied, logged
    once by the store rather than per request), never a 401 or a pass."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail, Reason.REVOCATION_UNAVAILABLE)


class UpstreamUnavailable(ProxyError):
    status = 502
    error_code = "bad_gateway"

    def __init__(self, detail: str = "", reason: Reason = Reason.UPSTREAM_UNAVAILABLE) -> None:
        super().__init__(reason, detail)


class UpstreamTimeout(UpstreamUnavailable):
    status = 504
    error_code = "gateway_timeout"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail, Reason.UPSTREAM_TIMEOUT)


class ConfigIssue:
    """One mistake in a config file: where it is, and what was expected there."""

    __slots__ = ("file", "line", "message", "path")

    def __init__(self, file: str, line: int | None, path: str, message: str) -> None:
        self.file = file
        self.line = line
        self.path = path
        self.message = message

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        # One line whatever the config holds: a name with a newline or an escape sequence
        # (YAML's "\e", "\n") is shown escaped, by check-config, at start-up and in the log.
        return one_line(f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}")


class ConfigError(Exception):
    """A config that must not be used. Its own root: it never reaches a request."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))
