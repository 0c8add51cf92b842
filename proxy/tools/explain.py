"""`token explain`: say what an input is, then run every check the proxy runs on it and report each.

Owns: recognising what a pasted input is before any check (`inspect`: a signed JWT, or "not a
JWT" and why, in words); decoding its header and payload for display WITHOUT trusting them;
choosing the provider for a token (by name, by its unverified `iss`, or as a route's request
would: `route_provider`); the checks that need
no config (`explain_without_config`); and the step-by-step report in the proxy's order, with a
phrase for each step that passes. The checks themselves are verify.py's (the same functions,
in the proxy's order, so a failing step carries the very reason and detail the proxy logs as
"request ... refused: REASON: DETAIL"), then the revocation list's (revocation.py's `revoked`,
on the list the caller read once, naming the rules that revoke it), then identity.py renders
the provider's claim headers,
so the explanation can never disagree with what the proxy decides. Nothing after a signature
that did not verify is checked: its claims are "not checked". Does not own: reading files,
choosing the exit status or printing (cli.py).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, cast

from ..auth.keys import KeySource
from ..auth.revocation import RevocationIndex, format_time, revoked, revoking_rules
from ..auth.verify import (
    CLAIM_CHECKS,
    HEADER_CHECKS,
    TokenHeader,
    _is_number,
    _unbase64url,
    by_issuer,
    issuers_in_words,
    parse_payload,
    read_header,
    segment_problem,
    segments_problem,
    shown,
    verify_signature,
)
from ..base.errors import InvalidToken, KeysUnavailable, Reason
from ..base.jwks import SUPPORTED_ALGORITHMS
from ..config.settings import HeaderMap, Provider, Route, Settings
from ..request.identity import claim_headers

__all__ = [
    "CONFIG_CHECKS",
    "DEFAULT_MAX_TOKEN_BYTES",
    "Form",
    "Report",
    "RevocationList",
    "Step",
    "choose_provider",
    "explain",
    "explain_without_config",
    "inspect",
    "provider_problem",
    "route_provider",
    "when",
]

NOT_CHECKED_SIGNATURE = "not checked: signature failed"
CONFIG_CHECKS = (
    "the size limit (max_token_bytes)",
    "the alg allow-list",
    "typ",
    "the signature (the provider's keys)",
    "iss",
    "aud",
    "required claims",
    "exp, nbf and iat with the provider's leeway",
    "max_token_age",
    "the claim headers",
    "each route's rules (methods, scopes, claims)",
)
"""What `token explain` cannot check without a config, in the words it prints."""
# cast: the field has a default (dataclasses types it "or MISSING").
DEFAULT_MAX_TOKEN_BYTES = cast(int, next(f.default for f in fields(Settings) if f.name == "max_token_bytes"))
"""The size limit of a config that sets none: the one `token explain` applies without a config."""


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    ok: bool | None
    """True passed, False failed, None not run (an earlier step failed, or it needs a config)."""
    detail: str = ""
    reason: Reason | None = None


@dataclass(frozen=True, slots=True)
class Form:
    """What the input is, before any check and without any config."""

    size: int
    problem: str | None = None
    """"not a JWT: ..." when the input is no JWS compact token the proxy could read; else None."""
    header: dict[str, Any] | None = None
    payload: dict[str, Any] | None = None
    """The payload, decoded but not verified; None when it does not decode (`payload_problem`)."""
    payload_problem: str | None = None
    signature_problem: str | None = None
    """Why the signature segment is not the one base64url spelling the proxy reads, or None:
    the proxy refuses that whatever its config, so it is said without one too."""

    @property
    def summary(self) -> str:
        if self.problem is not None:
            return self.problem
        assert self.header is not None
        alg = self.header.get("alg")
        what = f"alg {shown(alg)}" if "alg" in self.header else "no alg"
        kid = f"kid {shown(self.header['kid'])}" if "kid" in self.header else "no kid"
        return f"a JWT (JWS compact serialization, 3 segments, {self.size} bytes): {what}, {kid}"


@dataclass(frozen=True, slots=True)
class RevocationList:
    """The configured revocation list as `token explain` read it, once: its rules, or why not."""

    origin: str
    """Where it is kept, in words (`file /etc/jwt-sidecar/revoked.yaml`, `Redis redis://h:6379/0`)."""
    index: RevocationIndex | None
    problem: str = ""
    """Why it could not be read (index None)."""


@dataclass(slots=True)
class Report:
    form: Form
    provider: str | None
    steps: list[Step] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)

    @property
    def first_failure(self) -> Step | None:
        return next((step for step in self.steps if step.ok is False), None)


# -- what the input is ---------------------------------------------------------------------
def _looks_like(token: str) -> str:
    """A hint for a one-segment input: what it looks like instead."""
    text = token.strip()
    if text.startswith("{"):
        return "; it is JSON text, not a token (a JWT's parts are base64url-encoded)"
    if any(char.isspace() for char in text):
        return "; it contains whitespace, which no JWT does"
    return ""


def inspect(token: str) -> Form:
    """What `token` is, decoded without any check and without a config; see `Form`."""
    size = len(token)
    if not token:
        return Form(size, "not a JWT: the input is empty")
    if len(token) > 1 and token[0] == token[-1] and token[0] in "\"'":
        return Form(size, "not a JWT: it is in quotes; give the token without them")
    parts = token.split(".")
    if len(parts) != 3:
        if len(parts) == 5:
            jwe_header = _json_object(parts[0])
            if jwe_header is not None and "enc" in jwe_header:
                return Form(
                    size,
                    f"not a JWT the proxy accepts: 5 segments, an encrypted JWT (JWE, RFC 7516, "
                    f"enc {shown(jwe_header['enc'])}); the proxy accepts only signed JWTs (JWS, 3 segments)",
                )
        hint = _looks_like(token) if len(parts) == 1 else ""
        return Form(size, f"not a JWT: {segments_problem(len(parts))}{hint}")
    try:
        header = read_header(token, max_bytes=len(token))
    except InvalidToken as error:  # the proxy's own words
        return Form(size, _header_words(parts[0], error.detail))
    payload: dict[str, Any] | None = None
    problem = segment_problem(parts[1], "payload")
    if problem is None:
        try:
            payload = parse_payload(_unbase64url(parts[1].encode("ascii")) or b"")  # segment_problem said it decodes
        except InvalidToken as error:
            problem = error.detail
    return Form(size, None, dict(header.fields), payload, problem, segment_problem(parts[2], "signature"))


def _header_words(segment: str, detail: str) -> str:
    if detail.startswith("not a JWT"):
        return detail
    what = detail.removeprefix("header: ")
    if what == "not a JSON object":  # say what it is instead
        value = json.loads(_unbase64url(segment.encode()) or b"")  # read_header decoded it
        kind = _JSON_KINDS.get(type(value), "a JSON value")
        return f"not a JWT: the header is {kind}, not a JSON object"
    if what == "empty":
        return "not a JWT: the header segment is empty"
    if what.startswith("not "):
        return f"not a JWT: the header is {what}"
    return f"not a JWT: the header is not strict JSON: {what}"


_JSON_KINDS = {
    list: "a JSON array",
    str: "a JSON string",
    int: "a JSON number",
    float: "a JSON number",
    bool: "a JSON boolean",
    type(None): "JSON null",
}


def _json_object(segment: str) -> dict[str, Any] | None:
    if segment_problem(segment, "header") is not None:
        return None
    try:
        return dict(read_header(f"{segment}..", max_bytes=len(segment) + 2).fields)
    except InvalidToken:
        return None


# -- choosing the provider -----------------------------------------------------------------
def choose_provider(settings: Settings, payload: Mapping[str, Any] | None, name: str | None) -> Provider | None:
    if name is not None:
        return settings.providers.get(name)
    iss = payload.get("iss") if payload else None
    matches = [p for p in settings.providers.values() if isinstance(iss, str) and iss in p.issuers]
    if matches:
        return matches[0]
    return next(iter(settings.providers.values())) if len(settings.providers) == 1 else None


def provider_problem(settings: Settings, payload: Mapping[str, Any] | None) -> tuple[str, Reason]:
    """Why no provider was chosen for a token (`choose_provider` gave None), and the reason
    every provider of this config would give."""
    issuers = "; ".join(f"{p.name}: {', '.join(p.issuers)}" for p in settings.providers.values())
    if not settings.providers:
        return "the config has no providers, so no token is accepted", Reason.ISSUER
    if payload is None:
        return (
            f"the payload does not decode, so its iss cannot choose a provider (issuers: {issuers})",
            Reason.MALFORMED,
        )
    if "iss" not in payload or payload["iss"] is None:
        return f"the token has no iss, so no provider can be chosen by it (issuers: {issuers})", Reason.MISSING_CLAIM
    return f"no provider accepts iss {shown(payload['iss'])} (issuers: {issuers})", Reason.ISSUER


def route_provider(settings: Settings, route: Route, token: str) -> Provider:
    """The provider that verifies `token` on `route`, chosen as the proxy chooses: the route's
    `provider`, or with `providers:` the one the token's unverified iss names (`by_issuer`,
    the proxy's own function); `InvalidToken` with the proxy's reason when it names none."""
    assert route.auth is not None
    if not route.auth.providers:
        return settings.providers[route.auth.provider]
    providers = [settings.providers[name] for name in route.auth.providers]
    table = {iss: provider for provider in providers for iss in provider.issuers}
    return by_issuer(token, table, issuers_in_words(providers), max_bytes=settings.max_token_bytes)


# -- the checks ----------------------------------------------------------------------------
def when(value: Any, now: float) -> str:
    """A NumericDate as an operator reads it: `2026-12-03T09:13:09Z (in 4m 59s)`."""
    if not _is_number(value):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return f"{shown(value)} ({'a number beyond any date' if number else 'not a JSON number'})"
    try:
        stamp = datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{shown(value)} (beyond any calendar date)"
    delta = value - now
    return f"{stamp} ({'in ' + _span(delta) if delta > 0 else _span(-delta) + ' ago' if delta < 0 else 'now'})"


def _span(seconds: float) -> str:
    seconds = round(seconds)
    for unit, size, smaller, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            rest = (seconds % size) // small_size
            return f"{seconds // size}{unit}" + (f" {rest}{smaller}" if rest else "")
    return f"{seconds}s"


def _keys(count: int) -> str:
    return f"{count} key{'s' if count != 1 else ''}"


def _kid_words(kid: Any) -> str:
    return "no kid" if kid is None else f"kid {shown(kid)}"


def _date_passed(name: str, verb: str) -> Callable[[Mapping[str, Any], Provider, float], str]:
    def passed(payload: Mapping[str, Any], provider: Provider, now: float) -> str:
        if name not in payload:
            return f"no {name} claim"
        return f"{verb} {when(payload[name], now)}; leeway {provider.leeway:g}s"

    return passed


def _age_passed(payload: Mapping[str, Any], provider: Provider, now: float) -> str:
    if provider.max_token_age is None:
        return "no limit: the provider sets no max_token_age"
    return f"lifetime exp - iat is {payload['exp'] - payload['iat']:.0f}s; the limit is {provider.max_token_age:g}s"


def _aud_passed(payload: Mapping[str, Any], provider: Provider, now: float) -> str:
    aud = payload["aud"]
    matched = next(v for v in ([aud] if isinstance(aud, str) else aud) if v in provider.audiences)
    return f"aud {shown(aud)} includes {matched!r}"


_HEADER_PASSED: dict[str, Callable[[TokenHeader, Provider], str]] = {
    "alg": lambda h, p: f"{h.alg} is in the allow-list {list(p.algorithms)}",
    "kid": lambda h, p: f"kid {shown(h.kid)}" if h.kid is not None else "no kid: every key for the alg is tried",
    "typ": lambda h, p: (
        f"typ {shown(h.fields['typ'])} is {p.typ!r}" if p.typ is not None else "the provider requires no typ"
    ),
    "crit": lambda h, p: "no crit or b64 parameter",
}
_CLAIM_PASSED: dict[str, Callable[[Mapping[str, Any], Provider, float], str]] = {
    "numeric dates": lambda c, p, n: (
        ", ".join(d for d in ("exp", "nbf", "iat") if d in c) + " are JSON numbers"
        if any(d in c for d in ("exp", "nbf", "iat"))
        else "no exp, nbf or iat"
    ),
    "required claims": lambda c, p, n: ", ".join(("iss", "aud", *p.required_claims)) + " present",
    "exp": _date_passed("exp", "expires"),
    "nbf": _date_passed("nbf", "valid from"),
    "iat": _date_passed("iat", "issued"),
    "max_token_age": _age_passed,
    "iss": lambda c, p, n: f"iss {shown(c['iss'])} is accepted",
    "aud": _aud_passed,
    "sub": lambda c, p, n: f"sub {shown(c['sub'])}" if "sub" in c else "no sub claim",
}


async def explain(
    token: str,
    provider: Provider,
    source: KeySource,
    *,
    now: float,
    max_token_bytes: int,
    revocation: RevocationList | None = None,
    headers: HeaderMap | None = None,
) -> Report:
    """Every check the proxy runs for `provider`, in its order, each reported (the revocation
    list's after the claims, when the config has one: `revocation`, read once by the caller;
    `headers`: the map a route renders instead of the provider's own).

    The header checks all run (they are independent); the key, the signature, the payload
    and the claims each run only once everything before them passed, as in the proxy, so
    nothing read from an unverified payload is ever said to pass."""
    form = inspect(token)
    report = Report(form=form, provider=provider.name)
    steps = report.steps
    if form.problem is not None:
        reason = Reason.TOO_LARGE if len(token) > max_token_bytes else Reason.MALFORMED
        steps.append(Step("form", False, form.problem, reason))
        return report
    if len(token) > max_token_bytes:
        steps.append(
            Step("size", False, f"token is {len(token)} bytes; the limit is {max_token_bytes}", Reason.TOO_LARGE)
        )
    else:
        steps.append(Step("size", True, f"{len(token)} bytes; the limit is {max_token_bytes}"))
    header = read_header(token, max_bytes=len(token))  # `inspect` read it: this cannot fail
    for name, check in HEADER_CHECKS:
        try:
            check(header, provider)
        except InvalidToken as error:
            steps.append(Step(name, False, error.detail, error.reason))
        else:
            steps.append(Step(name, True, _HEADER_PASSED[name](header, provider)))

    payload: dict[str, Any] | None = None
    refused = report.first_failure
    if refused is not None:
        steps.append(Step("key", None, f"not checked: the {refused.name} check failed"))
    else:
        try:
            keys = await source.key_for(header.kid, header.alg)
        except (InvalidToken, KeysUnavailable) as error:
            steps.append(Step("key", False, error.detail or "the provider has no keys", error.reason))
        else:
            steps.append(Step("key", True, f"{_keys(len(keys))} for {_kid_words(header.kid)} and alg {header.alg}"))
            try:
                raw = verify_signature(token, header, keys)
            except InvalidToken as error:
                steps.append(Step("signature", False, error.detail, error.reason))
            else:
                steps.append(Step("signature", True, f"verified ({header.alg})"))
                try:
                    payload = parse_payload(raw)
                except InvalidToken as error:
                    steps.append(Step("payload", False, error.detail, error.reason))
                else:
                    steps.append(Step("payload", True, f"a JSON object of {len(payload)} claims"))
    if payload is None:
        failed = next(s for s in steps if s.ok is False)
        why = NOT_CHECKED_SIGNATURE if failed.name == "signature" else f"not checked: the {failed.name} check failed"
        done = {s.name for s in steps}
        steps.extend(Step(name, None, why) for name in ("key", "signature", "payload") if name not in done)
        later = (*CLAIM_CHECKS, ("revocation", None)) if revocation is not None else CLAIM_CHECKS
        steps.extend(Step(name, None, why) for name, _ in (*later, ("headers", None)))
        return report
    for name, claim_check in CLAIM_CHECKS:
        try:
            claim_check(payload, provider, now)
        except InvalidToken as error:
            steps.append(Step(name, False, error.detail, error.reason))
        else:
            steps.append(Step(name, True, _CLAIM_PASSED[name](payload, provider, now)))
    if revocation is not None:
        steps.append(_revocation_step(revocation, provider, payload))
    # Then the proxy writes the claim headers and the payload header: a claim with no exact
    # header form (a control character, a lone surrogate, NaN) is a 401 unsafe_claim there.
    # The provider's map; a route with its own `headers:` renders that one instead.
    try:
        rendered = claim_headers(payload, headers or provider.headers, provider.name)
    except InvalidToken as error:
        steps.append(Step("headers", False, error.detail, error.reason))
    else:
        names = ", ".join(name for name, _ in rendered)
        steps.append(Step("headers", True, f"forwarded as {names}" if names else "no claim header to forward"))
    return report


def _revocation_step(revocation: RevocationList, provider: Provider, payload: Mapping[str, Any]) -> Step:
    """Whether the configured list revokes the token, and by which rule (never its sub or jti)."""
    if not provider.revocation:
        return Step("revocation", True, f"provider {shown(provider.name)} opts out (revocation: false)")
    if revocation.index is None:
        return Step("revocation", None, f"the list in {revocation.origin} could not be read: {revocation.problem}")
    why = revoked(revocation.index, provider.name, payload)
    if why is None:
        rules = len(revocation.index)
        return Step(
            "revocation",
            True,
            f"not revoked by the {rules} rule{'' if rules == 1 else 's'} in {revocation.origin} "
            "(routes with revocation: false do not check)",
        )
    words = "; ".join(
        rule.describe() + (f", until {format_time(rule.expires)}" if rule.expires is not None else ", no expiry")
        for rule in revoking_rules(revocation.index, provider.name, payload)
    )
    return Step("revocation", False, f"{why}, by the list in {revocation.origin}: rule: {words}", Reason.REVOKED)


def explain_without_config(form: Form) -> Report:
    """The checks that every config makes the same, for a token read with no config.

    A JWT the proxy could read (`form.problem` is None). The alg must be one the proxy
    supports at all (no config allows `none`), the kid a string, and no crit or b64; all
    else needs a provider (`CONFIG_CHECKS`)."""
    assert form.header is not None
    report = Report(form=form, provider=None)
    header = TokenHeader(alg=form.header.get("alg"), kid=form.header.get("kid"), fields=form.header)
    alg = header.alg
    if not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS:
        what = (
            "the header has no alg" if "alg" not in form.header else f"alg {shown(alg)} is not one the proxy supports"
        )
        report.steps.append(
            Step(
                "alg",
                False,
                f"{what}; no config can allow it ({', '.join(SUPPORTED_ALGORITHMS)} are supported)",
                Reason.ALG_NOT_ALLOWED,
            )
        )
    else:
        report.steps.append(Step("alg", None, f"needs a config: is {alg} in the provider's allow-list?"))
    for name, check in HEADER_CHECKS:
        if name not in ("kid", "crit"):
            continue
        try:
            check(header, None)  # type: ignore[arg-type]  # these two read no provider setting
        except InvalidToken as error:
            report.steps.append(Step(name, False, error.detail, error.reason))
        else:
            report.steps.append(Step(name, True, _HEADER_PASSED[name](header, None)))  # type: ignore[arg-type]
    if form.signature_problem is not None:  # no key can verify a segment the proxy cannot read
        report.steps.append(Step("signature", False, form.signature_problem, Reason.MALFORMED))
        report.steps.append(Step("claims", None, "not checked: signature failed"))
    else:
        report.steps.append(Step("signature", None, "needs a config: the provider's keys"))
        report.steps.append(Step("claims", None, "needs a config: iss, aud, required claims, exp/nbf/iat with leeway"))
    return report
