"""RS256/384/512 checked by recovering the encoded digest and comparing it (verify.py
`verify_signature`, `_prepare`) against cryptography's own `RSAPublicKey.verify`: the same
verdict on every signature, good or crafted (RFC 8017 §8.2.2: any EM other than the one
encoding of the one DigestInfo is refused, and so is any signature of another length than
the modulus or not below it)."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from proxy.auth.verify import read_header, verify_signature
from proxy.base.errors import InvalidToken, Reason
from proxy.base.jwk import Jwk

_PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_PUBLIC = _PRIVATE.public_key()
_N = _PUBLIC.public_numbers().n
_D = _PRIVATE.private_numbers().d
_K = 256  # the modulus's length in bytes
_HASHES = {
    "RS256": (hashlib.sha256, hashes.SHA256()),
    "RS384": (hashlib.sha384, hashes.SHA384()),
    "RS512": (hashlib.sha512, hashes.SHA512()),
}
_INFO = {  # RFC 8017 §9.2 note 1
    "RS256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "RS384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "RS512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_NO_NULL = {  # the same DigestInfo with its parameters absent instead of NULL (refused by both)
    "RS256": bytes.fromhex("302f300b0609608648016503040201") + b"\x04\x20",
    "RS384": bytes.fromhex("303f300b0609608648016503040202") + b"\x04\x30",
    "RS512": bytes.fromhex("304f300b0609608648016503040203") + b"\x04\x40",
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwk(alg: str) -> Jwk:
    numbers = _PUBLIC.public_numbers()
    size = (numbers.n.bit_length() + 7) // 8
    return Jwk(
        {
            "kty": "RSA",
            "kid": "k",
            "alg": alg,
            "n": _b64(numbers.n.to_bytes(size, "big")),
            "e": _b64(numbers.e.to_bytes(3, "big")),
        },
        alg,
    )


def _raw_sign(em: bytes) -> bytes:
    """The RSA signature primitive on an encoded message of our making (RFC 8017 §5.2.1)."""
    return pow(int.from_bytes(em, "big"), _D, _N).to_bytes(_K, "big")


def _em(t: bytes, *, ff: int | None = None, head: bytes = b"\x00\x01", fill: int = 0xFF, tail: bytes = b"") -> bytes:
    """0x00 01 PS 00 T (and `tail`), PS `ff` bytes of `fill` (by default what makes k bytes)."""
    if ff is None:
        ff = _K - len(head) - 1 - len(t) - len(tail)
    return head + bytes([fill]) * ff + b"\x00" + t + tail


def _signatures(alg: str, signing_input: bytes) -> dict[str, bytes]:
    digest, _ = _HASHES[alg]
    h = digest(signing_input).digest()
    t = _INFO[alg] + h
    other = {"RS256": "RS384", "RS384": "RS512", "RS512": "RS256"}[alg]
    good = _raw_sign(_em(t))
    s = int.from_bytes(good, "big")
    ps = _em(t)
    return {
        "good": good,
        "good, made by cryptography": _PRIVATE.sign(signing_input, padding.PKCS1v15(), _HASHES[alg][1]),
        "one FF is FE": _raw_sign(ps[:5] + b"\xfe" + ps[6:]),
        "block type 2": _raw_sign(b"\x00\x02" + ps[2:]),
        "block type 0": _raw_sign(b"\x00\x00" + ps[2:]),
        "no leading zero": _raw_sign(b"\x01\x01" + ps[2:]),
        "no separator": _raw_sign(b"\x00\x01" + b"\xff" * (_K - 2 - len(t)) + t),
        "a byte after T": _raw_sign(_em(t, tail=b"\x00")),
        "garbage before T": _raw_sign(_em(b"\x00" * 4 + t)),
        "T cut short": _raw_sign(_em(t[:-1])),
        "DigestInfo without NULL": _raw_sign(_em(_NO_NULL[alg] + h)),
        "the hash alone, no DigestInfo": _raw_sign(_em(h)),
        "another hash's DigestInfo": _raw_sign(_em(_INFO[other] + _HASHES[other][0](signing_input).digest())),
        "another message's hash": _raw_sign(_em(_INFO[alg] + digest(signing_input + b"x").digest())),
        "PS of zeros": _raw_sign(_em(t, fill=0x00)),
        "seven FF, zeros before": _raw_sign(b"\x00" * (_K - 10 - len(t)) + b"\x00\x01" + b"\xff" * 7 + b"\x00" + t),
        "one byte short": good[1:],
        "one byte long": b"\x00" + good,
        "s + n (same EM mod n)": (s + _N).to_bytes(_K, "big") if s + _N < 1 << (8 * _K) else b"\xff" * _K,
        "n": _N.to_bytes(_K, "big"),
        "n - 1": (_N - 1).to_bytes(_K, "big"),
        "zero": b"\x00" * _K,
        "one": (1).to_bytes(_K, "big"),
        "all FF": b"\xff" * _K,
        "last bit flipped": good[:-1] + bytes([good[-1] ^ 1]),
        "first byte flipped": bytes([good[0] ^ 0x80]) + good[1:],
    }


def _verdict_ours(alg: str, header: str, body: str, signature: bytes) -> bool:
    token = f"{header}.{body}.{_b64(signature)}"
    try:
        verify_signature(token, read_header(token, max_bytes=65536), [_jwk(alg)])
    except InvalidToken as error:
        assert error.reason in (Reason.BAD_SIGNATURE, Reason.MALFORMED), error
        return False
    return True


def _verdict_cryptography(alg: str, signing_input: bytes, signature: bytes) -> bool:
    try:
        _PUBLIC.verify(signature, signing_input, padding.PKCS1v15(), _HASHES[alg][1])
    except InvalidSignature:
        return False
    return True


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512"])
def test_recover_and_compare_gives_cryptographys_verdict_on_crafted_signatures(alg: str) -> None:
    header = _b64(json.dumps({"alg": alg, "kid": "k"}).encode())
    body = _b64(json.dumps({"sub": "x", "iss": "https://issuer.test/"}).encode())
    signing_input = f"{header}.{body}".encode()
    cases = _signatures(alg, signing_input)
    verdicts = {name: _verdict_ours(alg, header, body, sig) for name, sig in cases.items()}
    for name, signature in cases.items():
        assert verdicts[name] == _verdict_cryptography(alg, signing_input, signature), name
    # and the verdicts are the ones RFC 8017 asks for: only the one encoding verifies
    assert {name for name, accepted in verdicts.items() if accepted} == {"good", "good, made by cryptography"}


def test_the_digest_info_prefixes_are_what_cryptography_signs() -> None:
    """`_DIGEST_INFO` is exactly what cryptography puts before the hash when it signs."""
    from proxy.auth.verify import _DIGEST_INFO

    for alg, (digest, algorithm) in _HASHES.items():
        signature = _PRIVATE.sign(b"m", padding.PKCS1v15(), algorithm)
        recovered = _PUBLIC.recover_data_from_signature(signature, padding.PKCS1v15(), None)
        assert recovered == _DIGEST_INFO[digest().name] + digest(b"m").digest() == _INFO[alg] + digest(b"m").digest()
