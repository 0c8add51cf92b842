"""Operator key material: make signing keys, publish their public halves, mint tokens with them.

Owns: generating RS256/ES256/EdDSA key pairs and HS256 secrets (never one secretcheck.py
refuses), writing private material with mode 0600 (never overwriting a key), writing or
extending a public JWK Set for a key rotation, the one way `token mint` reads a secret file
(`secret_for_minting`, through base/secretfile.py's `read_secret`, which a provider's
`secret: {file:, encoding:}` uses too), and minting a signed token from a private key or secret.
Does not own: argument parsing or printing (cli.py), loading keys for the proxy (config/builder.py,
keys.py) or verifying tokens (verify.py).

Every failure is a `KeyToolError` (base/secretfile.py) whose message is meant for the operator as it stands.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ..base.jwk import public_jwk
from ..base.jwks import FAMILIES, SUPPORTED_ALGORITHMS, SYMMETRIC_ALGORITHMS, fits
from ..base.secretcheck import weakness
from ..base.secretfile import MIN_HMAC_BYTES, SECRET_ENCODINGS, KeyToolError, read_secret

__all__ = [
    "GENERATE_ALGORITHMS",
    "SECRET_ENCODINGS",
    "GeneratedKey",
    "KeyToolError",
    "generate",
    "mint",
    "parse_claim",
    "read_secret",
    "secret_for_minting",
    "write",
]

GENERATE_ALGORITHMS: tuple[str, ...] = ("RS256", "ES256", "EdDSA", "HS256")

_DEFAULT_RSA_BITS = 2048
_MAX_RSA_BITS = 16384
# RFC 7518 §3.2: an HMAC key must be at least as long as the hash output. The generated
# secret is 64 bytes so it is long enough for every HS algorithm, and a provider that keeps
# the default `algorithms` (HS256, HS384, HS512) accepts it.
_SECRET_BYTES = 64
# What `keys generate` writes for a secret (`GeneratedKey.file_bytes`): the unpadded base64url
# text of _SECRET_BYTES bytes and a newline. `token mint` reads this shape as base64url.
_GENERATED = re.compile(
    rb"[A-Za-z0-9_-]{%d}(?:\r?\n)?" % len(base64.urlsafe_b64encode(bytes(_SECRET_BYTES)).rstrip(b"="))
)
# The kid names the key's file, so it must be a plain file name.
_KID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CURVES = {"secp256r1": ("P-256", "ES256"), "secp384r1": ("P-384", "ES384"), "secp521r1": ("P-521", "ES512")}
# Claims that have their own minting argument; a `--claim` may not set them a second way.
_OWN_ARGUMENT = ("iss", "aud", "sub")


@dataclass(frozen=True, slots=True, kw_only=True)
class GeneratedKey:
    """A new key: its private material and, for an asymmetric key, its public JWK."""

    kid: str
    alg: str
    private_pem: bytes | None = field(default=None, repr=False)
    """The private key, PEM PKCS#8 unencrypted; None for an HMAC secret."""
    secret: bytes | None = field(default=None, repr=False)
    """The raw HMAC secret; None for a key pair."""
    public_jwk: Mapping[str, Any] | None = None
    """The public key as a JWK with kid, alg and `use: sig`; None for an HMAC secret."""

    @property
    def file_name(self) -> str:
        """Name of the private file: `<kid>.pem`, or `<kid>.secret` for an HMAC secret."""
        return f"{self.kid}.secret" if self.secret is not None else f"{self.kid}.pem"

    def file_bytes(self) -> bytes:
        """What the private file holds; a secret as base64url text (`encoding: base64url`)."""
        if self.secret is not None:
            return base64.urlsafe_b64encode(self.secret).rstrip(b"=") + b"\n"
        assert self.private_pem is not None
        return self.private_pem


def generate(alg: str, kid: str, *, bits: int | None = None) -> GeneratedKey:
    """A new key for `alg` (RS256, ES256, EdDSA or HS256) named `kid`; `bits` sizes RSA only."""
    if alg not in GENERATE_ALGORITHMS:
        raise KeyToolError(f"cannot generate a key for {alg!r}; choose one of {', '.join(GENERATE_ALGORITHMS)}")
    _check_kid(kid)
    if bits is not None and alg != "RS256":
        raise KeyToolError(f"a key size only applies to RS256; {alg} keys have a fixed size")
    if alg == "HS256":
        return GeneratedKey(kid=kid, alg=alg, secret=_random_secret())
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    if alg == "RS256":
        size = _DEFAULT_RSA_BITS if bits is None else bits
        if not _DEFAULT_RSA_BITS <= size <= _MAX_RSA_BITS:
            raise KeyToolError(
                f"an RSA key of {size} bits is refused; use {_DEFAULT_RSA_BITS} to {_MAX_RSA_BITS} "
                "(RFC 7518 §3.3 asks for at least 2048)"
            )
        private = rsa.generate_private_key(public_exponent=65537, key_size=size)
        jwk = public_jwk(private.public_key())
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
        jwk = public_jwk(private.public_key())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
        jwk = public_jwk(private.public_key())
    from cryptography.hazmat.primitives import serialization  # (here: `jwt-sidecar run` imports this module: ~0.5 MiB)

    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return GeneratedKey(kid=kid, alg=alg, private_pem=pem, public_jwk={**jwk, "kid": kid, "alg": alg, "use": "sig"})


