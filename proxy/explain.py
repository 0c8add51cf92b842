"""`token explain`: run every check on one token and report each, instead of stopping at the first.

Owns: choosing the provider for a token (by name, or by its unverified `iss`), and the
step-by-step report. The checks themselves are verify.py's tables, run one by one, then the
provider's claim headers are rendered by identity.py, so the explanation can never disagree
with what the proxy decides. Does not own: printing (cli.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jwt.exceptions import PyJWTError

from .config import Provider, Settings
from .errors import InvalidToken, KeysUnavailable, Reason
from .identity import claim_headers
from .keys import KeySource
from .verify import CLAIM_CHECKS, HEADER_CHECKS, check_signature, decode_unverified, parse_payload, read_header

__all__ = ["Report", "Step", "choose_provider", "explain", "unverified_parts"]


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    ok: bool | None
    """True passed, False failed, None could not be run (an earlier step failed)."""
    detail: str = ""
    reason: Reason | None = None


@dataclass(slots=True)
class Report:
    provider: str | None
    header: Mapping[str, Any] | None
    payload: Mapping[str, Any] | None
    steps: list[Step] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)

    @property
    def first_failure(self) -> Step | None:
        return next((step for step in self.steps if step.ok is False), None)


def unverified_parts(token: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Header and payload decoded without any check, for display and provider choice only."""
    try:
        header, raw_payload = decode_unverified(token)
    except (PyJWTError, ValueError, RecursionError):
        # Also what PyJWT lets through: a token that is not UTF-8 (a surrogate from the command
        # line) and a header nested deeper than its JSON parser goes.
        return None, None
    try:
        return header, parse_payload(raw_payload)
    except InvalidToken:
        return header, None


def choose_provider(settings: Settings, payload: Mapping[str, Any] | None, name: str | None) -> Provider | None:
    if name is not None:
        return settings.providers.get(name)
    iss = payload.get("iss") if payload else None
    matches = [p for p in settings.providers.values() if iss in p.issuers]
    if matches:
        return matches[0]
    return next(iter(settings.providers.values())) if len(settings.providers) == 1 else None


async def explain(token: str, provider: Provider, source: KeySource, *, now: float, max_token_bytes: int) -> Report:
    header_fields, unverified_payload = unverified_parts(token)
    report = Report(provider=provider.name, header=header_fields, payload=unverified_payload)
    steps = report.steps

    def record(name: str, run: Any) -> None:
        try:
            run()
        except InvalidToken as error:
            steps.append(Step(name, False, error.detail, error.reason))
        else:
            steps.append(Step(name, True))

    header = None
    try:
        header = read_header(token, max_bytes=max_token_bytes)
        steps.append(Step("form", True, f"{len(token)} bytes, 3 segments, header decodes"))
    except InvalidToken as error:
        steps.append(Step("form", False, error.detail, error.reason))
    if header is not None:
        for name, check in HEADER_CHECKS:
            record(name, lambda check=check: check(header, provider))

    payload: dict[str, Any] | None = None
    signature_checked = False
    if header is not None and all(step.ok for step in steps):
        try:
            keys = await source.key_for(header.kid, header.alg)
        except (InvalidToken, KeysUnavailable) as error:
            steps.append(Step("key", False, error.detail or "the provider has no keys", error.reason))
        else:
            steps.append(Step("key", True, f"{len(keys)} key(s) for kid {header.kid!r}, alg {header.alg}"))
            signature_checked = True
            try:
                payload = check_signature(token, header, keys)
                steps.append(Step("signature", True, f"verified with {header.alg}"))
            except InvalidToken as error:
                steps.append(Step("signature", False, error.detail, error.reason))
    if not signature_checked:
        steps.append(Step("signature", None, "not checked: an earlier step failed"))
    if payload is None:
        # Claims are still checked, so one run shows everything wrong, but they prove nothing.
        payload = unverified_payload
    if payload is None:
        steps.extend(Step(name, None, "payload does not decode") for name, _ in (*CLAIM_CHECKS, ("headers", None)))
        return report
    for name, check in CLAIM_CHECKS:
        record(name, lambda check=check: check(payload, provider, now))
    # Then the proxy writes the claim headers and the payload header: a claim with no exact
    # header form (a control character, a lone surrogate, NaN) is a 401 unsafe_claim there.
    # The provider's map; a route with its own `headers:` renders that one instead.
    record("headers", lambda: claim_headers(payload, provider.headers))
    return report
