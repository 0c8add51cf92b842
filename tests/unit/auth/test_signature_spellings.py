"""One ECDSA token, two texts: (r, s) and (r, n - s) both verify (RFC 7518 §3.4 asks for no
low S, and PyJWT and OpenSSL accept both), so a holder of an ES token can write a second text
of it. What that touches, and why it is harmless here: the token cache keys on the text, so
each text is an entry verified on its own (the cache never answers for a text it did not
verify); revocation keys on claims (jti, sub, iat), so a rule refuses both texts, cached or not.
Base64url has one spelling per byte string (verify.py `_unbase64url`); the signature bytes
themselves do not, and tests/unit/base/test_jwk.py shows the other forms (DER, S + n, a byte
more or less, Ed25519's S + L) refused.
"""

from __future__ import annotations

import base64

from proxy.auth.revocation import RevocationIndex, make_rule, revoked
from proxy.auth.verify import TokenCache
from proxy.config.builder import TokenCacheSettings
from tests.conftest import FakeClock, TestKey, jwks_of, mint
from tests.unit.auth.test_verify import provider, verifier

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def other_spelling(token: str) -> str:
    """The same ES256 token with S replaced by n - S: the other valid signature of the same message."""
    head, body, signature = token.split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    r, s = raw[:32], int.from_bytes(raw[32:], "big")
    return f"{head}.{body}.{b64(r + (P256_ORDER - s).to_bytes(32, 'big'))}"


async def test_both_ecdsa_spellings_verify_are_cached_apart_and_are_revoked_together(
    ec_key: TestKey, clock: FakeClock
) -> None:
    cache = TokenCache(TokenCacheSettings(max_entries=10, max_ttl=300.0), clock)
    v = verifier(provider(jwks_of(ec_key)), clock, cache)
    token = mint({"jti": "t-1"}, key=ec_key, now=clock.time())
    twin = other_spelling(token)
    assert twin != token
    first, second = await v.verify(token), await v.verify(twin)
    assert dict(first.payload) == dict(second.payload), "one token: the same claims"
    assert (cache.misses, len(cache)) == (2, 2), "each text verified on its own, never one for the other"
    assert await v.verify(twin) is second and cache.hits == 1
    index = RevocationIndex([make_rule(jti="t-1")])
    assert revoked(index, "main", first.payload) is not None
    assert revoked(index, "main", second.payload) is not None, "revocation keys on claims: both texts"
