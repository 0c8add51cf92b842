"""Review (s8-rev2): the straight miss against the general way under key-set swaps while a
`_Checked` is held (same kid re-bound to another key or alg, kid-less keys, HS secrets next to
RSA keys, keys for another use), alg confusion and header spellings, in a random order."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import jwt

from proxy.auth.keys import key_source_for
from proxy.auth.verify import TokenCache, Verifier
from proxy.base.errors import InvalidToken
from proxy.base.jwks import KeySet
from proxy.config.builder import TokenCacheSettings
from tests.conftest import AUDIENCE, HS_SECRET, ISSUER, FakeClock, TestKey
from tests.unit.auth.test_verify import provider

ALGS = ("RS256", "PS256", "ES256", "EdDSA", "HS256", "RS512")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw(header: dict[str, Any] | bytes, claims: dict[str, Any], sign: Any) -> str:
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    signing_input = f"{_b64(h)}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _outcome(v: Verifier, token: str) -> Any:
    try:
        claims = v.verify_now(token)
    except InvalidToken as refused:
        return ("refused", refused.reason, refused.detail)
    if claims is None:
        return None
    return ("verified", dict(claims.header), dict(claims.payload), claims.until)


async def test_straight_and_general_agree_across_key_set_swaps(
    rsa_key: TestKey, rsa_key_2: TestKey, ec_key: TestKey, ed_key: TestKey, clock: FakeClock
) -> None:
    p = provider({"keys": [rsa_key.public_jwk]}, algorithms=ALGS)
    now = int(clock.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u", "iat": now, "exp": now + 300}
    oct_jwk = {"kty": "oct", "k": _b64(HS_SECRET), "alg": "HS256"}
    pem = rsa_key.public_pem()
    no_alg_rsa = {k: v for k, v in rsa_key.public_jwk.items() if k != "alg"}
    variants = [
        [rsa_key.public_jwk],
        [dict(rsa_key_2.public_jwk, kid=rsa_key.kid)],  # rotated under the same kid
        [dict(no_alg_rsa)],  # one RSA key, bound to RS256, PS256 and RS512
        [dict(rsa_key.public_jwk, alg="PS256")],  # same kid, same key, another alg
        [dict(rsa_key.public_jwk, kid=None)],  # kid-less
        [dict(rsa_key.public_jwk, use="enc")],
        [dict(rsa_key.public_jwk, key_ops=["encrypt"])],
        [dict(oct_jwk, kid=rsa_key.kid)],  # an HS secret under the RSA key's kid
        [dict(oct_jwk, kid=rsa_key.kid), rsa_key.public_jwk],
        [dict(oct_jwk, kid=rsa_key.kid, k=_b64(pem))],  # the RSA key's PEM as a secret
        [dict(ec_key.public_jwk, kid=rsa_key.kid), dict(ed_key.public_jwk, kid=rsa_key.kid)],
        [ec_key.public_jwk, ed_key.public_jwk, rsa_key.public_jwk, rsa_key_2.public_jwk],
        [dict(rsa_key.public_jwk, kid=None), dict(rsa_key_2.public_jwk, kid=None)],
        [],
    ]
    keysets = [KeySet.from_jwks({"keys": keys}, ALGS) for keys in variants]

    def rs(key: TestKey, alg: str) -> Any:
        return lambda m: jwt.get_algorithm_by_name(alg).sign(m, key.private)

    signers = {
        "rsa1-RS256": ("RS256", rs(rsa_key, "RS256")),
        "rsa1-PS256": ("PS256", rs(rsa_key, "PS256")),
        "rsa1-RS512": ("RS512", rs(rsa_key, "RS512")),
        "rsa2-RS256": ("RS256", rs(rsa_key_2, "RS256")),
        "ec": ("ES256", rs(ec_key, "ES256")),
        "ed": ("EdDSA", rs(ed_key, "EdDSA")),
        "hs": ("HS256", lambda m: jwt.get_algorithm_by_name("HS256").sign(m, HS_SECRET)),
        "hs-pem": ("HS256", lambda m: __import__("hmac").new(pem, m, "sha256").digest()),
        "hs-jwk": (
            "HS256",
            lambda m: __import__("hmac").new(json.dumps(rsa_key.public_jwk).encode(), m, "sha256").digest(),
        ),
    }
    header_kids: list[Any] = [rsa_key.kid, None, ec_key.kid, "unknown"]
    tokens = []
    for _name, (alg, sign) in signers.items():
        for kid in header_kids:
            for spelling in range(3):
                header: dict[str, Any] = {"alg": alg}
                if kid is not None:
                    header["kid"] = kid
                if spelling == 1:
                    header["typ"] = "JWT"
                raw_header: dict[str, Any] | bytes = header
                if spelling == 2:  # the same header, another spelling (whitespace)
                    raw_header = json.dumps(header).encode()
                tokens.append(_raw(raw_header, claims, sign))
    for token in list(tokens[::7]):  # some tampered ones
        h, pl, s = token.split(".")
        tokens.append(f"{h}.{pl}.{s[:-2]}{'A' if s[-2] != 'A' else 'B'}{s[-1]}")
        tokens.append(f"{h}.{_b64(json.dumps(dict(claims, sub='x')).encode())}.{s}")

    rng = random.Random(8)
    warm = Verifier(
        p, key_source_for(p, fetcher=None, clock=clock), clock=clock, cache=TokenCache(TokenCacheSettings(), clock)
    )
    warm._headers.bound = 256  # every header spelling of the corpus held (the default is 16)
    straight = verified = 0
    for step in range(6000):
        if step % 40 == 0:
            warm.source.keyset = rng.choice(keysets)
        token = rng.choice(tokens)
        fresh = Verifier(
            p, key_source_for(p, fetcher=None, clock=clock), clock=clock, cache=TokenCache(TokenCacheSettings(), clock)
        )
        fresh.source.keyset = warm.source.keyset
        known = warm._headers.get(token.partition(".")[0])
        expected = _outcome(fresh, token)
        got = _outcome(warm, token)
        if known is not None and known.keyset is warm.source.keyset and known.key is not None:
            straight += 1  # (bound, during the call, to this key set: the straight run)
        verified += got is not None and got[0] == "verified"
        assert got == expected, (step, token[:80], got, expected)
    assert straight > 300 and verified > 100, (straight, verified)


def test_put_keys_each_entry_on_its_own_text_when_lookups_interleave(clock: FakeClock) -> None:
    """`TokenCache.put` reuses the digest `get` computed only for the very token object it was
    computed for: another token looked up in between (an awaited key fetch) is no poisoning."""
    from proxy.auth.verify import Claims

    cache = TokenCache(TokenCacheSettings(), clock)
    a, b = "a" * 40 + ".x.y", "b" * 40 + ".x.y"
    same_text_as_a = "".join(["a" * 40, ".x.y"])  # equal text, another object
    assert cache.get("main", a) is None
    assert cache.get("main", b) is None  # the last digest is now b's
    ca = Claims("main", {}, {"exp": int(clock.time()) + 60})
    cache.put(a, ca, int(clock.time()) + 60)
    assert ca.digest == cache.digest(same_text_as_a) != cache.digest(b)
    assert cache.get("main", b) is None
    assert cache.get("main", same_text_as_a) is ca
    # a caller's exp is the token's own; a later one than max_ttl never extends the entry
    cb = Claims("main", {}, {"exp": int(clock.time()) + 10**9})
    cache.put(b, cb, int(clock.time()) + 10**9)
    assert cb.until <= clock.time() + TokenCacheSettings().max_ttl