def write(key: GeneratedKey, out_dir: Path, *, jwks_path: Path | None = None) -> list[Path]:
    """Write the key's private file (mode 0600) into `out_dir` and publish its public JWK.

    The public JWK goes into a new `out_dir/jwks.json`, or, with `jwks_path`, is added to
    that existing JWK Set beside the keys it already holds, so old and new keys are served
    together during a rotation. Nothing is overwritten: an existing private file, an
    existing `jwks.json` (without `jwks_path`) or a kid already in the set is refused before
    anything is written. Returns the paths written, the private file first.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():  # else mkdir's bare "File exists"
        raise KeyToolError(f"{out_dir} is a file; --out names the directory the key files go into")
    private_path = out_dir / key.file_name
    if key.public_jwk is None and jwks_path is not None:
        raise KeyToolError(
            f"an {key.alg} secret is shared, never published, so it cannot join a JWK Set; leave out --jwks"
        )
    if private_path.exists():
        raise KeyToolError(
            f"{private_path} already exists; refusing to overwrite a key (choose another --kid or --out)"
        )
    jwks_target: Path | None = None
    document: dict[str, Any] = {}
    mode = 0o644
    if key.public_jwk is not None:
        if jwks_path is None:
            jwks_target = out_dir / "jwks.json"
            if jwks_target.exists():
                raise KeyToolError(
                    f"{jwks_target} already exists; to add this key to it for a rotation, pass --jwks {jwks_target}"
                )
            document = {"keys": [dict(key.public_jwk)]}
        else:
            jwks_target = Path(jwks_path)
            document, mode = _extended_jwks(jwks_target, key.public_jwk)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KeyToolError(f"cannot create {out_dir}: {error.strerror or error}") from None
    _create_private(private_path, key.file_bytes())
    if jwks_target is None:
        return [private_path]
    try:
        _replace_atomically(jwks_target, (json.dumps(document, indent=2) + "\n").encode(), mode)
    except KeyToolError:
        # Leave no half-done rotation behind: a private key whose public half was never published.
        private_path.unlink(missing_ok=True)
        raise
    return [private_path, jwks_target]


def secret_for_minting(data: bytes, encoding: str | None, *, source: str, alg: str | None = None) -> tuple[bytes, str]:
    """The HMAC secret a secret file holds for `token mint`, and the encoding it was read with.

    With `encoding`: read exactly as a provider with that `encoding:` reads it, and a file
    that is not that encoding is refused, naming the encodings it does read as. Without: the
    form `keys generate` writes (the unpadded base64url text of its 64 random bytes, one
    line) is base64url; any other file must read one way only, counting only readings long
    enough for `alg` (default HS256): a file that is also valid base64 or base64url text
    decoding to another usable secret is refused, since a wrong guess signs tokens no
    provider accepts. So a secret is never signed with silently guessed bytes. A PEM key is
    refused in any case: it belongs to --key, and as an HMAC secret it is the algorithm
    confusion of RFC 8725 §2.1.
    """
    if b"-----BEGIN " in data:
        raise KeyToolError(f"{source} holds a PEM key, not a shared secret; sign with --key {source}")
    if encoding is not None:
        try:
            return read_secret(data, encoding), encoding
        except KeyToolError as error:
            if str(error) == "the secret is empty":
                raise KeyToolError(f"{source} is empty") from None
            others = [e for e in SECRET_ENCODINGS if e != encoding and _reads_as(data, e) is not None]
            hint = f"; it reads as {' or '.join(others)}" if others else ""
            raise KeyToolError(
                f"{source} is not {encoding} text{hint}; give the --secret-encoding that the "
                "provider's `secret: encoding:` names"
            ) from None
    if _GENERATED.fullmatch(data) and _reads_as(data, "base64url") is not None:
        return read_secret(data, "base64url"), "base64url"
    need = MIN_HMAC_BYTES.get(alg or "HS256", 32)
    readings: dict[bytes, list[str]] = {}
    for name in SECRET_ENCODINGS:
        secret = _reads_as(data, name)
        if secret is not None and len(secret) >= need:
            readings.setdefault(secret, []).append(name)
    if len(readings) > 1:
        ways = "; ".join(f"as {' or '.join(names)} text: {len(secret)} bytes" for secret, names in readings.items())
        raise KeyToolError(
            f"{source} can be read more than one way ({ways}), and a token signed with the wrong "
            "bytes verifies nowhere; give --secret-encoding as the provider's `secret: encoding:` "
            "says (utf-8 when it says none)"
        )
    if readings:
        (names,) = readings.values()
        return read_secret(data, names[0]), names[0]
    # No reading is long enough: the provider's default, whose length mint then refuses in words.
    return read_secret(data, "utf-8"), "utf-8"


def _reads_as(data: bytes, encoding: str) -> bytes | None:
    try:
        return read_secret(data, encoding)
    except KeyToolError:
        return None


def parse_claim(text: str) -> tuple[str, Any]:
    """`name=value` → (name, value): the value as JSON when it parses as JSON, else as a string.

    So `admin=true` is True, `n=3` is 3, `roles=["a","b"]` a list and `name=bob` "bob";
    `name="3"` keeps a number-like string a string. Dotted names are kept as they are.
    """
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise KeyToolError(f'{text!r} is not a claim; write NAME=VALUE, e.g. admin=true or roles=\'["a","b"]\'')
    try:
        value: Any = json.loads(raw, parse_constant=_no_constant)
    except ValueError:
        value = raw
    return name, value


def _no_constant(name: str) -> Any:
    # NaN and Infinity are Python's extension to JSON, not JSON (RFC 8259 §6): keep them text.
    raise ValueError(name)


def mint(
    *,
    private_key_pem: bytes | None = None,
    secret: bytes | None = None,
    alg: str | None = None,
    kid: str | None = None,
    iss: str,
    aud: Sequence[str],
    sub: str | None = None,
    ttl_seconds: float,
    not_before: float | None = None,
    claims: Mapping[str, Any] | None = None,
    now: float,
) -> str:
    """A signed token from a PEM private key or an HMAC secret (exactly one).

    The payload holds iss, aud (a string when there is one audience, RFC 7519 §4.1.3), sub
    when given, iat (`now`), exp = iat + ttl, nbf when `not_before` (a time) is given, a random
    jti, then `claims`. A negative ttl mints a token that expired that long ago, a
    `not_before` after `now` one that is not valid yet: tokens to try a verifier's refusals
    with. A claim in `claims` may replace iat, exp, nbf or jti but not iss, aud or sub. `alg`
    defaults to the one the key implies: RSA → RS256, EC → ES256/ES384/ES512 by curve,
    Ed25519 → EdDSA, a secret → HS256.
    """
    if (private_key_pem is None) == (secret is None):
        raise KeyToolError("give exactly one of a private key or a secret")
    if alg is not None and alg not in FAMILIES:
        raise KeyToolError(f"{alg!r} is not a signing algorithm; choose one of {', '.join(SUPPORTED_ALGORITHMS)}")
    signing_key: Any
    if secret is not None:
        signing_key, algorithm = secret, _secret_algorithm(secret, alg)
    else:
        assert private_key_pem is not None
        signing_key, algorithm = _private_key_algorithm(private_key_pem, alg)
    if not aud:
        raise KeyToolError("give at least one audience")
    if abs(ttl_seconds) < 1:
        raise KeyToolError("the token's lifetime must be at least 1s (or, for an expired token, at most -1s)")
    extra = dict(claims or {})
    taken = [name for name in _OWN_ARGUMENT if name in extra]
    if taken:
        raise KeyToolError(f"set {', '.join(taken)} with {', '.join('--' + n for n in taken)}, not as a claim")
    issued = int(now)
    payload: dict[str, Any] = {"iss": iss, "aud": aud[0] if len(aud) == 1 else list(aud)}
    if sub is not None:
        payload["sub"] = sub
    expires = issued + int(ttl_seconds)
    payload.update(iat=issued, exp=expires)
    if not_before is not None:
        if "nbf" in extra:
            raise KeyToolError("nbf is given twice: as a not-before time and as a claim")
        if int(not_before) >= expires:
            raise KeyToolError(
                f"the token would never be valid: its nbf ({int(not_before) - issued:+d}s from now) "
                f"is not before its exp ({int(ttl_seconds):+d}s); give a longer ttl or an earlier "
                "not-before"
            )
        payload["nbf"] = int(not_before)
    import secrets  # (here: `jwt-sidecar run` imports this module)

    payload["jti"] = secrets.token_urlsafe(16)
    payload.update(extra)
    headers = {"kid": kid} if kid is not None else None
    import jwt  # here: `jwt-sidecar run` imports this module and must not load PyJWT (base/jwk.py)

    try:
        return jwt.encode(payload, signing_key, algorithm=algorithm, headers=headers)
    except (TypeError, ValueError) as error:
        # A claim value JSON cannot hold; --claim values always can, so this is a caller's dict.
        raise KeyToolError(f"cannot encode the token: {error}") from None


# -- helpers ------------------------------------------------------------------------------


def _random_secret() -> bytes:
    """Random bytes that config/builder.py's secret check accepts, read as written or as plain text.

    About one random draw in a million happens to spell a placeholder word in its base64url
    text (secretcheck.py); drawing again costs nothing and keeps `keys generate` from ever
    writing a secret that `jwt-sidecar run` refuses, even read with the default `utf-8`.
    """
    while True:
        import secrets  # (as in `mint`)

        secret = secrets.token_bytes(_SECRET_BYTES)
        text = base64.urlsafe_b64encode(secret).rstrip(b"=")
        if weakness(secret, written=text) is None and weakness(text) is None:
            return secret


def _check_kid(kid: str) -> None:
    if not _KID.fullmatch(kid):
        raise KeyToolError(
            f"{kid!r} cannot be a kid here: it names the key's file, so use letters, digits, "
            "'.', '_' and '-' (up to 128, not starting with '.', '_' or '-')"
        )


def _extended_jwks(path: Path, jwk: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """The JWK Set at `path` with `jwk` appended, and the file's mode to keep."""
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        raise KeyToolError(f"{path} does not exist; to start a new key set, leave out --jwks") from None
    except OSError as error:
        raise KeyToolError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        document = json.loads(data)
    except ValueError as error:
        raise KeyToolError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeyToolError(f'{path} is not a JWK Set: expected a JSON object with a "keys" array')
    kids = [k.get("kid") for k in document["keys"] if isinstance(k, dict)]
    if jwk["kid"] in kids:
        raise KeyToolError(
            f"kid {jwk['kid']!r} is already in {path}; a new key needs a kid of its own, "
            "or verifiers cannot tell the keys apart"
        )
    document["keys"].append(dict(jwk))
    return document, mode


