"""A route's authorisation rules, applied to claims that are already verified.

Owns: reading scopes from a payload (RFC 9068 §2.2.3 / RFC 8693 §4.2 `scope` string, split
on SP alone as RFC 6749 §3.3 says, or a `scp`/`scope` list as Azure AD and Okta issue
them), walking dotted claim paths, and the
claim operators (equals, one_of, contains, matches, present), and which claims of a
provider's verified tokens anything reads after verification (`claims_read`: what a cached
token keeps). A failure is an
`InsufficientScope` (403), never an `InvalidToken`: the token is fine, it just does not
grant this. Does not own: where claims came from or whether they are genuine (verify.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..base.errors import InsufficientScope, Reason
from ..config.settings import ClaimRule, RouteAuth, ScopeRule, Settings

__all__ = ["ABSENT", "check_route", "claim_at", "claims_read", "rule_holds", "scopes_of"]


class _Absent:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()


_PLAIN_MAPPINGS = (dict, MappingProxyType)


def claim_at(payload: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at a dotted path (`realm_access.roles`), or ABSENT."""
    value: Any = payload
    for part in path:
        # The plain types first: an isinstance against the Mapping ABC is several times slower.
        if not (isinstance(value, (_PLAIN_MAPPINGS, Mapping))) or part not in value:
            return ABSENT
        value = value[part]
    return value


def scopes_of(payload: Mapping[str, Any]) -> frozenset[str]:
    """Every scope the token grants, from `scope` and `scp`, string or list.

    A string is split on SP (U+0020) alone: RFC 6749 §3.3 separates scope tokens with
    %x20 and nothing else, so `read<TAB>admin` or `read<NBSP>admin` is one scope token
    (which no route names: config/builder.py admits only RFC 6749 scope tokens), never `admin`.
    `str.split()` would split on every Unicode whitespace. A list item is one scope token,
    verbatim (`["read admin"]` grants neither), and items that are not strings grant nothing.
    """
    found: set[str] = set()
    for name in ("scope", "scp"):
        value = payload.get(name)
        if isinstance(value, str):
            found.update(value.split(" "))
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    found.discard("")  # between two spaces, or before or after: not a scope
    return frozenset(found)


def _same(a: Any, b: Any) -> bool:
    # YAML `true` must not equal a claim of 1, nor `1` equal true: Python says True == 1.
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def rule_holds(rule: ClaimRule, payload: Mapping[str, Any]) -> bool:
    value = claim_at(payload, rule.path)
    if rule.op == "present":
        return (value is not ABSENT and value is not None) is rule.value
    if value is ABSENT:
        return False
    if rule.op == "equals":
        return _same(value, rule.value)
    if rule.op == "one_of":
        return any(_same(value, option) for option in rule.value)
    if rule.op == "contains":
        return isinstance(value, list) and any(_same(item, rule.value) for item in value)
    if rule.op == "matches":
        return isinstance(value, str) and rule.value.fullmatch(value) is not None
    raise ValueError(f"unknown claim operator {rule.op!r}")  # config/builder.py admits none other


def _check_scopes(rule: ScopeRule, payload: Mapping[str, Any]) -> None:
    if not rule.all_of and not rule.any_of:
        return
    granted = scopes_of(payload)
    missing = [s for s in rule.all_of if s not in granted]
    any_ok = not rule.any_of or any(s in granted for s in rule.any_of)
    if missing or not any_ok:
        required = " ".join((*rule.all_of, *rule.any_of))
        detail = (f"missing scopes {missing}" if missing else "") + (
            f"{'; ' if missing else ''}none of {list(rule.any_of)}" if not any_ok else ""
        )
        raise InsufficientScope(Reason.SCOPE, detail, scope=required)


def check_route(auth: RouteAuth, payload: Mapping[str, Any]) -> None:
    """Raise `InsufficientScope` unless the claims satisfy the route's scopes and claim rules."""
    _check_scopes(auth.scopes, payload)
    for rule in auth.claims:
        if not rule_holds(rule, payload):
            raise InsufficientScope(Reason.CLAIM_RULE, f"claim rule {rule.claim} {rule.op} failed")


# What reads a verified token's claims after verification, besides the routes' rules and the
# header maps: by_issuer's choice from a cached entry (iss), the access log's subject (sub),
# a WebSocket tunnel's deadline (exp), and the revocation list (jti, sub, iss, iat).
_ALWAYS_READ = frozenset({"iss", "sub", "exp"})
_REVOCATION_READS = frozenset({"jti", "sub", "iss", "iat"})


def claims_read(settings: Settings, provider: str) -> frozenset[str] | None:
    """The top-level claims of `provider`'s verified tokens that anything reads once they are
    verified, on any route that accepts them; None: all of them (a header map forwards the
    whole payload). A cached token keeps these alone (auth/verify.py `Verifier`): claims
    nothing reads are not kept for the token's lifetime in the cache.

    Every reader is named here: a route's scopes (`scope`, `scp`) and claim rules (the first
    name of each path), the claim headers of every header map that renders these tokens (the
    provider's, and each such route's own), the revocation list when one is configured, and
    `_ALWAYS_READ`. tests/unit/auth/test_rules.py checks each against a token's full claims."""
    read = set(_ALWAYS_READ)
    if settings.revocation is not None:
        read |= _REVOCATION_READS
    maps = [settings.providers[provider].headers]
    for route in settings.routes:
        auth = route.auth
        if auth is None or provider not in auth.names:
            continue
        if route.headers is not None:
            maps.append(route.headers)
        if auth.scopes.all_of or auth.scopes.any_of:
            read |= {"scope", "scp"}
        read.update(rule.path[0] for rule in auth.claims)
    for header_map in maps:
        if header_map.payload:
            return None
        read.update(claim.path[0] for claim in header_map.claims)
    return frozenset(read)
