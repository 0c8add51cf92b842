"""verify.py's straight miss (`Verifier.verify_now` for a header seen before whose one key is
held) against the general way (`_header`, `_held`, `verify_signature`, a header not seen yet):
the same claims, the same cache entry, the same refusal (reason and words) on a corpus of good,
tampered and malformed tokens, and a new key set seen at once."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jwt import PyJWS

from proxy.auth.keys import key_source_for
from proxy.auth.verify import TokenCache, Verifier
from proxy.base.errors import InvalidToken
from proxy.base.jwks import KeySet
from proxy.config.builder import TokenCacheSettings
from tests.conftest import AUDIENCE, ISSUER, FakeClock, TestKey, jwks_of, mint
from tests.unit.auth.test_verify import b64, provider


def _outcome(v: Verifier, token: str) -> Any:
    try:
        claims = v.verify_now(token)
    except InvalidToken as refused:
        return ("refused", refused.reason, refused.detail)
    if claims is None:
        return None
    assert v.cache is not None and v.cache.get("main", token) is claims  # into the cache
    return ("verified", claims.provider, dict(claims.header), dict(claims.payload), claims.until)


def _signed(key: TestKey, payload: bytes, alg: str | None = None) -> str:
    return PyJWS().encode(payload, key.private, algorithm=alg or key.alg, headers={"kid": key.kid})


def _corpus(rsa_key: TestKey, ec_key: TestKey, ed_key: TestKey, other_rsa: TestKey, now: float) -> list[str]:
    good = mint(key=rsa_key, now=now)
    header, payload, signature = good.split(".")
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u", "exp": int(now) + 300}
    return [
        good,
        mint({"email": "a@b.c", "roles": {"admin": [1, {"x": "y"}]}}, key=rsa_key, now=now),
        mint(key=ec_key, now=now),
        mint(key=ed_key, now=now),
        mint({"exp": int(now) - 3600}, key=rsa_key, now=now),
        mint({"nbf": int(now) + 3600}, key=rsa_key, now=now),
        mint({"iat": int(now) + 3600}, key=rsa_key, now=now),
        mint({"aud": "someone-else"}, key=rsa_key, now=now),
        mint({"aud": [AUDIENCE, "x"]}, key=rsa_key, now=now),
        mint({"iss": "https://elsewhere/"}, key=rsa_key, now=now),
        mint({"exp": "9999999999"}, key=rsa_key, now=now),
        mint({"sub": 7}, key=rsa_key, now=now),
        mint({"exp": 1.5e300}, key=rsa_key, now=now),
        mint(key=rsa_key, omit=("exp",), now=now),
        mint(key=rsa_key, omit=("aud",), now=now),
        mint(key=other_rsa, headers={"kid": rsa_key.kid}, now=now),  # another key's signature
        mint(key=rsa_key, headers={"kid": "never-seen"}, now=now),
        # Signed payloads that are not one strict JSON object:
        _signed(rsa_key, b'{"iss":"%s","iss":"%s","aud":"%s"}' % (ISSUER.encode(), ISSUER.encode(), AUDIENCE.encode())),
        _signed(rsa_key, b'{"a":{"b":1,"b":2}}'),
        _signed(rsa_key, b"[1,2]"),
        _signed(rsa_key, b""),
        _signed(rsa_key, b'{"exp":NaN}'),
        _signed(rsa_key, b' {"iss":"%s","aud":"%s","exp":%d} ' % (ISSUER.encode(), AUDIENCE.encode(), int(now) + 60)),
        _signed(rsa_key, b"\xff\xfe"),
        _signed(rsa_key, json.dumps(claims).encode()),
        # The header segment as seen, the rest tampered or malformed:
        f"{header}.{payload}.{signature[:-8]}AAAAAAAA",
        f"{header}.{payload}.{signature[:-4]}",
        f"{header}.{payload}.{signature}==",
        f"{header}.{payload}.",
        f"{header}.{b64(json.dumps(claims))}.{signature}",
        f"{header}.{payload[:-1]}+.{signature}",
        f"{header}.{payload}x.{signature}",
        f"{header}.{payload}.{signature}.{signature}",
        f"{header}.{payload}{signature}",
        f"{header}..{signature}",
        f"{header}.{payload}.{signature[:-1]}{chr(ord(signature[-1]) ^ 1)}",
        f"{header}.{payload}.{signature}\u00e9",
        f"{header}",
        f"{header}.",
        f"{header}.{payload}.{signature}" + "A" * 9000,  # too large
    ]


async def test_the_straight_miss_answers_as_the_general_way(
    rsa_key: TestKey, ec_key: TestKey, ed_key: TestKey, rsa_key_2: TestKey, clock: FakeClock
) -> None:
    p = provider(jwks_of(rsa_key, ec_key, ed_key))

    def fresh() -> Verifier:
        return Verifier(
            p, key_source_for(p, fetcher=None, clock=clock), clock=clock, cache=TokenCache(TokenCacheSettings(), clock)
        )

    warm = fresh()
    for key in (rsa_key, ec_key, ed_key):  # each header segment seen once, its key bound
        assert warm.verify_now(mint(key=key, now=clock.time() - 1)) is not None
    straight = 0
    for token in _corpus(rsa_key, ec_key, ed_key, rsa_key_2, clock.time()):
        known = warm._headers.get(token.partition(".")[0])
        straight += known is not None and known.key is not None
        assert _outcome(warm, token) == _outcome(fresh(), token), token[:60]
    assert straight >= 30, "most of the corpus takes the straight run"


async def test_a_new_key_set_is_seen_by_the_straight_miss(
    rsa_key: TestKey, rsa_key_2: TestKey, clock: FakeClock
) -> None:
    p = provider(jwks_of(rsa_key))
    v = Verifier(p, key_source_for(p, fetcher=None, clock=clock), clock=clock)
    assert v.verify_now(mint(key=rsa_key, now=clock.time())) is not None
    # The same kid, another key (a rotation that kept the kid): the old key's tokens no longer verify.
    rotated = dict(rsa_key_2.public_jwk, kid=rsa_key.kid)
    v.source.keyset = KeySet.from_jwks({"keys": [rotated]}, p.algorithms)
    with pytest.raises(InvalidToken) as caught:
        v.verify_now(mint({"sub": "again"}, key=rsa_key, now=clock.time()))
    assert "does not match the signature" in caught.value.detail
    assert v.verify_now(mint(key=rsa_key_2, headers={"kid": rsa_key.kid}, now=clock.time())) is not None
    # Two keys for the kid: the general way (each key tried, each named in a refusal).
    v.source.keyset = KeySet.from_jwks({"keys": [rotated, dict(rsa_key.public_jwk, kid=None)]}, p.algorithms)
    assert v.verify_now(mint(key=rsa_key, now=clock.time())) is not None
