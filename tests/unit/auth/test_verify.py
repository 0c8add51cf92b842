"""verify.py: every check, each failure asserting the Reason it hit; the token cache."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from aiohttp import web
from jwt import PyJWS

from proxy.auth.keys import key_source_for
from proxy.auth.verify import TokenCache, Verifier
from proxy.base.errors import InvalidToken, KeysUnavailable, Reason
from proxy.config.builder import Provider, StaticKeys, TokenCacheSettings
from proxy.http.fetch import Fetcher
from tests.conftest import AUDIENCE, HS_SECRET, ISSUER, FakeClock, TestKey, jwks_of, mint


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def raw_token(header: Any, payload: Any, signature: bytes = b"") -> str:
    return ".".join((b64(json.dumps(header)), b64(json.dumps(payload)), b64(signature)))


def provider(jwks: dict[str, Any], **overrides: Any) -> Provider:
    fields: dict[str, Any] = {
        "name": "main",
        "issuers": (ISSUER,),
        "audiences": (AUDIENCE, "api://other"),
        "algorithms": ("RS256", "PS256", "ES256", "EdDSA"),
        "keys": StaticKeys(kind="jwks_file", origin="test", jwks=jwks),
        "leeway": 30.0,
    }
    fields.update(overrides)
    return Provider(**fields)


def verifier(p: Provider, clock: FakeClock, cache: TokenCache | None = None) -> Verifier:
    return Verifier(p, key_source_for(p, fetcher=None, clock=clock), clock=clock, cache=cache)


@pytest.fixture
def keys(rsa_key: TestKey, ec_key: TestKey, ed_key: TestKey) -> dict[str, Any]:
    return jwks_of(rsa_key, ec_key, ed_key)


async def reason_of(v: Verifier, token: str) -> Reason:
    with pytest.raises(InvalidToken) as caught:
        await v.verify(token)
    assert caught.value.detail, "every refusal carries operator detail"
    return caught.value.reason


# -- tokens that pass ----------------------------------------------------------------------
@pytest.mark.parametrize("which", ["rsa_key", "ec_key", "ed_key"])
async def test_valid_token_for_each_asymmetric_algorithm(
    which: str, keys: dict, clock: FakeClock, request: pytest.FixtureRequest
) -> None:
    key: TestKey = request.getfixturevalue(which)
    claims = await verifier(provider(keys), clock).verify(mint({"email": "a@b.c"}, key=key, now=clock.time()))
    assert claims.subject == "user-42"
    assert claims.payload["email"] == "a@b.c"
    assert claims.header["kid"] == key.kid


async def test_ps256_with_an_rsa_key_that_declares_no_alg(rsa_key: TestKey, clock: FakeClock) -> None:
    jwk = {k: v for k, v in rsa_key.public_jwk.items() if k != "alg"}
    p = provider({"keys": [jwk]})
    claims = await verifier(p, clock).verify(mint(key=rsa_key, alg="PS256", now=clock.time()))
    assert claims.header["alg"] == "PS256"


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_secret_provider(alg: str, clock: FakeClock) -> None:
    k = b64(HS_SECRET)
    p = provider(
        {"keys": [{"kty": "oct", "k": k}]},
        algorithms=("HS256", "HS384", "HS512"),
        keys=StaticKeys(kind="secret", origin="test", jwks={"keys": [{"kty": "oct", "k": k}]}),
    )
    claims = await verifier(p, clock).verify(mint(alg=alg, now=clock.time(), headers={"kid": None}))
    assert claims.provider == "main"


async def test_token_without_kid_is_tried_against_every_key_of_its_type(
    rsa_key: TestKey, rsa_key_2: TestKey, clock: FakeClock
) -> None:
    p = provider(jwks_of(rsa_key, rsa_key_2))
    token = mint(key=rsa_key_2, now=clock.time(), headers={"kid": None})
    assert (await verifier(p, clock).verify(token)).subject == "user-42"


async def test_expired_within_leeway_passes_and_beyond_fails(keys: dict, rsa_key: TestKey, clock: FakeClock) -> None:
    v = verifier(provider(keys), clock)
    token = mint({"exp": int(clock.time()) - 10}, key=rsa_key, now=clock.time() - 100)
    assert (await v.verify(token)).subject == "user-42"
    late = mint({"exp": int(clock.time()) - 31}, key=rsa_key, now=clock.time() - 100)
    assert await reason_of(v, late) is Reason.EXPIRED


async def test_audience_any_of_list_claim(keys: dict, rsa_key: TestKey, clock: FakeClock) -> None:
    token = mint({"aud": ["api://unrelated", "api://other"]}, key=rsa_key, now=clock.time())
    assert (await verifier(provider(keys), clock).verify(token)).payload["aud"][1] == "api://other"


@pytest.mark.parametrize("typ", ["at+jwt", "application/at+jwt", "AT+JWT"])
async def test_required_typ_accepts_rfc9068_spellings(typ: str, keys: dict, rsa_key: TestKey, clock: FakeClock) -> None:
    token = mint(key=rsa_key, now=clock.time(), headers={"typ": typ})
    assert (await verifier(provider(keys, typ="at+jwt"), clock).verify(token)).subject == "user-42"


# -- the table of bad tokens ----------------------------------------------------------------
def _now() -> int:
    import time

    return int(time.time())


BAD_TOKENS: list[tuple[str, Any, Reason]] = [
    # (id, factory(rsa_key, now) -> token, reason)
    (
        "alg none",
        lambda k, n: raw_token({"alg": "none"}, {"iss": ISSUER, "aud": AUDIENCE, "exp": n + 60}),
        Reason.ALG_NOT_ALLOWED,
    ),
    (
        "alg None",
        lambda k, n: raw_token({"alg": "None"}, {"iss": ISSUER, "aud": AUDIENCE, "exp": n + 60}),
        Reason.ALG_NOT_ALLOWED,
    ),
    (
        "alg NONE",
        lambda k, n: raw_token({"alg": "NONE"}, {"iss": ISSUER, "aud": AUDIENCE, "exp": n + 60}),
        Reason.ALG_NOT_ALLOWED,
    ),
    (
        "alg nOnE with kid",
        lambda k, n: raw_token({"alg": "nOnE", "kid": k.kid}, {"iss": ISSUER, "aud": AUDIENCE, "exp": n + 60}),
        Reason.ALG_NOT_ALLOWED,
    ),
    ("no alg", lambda k, n: raw_token({"kid": k.kid}, {"iss": ISSUER}), Reason.ALG_NOT_ALLOWED),
    ("HS256 signed with the RSA public PEM", lambda k, n: _hs_with_pem(k, n), Reason.ALG_NOT_ALLOWED),
    ("unknown kid", lambda k, n: mint(key=k, now=n, headers={"kid": "nobody"}), Reason.UNKNOWN_KID),
    ("kid not a string", lambda k, n: raw_token({"alg": "RS256", "kid": 7}, {"iss": ISSUER}, b"sig"), Reason.MALFORMED),
    ("2 segments", lambda k, n: ".".join(mint(key=k, now=n).split(".")[:2]), Reason.MALFORMED),
    ("4 segments", lambda k, n: mint(key=k, now=n) + ".AAAA", Reason.MALFORMED),
    ("empty", lambda k, n: "", Reason.MALFORMED),
    ("bad base64 header", lambda k, n: "!!!." + mint(key=k, now=n).split(".", 1)[1], Reason.MALFORMED),
    ("bad base64 payload", lambda k, n: _replace_segment(mint(key=k, now=n), 1, "a*b"), Reason.MALFORMED),
    ("non-JSON header", lambda k, n: b64("not json") + "." + mint(key=k, now=n).split(".", 1)[1], Reason.MALFORMED),
    ("header is a JSON list", lambda k, n: b64("[1]") + "." + mint(key=k, now=n).split(".", 1)[1], Reason.MALFORMED),
    ("non-JSON payload", lambda k, n: _sign_raw(k, b"not json"), Reason.MALFORMED),
    ("payload is a JSON list", lambda k, n: _sign_raw(k, b"[1, 2]"), Reason.MALFORMED),
    (
        "tampered payload",
        lambda k, n: _replace_segment(
            mint(key=k, now=n), 1, b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "admin", "exp": n + 60}))
        ),
        Reason.BAD_SIGNATURE,
    ),
    ("signature of another key, same kid", lambda k, n: _other_key_same_kid(k, n), Reason.BAD_SIGNATURE),
    (
        "crit unknown extension",
        lambda k, n: mint(key=k, now=n, headers={"crit": ["exp-ext"], "exp-ext": 1}),
        Reason.CRIT,
    ),
    ("exp as a string", lambda k, n: mint({"exp": str(n + 60)}, key=k, now=n), Reason.MALFORMED_CLAIM),
    ("iat as a string", lambda k, n: mint({"iat": str(n)}, key=k, now=n), Reason.MALFORMED_CLAIM),
    ("exp as a boolean", lambda k, n: mint({"exp": True}, key=k, now=n), Reason.MALFORMED_CLAIM),
    ("sub as a number", lambda k, n: mint({"sub": 42}, key=k, now=n), Reason.MALFORMED_CLAIM),
    ("exp missing", lambda k, n: mint(key=k, now=n, omit=("exp",)), Reason.MISSING_CLAIM),
    ("expired beyond leeway", lambda k, n: mint({"exp": n - 31}, key=k, now=n - 600), Reason.EXPIRED),
    ("nbf in the future", lambda k, n: mint({"nbf": n + 120}, key=k, now=n), Reason.NOT_YET_VALID),
    ("iat in the future", lambda k, n: mint({"iat": n + 120, "exp": n + 400}, key=k, now=n), Reason.ISSUED_IN_FUTURE),
    ("wrong iss", lambda k, n: mint({"iss": "https://evil.test"}, key=k, now=n), Reason.ISSUER),
    ("iss with trailing slash", lambda k, n: mint({"iss": ISSUER + "/"}, key=k, now=n), Reason.ISSUER),
    ("absent iss", lambda k, n: mint(key=k, now=n, omit=("iss",)), Reason.MISSING_CLAIM),
    ("wrong aud", lambda k, n: mint({"aud": "api://billing"}, key=k, now=n), Reason.AUDIENCE),
    ("absent aud", lambda k, n: mint(key=k, now=n, omit=("aud",)), Reason.MISSING_CLAIM),
    ("empty aud list", lambda k, n: mint({"aud": []}, key=k, now=n), Reason.AUDIENCE),
    ("aud list with a number", lambda k, n: mint({"aud": [AUDIENCE, 3]}, key=k, now=n), Reason.AUDIENCE),
    ("100 kB token", lambda k, n: mint({"pad": "x" * 100_000}, key=k, now=n), Reason.TOO_LARGE),
]


def _replace_segment(token: str, index: int, segment: str) -> str:
    parts = token.split(".")
    parts[index] = segment
    return ".".join(parts)


def _hs_with_pem(key: TestKey, now: int) -> str:
    # The classic confusion attack: HMAC keyed with the public key an attacker can download.
    # PyJWT refuses a PEM as an HMAC key, so sign by hand with the PEM bytes.
    import hashlib
    import hmac

    signing_input = (
        b64(json.dumps({"alg": "HS256", "kid": key.kid}))
        + "."
        + b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "admin", "exp": now + 60}))
    )
    mac = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


def _sign_raw(key: TestKey, payload: bytes) -> str:
    return jwt.api_jws.encode(payload, key.private, algorithm="RS256", headers={"kid": key.kid})


def _other_key_same_kid(key: TestKey, now: int) -> str:
    from tests.conftest import _rsa

    impostor = _rsa(key.kid)
    return mint(key=impostor, now=now)


@pytest.mark.parametrize("make, reason", [(m, r) for _, m, r in BAD_TOKENS], ids=[i for i, _, _ in BAD_TOKENS])
async def test_bad_token_is_refused_for_the_right_reason(
    make: Any, reason: Reason, keys: dict, rsa_key: TestKey, clock: FakeClock
) -> None:
    v = verifier(provider(keys), clock)
    assert await reason_of(v, make(rsa_key, int(clock.time()))) is reason


async def test_hmac_allowed_on_paper_still_never_verifies_against_an_rsa_key(
    rsa_key: TestKey, clock: FakeClock
) -> None:
    # Even a provider built by hand with RS256 and HS256 (config.py refuses that mix) has no
    # HS256-bound key for an RSA JWK: the confusion attack finds no key at all.
    p = provider(jwks_of(rsa_key), algorithms=("RS256", "HS256"))
    assert await reason_of(verifier(p, clock), _hs_with_pem(rsa_key, int(clock.time()))) is Reason.UNKNOWN_KID


async def test_typ_mismatch_and_absence(keys: dict, rsa_key: TestKey, clock: FakeClock) -> None:
    v = verifier(provider(keys, typ="at+jwt"), clock)
    assert await reason_of(v, mint(key=rsa_key, now=clock.time(), headers={"typ": "JWT"})) is Reason.TYP
    assert await reason_of(v, mint(key=rsa_key, now=clock.time())) is Reason.TYP


async def test_max_token_age(keys: dict, rsa_key: TestKey, clock: FakeClock) -> None:
    v = verifier(provider(keys, max_token_age=3600.0), clock)
    n = int(clock.time())
    assert (await v.verify(mint({"exp": n + 3600}, key=rsa_key, now=n))).subject == "user-42"
    assert await reason_of(v, mint({"exp": n + 3601}, key=rsa_key, now=n)) is Reason.TOO_OLD
    assert await reason_of(v, mint(key=rsa_key, now=n, omit=("iat",))) is Reason.MISSING_CLAIM


async def test_required_claims_are_enforced(keys: dict, rsa_key: TestKey, clock: FakeClock) -> None:
    v = verifier(provider(keys, required_claims=("exp", "sub", "jti")), clock)
    with pytest.raises(InvalidToken) as caught:
        await v.verify(mint(key=rsa_key, now=clock.time()))
    assert caught.value.reason is Reason.MISSING_CLAIM and "jti" in caught.value.detail


async def test_refusal_never_leaks_the_token_into_client_text(keys: dict, rsa_key: TestKey, clock: FakeClock) -> None:
    token = mint({"iss": "https://evil.test"}, key=rsa_key, now=clock.time())
    with pytest.raises(InvalidToken) as caught:
        await verifier(provider(keys), clock).verify(token)
    client_text = caught.value.description + caught.value.challenge("r")
    assert token not in client_text and "evil" not in client_text
    assert caught.value.challenge("r") == (
        'Bearer realm="r", error="invalid_token", error_description="The token\'s issuer is not accepted"'
    )


async def test_provider_without_keys_is_our_outage_not_a_bad_token(
    rsa_key: TestKey, clock: FakeClock, aiohttp_server: Any
) -> None:

    from proxy.config.builder import RemoteJwks

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500)

    app = web.Application()
    app.router.add_get("/jwks.json", broken)
    server = await aiohttp_server(app)
    p = provider({}, keys=RemoteJwks(url=str(server.make_url("/jwks.json")), timeout=1.0))
    async with Fetcher() as fetcher:
        source = key_source_for(p, fetcher=fetcher, clock=clock)
        await source.start()
        try:
            with pytest.raises(KeysUnavailable):
                await Verifier(p, source, clock=clock).verify(mint(key=rsa_key, now=clock.time()))
        finally:
            await source.close()


async def test_jku_and_x5u_headers_are_never_fetched(rsa_key: TestKey, clock: FakeClock, aiohttp_server: Any) -> None:

    from proxy.config.builder import RemoteJwks

    seen: list[str] = []
    attacker_key = __import__("tests.conftest", fromlist=["_rsa"])._rsa("attacker")

    async def attacker(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response(jwks_of(attacker_key))

    async def real(request: web.Request) -> web.Response:
        return web.json_response(jwks_of(rsa_key))

    evil_app, good_app = web.Application(), web.Application()
    evil_app.router.add_get("/{tail:.*}", attacker)
    good_app.router.add_get("/jwks.json", real)
    evil, good = await aiohttp_server(evil_app), await aiohttp_server(good_app)
    p = provider({}, keys=RemoteJwks(url=str(good.make_url("/jwks.json")), min_refresh_interval=0.0))
    token = mint(
        key=attacker_key,
        now=clock.time(),
        headers={
            "jku": str(evil.make_url("/jwks.json")),
            "x5u": str(evil.make_url("/cert.pem")),
            "jwk": attacker_key.public_jwk,
        },
    )
    async with Fetcher() as fetcher:
        source = key_source_for(p, fetcher=fetcher, clock=clock)
        await source.start()
        try:
            assert await reason_of(Verifier(p, source, clock=clock), token) is Reason.UNKNOWN_KID
        finally:
            await source.close()
    assert seen == []


# -- the verified-token cache ---------------------------------------------------------------
async def test_cache_hit_skips_verification_and_expires_with_the_token(
    keys: dict, rsa_key: TestKey, clock: FakeClock
) -> None:
    cache = TokenCache(TokenCacheSettings(max_entries=10, max_ttl=300.0), clock)
    p = provider(keys, leeway=0.0)
    v = verifier(p, clock, cache)
    token = mint({"exp": int(clock.time()) + 60}, key=rsa_key, now=clock.time())
    first = await v.verify(token)
    assert await v.verify(token) is first
    assert (cache.hits, cache.misses) == (1, 1)
    clock.advance(61)
    assert await reason_of(v, token) is Reason.EXPIRED, "a cached entry never outlives exp"


async def test_cache_entry_never_outlives_max_ttl(keys: dict, rsa_key: TestKey, clock: FakeClock) -> None:
    cache = TokenCache(TokenCacheSettings(max_entries=10, max_ttl=5.0), clock)
    v = verifier(provider(keys), clock, cache)
    token = mint({"exp": int(clock.time()) + 3600}, key=rsa_key, now=clock.time())
    await v.verify(token)
    clock.advance(6)
    await v.verify(token)
    assert (cache.hits, cache.misses) == (0, 2)


async def test_cache_is_bounded_and_keyed_by_provider(keys: dict, rsa_key: TestKey, clock: FakeClock) -> None:
    cache = TokenCache(TokenCacheSettings(max_entries=3, max_ttl=60.0), clock)
    main, other = provider(keys), provider(keys, name="other", audiences=("api://nobody",))
    tokens = [mint({"n": i}, key=rsa_key, now=clock.time()) for i in range(5)]
    for token in tokens:
        await verifier(main, clock, cache).verify(token)
    assert len(cache) == 3
    # A token cached for `main` is not valid for `other` just because it is cached.
    assert await reason_of(verifier(other, clock, cache), tokens[-1]) is Reason.AUDIENCE


async def test_refused_tokens_are_not_cached(keys: dict, rsa_key: TestKey, clock: FakeClock) -> None:
    cache = TokenCache(TokenCacheSettings(), clock)
    v = verifier(provider(keys), clock, cache)
    await reason_of(v, mint({"aud": "x"}, key=rsa_key, now=clock.time()))
    assert len(cache) == 0


# -- the PyJWT internals we replace ---------------------------------------------------------
def test_our_segment_decoder_agrees_with_pyjwts_own_but_for_padding() -> None:
    # (It was an override of PyJWS's decoder; since no running sidecar imports PyJWT it is
    # called directly, and compared with PyJWT's here.)
    import random

    from jwt.exceptions import DecodeError

    from proxy.auth.verify import _unbase64url

    rng = random.Random(7)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/!. \x00\xe9"
    samples = [base64.urlsafe_b64encode(rng.randbytes(n)) for n in range(40)]  # canonical, padded
    samples += [s.rstrip(b"=") for s in samples]
    samples += [bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 12))) for _ in range(3000)]

    def outcome(decoder: Any, segment: bytes) -> bytes | None:
        try:
            return decoder(segment, "payload")
        except DecodeError:
            return None

    def ours_of(segment: bytes, name: str) -> bytes | None:
        return _unbase64url(segment)

    padded_accepted = 0
    for segment in samples:
        ours, pyjwt = (
            outcome(ours_of, segment),
            outcome(PyJWS._decode_base64url_segment, segment),
        )
        if b"=" in segment:
            # RFC 7515 §2: no padding. PyJWT takes it; one token with two spellings is what
            # issue 10 item 3 removed.
            assert ours is None, segment
            padded_accepted += pyjwt is not None
        else:
            assert ours == pyjwt, segment
    assert padded_accepted >= 20, "the corpus holds padded segments PyJWT accepts"


def test_our_signature_check_agrees_with_pyjws_decode_complete_on_a_corpus(
    rsa_key: TestKey, rsa_key_2: TestKey, ec_key: TestKey, ed_key: TestKey
) -> None:
    # check_signature checks on cryptography's key objects, with base/jwk.py's keys, rather
    # than PyJWS.decode_complete with PyJWT's PyJWK (which decoded the header a second time
    # and merged options: ~60% of a miss; and PyJWT cost every running process 2.6 MiB).
    # Both must accept and refuse exactly the same tokens, with the same payload and Reason.
    from jwt.exceptions import DecodeError, InvalidKeyError, InvalidSignatureError, PyJWTError

    from proxy.auth.verify import _unbase64url, check_signature, read_header
    from proxy.base.jwk import Jwk

    class StrictPyJWS(PyJWS):  # the reference as it was: PyJWS with the header checks and segment decoder ours
        def _validate_headers(self, headers: dict[str, Any], *, encoding: bool = False) -> None:
            return None

        @staticmethod
        def _decode_base64url_segment(segment: bytes, name: str) -> bytes:
            decoded = _unbase64url(segment)
            if decoded is None:
                raise DecodeError(f"{name} segment is not unpadded, canonical base64url (RFC 7515 §2)")
            return decoded

    _JWS = StrictPyJWS()

    def reference(token: str, keys: list[jwt.PyJWK]) -> tuple[str, Any]:
        # The check as it was, through PyJWS (InvalidSignatureError is a DecodeError: first).
        header = read_header(token, max_bytes=65536)
        for key in keys:
            try:
                decoded = _JWS.decode_complete(
                    token,
                    key=key,
                    algorithms=[header.alg],
                    options={"verify_signature": True, "enforce_minimum_key_length": True},
                )
            except (InvalidSignatureError, InvalidKeyError):
                continue
            except DecodeError:
                return ("refused", Reason.MALFORMED)
            except PyJWTError:
                return ("refused", Reason.BAD_SIGNATURE)
            return ("accepted", json.loads(decoded["payload"]))
        return ("refused", Reason.BAD_SIGNATURE)

    def ours(token: str, keys: list[jwt.PyJWK]) -> tuple[str, Any]:
        try:
            ours_keys = [Jwk(key._jwk_data, key.algorithm_name) for key in keys]  # the same JWK, our parser
            return ("accepted", check_signature(token, read_header(token, max_bytes=65536), ours_keys))
        except InvalidToken as error:
            return ("refused", error.reason)

    def flip(segment: str, at: int) -> str:
        chars = list(segment)
        chars[at] = "A" if chars[at] != "A" else "B"
        return "".join(chars)

    def keys_for(test_key: TestKey, alg: str | None = None) -> list[jwt.PyJWK]:
        return [jwt.PyJWK(test_key.public_jwk, algorithm=alg or test_key.alg)]

    short_secret = {"kty": "oct", "k": b64(b"short"), "kid": "hs"}
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'kid': 'hs'}))}.{b64(json.dumps({'sub': 'x'}))}"
    short_signed = f"{signing_input}.{b64(hmac.new(b'short', signing_input.encode(), hashlib.sha256).digest())}"
    long_secret = {"kty": "oct", "k": b64(HS_SECRET), "kid": "hs"}
    cases: list[tuple[str, list[jwt.PyJWK]]] = []
    for test_key, other in ((rsa_key, rsa_key_2), (ec_key, None), (ed_key, None)):
        good = mint(key=test_key)
        head, body, sig = good.split(".")
        cases += [
            (good, keys_for(test_key)),
            (f"{head}.{body}.{flip(sig, 3)}", keys_for(test_key)),  # tampered signature
            (f"{head}.{flip(body, 5)}.{sig}", keys_for(test_key)),  # tampered payload
            (f"{head}.{body}.{sig[:-1] + ('A' if sig[-1] != 'A' else 'Q')}", keys_for(test_key)),  # last char
            (f"{head}.{body}.{sig}=", keys_for(test_key)),  # stray padding
            (f"{head}.{body}.{sig}==", keys_for(test_key)),
            (f"{head}.{body}.{sig[:-2]}+/", keys_for(test_key)),  # base64, not base64url
            (f"{head}.{body}.", keys_for(test_key)),  # no signature
            (f"{head}..{sig}", keys_for(test_key)),  # no payload
            (f"{head}.{body}.{sig}\u00e9", keys_for(test_key)),  # non-ASCII
            (f"{head}.{body}!.{sig}", keys_for(test_key)),
        ]
        if other is not None:
            cases += [(good, keys_for(other)), (good, [*keys_for(other), *keys_for(test_key)])]
    rs = mint(key=rsa_key)
    cases += [
        (rs, keys_for(rsa_key, "PS256")),  # key bound to another alg
        (mint(key=rsa_key, alg="PS256"), keys_for(rsa_key, "PS256")),
        (mint(secret=HS_SECRET, headers={"kid": "hs"}), [jwt.PyJWK(long_secret, algorithm="HS256")]),
        (short_signed, [jwt.PyJWK(short_secret, algorithm="HS256")]),  # correctly signed, key too short
        (short_signed, [jwt.PyJWK(short_secret, algorithm="HS256"), jwt.PyJWK(long_secret, algorithm="HS256")]),
        (raw_token({"alg": "RS256", "kid": rsa_key.kid}, ["not", "an", "object"]), keys_for(rsa_key)),
        (
            ".".join((b64(json.dumps({"alg": "RS256", "kid": rsa_key.kid})), b64(b"not json"), rs.split(".")[2])),
            keys_for(rsa_key),
        ),
    ]
    # A payload that is valid JSON but not an object, correctly signed: both refuse (ours as
    # MALFORMED at parse time, PyJWS accepts the signature; the caller's parse_payload refuses).
    list_payload = jwt.api_jws.PyJWS().encode(
        b'["a"]', rsa_key.private, algorithm="RS256", headers={"kid": rsa_key.kid}
    )
    for token, keys in cases:
        expected, got = reference(token, keys), ours(token, keys)
        assert expected == got, (token, expected, got)
    # parse_payload is part of ours: a correctly signed non-object payload is refused.
    assert ours(list_payload, keys_for(rsa_key)) == ("refused", Reason.MALFORMED)
    assert reference(list_payload, keys_for(rsa_key)) == ("accepted", ["a"])
    # b64=false (RFC 7797) is refused by both (PyJWS wants a detached payload; we never take one).
    detached = raw_token({"alg": "RS256", "kid": rsa_key.kid, "b64": False, "crit": ["b64"]}, {"sub": "x"})
    assert ours(detached, keys_for(rsa_key))[0] == reference(detached, keys_for(rsa_key))[0] == "refused"


# -- one token, one spelling (RFC 7515 §2 base64url: unpadded, canonical) ---------------------
_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _same_bytes_other_spellings(segment: str) -> list[str]:
    """The other texts a lenient decoder reads as this segment's bytes: padding, the
    standard alphabet, whitespace, and a last character with unused bits set."""
    decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    variants = [segment + "=" * (-len(segment) % 4)] if len(segment) % 4 else []  # what PyJWT accepted
    variants += [segment.replace("-", "+").replace("_", "/")] if ("-" in segment or "_" in segment) else []
    variants += [segment[:5] + ws + segment[5:] for ws in (" ", "\t", "\n", "\r\n", "\x0b", "\x0c")]
    variants += [" " + segment, segment + " ", segment + "\n"]
    tail = len(segment) % 4
    if tail:
        unused = 0x0F if tail == 2 else 0x03
        last = _B64URL.index(segment[-1])
        variants += [segment[:-1] + _B64URL[(last & ~unused) | bits] for bits in range(1, unused + 1)]
    for variant in variants:  # each really is the same bytes to a lenient decoder
        assert variant != segment
        lenient = variant.replace("-", "+").replace("_", "/").rstrip("=")
        letters = sum(c.isalnum() or c in "+/" for c in lenient)  # a2b_base64 skips the rest
        assert binascii.a2b_base64(lenient + "=" * (-letters % 4)) == decoded, variant
    # and more padding than any decoder takes
    return [*variants, segment + "=", segment + "==", segment + "===", segment + "=" * (-len(segment) % 4) + "===="]


def _other_spellings(token: str) -> list[tuple[str, str]]:
    parts = token.split(".")
    return [
        (f"{name}: {variant!r}", ".".join([*parts[:i], variant, *parts[i + 1 :]]))
        for i, name in enumerate(("header", "payload", "signature"))
        for variant in _same_bytes_other_spellings(parts[i])
    ]


@pytest.mark.parametrize("which", ["rsa_key", "ec_key", "ed_key", "hs"])
async def test_a_token_has_one_spelling_every_other_is_malformed_and_never_cached(
    which: str, keys: dict, clock: FakeClock, request: pytest.FixtureRequest
) -> None:
    if which == "hs":
        p = provider({"keys": [{"kty": "oct", "k": b64(HS_SECRET)}]}, algorithms=("HS256",))
        token = mint(now=clock.time())
    else:
        p = provider(keys)
        token = mint(key=request.getfixturevalue(which), now=clock.time())
    cache = TokenCache(TokenCacheSettings(), clock)
    v = verifier(p, clock, cache)
    canonical = await v.verify(token)  # verified and cached under its one spelling
    variants = _other_spellings(token)
    assert len(variants) > 40
    for name, variant in variants:
        assert await reason_of(v, variant) is Reason.MALFORMED, name
    assert len(cache) == 1 and cache.get("main", token) is canonical, "no other spelling got in"
    assert cache.misses == len(variants) + 1, "every other spelling missed the cache, then was refused"


@pytest.mark.parametrize(
    "segment",
    [
        "",
        "A",
        "AAAAA",
        "QQ=",
        "QQ==",
        "QUI=",
        "QR",
        "QUJ",
        "QUI",
        "+w",
        "/w",
        "Q\u00c9",
        "\uff21\uff21",
        "\u0660\u0661",
        "Q\x00Q",
        "QQ\udc80",
    ],
)
@pytest.mark.parametrize("index", [0, 1, 2])
async def test_non_base64url_or_non_canonical_segments_are_malformed(
    segment: str, index: int, keys: dict, rsa_key: TestKey, clock: FakeClock
) -> None:
    # Empty header or payload (no JSON), a length of 1 mod 4, padding, a set unused bit (QR
    # for QQ, QUJ for QUI), the standard alphabet, non-ASCII look-alikes (fullwidth A,
    # Arabic-Indic digits), NUL, a byte kept by surrogateescape. "" and "QUI" are canonical
    # (no bytes, "AB"): as a header they are no JSON; as a payload or a signature they are
    # well-formed and fail the signature (a payload is read only once its signature holds).
    token = _replace_segment(mint(key=rsa_key, now=clock.time()), index, segment)
    canonical = segment in ("", "QUI")
    expected = Reason.BAD_SIGNATURE if canonical and index > 0 else Reason.MALFORMED
    assert await reason_of(verifier(provider(keys), clock), token) is expected


# -- kid is a hint (RFC 7515 §4.1.4): secret and pem_file keys, with or without a kid -------------
@pytest.mark.parametrize(
    "source, key_kid, token_kid, reason",
    [
        ("secret", None, "any-kid", None),  # was unknown_kid: a secret has no kid, so never matched
        ("secret", None, None, None),
        ("secret", "hs-1", "hs-1", None),
        ("secret", "hs-1", None, None),  # a token without kid tries every key, as with a JWKS
        ("secret", "hs-1", "hs-2", Reason.UNKNOWN_KID),
        ("pem_file", None, "any-kid", None),
        ("pem_file", None, None, None),
        ("pem_file", "p-1", "p-1", None),
        ("pem_file", "p-1", None, None),
        ("pem_file", "p-1", "rsa-1", Reason.UNKNOWN_KID),
    ],
)
async def test_a_static_key_without_kid_verifies_any_kid_and_with_one_only_its_own(
    tmp_path: Any,
    rsa_key: TestKey,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
    key_kid: str | None,
    token_kid: str | None,
    reason: Reason | None,
) -> None:
    import secrets

    from proxy.config.builder import parse

    secret = secrets.token_bytes(64)
    (tmp_path / "hs.secret").write_text(base64.b64encode(secret).decode())
    (tmp_path / "rsa.pem").write_bytes(rsa_key.public_pem())
    kid = f", kid: {key_kid}" if key_kid else ""
    keys = (
        f"secret: {{file: hs.secret, encoding: base64{kid}}}"
        if source == "secret"
        else f"pem_file: {{file: rsa.pem{kid}}}"
        if key_kid
        else "pem_file: rsa.pem"
    )
    settings = parse(
        f"providers:\n  main: {{issuer: '{ISSUER}', audiences: ['{AUDIENCE}'], {keys}}}\n", base_dir=tmp_path
    )
    v = verifier(settings.providers["main"], clock)
    headers = {"kid": token_kid}
    token = (
        mint(secret=secret, headers=headers, now=clock.time())
        if source == "secret"
        else mint(key=rsa_key, headers=headers, now=clock.time())
    )
    if reason is None:
        assert (await v.verify(token)).subject == "user-42"
    else:
        assert await reason_of(v, token) is reason
    # Another key under the same kid is never taken for this one.
    impostor = (
        mint(secret=secrets.token_bytes(64), headers=headers, now=clock.time())
        if source == "secret"
        else mint(key=_rsa_impostor(), headers=headers, now=clock.time())
    )
    assert await reason_of(v, impostor) is (reason or Reason.BAD_SIGNATURE)


def _rsa_impostor() -> TestKey:
    from tests.conftest import _rsa

    global _IMPOSTOR
    if _IMPOSTOR is None:
        _IMPOSTOR = _rsa("impostor")
    return _IMPOSTOR


_IMPOSTOR: TestKey | None = None


# -- the cache's key: a digest of the whole token ---------------------------------------------
async def test_a_token_differing_from_a_cached_one_in_any_one_segment_misses_the_cache(
    keys: dict, rsa_key: TestKey, clock: FakeClock
) -> None:
    # The cache keeps a digest of the token, not its text: a key that did not cover the
    # header, the payload and the signature would let a forged token find another's entry.
    cache = TokenCache(TokenCacheSettings(max_entries=10, max_ttl=300.0), clock)
    v = verifier(provider(keys), clock, cache)
    token = mint({"role": "user"}, key=rsa_key, now=clock.time())
    await v.verify(token)
    head, body, sig = token.split(".")
    admin = b64(json.dumps({**json.loads(base64.urlsafe_b64decode(body + "==")), "role": "admin"}))
    forged = [
        f"{b64(json.dumps({'alg': 'RS256', 'kid': rsa_key.kid, 'typ': 'JWT'}))}.{body}.{sig}",  # another header
        f"{head}.{admin}.{sig}",  # another payload, the signature of the first
        f"{head}.{body}.{sig[:10]}{'A' if sig[10] != 'A' else 'B'}{sig[11:]}",  # another signature
    ]
    for other in forged:
        assert cache.get("main", other) is None, other
        assert cache.lookup(other) is None, other
        refused = await reason_of(v, other)
        assert refused in (Reason.BAD_SIGNATURE, Reason.MALFORMED), other
    assert cache.hits == 0 and len(cache) == 1
    assert (await v.verify(token)).payload["role"] == "user" and cache.hits == 1
    # Another cache (another process, another config) has another digest key.
    other_cache = TokenCache(TokenCacheSettings(max_entries=10, max_ttl=300.0), clock)
    assert other_cache.digest(token + "") != cache.digest(token + "")


async def test_the_cache_never_serves_an_entry_to_another_provider_or_past_its_deadline(
    keys: dict, rsa_key: TestKey, clock: FakeClock
) -> None:
    cache = TokenCache(TokenCacheSettings(max_entries=2, max_ttl=300.0), clock)
    main = verifier(provider(keys, leeway=0.0), clock, cache)
    token = mint({"exp": int(clock.time()) + 100}, key=rsa_key, now=clock.time())
    claims = await main.verify(token)
    assert claims.until == int(clock.time()) + 100, "the deadline is exp (before max_ttl)"
    assert cache.get("other", token) is None, "an entry is its provider's only"
    assert cache.get("main", token + "") is claims, "a new str of the same text finds it (not only the hot memo's)"
    clock.advance(100)
    assert cache.get("main", token) is None and len(cache) == 0, "at exp the entry is gone"
    # Bounded: the least recently used entry goes first.
    tokens = [mint({"n": i}, key=rsa_key, now=clock.time()) for i in range(3)]
    first = await main.verify(tokens[0])
    await main.verify(tokens[1])
    assert await main.verify(tokens[0] + "") is first  # used: now the most recent
    await main.verify(tokens[2])
    assert len(cache) == 2 and cache.lookup(tokens[1] + "") is None and cache.lookup(tokens[0] + "") is first


@pytest.mark.parametrize("max_token_age", [None, 600.0])
@pytest.mark.parametrize("required", [("exp",), ("exp", "sub", "jti")])
def test_the_claims_shortcut_passes_only_what_every_claim_check_passes(
    max_token_age: float | None, required: tuple[str, ...]
) -> None:
    import itertools

    from proxy.auth.verify import _plainly_valid, check_claims

    now = 1_800_000_000.0
    p = provider({"keys": []}, leeway=30.0, max_token_age=max_token_age, required_claims=required)
    values: dict[str, list[Any]] = {
        "exp": [None, now + 10, int(now) + 10, int(now) - 29, int(now) - 30, int(now) - 31, True, "9", 10**400],
        "iat": [None, int(now), int(now) + 30, int(now) + 31, float(now), -(10**400), False],
        "nbf": [None, int(now) + 29, int(now) + 31, 10**400],
        "iss": [None, ISSUER, ISSUER + "/", [ISSUER], 1],
        "aud": [None, AUDIENCE, "api://nobody", [AUDIENCE], []],
        "sub": [None, "u", 7, ""],
        "jti": [None, "j"],
    }
    absent = object()
    shortcut = 0
    for combination in itertools.product(*[[absent, *options] for options in values.values()]):
        payload = {name: value for name, value in zip(values, combination, strict=True) if value is not absent}
        if not _plainly_valid(payload, p, now):
            continue
        shortcut += 1
        check_claims(payload, p, now)  # raises if the shortcut let through what a check refuses
    if max_token_age is None:
        assert shortcut > 10, "the usual token takes the shortcut"
    else:
        assert shortcut == 0, "max_token_age is left to its check"


# -- a miss without a wait -----------------------------------------------------------------
async def test_held_keys_are_what_key_for_answers_at_once_and_verify_now_waits_for_nothing_else(
    rsa_key: TestKey, ec_key: TestKey, ed_key: TestKey, clock: FakeClock
) -> None:
    """`verify_now` (which pipeline.begin calls on a miss, so a miss needs no coroutine) reads
    keys.py's `key_for` at once through `_held`: whenever `_held` answers, `key_for` answers
    the same keys; a kid the source has never seen is left to `key_for` (its refetch)."""
    from proxy.auth.verify import _held

    kidless = dict(rsa_key.public_jwk)
    del kidless["kid"]
    p = provider({"keys": [rsa_key.public_jwk, ec_key.public_jwk, ed_key.public_jwk, kidless]})
    source = key_source_for(p, fetcher=None, clock=clock)
    answered = 0
    for kid in (rsa_key.kid, ec_key.kid, ed_key.kid, None, "never-seen"):
        for alg in (*p.algorithms, "HS256"):
            held = _held(source, kid, alg)
            if held is None:
                continue
            answered += 1
            assert held == await source.key_for(kid, alg), (kid, alg)
    assert answered >= 6
    assert _held(source, "never-seen", "RS256") is None  # key_for would refetch first

    v = verifier(p, clock, TokenCache(TokenCacheSettings(max_entries=10), clock))
    token = mint(key=rsa_key, now=clock.time())
    claims = v.verify_now(token)
    assert claims is not None and claims.subject == "user-42"
    assert v.cached(token) is claims  # into the cache, as verify_uncached puts it
    with pytest.raises(InvalidToken) as caught:  # a refusal is raised at once, its reason as ever
        v.verify_now(mint({"exp": clock.time() - 3600}, key=rsa_key, now=clock.time()))
    assert caught.value.reason is Reason.EXPIRED
    # A kid never seen: no answer now (nothing refused, nothing cached); verify_uncached decides.
    unseen = mint(key=rsa_key, headers={"kid": "never-seen"}, now=clock.time())
    assert v.verify_now(unseen) is None and v.cached(unseen) is None
    assert (await v.verify_uncached(unseen)).subject == "user-42"  # the kid-less key, after key_for


async def test_verify_now_leaves_a_source_without_keys_to_verify_uncached(rsa_key: TestKey, clock: FakeClock) -> None:
    from proxy.config.builder import RemoteJwks

    p = provider({}, keys=RemoteJwks(url="http://127.0.0.1:9/jwks.json", timeout=0.5))
    async with Fetcher() as fetcher:
        source = key_source_for(p, fetcher=fetcher, clock=clock)
        v = Verifier(p, source, clock=clock)
        token = mint(key=rsa_key, now=clock.time())
        assert v.verify_now(token) is None  # no fetch here, no refusal: the wait is verify_uncached's
        with pytest.raises(KeysUnavailable):
            await v.verify(token)
        await source.close()


@pytest.mark.parametrize("keep", [frozenset({"iss", "sub", "exp", "realm_access", "groups"}), None])
async def test_cached_tokens_share_their_claim_names_at_every_depth(
    keys: dict, rsa_key: TestKey, clock: FakeClock, keep: frozenset[str] | None
) -> None:
    """A cached token's member names are one str shared by every entry (interned, or the
    config's own), top-level and inside objects, never a copy per token (bench/cache_memory.py
    measures what that saves); the JSON parse itself no longer interns (bench/FIGURES.md)."""
    p = provider(keys)
    cache = TokenCache(TokenCacheSettings(max_entries=10), clock)
    v = Verifier(p, key_source_for(p, fetcher=None, clock=clock), clock=clock, cache=cache, keep=keep)
    payloads = []
    for user in ("a", "b"):
        # Built from text, as a token's JSON is parsed: no str is shared by the literals.
        extra = json.loads(
            '{"sub": "USER", "realm_access": {"roles": ["r"], "inner": [{"deep": 1}]}, "groups": [{"g": 1}], "x": "{"}'.replace(
                "USER", user
            )
        )
        payloads.append((await v.verify(mint(extra, key=rsa_key, now=clock.time()))).payload)
    first, second = payloads
    assert set(first) == (keep or {"iss", "aud", "sub", "iat", "exp", "realm_access", "groups", "x"})
    for one, other in ((first, second), (first["realm_access"], second["realm_access"])):
        for name in one:
            (same,) = [n for n in other if n == name]
            assert same is name, name
    deep_a, deep_b = first["realm_access"]["inner"][0], second["realm_access"]["inner"][0]
    assert next(iter(deep_a)) is next(iter(deep_b)) and next(iter(first["groups"][0])) is next(
        iter(second["groups"][0])
    )
    assert first["realm_access"] == {"roles": ["r"], "inner": [{"deep": 1}]} and first["sub"] == "a"


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512"])
async def test_rs256_384_512_verify_with_their_own_hash_and_refuse_another(
    rsa_key: TestKey, clock: FakeClock, alg: str
) -> None:
    """RS256/384/512 are checked on cryptography's key with the signing input digested by
    hashlib (`_prepare`): each with its own hash, never another's."""
    unbound = {name: value for name, value in rsa_key.public_jwk.items() if name != "alg"}
    p = provider({"keys": [unbound]}, algorithms=("RS256", "RS384", "RS512"))
    v = verifier(p, clock)
    assert (await v.verify(mint(key=rsa_key, alg=alg, now=clock.time()))).subject == "user-42"
    token = mint(key=rsa_key, alg=alg, now=clock.time())
    other = {"RS256": "RS384", "RS384": "RS512", "RS512": "RS256"}[alg]
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    relabelled = _replace_segment(token, 0, b64(json.dumps({**header, "alg": other})))
    assert await reason_of(v, relabelled) is Reason.BAD_SIGNATURE
    tampered = _replace_segment(token, 1, b64(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "root"})))
    assert await reason_of(v, tampered) is Reason.BAD_SIGNATURE
