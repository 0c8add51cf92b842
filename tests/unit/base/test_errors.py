"""The answer to a refusal: its JSON body and its RFC 6750 challenge say the same thing.

For every exception class a refusal can be and every reason it can carry (more pairs than
the request path makes, so a new pairing cannot slip through), the challenge's `error` and
`error_description` are the body's, the status is RFC 6750's for the code, and a realm or
scope with quotes and backslashes comes back intact from the quoted-strings.
"""

from __future__ import annotations

import pytest

from proxy.base.errors import (
    AuthError,
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    ProxyError,
    Reason,
    TokenMissing,
)
from tests.integration.test_refusals import RFC6750_STATUS, parse_challenge

REALM = 'a "quoted" \\ realm'


def auth_errors() -> list[AuthError]:
    made: list[AuthError] = [TokenMissing(), TokenMissing("no Authorization")]
    for reason in Reason:
        made += [
            InvalidRequest(reason),
            InvalidToken(reason, "detail"),
            InsufficientScope(reason),
            InsufficientScope(reason, scope='admin "ops"'),
        ]
    return made


@pytest.mark.parametrize("error", auth_errors(), ids=lambda e: f"{type(e).__name__}-{e.reason}")
def test_the_challenge_says_what_the_body_says(error: AuthError) -> None:
    params = parse_challenge(error.challenge(REALM))
    assert params.pop("realm") == REALM
    scope = params.pop("scope", None)
    assert scope == getattr(error, "scope", None)
    body = error.fields()
    assert params == body
    if body:
        assert RFC6750_STATUS[body["error"]] == error.status
        assert body["error_description"] == error.description
    else:  # RFC 6750 §3.1: no credentials, no error information
        assert isinstance(error, TokenMissing) and error.status == 401


def test_only_a_missing_token_has_no_error_code() -> None:
    classes = set(_subclasses(ProxyError))
    assert {cls for cls in classes if cls.error_code is None} == {TokenMissing}


def _subclasses(cls: type) -> list[type]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _subclasses(sub)
    return found
