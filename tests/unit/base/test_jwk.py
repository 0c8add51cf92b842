"""base/jwk.py reads a JWK as PyJWT's `PyJWK` did: the same keys made, the same JWKs refused.

PyJWT is no longer imported by a running sidecar (base/jwk.py says why); it stays a test
dependency so that our parser is compared with it here, on every key type and on a corpus
of broken JWKs: wrong lengths, points off the curve, numbers that make no RSA key, bad
base64, missing and mistyped members, empty secrets.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import PyJWK
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import PyJWTError

from proxy.base.jwk import InvalidKeyError, Jwk, public_jwk, unfit_secret
from proxy.base.jwks import FAMILIES, KeySet


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_bytes(key: Any) -> bytes:
    if isinstance(key, bytes):
        return key
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


RSA_2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
RSA_1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
EC_KEYS = {
    "P-256": ec.generate_private_key(ec.SECP256R1()).public_key(),
    "P-384": ec.generate_private_key(ec.SECP384R1()).public_key(),
    "P-521": ec.generate_private_key(ec.SECP521R1()).public_key(),
    "secp256k1": ec.generate_private_key(ec.SECP256K1()).public_key(),
}
ED25519 = ed25519.Ed25519PrivateKey.generate().public_key()
ED448 = ed448.Ed448PrivateKey.generate().public_key()


def good_jwks() -> list[tuple[dict[str, Any], str]]:
    rsa_jwk = RSAAlgorithm.to_jwk(RSA_2048, as_dict=True)
    cases: list[tuple[dict[str, Any], str]] = [(rsa_jwk, alg) for alg in ("RS256", "RS384", "RS512", "PS256", "PS512")]
    cases.append((RSAAlgorithm.to_jwk(RSA_1024, as_dict=True), "RS256"))  # loads; verify.py refuses its length
    for crv, key in EC_KEYS.items():
        alg = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}[crv]
        cases.append((ECAlgorithm.to_jwk(key, as_dict=True), alg))
    cases.append((OKPAlgorithm.to_jwk(ED25519, as_dict=True), "EdDSA"))
    cases.append((OKPAlgorithm.to_jwk(ED448, as_dict=True), "EdDSA"))
    cases.append(({"kty": "oct", "k": b64(b"s" * 64)}, "HS256"))
    cases.append(({"kty": "oct", "k": b64(b"s" * 64) + "=="}, "HS512"))  # padded: PyJWT's decoder takes it
    return cases


def broken_jwks() -> list[tuple[dict[str, Any], str]]:
    rsa_jwk = RSAAlgorithm.to_jwk(RSA_2048, as_dict=True)
    p256 = ECAlgorithm.to_jwk(EC_KEYS["P-256"], as_dict=True)
    p384 = ECAlgorithm.to_jwk(EC_KEYS["P-384"], as_dict=True)
    ed = OKPAlgorithm.to_jwk(ED25519, as_dict=True)
    off_curve = {
        **p256,
        "y": b64((int.from_bytes(base64.urlsafe_b64decode(p256["y"] + "=="), "big") ^ 1).to_bytes(32, "big")),
    }
    return [
        ({}, "RS256"),
        ({"kty": ""}, "RS256"),
        ({"kty": "RSA"}, "RS256"),
        ({"kty": "RSA", "n": rsa_jwk["n"]}, "RS256"),
        ({"kty": "RSA", "n": rsa_jwk["n"], "e": 65537}, "RS256"),  # e a number, not base64url
        ({"kty": "RSA", "n": rsa_jwk["n"], "e": None}, "RS256"),
        ({"kty": "RSA", "n": rsa_jwk["n"], "e": ["AQAB"]}, "RS256"),
        ({"kty": "RSA", "n": rsa_jwk["n"], "e": "AAAC"}, "RS256"),  # even exponent
        ({"kty": "RSA", "n": rsa_jwk["n"], "e": "AQ"}, "RS256"),  # e = 1
        ({"kty": "RSA", "n": "AA", "e": "AQAB"}, "RS256"),  # n = 0
        ({"kty": "RSA", "n": "A", "e": "AQAB"}, "RS256"),  # no byte ends there
        ({"kty": "RSA", "n": rsa_jwk["n"][:-2] + "AA", "e": "AQAB"}, "RS256"),  # an even modulus
        ({**rsa_jwk}, "ES256"),  # a kty the algorithm is not for
        ({**p256}, "RS256"),
        ({**p256}, "HS256"),
        ({**ed}, "ES256"),
        ({"kty": "EC", "crv": "P-256", "x": p256["x"]}, "ES256"),
        (off_curve, "ES256"),  # the invalid-curve attack's key
        ({**p256, "crv": "P-384"}, "ES384"),  # 32-byte coordinates named P-384
        ({**p384, "crv": "P-256"}, "ES256"),
        ({**p256, "crv": "P-224"}, "ES256"),
        ({**p256, "crv": None}, "ES256"),
        ({**p256, "x": p256["x"][:-4]}, "ES256"),
        ({**p256, "x": 5}, "ES256"),
        ({"kty": "OKP", "crv": "Ed25519"}, "EdDSA"),
        ({"kty": "OKP", "crv": "X25519", "x": ed["x"]}, "EdDSA"),
        ({"kty": "OKP", "x": ed["x"]}, "EdDSA"),
        ({"kty": "OKP", "crv": "Ed25519", "x": ed["x"][:-3]}, "EdDSA"),  # 30 bytes
        ({"kty": "OKP", "crv": "Ed448", "x": ed["x"]}, "EdDSA"),
        ({"kty": "OKP", "crv": "Ed25519", "x": {"a": 1}}, "EdDSA"),
        ({"kty": "oct", "k": ""}, "HS256"),
        ({"kty": "oct", "k": "A"}, "HS256"),
        ({"kty": "oct", "k": 12}, "HS256"),
        ({"kty": "RSA", "n": rsa_jwk["n"], "e": "AQAB"}, "ES999"),  # no such algorithm
    ]


@pytest.mark.parametrize(("jwk", "alg"), good_jwks(), ids=lambda v: v if isinstance(v, str) else v.get("kty"))
def test_a_good_jwk_makes_the_same_key_as_pyjwts(jwk: dict[str, Any], alg: str) -> None:
    theirs, ours = PyJWK(dict(jwk), algorithm=alg), Jwk(jwk, alg)
    assert ours.algorithm_name == theirs.algorithm_name == alg
    assert type(ours.key) is type(theirs.key)
    assert public_bytes(ours.key) == public_bytes(theirs.key)


def refused(make: Any) -> bool:
    try:
        make()
    except (PyJWTError, InvalidKeyError):
        return True
    return False


@pytest.mark.parametrize("case", range(len(broken_jwks())))
def test_a_broken_jwk_is_refused_as_pyjwt_refused_it(case: int) -> None:
    jwk, alg = broken_jwks()[case]
    assert refused(lambda: Jwk(jwk, alg)) is refused(lambda: PyJWK(dict(jwk), algorithm=alg))
    try:
        Jwk(jwk, alg)
    except Exception as error:  # noqa: BLE001 - the one type jwks.py reports by name
        assert type(error) is InvalidKeyError


def test_the_broken_corpus_is_mostly_refused() -> None:
    assert sum(refused(lambda c=c: Jwk(*c)) for c in broken_jwks()) >= len(broken_jwks()) - 2


def test_an_hmac_jwk_without_k_is_refused_where_pyjwt_raised_a_key_error() -> None:
    with pytest.raises(KeyError):
        PyJWK({"kty": "oct"}, algorithm="HS256")
    with pytest.raises(InvalidKeyError):
        Jwk({"kty": "oct"}, "HS256")


def test_a_published_private_key_is_refused_by_the_parser_too() -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(InvalidKeyError):
        Jwk(RSAAlgorithm.to_jwk(private, as_dict=True), "RS256")


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA", "HS256"])
def test_key_sets_report_an_unloadable_key_as_before(alg: str) -> None:
    # What the index says per key is unchanged: `could not be loaded (ES256: InvalidKeyError)`.
    unloadable = [
        dict(jwk, kid=f"k{i}")
        for i, (jwk, a) in enumerate(broken_jwks())
        if a == alg and jwk.get("kty") and refused(lambda jwk=jwk, a=a: PyJWK(dict(jwk), algorithm=a))
    ]
    assert unloadable
    keyset = KeySet.from_jwks({"keys": unloadable}, (alg,))
    assert len(keyset) == 0
    for skipped in keyset.skipped:
        assert skipped.reason == f"could not be loaded ({alg}: InvalidKeyError)" or skipped.reason.startswith(
            "no allowed algorithm fits"
        ), skipped
    assert any(s.reason == f"could not be loaded ({alg}: InvalidKeyError)" for s in keyset.skipped)


@pytest.mark.parametrize("key", [RSA_2048, *EC_KEYS.values(), ED25519, ED448], ids=lambda k: type(k).__name__)
def test_public_jwk_writes_what_pyjwts_to_jwk_wrote(key: Any) -> None:
    writer = (
        RSAAlgorithm
        if isinstance(key, rsa.RSAPublicKey)
        else ECAlgorithm
        if isinstance(key, ec.EllipticCurvePublicKey)
        else OKPAlgorithm
    )
    assert public_jwk(key) == writer.to_jwk(key, as_dict=True)


def unfit_by_pyjwt(secret: bytes) -> bool:
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except PyJWTError:
        return True
    return False


def secrets_corpus() -> list[bytes]:
    pem = RSA_2048.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    ssh = RSA_2048.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    der = public_bytes(RSA_2048)
    jwk = json.dumps(RSAAlgorithm.to_jwk(RSA_2048, as_dict=True)).encode()
    return [
        b"s" * 64,
        b"",
        pem,
        pem.replace(b"-----BEGIN", b"----- BEGIN"),
        b"junk" + pem + b"junk",
        pem.split(b"\n", 1)[0],  # a BEGIN line alone is not a PEM
        ssh,
        b"ssh-ed25519 AAAA",
        der,
        der[:-1],
        jwk,
        json.dumps({"keys": [json.loads(jwk)]}).encode(),
        json.dumps([[{"kty": "oct"}]]).encode(),
        b'{"a": 1}',
        b"[1, 2, 3]",
        b"12345678901234567890123456789012",
        b"[" * 100_000 + b'"kty": 1' + b"]" * 100_000,  # too deep for json.loads: a JWK member name
        b"[" * 100_000 + b'"x"' + b"]" * 100_000,
        b"{" * 100_000,
        b"\xff\xfe" + "kty".encode("utf-16-le"),
    ]


@pytest.mark.parametrize("case", range(len(secrets_corpus())))
def test_a_secret_is_unfit_exactly_when_pyjwt_refused_it(case: int) -> None:
    secret = secrets_corpus()[case]
    assert unfit_secret(secret) is unfit_by_pyjwt(secret), secret[:80]


def _signing_key(alg: str) -> tuple[Any, dict[str, Any]]:
    """A private key (or secret) for `alg` and its public JWK."""
    if alg.startswith("HS"):
        secret = bytes(range(64))
        return secret, {"kty": "oct", "k": b64(secret)}
    if alg.startswith(("RS", "PS")):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return private, RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    if alg.startswith("ES"):
        curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
        private = ec.generate_private_key(curve)
        return private, ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    private = ed25519.Ed25519PrivateKey.generate()
    return private, OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)


@pytest.mark.parametrize("alg", list(FAMILIES))
def test_every_algorithm_checks_signatures_as_pyjwt_did(alg: str) -> None:
    # verify.py checks each algorithm on cryptography's key (`_prepare`), as PyJWT's algorithms
    # did: a good token verifies with our key and theirs; a changed signature, payload or a
    # signature of another length is refused by both.
    import jwt as pyjwt

    from proxy.auth.verify import check_signature, read_header
    from proxy.base.errors import InvalidToken

    private, public = _signing_key(alg)
    good = pyjwt.encode({"sub": "x"}, private, algorithm=alg, headers={"kid": "k"})
    head, body, sig = good.split(".")
    other_body = b64(json.dumps({"sub": "y"}).encode())
    raw = base64.urlsafe_b64decode(sig + "==")
    tokens = [
        good,
        f"{head}.{other_body}.{sig}",
        f"{head}.{body}.{b64(raw[:-1] + bytes([raw[-1] ^ 1]))}",
        f"{head}.{body}.{b64(raw[:-1])}",  # one byte short
        f"{head}.{body}.{b64(raw + bytes(1))}",  # one byte long
    ]
    for token in tokens:
        try:
            pyjwt.api_jws.PyJWS().decode(token, PyJWK(dict(public), algorithm=alg), algorithms=[alg])
            theirs = True
        except PyJWTError:
            theirs = False
        try:
            check_signature(token, read_header(token, max_bytes=65536), [Jwk(public, alg)])
            ours = True
        except InvalidToken:
            ours = False
        assert ours is theirs, (alg, token)
    assert check_signature(good, read_header(good, max_bytes=65536), [Jwk(public, alg)]) == {"sub": "x"}


@pytest.mark.parametrize(
    ("alg", "key", "why"),
    [
        ("RS256", RSAAlgorithm.to_jwk(RSA_1024, as_dict=True), "is too short for RS256"),
        ("PS256", RSAAlgorithm.to_jwk(RSA_1024, as_dict=True), "is too short for PS256"),
        ("HS512", {"kty": "oct", "k": b64(bytes(range(48)))}, "is too short for HS512"),  # 48 < 64 bytes
        ("HS256", {"kty": "oct", "k": b64(public_bytes(RSA_2048))}, "cannot be used for HS256"),  # a DER public key
    ],
)
def test_a_key_pyjwt_would_not_use_is_refused_with_our_words(alg: str, key: dict[str, Any], why: str) -> None:
    from proxy.auth.verify import check_signature, read_header
    from proxy.base.errors import InvalidToken, Reason

    token = f"{b64(json.dumps({'alg': alg}).encode())}.{b64(b'{}')}.{b64(b'x' * 32)}"
    with pytest.raises(InvalidToken) as caught:
        check_signature(token, read_header(token, max_bytes=65536), [Jwk(key, alg)])
    assert caught.value.reason is Reason.BAD_SIGNATURE
    assert f"the key without kid {why}" in caught.value.detail


_ORDER = {
    "ES256": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "ES384": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973", 16
    ),
    "ES512": int(
        "01FF" + "FFFFFFFF" * 7 + "FFFFFFFA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409", 16
    ),
}
_ED25519_ORDER = 2**252 + 27742317777372353535851937790883648493


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "EdDSA"])
def test_odd_signature_forms_are_judged_as_pyjwt_judged_them(alg: str) -> None:
    # RFC 7518 §3.4: an ECDSA signature is R || S, each exactly the curve's size; the DER form
    # cryptography makes, a zero R or S, R + n, R and S swapped, a byte too many or too few are
    # refused by both. S and n - S both verify (ECDSA's malleability: PyJWT and RFC 7518 accept
    # it; nothing here keys on a token's text but the cache). Ed25519: S + L (not canonical) is
    # refused by both (cryptography checks S < L).
    import jwt as pyjwt
    from cryptography.hazmat.primitives import hashes

    from proxy.auth.verify import check_signature, read_header
    from proxy.base.errors import InvalidToken

    private, public = _signing_key(alg)
    good = pyjwt.encode({"sub": "x"}, private, algorithm=alg)
    head, body, sig = good.split(".")
    raw = base64.urlsafe_b64decode(sig + "==")
    if alg == "EdDSA":
        s = int.from_bytes(raw[32:], "little")
        forms = {"good": raw, "S+L": raw[:32] + (s + _ED25519_ORDER).to_bytes(32, "little"), "short": raw[:-1]}
        expected = {"good": True}
    else:
        size, n = len(raw) // 2, _ORDER[alg]
        r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
        digest = {"ES256": hashes.SHA256, "ES384": hashes.SHA384, "ES512": hashes.SHA512}[alg]
        forms = {
            "good": raw,
            "high-S": r.to_bytes(size, "big") + (n - s).to_bytes(size, "big"),
            "DER": private.sign(f"{head}.{body}".encode(), ec.ECDSA(digest())),
            "R=0": bytes(size) + raw[size:],
            "S=0": raw[:size] + bytes(size),
            "R+n": ((r + n) % 2 ** (8 * size)).to_bytes(size, "big") + raw[size:],
            "swapped": raw[size:] + raw[:size],
            "padded": bytes(1) + raw,
            "short": raw[1:],
        }
        expected = {"good": True, "high-S": True}
    for name, signature in forms.items():
        token = f"{head}.{body}.{b64(signature)}"
        try:
            pyjwt.api_jws.PyJWS().decode(token, PyJWK(dict(public), algorithm=alg), algorithms=[alg])
            theirs = True
        except PyJWTError:
            theirs = False
        try:
            check_signature(token, read_header(token, max_bytes=65536), [Jwk(public, alg)])
            ours = True
        except InvalidToken:
            ours = False
        assert (ours, theirs) == (expected.get(name, False),) * 2, (alg, name)


def test_a_key_set_leaves_out_keys_too_weak_for_their_algorithm() -> None:
    """jwks.py refuses at load what verify.py would refuse per token: an RSA key under 2048 bits
    (RFC 7518 §3.3), and binds an HMAC secret only to the algorithms it is long enough for."""
    from proxy.base.jwks import KeySet

    weak = {**RSAAlgorithm.to_jwk(RSA_1024, as_dict=True), "kid": "weak"}
    good = {**RSAAlgorithm.to_jwk(RSA_2048, as_dict=True), "kid": "good"}
    keys = KeySet.from_jwks({"keys": [weak, good]}, ("RS256", "PS256"))
    assert keys.size == 1 and keys.kids == {"good"}
    assert [(k.kid, k.reason) for k in keys.skipped] == [
        ("weak", "too weak: an RSA key of 1024 bits; at least 2048 are required (RFC 7518 §3.3)")
    ]
    assert keys.candidates("weak", "RS256") == ()
    secret = {"kty": "oct", "k": b64(bytes(range(32)))}  # 32 bytes: HS256's length, short of HS384's
    keys = KeySet.from_jwks({"keys": [secret]}, ("HS256", "HS384"))
    assert [key.algorithm_name for key in keys.candidates(None, "HS256")] == ["HS256"]
    assert keys.candidates(None, "HS384") == ()
    only_short = KeySet.from_jwks({"keys": [secret]}, ("HS384", "HS512"))
    assert [k.reason for k in only_short.skipped] == [
        "too weak: HS384 needs a secret of at least 48 bytes, this one has 32 (RFC 7518 §3.2); "
        "HS512 needs a secret of at least 64 bytes, this one has 32 (RFC 7518 §3.2)"
    ]