def _create_private(path: Path, data: bytes) -> None:
    # O_EXCL: never replace an existing key, even one that appeared since the check above.
    # The mode is given at creation, so the secret is never readable by others, not even briefly.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyToolError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as error:
        raise KeyToolError(f"cannot create {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        path.unlink(missing_ok=True)
        raise KeyToolError(f"cannot write {path}: {error.strerror or error}") from None


def _replace_atomically(path: Path, data: bytes, mode: int) -> None:
    # A temp file in the same directory, then os.replace: a server reading the JWK Set
    # sees the old file or the new one, never a half-written one.
    try:
        import tempfile  # (here: it brings `shutil`, `bz2` and `lzma`, ~0.6 MiB of a running sidecar)

        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise KeyToolError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except OSError as error:
        Path(temp).unlink(missing_ok=True)
        raise KeyToolError(f"cannot write {path}: {error.strerror or error}") from None


def _secret_algorithm(secret: bytes, alg: str | None) -> str:
    algorithm = alg or "HS256"
    if algorithm not in SYMMETRIC_ALGORITHMS:
        raise KeyToolError(f"a secret signs only {', '.join(SYMMETRIC_ALGORITHMS)}, not {algorithm}")
    need = MIN_HMAC_BYTES[algorithm]
    if len(secret) < need:
        raise KeyToolError(f"the secret is {len(secret)} bytes; {algorithm} needs at least {need} (RFC 7518 §3.2)")
    return algorithm


def _private_key_algorithm(pem: bytes, alg: str | None) -> tuple[Any, str]:
    """The loaded private key and the algorithm it signs with (`alg`, checked, or implied)."""
    from cryptography.hazmat.primitives import serialization  # (as in `generate_key`)

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise KeyToolError(
            "the private key is encrypted; give an unencrypted PEM key (`openssl pkey -in KEY -out PLAIN`)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        hint = "; it holds a public key, and signing needs the private one" if b"PUBLIC KEY" in pem else ""
        raise KeyToolError(f"the key is not a PEM private key{hint}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        kty, crv, implied = "RSA", None, "RS256"
    elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _CURVES:
        kty, (crv, implied) = "EC", _CURVES[key.curve.name]
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        kty, crv, implied = "OKP", "Ed25519", "EdDSA"
    else:
        what = f"EC {key.curve.name}" if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
        raise KeyToolError(f"unsupported key type {what}; use RSA, EC P-256/P-384/P-521 or Ed25519")
    if alg is None:
        return key, implied
    if not fits(alg, kty, crv):
        described = kty + (f" {crv}" if crv else "")
        raise KeyToolError(
            f"{alg} cannot sign with this {described} key; it signs {implied}"
            + (" (or RS384, RS512, PS256, PS384, PS512)" if kty == "RSA" else "")
        )
    return key, alg
