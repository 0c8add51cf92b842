"""One JSON Web Key (RFC 7517/7518/8037) turned into a cryptography key bound to one algorithm,
and a public key turned back into a JWK.

Owns: reading the members of an RSA (`n`, `e`), EC (`crv`, `x`, `y`), OKP (`crv`, `x`:
Ed25519, Ed448) or oct (`k`) public JWK into cryptography's key object (or the secret's bytes),
with the checks PyJWT's `PyJWK` made (coordinate lengths per curve, the point on the curve
and RSA's public numbers checked by cryptography, an empty secret refused, a private JWK
refused); whether a secret looks like something other than a secret (a PEM, SSH or DER key or
certificate, a JWK: `unfit_secret`, PyJWT's `HMACAlgorithm.prepare_key` checks); `public_jwk`
for the config's PEM files. Does not own: which JWKs of a set are usable or which algorithm
fits which key (jwks.py), or checking signatures (auth/verify.py).

Why not PyJWT's `PyJWK`: importing PyJWT loads every algorithm module, its JWKS client
(urllib.request, http.client, email) and its JWT API: 4.8 MiB in a fresh interpreter, 2.6 MiB
of every running process's peak RSS (bench/FIGURES.md, "Memory of one process and of
`workers: 2`"), for a parser of four key types.
PyJWT stays for the key tools (`jwt-sidecar keys`, `token mint`) and the tests, which compare
this module with it (tests/unit/base/test_jwk.py). Error messages are PyJWT's, and every
failure is one `InvalidKeyError` as `PyJWK` raised (jwks.py reports its name per key).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers

__all__ = ["InvalidKeyError", "Jwk", "public_jwk", "unfit_secret"]


class InvalidKeyError(ValueError):
    """A JWK that makes no key (named as PyJWT's exception was: jwks.py reports the name)."""


class Jwk:
    """A verification key bound to one algorithm: `key` is cryptography's public key object,
    or the secret's bytes for HS*. Attribute names as PyJWT's `PyJWK` (verify.py reads
    `algorithm_name`, `key_id` and `key`)."""

    __slots__ = ("algorithm_name", "key", "key_id", "key_type")

    def __init__(self, jwk: Mapping[str, Any], algorithm: str) -> None:
        kty = jwk.get("kty")
        if not kty:
            raise InvalidKeyError(f"kty is not found: {dict(jwk)}")
        self.algorithm_name = algorithm
        self.key_type: str = kty
        kid = jwk.get("kid")
        self.key_id: str | None = kid
        want = _KTY.get(algorithm)
        if want is None:
            raise InvalidKeyError(f"Unable to find an algorithm for key: {dict(jwk)}")
        if kty != want:
            raise InvalidKeyError(_NOT[want])
        if want != "oct" and "d" in jwk:
            raise InvalidKeyError("holds private key material")  # jwks.py refuses these first
        read = _READERS[want]
        try:
            self.key: Any = read(jwk)
        except (TypeError, ValueError) as error:
            if isinstance(error, InvalidKeyError):
                raise
            raise InvalidKeyError(f"Unable to construct key from JWK: {error}") from error

    def __repr__(self) -> str:
        return f"Jwk({self.algorithm_name}, kid={self.key_id!r})"


def _b64(value: Any) -> bytes:
    """PyJWT's `base64url_decode`: padding added, characters outside the alphabet skipped."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    elif not isinstance(value, bytes):
        raise TypeError("Expected a string or bytes value")
    return base64.urlsafe_b64decode(value + b"=" * (-len(value) % 4))


def _rsa(jwk: Mapping[str, Any]) -> RSAPublicKey:
    if "n" not in jwk or "e" not in jwk:
        raise InvalidKeyError("Not a public or private key")
    e, n = int.from_bytes(_b64(jwk["e"]), "big"), int.from_bytes(_b64(jwk["n"]), "big")
    return RSAPublicNumbers(e, n).public_key()  # ValueError for numbers that make no RSA key


_CURVES: dict[Any, tuple[type[ec.EllipticCurve], int]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
    "P-521": (ec.SECP521R1, 66),
    "secp256k1": (ec.SECP256K1, 32),
}


def _ec(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    if "x" not in jwk or "y" not in jwk:
        raise InvalidKeyError("Not an Elliptic curve key")
    x, y = _b64(jwk["x"]), _b64(jwk["y"])
    crv = jwk.get("crv")
    curve = _CURVES.get(crv) if isinstance(crv, str) else None
    if curve is None:
        raise InvalidKeyError(f"Invalid curve: {crv}")
    if not len(x) == len(y) == curve[1]:
        raise InvalidKeyError(f"Coords should be {curve[1]} bytes for curve {crv}")
    # cryptography refuses a point that is not on the curve (ValueError): the invalid-curve
    # attack (a point of small order on another curve) never gets a key object.
    return ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve[0]()).public_key()


def _okp(jwk: Mapping[str, Any]) -> Ed25519PublicKey | Ed448PublicKey:
    crv = jwk.get("crv")
    if crv != "Ed25519" and crv != "Ed448":
        raise InvalidKeyError(f"Invalid curve: {crv}")
    if "x" not in jwk:
        raise InvalidKeyError('OKP should have "x" parameter')
    x = _b64(jwk["x"])
    try:
        return Ed25519PublicKey.from_public_bytes(x) if crv == "Ed25519" else Ed448PublicKey.from_public_bytes(x)
    except ValueError as error:
        raise InvalidKeyError("Invalid key parameter") from error


def _oct(jwk: Mapping[str, Any]) -> bytes:
    if "k" not in jwk:  # PyJWT raised a KeyError here, out of PyJWK's handling
        raise InvalidKeyError("Not an HMAC key")
    secret = _b64(jwk["k"])
    if not secret:
        raise InvalidKeyError("HMAC key must not be empty.")
    return secret


_READERS = {"RSA": _rsa, "EC": _ec, "OKP": _okp, "oct": _oct}
_NOT = {
    "RSA": "Not an RSA key",
    "EC": "Not an Elliptic curve key",
    "OKP": "Not an Octet Key Pair",
    "oct": "Not an HMAC key",
}
_KTY = {
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), "RSA"),
    **dict.fromkeys(("ES256", "ES256K", "ES384", "ES512", "ES521"), "EC"),
    "EdDSA": "OKP",
    **dict.fromkeys(("HS256", "HS384", "HS512"), "oct"),
}
"""The key type each algorithm PyJWT knew is verified with (jwks.py's `FAMILIES` says which of them may be)."""


def public_jwk(key: Any) -> dict[str, Any]:
    """An RSA, EC or Ed25519/Ed448 public key as a JWK, as PyJWT's `to_jwk(as_dict=True)` writes it."""
    if isinstance(key, RSAPublicKey):
        numbers = key.public_numbers()
        return {"kty": "RSA", "key_ops": ["verify"], "n": _uint(numbers.n), "e": _uint(numbers.e)}
    if isinstance(key, ec.EllipticCurvePublicKey):
        point = key.public_numbers()
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521", "secp256k1": "secp256k1"}
        if key.curve.name not in crv:
            raise InvalidKeyError(f"Invalid curve: {key.curve}")
        bits = key.curve.key_size
        return {"kty": "EC", "crv": crv[key.curve.name], "x": _uint(point.x, bits), "y": _uint(point.y, bits)}
    if isinstance(key, (Ed25519PublicKey, Ed448PublicKey)):
        # Here: cryptography's `serialization` package brings its SSH and cipher modules, ~0.5 MiB
        # of every running sidecar (bench/FIGURES.md, "Resident memory, session 10").
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        x = key.public_bytes(encoding=Encoding.Raw, format=PublicFormat.Raw)
        return {"x": _b64e(x), "kty": "OKP", "crv": "Ed25519" if isinstance(key, Ed25519PublicKey) else "Ed448"}
    raise InvalidKeyError("Not a public or private key")


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _uint(value: int, bits: int | None = None) -> str:
    data = value.to_bytes(((bits if bits is not None else value.bit_length()) + 7) // 8, "big")
    return _b64e(data or b"\x00")


# -- a secret that is something else ---------------------------------------------------------
_PEMS = (
    b"CERTIFICATE",
    b"TRUSTED CERTIFICATE",
    b"PRIVATE KEY",
    b"PUBLIC KEY",
    b"ENCRYPTED PRIVATE KEY",
    b"OPENSSH PRIVATE KEY",
    b"DSA PRIVATE KEY",
    b"RSA PRIVATE KEY",
    b"RSA PUBLIC KEY",
    b"EC PRIVATE KEY",
    b"DH PARAMETERS",
    b"NEW CERTIFICATE REQUEST",
    b"CERTIFICATE REQUEST",
    b"SSH2 PUBLIC KEY",
    b"SSH2 ENCRYPTED PRIVATE KEY",
    b"X509 CRL",
)
_PEM_MARKER = re.compile(b"(?=(----[- ](BEGIN|END) (" + b"|".join(_PEMS) + b")[- ]----))")
_SSH_KEYS = (
    b"ssh-ed25519",
    b"ssh-rsa",
    b"ssh-dss",
    b"ecdsa-sha2-nistp256",
    b"ecdsa-sha2-nistp384",
    b"ecdsa-sha2-nistp521",
)


def unfit_secret(secret: bytes) -> bool:
    """Whether an HMAC secret is really a PEM, SSH or DER key or certificate, or a JWK (JSON
    with a `kty` member anywhere): what PyJWT's `HMACAlgorithm.prepare_key` refuses, so that a
    public key or a key set can never be made to serve as an HMAC secret (CVE-2022-29217)."""
    if not secret or _is_pem(secret) or secret.startswith(_SSH_KEYS) or _is_der(secret):
        return True
    try:
        document = json.loads(secret, parse_int=lambda _: 0)
    except RecursionError:
        return _deep_json_looks_like_a_jwk(secret)
    except ValueError:
        return False
    pending = [document]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if "kty" in item:
                return True
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _is_pem(secret: bytes) -> bool:
    begins: dict[bytes, int] = {}
    for marker in _PEM_MARKER.finditer(secret):
        kind, label = marker.group(2), marker.group(3)
        if kind == b"BEGIN":
            begins[label] = marker.start(1) + len(marker.group(1))
        elif label in begins and begins[label] < marker.start(1):
            return True
    return False


def _is_der(secret: bytes) -> bool:
    # Imported here: only a process with an HS key ever asks, and only once per key.
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    for load in (load_der_public_key, x509.load_der_x509_certificate):
        try:
            load(secret)
        except (TypeError, ValueError, UnsupportedAlgorithm):
            continue
        return True
    return False


def _deep_json_looks_like_a_jwk(secret: bytes) -> bool:
    """JSON too deep for `json.loads`: an object, or an array with a `"kty":` member name."""
    try:
        text = secret.decode(json.detect_encoding(secret), errors="surrogatepass")
    except UnicodeError:
        text = ""
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("{"):
        return True
    if not stripped.startswith("["):
        return False
    index = 0
    while index < len(text):
        if text[index] != '"':
            index += 1
            continue
        end = index + 1
        while end < len(text):
            if text[end] == "\\":
                end += 2
            elif text[end] == '"':
                break
            else:
                end += 1
        if end >= len(text):
            return False
        after = end + 1
        while after < len(text) and text[after] in " \t\r\n":
            after += 1
        if after < len(text) and text[after] == ":":
            try:
                if json.loads(text[index : end + 1]) == "kty":
                    return True
            except ValueError:
                pass
        index = end + 1
    return False
