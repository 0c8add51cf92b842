"""Token + provider + keys + now → verified `Claims`, or an `InvalidToken` that says which check failed.

Owns: the order and content of every check RFC 7515/7519/8725/9068 asks of a JWS access
token (size, one canonical base64url spelling, strict JSON with no duplicate member names,
header, alg allow-list, typ, crit, signature, NumericDate types, exp, nbf, iat, token age,
iss, aud, required claims), checking the signature with each candidate key on cryptography's
key object (RSASSA-PKCS1-v1_5, RSASSA-PSS, ECDSA, EdDSA, HMAC; RFC 7518 §3), choosing
among a route's several providers by the token's unverified `iss` (`by_issuer`),
the operator text of every refusal (the `detail` the proxy logs and `token explain` prints:
our own phrases, a token's values via `shown`, never `None` or a library's message;
`segment_problem` names what is wrong with a segment), and the verified-token cache. Does
not own: fetching keys (keys.py hands us candidates), route rules (rules.py), or where the
token came from (extract.py).

The checks are small named functions in two tables, `HEADER_CHECKS` and `CLAIM_CHECKS`:
`verify` stops at the first failure; `explain` runs every one of them and reports each. The
usual cache miss (a header already checked, its one key held) runs them as one straight
`Verifier.verify_now`, which leaves everything else to the general way before any signature
is checked (bench/FIGURES.md, "Cache misses, session 8").

Why not `jwt.decode` with its own claim checks: PyJWT reads `datetime.now()` (we inject a
clock), accepts numeric strings for exp/nbf/iat (`int("1700000000")`; RFC 7519 §2 says a
NumericDate is a JSON number), and raises one error type for several of our reasons. Its
algorithms are not used either: the signature is checked straight on cryptography's key
objects as PyJWT's algorithms did (`_prepare`), so that no running sidecar imports PyJWT
(base/jwk.py says why; the tests compare both on a corpus).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import json.scanner
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..base.errors import InvalidToken, Reason
from ..base.jwk import Jwk, unfit_secret
from ..base.memo import Memo
from ..config.settings import Provider, TokenCacheSettings

if TYPE_CHECKING:
    from ..base.clock import Clock
    from .keys import KeySource

__all__ = [
    "CLAIM_CHECKS",
    "HEADER_CHECKS",
    "Claims",
    "TokenCache",
    "TokenHeader",
    "Verifier",
    "by_issuer",
    "check_claims",
    "check_signature",
    "issuers_in_words",
    "parse_payload",
    "read_header",
    "segment_problem",
    "segments_problem",
    "shown",
    "verify_signature",
]


@dataclass(frozen=True, slots=True)
class TokenHeader:
    """The JOSE header of a token that is not trusted yet (RFC 7515 §4)."""

    alg: Any
    kid: Any
    fields: Mapping[str, Any]


class Claims:
    """A verified token: its provider, header and payload; in the token cache, the entry itself.

    Compared and hashed by identity: a cached token comes back as the same object, which is
    how identity.py's `Renderer` knows it rendered its headers already. Nothing in it changes
    once built but what the cache and the first `Renderer` note on it (`until`, `digest`,
    `rendered_by`, `rendered`); the payload and header are read-only views. `__slots__` and
    no other per-token object (the header view is shared by every token with the same header
    segment, claim names and the provider's iss/aud are shared strings): a cached token
    costs what bench/cache_memory.py measures (bench/FIGURES.md)."""

    __slots__ = ("digest", "header", "payload", "provider", "rendered", "rendered_by", "until")

    def __init__(
        self, provider: str, header: Mapping[str, Any], payload: Mapping[str, Any], until: float = math.inf
    ) -> None:
        self.provider = provider
        self.header = header
        self.payload = payload
        self.until = until
        """`TokenCache`: not to be served from the cache from this `clock.time()` on."""
        self.digest: bytes | None = None
        """`TokenCache`: its key for this token."""
        self.rendered_by: object = None
        self.rendered: Any = None
        """The identity headers the first `Renderer` (`rendered_by`) made for this token: they
        live as long as the entry (other renderers keep theirs in their own memo)."""

    @property
    def subject(self) -> str | None:
        sub = self.payload.get("sub")
        return sub if isinstance(sub, str) else None

    @property
    def expires(self) -> float | None:
        exp = self.payload.get("exp")
        return float(exp) if _is_number(exp) else None

    def __repr__(self) -> str:
        return f"Claims(provider={self.provider!r}, header={dict(self.header)!r}, payload={dict(self.payload)!r})"


def _unbase64url(segment: bytes) -> bytes | None:
    """A segment's bytes, or None when it is not unpadded, canonical base64url.

    Stricter than PyJWT's decoder, and faster. Strict: a byte string has one spelling (RFC 7515
    §2: base64url "with all trailing '=' characters omitted"), so padding is refused (PyJWT
    accepts `==` after a signature, which made two texts of one token verify), as is any
    character outside [A-Za-z0-9_-], a length of 1 mod 4 (no byte ends there) and a last
    character with non-zero unused bits (`...Q` vs `...R`). tests/unit/auth/test_verify.py
    compares it with PyJWT's on thousands of segments (same answer but for padding, which only
    PyJWT accepts). That makes each segment one spelling of its bytes, not the token one text:
    an ECDSA signature (r, s) has a twin (r, n - s) that verifies too (RFC 7518 §3.4 asks for
    no low S; accepted, as PyJWT and OpenSSL accept it), so a holder of an ES token can write
    a second text of it. Nothing here relies on one text per token: the token cache keys on
    the text but verified each text it holds, and revocation keys on claims
    (tests/unit/auth/test_signature_spellings.py; README "What is checked, in order").

    One `translate` reads '-_' as '+/' and '=', '+' and '/' as '!', which `a2b_base64` in
    strict mode refuses as it refuses every other character outside the alphabet
    (whitespace, non-ASCII, '.'): no search for the three (six `in` tests a miss, ~2k
    instructions: bench/FIGURES.md, "Cache misses, session 8"). A length of 1 mod 4 ends in
    no byte; the last character must leave the bits no byte uses at zero (4 of them after 2
    characters, 2 after 3): one table lookup instead of PyJWT's re-encode. One `translate`
    and one `a2b_base64` per segment, where an alphabet check by `translate(None, alphabet)`
    cost as much as the decode (bench/FIGURES.md)."""
    tail = len(segment) % 4
    if tail == 1 or (tail and _SEXTET.get(segment[-1], 0) & (0x0F if tail == 2 else 0x03)):
        return None
    try:
        return binascii.a2b_base64(segment.translate(_TO_STANDARD) + _PADDING[tail], strict_mode=True)
    except binascii.Error:
        return None


_PADDING = (b"", b"", b"==", b"=")
_BASE64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SEXTET = {byte: value for value, byte in enumerate(_BASE64URL_ALPHABET)}
_TO_STANDARD = bytes.maketrans(b"-_=+/", b"+/!!!")
"""base64url to base64's alphabet, and base64's own '+', '/' and its padding to '!', which
no base64 text holds: only base64url's alphabet decodes."""


class _NotStrictJson(ValueError):
    """JSON that Python's parser takes but RFC 8259 / RFC 7519 §4 make us refuse."""


def _one_member_per_name(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7519 §4 lets a parser reject duplicate member names or keep the last; we reject,
    # at every depth (the claims set and any object inside it), so nothing that reads the
    # JSON after us (an upstream reading X-Jwt-Payload, a parser that keeps the first) can
    # see another value than the one we checked. The hook is one call per object, the dict
    # built in C: the names are interned only where a token is kept (`_shared_names`), not
    # here for every token (bench/FIGURES.md, "Cache misses, session 5").
    members = dict(pairs)
    if len(members) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _NotStrictJson(f"duplicate member name {name!r}")
            seen.add(name)
    return members


_intern = sys.intern


def _shared_names(value: Any) -> Any:
    """A claim's JSON value as the cache keeps it: every member name interned, at every depth,
    so every cached token's `roles`, `name`... is one shared str, not a copy per token (~50
    bytes a name, bench/FIGURES.md); strings, numbers and the like as they are."""
    if value.__class__ is dict:
        return {_intern(name): _shared_names(member) for name, member in value.items()}
    if value.__class__ is list:
        return [_shared_names(item) for item in value]
    return value


_BRACE = ord("{")


def _no_constant(name: str) -> Any:
    # Python reads NaN, Infinity and -Infinity; JSON (RFC 8259 §6) has no such numbers.
    raise _NotStrictJson(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_one_member_per_name, parse_constant=_no_constant)
_STRICT_JSON = _DECODER.decode
"""`json.loads` for token JSON: refuses duplicate member names and NaN/Infinity. A str only
(RFC 7515 §5.2 / RFC 7519 §7.2: UTF-8, decoded by the caller, so no encoding sniffing)."""
_SCAN = (json.scanner.c_make_scanner or json.scanner.py_make_scanner)(_DECODER)  # type: ignore[attr-defined]


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """`raw` as a JSON object by the same decoder, when it is one with nothing around it; None
    otherwise (then `_STRICT_JSON` says why, or accepts what this did not: surrounding
    whitespace). The decoder's scanner called directly: `decode` adds two regex matches and
    two Python calls per document (bench/FIGURES.md)."""
    try:
        text = raw.decode("utf-8")
        if text[:1] == "{":
            value, end = _SCAN(text, 0)
            if end == len(text):
                return value
    except (ValueError, RecursionError, StopIteration):
        pass
    return None


def shown(value: Any, *, limit: int = 80) -> str:
    """A value from a token in operator text: a string quoted, anything else as its JSON
    (`null`, `true`, `[1, 2]`), never Python's spelling (`None`, `True`); long ones shortened."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=True, allow_nan=False)
        except (TypeError, ValueError, RecursionError):  # not from JSON: still no Python spelling
            text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_problem(error: ValueError | RecursionError) -> str:
    if isinstance(error, _NotStrictJson):
        return str(error)
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return "not UTF-8 JSON"


# -- form, in words --------------------------------------------------------------------------
_ALPHABET = frozenset(_BASE64URL_ALPHABET.decode())


def segment_problem(segment: str, name: str) -> str | None:
    """Why one segment is not the unpadded, canonical base64url the proxy reads, in words; or None.

    The verdict is the decoder's (`_decode_base64url_segment`); this names what it objects
    to, for the operator (logs, `token explain`). Only called once a segment was refused, or
    by `token explain`: never on the path of a token that verifies."""
    for index, char in enumerate(segment):
        if char in _ALPHABET:
            continue
        at = f"at character {index + 1} of {len(segment)}"
        if char == "=" and not segment[index:].strip("="):
            return f"the {name} segment ends in '=' padding; a JWT's segments are unpadded base64url (RFC 7515 §2)"
        if char in "+/":
            return (
                f"the {name} segment has {char!r} {at}: that is base64, not base64url, which has "
                f"{'-' if char == '+' else '_'!r} instead (RFC 7515 §2)"
            )
        if char.isspace():
            return f"the {name} segment has whitespace {at}"
        return f"the {name} segment has {char!a} {at}, which is not base64url"
    if len(segment) % 4 == 1:
        return (
            f"the {name} segment is {len(segment)} character{'s' if len(segment) != 1 else ''} long, "
            "which no base64url text is (a character is missing or extra)"
        )
    tail = len(segment) % 4
    unused = 0x0F if tail == 2 else 0x03 if tail == 3 else 0
    last = _SEXTET[ord(segment[-1])] if unused else 0
    if last & unused:
        canonical = chr(_BASE64URL_ALPHABET[last & ~unused])
        return (
            f"the {name} segment is not canonical base64url: its last character {segment[-1]!r} sets bits "
            f"no byte uses (the one spelling ends in {canonical!r}; a token has one spelling, RFC 7515 §2)"
        )
    try:  # the proxy's decoder has the last word
        decoded = _unbase64url(segment.encode("ascii"))
    except UnicodeEncodeError:
        decoded = None
    return f"the {name} segment is not base64url" if decoded is None else None


def segments_problem(count: int) -> str:
    """A token of `count` segments, which is not 3, in words."""
    return f"{count} segment{'s' if count != 1 else ''}, expected 3 (HEADER.PAYLOAD.SIGNATURE, each base64url)"


# -- header --------------------------------------------------------------------------------
def read_header(token: str, *, max_bytes: int) -> TokenHeader:
    """Decode the header without trusting it. Size and form only; see HEADER_CHECKS for the rest.

    Only the header segment is decoded here; `verify_signature` decodes the other two.
    """
    if len(token) > max_bytes:
        # Refuse before decoding: base64 and JSON on a huge input are work an attacker chooses.
        raise InvalidToken(Reason.TOO_LARGE, f"token is {len(token)} bytes; the limit is {max_bytes}")
    if token.count(".") != 2:
        raise InvalidToken(Reason.MALFORMED, f"not a JWT: {segments_problem(token.count('.') + 1)}")
    segment = token[: token.index(".")]
    try:
        raw = _unbase64url(segment.encode("ascii"))
    except UnicodeEncodeError:
        raw = None
    if raw is None:
        problem = segment_problem(segment, "header") or "the header is not base64url"
        raise InvalidToken(Reason.MALFORMED, f"not a JWT: {problem}") from None
    try:
        fields = _STRICT_JSON(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise InvalidToken(Reason.MALFORMED, f"header: {_json_problem(error) if raw else 'empty'}") from None
    if not isinstance(fields, dict):
        raise InvalidToken(Reason.MALFORMED, "header: not a JSON object")
    return TokenHeader(alg=fields.get("alg"), kid=fields.get("kid"), fields=fields)


def _check_alg(header: TokenHeader, provider: Provider) -> None:
    # RFC 8725 §3.1: the allow-list decides, never the token; exact and case-sensitive
    # (RFC 7515 §4.1.1), so "none", "None" and "NONE" are all refused.
    if not isinstance(header.alg, str) or header.alg not in provider.algorithms:
        if "alg" not in header.fields:
            raise InvalidToken(
                Reason.ALG_NOT_ALLOWED, f"the header has no alg; the allow-list is {list(provider.algorithms)}"
            )
        raise InvalidToken(
            Reason.ALG_NOT_ALLOWED, f"alg {shown(header.alg)} is not in the allow-list {list(provider.algorithms)}"
        )


def _check_kid(header: TokenHeader, provider: Provider) -> None:
    if header.kid is not None and not isinstance(header.kid, str):
        raise InvalidToken(Reason.MALFORMED, f"kid {shown(header.kid)} is not a string (RFC 7515 §4.1.4)")


def _media_type(value: str) -> str:
    # RFC 7515 §4.1.9: "application/" may be omitted; media types compare case-insensitively.
    value = value.lower()
    return value[len("application/") :] if value.startswith("application/") else value


def _check_typ(header: TokenHeader, provider: Provider) -> None:
    if provider.typ is None:
        return
    typ = header.fields.get("typ")
    if not isinstance(typ, str) or _media_type(typ) != _media_type(provider.typ):
        what = "the header has no typ" if "typ" not in header.fields else f"typ {shown(typ)} is not accepted"
        raise InvalidToken(Reason.TYP, f"{what}; the provider requires {provider.typ!r} (RFC 8725 §3.11)")


def _check_crit(header: TokenHeader, provider: Provider) -> None:
    # RFC 7515 §4.1.11: a recipient that does not understand a listed extension must reject
    # the token. We understand none (b64=false, RFC 7797, is not for JWTs).
    if "crit" in header.fields:
        raise InvalidToken(Reason.CRIT, f"crit {shown(header.fields['crit'])} names extensions we do not support")
    if "b64" in header.fields:
        raise InvalidToken(Reason.CRIT, "b64 header parameter is not allowed in a JWT (RFC 7797 §7)")


HeaderCheck = Callable[[TokenHeader, Provider], None]
HEADER_CHECKS: tuple[tuple[str, HeaderCheck], ...] = (
    ("alg", _check_alg),
    ("kid", _check_kid),
    ("typ", _check_typ),
    ("crit", _check_crit),
)


# -- signature ---------------------------------------------------------------------------
def check_signature(token: str, header: TokenHeader, keys: Sequence[Jwk]) -> dict[str, Any]:
    """Verify the signature with each candidate key; return the payload of the first that verifies."""
    return parse_payload(verify_signature(token, header, keys))


def verify_signature(token: str, header: TokenHeader, keys: Sequence[Jwk]) -> bytes:
    """Verify the signature with each candidate key; return the raw payload it signs.

    What PyJWT's `PyJWS.decode_complete` did for a key bound to one algorithm, without
    its second decode of the header and its option merging, which were most of a cache
    miss's time beside the RSA check (bench/FIGURES.md): the header was read strictly by `read_header`;
    the payload and signature segments go through the same strict decoder; `b64: false`
    (RFC 7797) is refused; each key must be bound to the token's alg; the key is prepared
    and its length checked (as PyJWT's `enforce_minimum_key_length`), once per key object
    (`_prepare`); then cryptography's verify, called as PyJWT's algorithms did (for
    RS256/384/512, its recovery of the encoded digest and one comparison: `_prepare` says why).
    tests/unit/auth/test_verify.py checks that this (with base/jwk.py's keys) and
    `decode_complete` (with PyJWT's) agree on every token of a corpus of good, tampered and
    malformed ones. The payload is
    parsed (`parse_payload`) only once the signature verified; `token explain` reports the
    two steps apart. Every detail is our phrase: PyJWT's messages name its own internals.
    """
    if not keys:
        raise InvalidToken(Reason.UNKNOWN_KID, f"no key for {_kid_words(header.kid)} and alg {shown(header.alg)}")
    if header.fields.get("b64", True) is False:
        raise InvalidToken(Reason.MALFORMED, "b64=false (RFC 7797): the payload is not base64url-encoded JSON")
    data = token.encode("utf-8", "surrogatepass")
    signing_input, _, crypto_segment = data.rpartition(b".")
    payload_segment = signing_input.partition(b".")[2]
    payload, signature = _unbase64url(payload_segment), _unbase64url(crypto_segment)
    if payload is None or signature is None:
        parts = token.split(".")
        problem = segment_problem(parts[1], "payload") or segment_problem(parts[2], "signature")
        raise InvalidToken(Reason.MALFORMED, problem or "the payload or signature segment is not base64url") from None
    if not signature:  # `HEADER.PAYLOAD.`: no key can match nothing, so say what is there instead
        raise InvalidToken(
            Reason.BAD_SIGNATURE,
            f"the signature segment is empty: the token is unsigned, and {header.alg} needs a signature",
        )
    failures: list[str] = []
    for key in keys:
        if key.algorithm_name != header.alg:
            failures.append(f"{_key_words(key)} is bound to {key.algorithm_name}, not {shown(header.alg)}")
            continue
        prepared = _PREPARED.get(key) or _PREPARED.make_for(key)
        public, problem, pkcs1, hashing, check = prepared
        if problem is not None:
            failures.append(
                f"{_key_words(key)} {problem} {header.alg}{' (RFC 7518 §3)' if problem == _TOO_SHORT else ''}"
            )
            continue
        if pkcs1 is not None:  # RS256/384/512: straight on cryptography's key (see `_prepare`)
            if _pkcs1_verifies(public, pkcs1, hashing, signing_input, signature):
                return payload
        elif check(signing_input, public, signature):
            return payload
        failures.append(f"{_key_words(key)} does not match the signature")
    raise InvalidToken(Reason.BAD_SIGNATURE, f"signature ({header.alg}) does not verify: " + "; ".join(failures))


def _key_words(key: Jwk) -> str:
    return f"key {key.key_id!r}" if key.key_id else "the key without kid"


_TOO_SHORT = "is too short for"
_UNUSABLE = "cannot be used for"


_Prepared = tuple[Any, "str | None", "padding.PKCS1v15 | None", Any, "Callable[[bytes, Any, bytes], bool]"]


def _prepare(key: Jwk) -> _Prepared:
    """What checking a signature with `key` needs, once per key object rather than per token:
    (the key, what makes it unusable or None, for RS256/384/512 the padding and
    (hashlib's constructor of the alg's hash, the DER DigestInfo prefix of that hash (RFC 8017
    §9.2 note 1), the modulus's length in bytes) for `verify_signature` to check
    RSASSA-PKCS1-v1_5 by `RSAPublicKey.recover_data_from_signature` and one comparison, and
    for the other algorithms a `check(message, key, signature)`). Why recover and compare
    rather than `RSAPublicKey.verify(..., Prehashed(hash))`: the same exponentiation and
    padding check in OpenSSL, without the digest fetched from the provider and set on a fresh
    context on every call and cryptography's `Prehashed` handling (~9k instructions of a miss,
    bench/FIGURES.md "Cache misses, session 7"); tests/unit/auth/test_rsa_pkcs1.py holds the
    two to the same verdict on crafted encodings. The checks
    are PyJWT's `prepare_key` and `check_key_length` (`enforce_minimum_key_length`): an RSA
    key of fewer than 2048 bits (NIST SP 800-131A), an HMAC secret shorter than its hash
    (RFC 7518 §3.2), an EC key on another curve than the algorithm's, a secret that is a
    PEM/SSH/DER key or a JWK (`unfit_secret`)."""
    spec = _ALGORITHMS.get(key.algorithm_name)
    public = key.key
    if spec is None:
        return None, _UNUSABLE, None, None, _never
    family, hash_type = spec
    if family in ("RS", "PS"):
        if not isinstance(public, RSAPublicKey):
            return None, _UNUSABLE, None, None, _never
        if public.key_size < 2048:
            return None, _TOO_SHORT, None, None, _never
        if family == "RS":
            hashing = hash_type()
            size = (public.key_size + 7) // 8
            return public, None, _PKCS1, (getattr(hashlib, hashing.name), _DIGEST_INFO[hashing.name], size), _never
        pss = padding.PSS(mgf=padding.MGF1(hash_type()), salt_length=hash_type.digest_size)
        return public, None, None, None, _rsa_pss(pss, hash_type())
    if family == "ES":
        curve = _CURVE_OF.get(key.algorithm_name)
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, curve or ()):
            return None, _UNUSABLE, None, None, _never
        return public, None, None, None, _ecdsa(ec.ECDSA(hash_type()), (public.curve.key_size + 7) // 8)
    if family == "Ed":
        if not isinstance(public, _OKP_KEYS):
            return None, _UNUSABLE, None, None, _never
        return public, None, None, None, _eddsa
    # HS: the secret's bytes
    if not isinstance(public, bytes) or unfit_secret(public):
        return None, _UNUSABLE, None, None, _never
    if len(public) < hash_type().digest_size:
        return None, _TOO_SHORT, None, None, _never
    return public, None, None, None, _hmac(hash_type)


def _never(message: bytes, key: Any, signature: bytes) -> bool:
    return False


def _rsa_pss(pss: padding.PSS, hashing: hashes.HashAlgorithm) -> Callable[[bytes, Any, bytes], bool]:
    def check(message: bytes, key: Any, signature: bytes) -> bool:
        try:
            key.verify(signature, message, pss, hashing)
            return True
        except InvalidSignature:
            return False

    return check


def _ecdsa(ecdsa: ec.ECDSA, size: int) -> Callable[[bytes, Any, bytes], bool]:
    def check(message: bytes, key: Any, signature: bytes) -> bool:
        # JWS carries R || S, each `size` bytes (RFC 7518 §3.4); cryptography wants DER.
        if len(signature) != 2 * size:
            return False
        der = encode_dss_signature(int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big"))
        try:
            key.verify(der, message, ecdsa)
            return True
        except InvalidSignature:
            return False

    return check


def _eddsa(message: bytes, key: Any, signature: bytes) -> bool:
    try:
        key.verify(signature, message)
        return True
    except InvalidSignature:
        return False


def _hmac(hash_type: Any) -> Callable[[bytes, Any, bytes], bool]:
    digest = {hashes.SHA256: hashlib.sha256, hashes.SHA384: hashlib.sha384, hashes.SHA512: hashlib.sha512}[hash_type]

    def check(message: bytes, key: Any, signature: bytes) -> bool:
        return hmac.compare_digest(signature, hmac.new(key, message, digest).digest())

    return check


_ALGORITHMS: dict[str, tuple[str, Any]] = {
    "RS256": ("RS", hashes.SHA256),
    "RS384": ("RS", hashes.SHA384),
    "RS512": ("RS", hashes.SHA512),
    "PS256": ("PS", hashes.SHA256),
    "PS384": ("PS", hashes.SHA384),
    "PS512": ("PS", hashes.SHA512),
    "ES256": ("ES", hashes.SHA256),
    "ES384": ("ES", hashes.SHA384),
    "ES512": ("ES", hashes.SHA512),
    "EdDSA": ("Ed", None),
    "HS256": ("HS", hashes.SHA256),
    "HS384": ("HS", hashes.SHA384),
    "HS512": ("HS", hashes.SHA512),
}
"""Each algorithm jwks.py's `FAMILIES` allows: how it is checked, with which hash (RFC 7518 §3.1, RFC 8037)."""
_CURVE_OF: dict[str, type[ec.EllipticCurve]] = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
_OKP_KEYS = (Ed25519PublicKey, Ed448PublicKey)
_PKCS1 = padding.PKCS1v15()


def _pkcs1_verifies(public: Any, pkcs1: padding.PKCS1v15, hashing: Any, signing_input: bytes, signature: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 (RS256/384/512) on cryptography's key, as `_prepare` prepared it:
    RFC 8017 §8.2.2 as written. OpenSSL recovers EM = 0x00 01 FF..FF 00 || T from the signature
    (refusing s >= n and any other padding) and T is compared with the one DigestInfo ||
    H(signing input) of the token's alg; a signature of another length than the modulus is
    refused first (as `verify` refuses it). No digest fetched per call: bench/FIGURES.md,
    "Cache misses, session 7"; tests/unit/auth/test_rsa_pkcs1.py."""
    if len(signature) != hashing[2]:
        return False
    try:
        return bool(
            public.recover_data_from_signature(signature, pkcs1, None)
            == hashing[1] + hashing[0](signing_input).digest()
        )
    except InvalidSignature:
        return False


_DIGEST_INFO = {  # DER of DigestInfo{algorithm, NULL} before the hash's bytes (RFC 8017 §9.2, note 1)
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_PREPARED: Memo[Jwk, _Prepared] = Memo(256, _prepare)
"""By key object (identity): the keys of the key sets in use, each prepared once. Only ever
asked about a key a `KeySource` handed out for this token, so a key rotated out is never
looked up again (it waits here for the memo's next start-over)."""


def _kid_words(kid: Any) -> str:
    return "this token (no kid)" if kid is None else f"kid {shown(kid)}"


def parse_payload(raw: bytes) -> dict[str, Any]:
    """The payload's JSON object (strict: `_STRICT_JSON`), or `InvalidToken(MALFORMED)` saying why."""
    fast = _json_object(raw)
    if fast is not None:
        return fast
    try:
        payload = _STRICT_JSON(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise InvalidToken(Reason.MALFORMED, f"payload: {_json_problem(error) if raw else 'empty'}") from None
    if not isinstance(payload, dict):
        raise InvalidToken(Reason.MALFORMED, "payload is not a JSON object (RFC 7519 §7.2)")
    return payload


# -- claims ------------------------------------------------------------------------------
def _is_number(value: Any) -> TypeGuard[int | float]:
    # bool is an int to Python and no JSON number; an int beyond a double (10**400, which JSON
    # allows and Python reads exactly) makes math.isfinite raise OverflowError: neither is a
    # NumericDate we can compare with the clock.
    if isinstance(value, float):
        return math.isfinite(value)
    return type(value) is int and _DOUBLE_MIN <= value <= _DOUBLE_MAX


_DOUBLE_MAX = int(sys.float_info.max)
_DOUBLE_MIN = -_DOUBLE_MAX


def _check_dates_are_numbers(payload: Mapping[str, Any], provider: Provider, now: float) -> None:
    for name in ("exp", "nbf", "iat"):
        if name in payload and not _is_number(payload[name]):
            raise InvalidToken(
                Reason.MALFORMED_CLAIM,
                f"{name} is {shown(payload[name])}; a NumericDate is a JSON number (RFC 7519 §2)",
            )


def _check_required(payload: Mapping[str, Any], provider: Provider, now: float) -> None:
    # iss and aud are always required: RFC 8725 §3.8 and §3.9.
    for name in ("iss", "aud", *provider.required_claims):
        if payload.get(name) is None:
            what = "is missing" if name not in payload else "is null"
            raise InvalidToken(Reason.MISSING_CLAIM, f"required claim {name!r} {what}")


def _check_exp(payload: Mapping[str, Any], provider: Provider, now: float) -> None:
    exp = payload.get("exp")
    if _is_number(exp) and now >= exp + provider.leeway:
        raise InvalidToken(Reason.EXPIRED, f"expired {now - exp:.0f}s ago (leeway {provider.leeway:g}s)")


def _check_nbf(payload: Mapping[str, Any], provider: Provider, now: float) -> None:
    nbf = payload.get("nbf")
    if _is_number(nbf) and nbf > now + provider.leeway:
        raise InvalidToken(Reason.NOT_YET_VALID, f"not valid for another {nbf - now:.0f}s")


def _check_iat(payload: Mapping[str, Any], provider: Provider, now: float) -> None:
    iat = payload.get("iat")
    if _is_number(iat) and iat > now + provider.leeway:
        raise InvalidToken(Reason.ISSUED_IN_FUTURE, f"issued {iat - now:.0f}s in the future")


def _check_age(payload: Mapping[str, Any], provider: Provider, now: float) -> None:
    if provider.max_token_age is None:
        return
    exp, iat = payload.get("exp"), payload.get("iat")
    if not (_is_number(exp) and _is_number(iat)):
        raise InvalidToken(Reason.MISSING_CLAIM, "max_token_age needs both exp and iat")
    if exp - iat > provider.max_token_age:
        raise InvalidToken(
            Reason.TOO_OLD, f"lifetime exp - iat is {exp - iat:.0f}s; max_token_age is {provider.max_token_age:g}s"
        )


def _check_iss(payload: Mapping[str, Any], provider: Provider, now: float) -> None:
    iss = payload.get("iss")
    # RFC 7519 §4.1.1: StringOrURI, compared as exact strings, no normalisation.
    if not isinstance(iss, str) or iss not in provider.issuers:
        what = "the token has no iss" if iss is None else f"iss {shown(iss)} is not accepted"
        raise InvalidToken(Reason.ISSUER, f"{what}; the provider accepts {list(provider.issuers)}")


def _check_aud(payload: Mapping[str, Any], provider: Provider, now: float) -> None:
    aud = payload.get("aud")
    if isinstance(aud, str):  # the common case, without building a list
        if aud in provider.audiences:
            return
        raise InvalidToken(Reason.AUDIENCE, f"aud {shown(aud)} is none of {list(provider.audiences)}")
    if aud is None:
        raise InvalidToken(Reason.AUDIENCE, f"the token has no aud; the provider accepts {list(provider.audiences)}")
    if not isinstance(aud, list) or not aud or not all(isinstance(v, str) for v in aud):
        raise InvalidToken(Reason.AUDIENCE, f"aud {shown(aud)} is not a string or a non-empty list of strings")
    if not any(v in provider.audiences for v in aud):
        raise InvalidToken(Reason.AUDIENCE, f"aud {shown(aud)} contains none of {list(provider.audiences)}")


def _check_sub(payload: Mapping[str, Any], provider: Provider, now: float) -> None:
    if "sub" in payload and not isinstance(payload["sub"], str):
        raise InvalidToken(Reason.MALFORMED_CLAIM, f"sub {shown(payload['sub'])} is not a string (RFC 7519 §4.1.2)")


ClaimCheck = Callable[[Mapping[str, Any], Provider, float], None]
CLAIM_CHECKS: tuple[tuple[str, ClaimCheck], ...] = (
    ("numeric dates", _check_dates_are_numbers),
    ("required claims", _check_required),
    ("exp", _check_exp),
    ("nbf", _check_nbf),
    ("iat", _check_iat),
    ("max_token_age", _check_age),
    ("iss", _check_iss),
    ("aud", _check_aud),
    ("sub", _check_sub),
)


def check_header(header: TokenHeader, provider: Provider) -> None:
    for _, check in HEADER_CHECKS:
        check(header, provider)


def check_claims(payload: Mapping[str, Any], provider: Provider, now: float) -> None:
    for _, check in CLAIM_CHECKS:
        check(payload, provider, now)


# -- choosing among several providers -----------------------------------------------------
_T = TypeVar("_T")


def by_issuer(
    token: str, table: Mapping[str, _T], accepted: str, *, max_bytes: int, cache: TokenCache | None = None
) -> _T:
    """What `table` holds for the unverified `iss` of `token`: a route with `providers:`
    chooses its provider so, once, never by trying each provider's keys.

    Nothing read here is trusted: the provider chosen verifies the very bytes read here
    (signature, then its own iss check), with the rules verification reads them by (size
    first, the strict base64url decoder, strict JSON: duplicate members are refused, so no
    second `iss` can be read otherwise there). Refusals carry verification's reasons;
    `accepted` says, for the detail, which issuers the route's providers accept.

    With the route's token `cache`, a token it holds (whatever its provider and age: the same
    text has the same payload) is chosen by the `iss` its entry holds, without decoding; the
    payload of one it does not hold is parsed here and handed to `verify_uncached` of the
    same token, so a miss decodes it once (bench/FIGURES.md)."""
    if len(token) > max_bytes:
        raise InvalidToken(Reason.TOO_LARGE, f"token is {len(token)} bytes; the limit is {max_bytes}")
    if cache is not None:
        known = cache.lookup(token)
        if known is not None:
            iss = known.payload.get("iss")  # verified, and always kept (rules._ALWAYS_READ)
            found = table.get(iss) if isinstance(iss, str) else None
            if found is not None:
                return found
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken(Reason.MALFORMED, f"not a JWT: {segments_problem(len(parts))}")
    try:
        raw = _unbase64url(parts[1].encode("ascii"))
    except UnicodeEncodeError:
        raw = None
    if raw is None:
        problem = segment_problem(parts[1], "payload") or "the payload segment is not base64url"
        raise InvalidToken(Reason.MALFORMED, f"not a JWT: {problem}")
    payload = parse_payload(raw)
    iss = payload.get("iss")
    found = table.get(iss) if isinstance(iss, str) else None
    if found is None:
        if iss is None:
            raise InvalidToken(
                Reason.MISSING_CLAIM, f"required claim 'iss' is missing or null; it chooses the provider: {accepted}"
            )
        raise InvalidToken(Reason.ISSUER, f"iss {shown(iss)} is none of this route's providers' issuers: {accepted}")
    if cache is not None:
        _PARSED.keep(token, raw, payload)
    return found


def issuers_in_words(providers: Sequence[Provider]) -> str:
    """`by_issuer`'s `accepted`: each provider's issuers, for a refusal's detail."""
    return "; ".join(f"{p.name}: {', '.join(map(shown, p.issuers))}" for p in providers)


# -- cache and the whole check -----------------------------------------------------------
class TokenCache:
    """Verified tokens, bounded, an entry never outliving exp or max_ttl, never served to
    another provider than the one that verified it.

    Keyed by a digest of the whole token text (header, payload and signature: a token that
    differs in any one of them is another key, so a forged token never finds another's
    entry): a keyed BLAKE2b of 128 bits, its key random per cache, so nobody can look for two
    texts with one digest offline. Not by the text itself: that was ~700 of the ~3,200 bytes
    a cached RS256 token cost (bench/FIGURES.md). The entry is the `Claims` itself (its
    `until`, `digest`). Before the digest, a bounded memo by exact text (`_HOT`) answers for
    the tokens seen lately: a hit is then a dict lookup on a str whose hash extract.py's memo
    computed already, not a BLAKE2b of ~700 bytes (~15k instructions).
    Only the token's own checks are cached; route rules run on every request.
    """

    def __init__(self, settings: TokenCacheSettings, clock: Clock) -> None:
        # An LRU (OrderedDict: C, one move_to_end per hit, one popitem per eviction) with the
        # deadline checked on every read; an expired entry is never returned, and waits for
        # its turn to be evicted. Not cachetools' TLRUCache: its expiry queue's upkeep made an
        # insert into a full cache cost several times as much (bench/FIGURES.md).
        self._entries: OrderedDict[bytes, Claims] = OrderedDict()
        self._max_entries = settings.max_entries
        self._max_ttl = settings.max_ttl
        self._time = clock.time
        self._hasher = hashlib.blake2b(key=os.urandom(32), digest_size=16)
        self._hot: Memo[str, Claims] = Memo(min(_HOT, settings.max_entries))
        self._last: tuple[str, bytes] = ("", b"")
        self.hits = 0
        self.misses = 0

    def digest(self, token: str) -> bytes:
        """The cache's key for `token`: its keyed BLAKE2b (the key block hashed once, copied)."""
        last = self._last
        if last[0] is token:  # the same str object just looked up (a miss, now stored): same text
            return last[1]
        hasher = self._hasher.copy()
        hasher.update(token.encode("utf-8", "surrogatepass"))
        digest = hasher.digest()
        self._last = (token, digest)
        return digest

    def get(self, provider: str, token: str) -> Claims | None:
        """The claims of `token` verified lately for `provider` and not past their use-by time, else None."""
        claims = self._hot.get(token)
        if claims is None or claims.provider != provider:
            # `_lookup` and `digest` written out: every miss comes here (bench/FIGURES.md,
            # "Cache misses, session 8"); the digest kept for `put` of the same token.
            hasher = self._hasher.copy()
            hasher.update(token.encode("utf-8", "surrogatepass"))
            digest = hasher.digest()
            self._last = (token, digest)
            claims = self._entries.get(digest)
            if claims is None:
                self.misses += 1
                return None
            self._entries.move_to_end(digest)
            if claims.provider != provider:
                self.misses += 1
                return None
            self._hot.remember(token, claims)
        if self._time() < claims.until:
            self.hits += 1
            return claims
        self._entries.pop(claims.digest, None)  # type: ignore[arg-type]
        self.misses += 1
        return None

    def lookup(self, token: str) -> Claims | None:
        """The entry for `token` whatever its provider and use-by time (`get` checks both), else None."""
        hot = self._hot.get(token)
        return hot if hot is not None else self._lookup(token)

    def _lookup(self, token: str) -> Claims | None:
        digest = self.digest(token)
        claims = self._entries.get(digest)
        if claims is not None:
            self._entries.move_to_end(digest)
        return claims

    def put(self, token: str, claims: Claims, exp: Any = None) -> None:
        """Keep `claims`, verified from `token`, until its exp (`exp`: its exp claim when the
        caller has it at hand, else read here) or max_ttl from now, whichever comes first."""
        until = self._time() + self._max_ttl
        if exp.__class__ is not int:  # (an int exp, the usual, without `Claims.expires`'s calls)
            exp = claims.expires
        claims.until = until if exp is None or until < exp else exp
        last = self._last
        claims.digest = digest = last[1] if last[0] is token else self.digest(token)
        entries = self._entries
        if digest in entries:  # (another provider's entry for this text: the new one is the latest)
            del entries[digest]
        entries[digest] = claims
        if len(entries) > self._max_entries:
            entries.popitem(last=False)
        self._hot.remember(token, claims)

    def __len__(self) -> int:
        return len(self._entries)


_HOT = 64
"""How many tokens `TokenCache._HOT` knows by their text: the few that come again and again
(a busy client's), at ~700 bytes each, a fixed cost whatever `max_entries` is."""


class Verifier:
    """Verifies tokens for one provider, with its key source and an optional shared cache."""

    def __init__(
        self,
        provider: Provider,
        source: KeySource,
        *,
        clock: Clock,
        cache: TokenCache | None = None,
        max_token_bytes: int = 8192,
        keep: frozenset[str] | None = None,
    ) -> None:
        self.provider = provider
        self.source = source
        self.clock = clock
        self.cache = cache
        self.max_token_bytes = max_token_bytes
        self._headers: Memo[str, _Checked] = Memo(_HEADERS)
        """By header segment, as the token spells it: a header that passed `HEADER_CHECKS`
        for this provider, its read-only view (shared by the `Claims` of every token with
        that header) and its one key (`_Checked`). An issuer signs every token with the
        same few headers."""
        self.keep = keep if cache is not None else None
        """The claims a verified token keeps (rules.py `claims_read`: every claim anything
        reads after verification); None: all of them. With a cache only: a cached token then
        costs its header map's claims, not every claim the issuer put in (bench/FIGURES.md)."""
        self._shared = {name: name for name in (*provider.issuers, *provider.audiences)}
        """The provider's issuers and audiences: a token's verified `iss` (and a string
        `aud`) is kept as this str, not as its own copy."""

    def cached(self, token: str) -> Claims | None:
        """The claims of a token verified lately (the cache's checks: still before its use-by
        time), else None: `verify_now` or `verify_uncached` it."""
        if self.cache is None or len(token) > self.max_token_bytes:  # too large: never cached
            return None
        return self.cache.get(self.provider.name, token)

    async def verify(self, token: str) -> Claims:
        """The token's claims when every check passes; `InvalidToken` (or `KeysUnavailable`) otherwise."""
        claims = self.cached(token)
        if claims is None:
            claims = self.verify_now(token)
        return claims if claims is not None else await self.verify_uncached(token)

    def verify_now(self, token: str) -> Claims | None:
        """`verify_uncached` without a wait, for a token `cached` did not hold whose keys the
        source holds now (the usual miss): its claims, or the `InvalidToken` of the check that
        failed, as `verify_uncached` would answer; None when the keys must be waited for (a kid
        not seen yet, no keys yet: `KeySource.key_for` fetches), then `verify_uncached` it (the
        header, checked already, is remembered). pipeline.py calls this in `begin`, so a miss
        costs no coroutine (bench/FIGURES.md, "Cache misses, session 5").

        The usual miss is one straight run (bench/FIGURES.md, "Cache misses, session 8"): a
        header seen before (checked, by its segment) whose one key is held and bound to its
        alg (`_Checked.bind`), the token split once, its payload and signature decoded once,
        the signature checked on that key; then `_accept`. Anything else (a header not seen
        yet, another count of dots, a segment that is not base64url, an empty signature,
        several candidate keys or none) is left to the general way (`_header`, `_held`,
        `verify_signature`) before any signature is checked, which answers as it always did;
        a signature that does not verify is refused in the words `verify_signature` uses
        for one key."""
        if len(token) <= self.max_token_bytes:
            dot = token.find(".")
            known = self._headers.get(token[:dot])
            if known is not None and dot >= 0:
                if known.keyset is not self.source.keyset:
                    known.bind(self.source)
                key = known.key
                if key is not None:
                    # Split once, on bytes: the header segment matched is ASCII, so `dot` is
                    # its byte offset too; two dots exactly (the signing input holds one).
                    signing_input, _, crypto_segment = token.encode("utf-8", "surrogatepass").rpartition(b".")
                    if len(signing_input) > dot and signing_input.find(_DOT, dot + 1) < 0:
                        raw = _unbase64url(signing_input[dot + 1 :])
                        signature = _unbase64url(crypto_segment)
                        if raw is not None and signature:
                            if not (
                                _pkcs1_verifies(known.public, known.pkcs1, known.hashing, signing_input, signature)
                                if known.pkcs1 is not None  # RS256/384/512
                                else known.check(signing_input, known.public, signature)
                            ):
                                raise InvalidToken(
                                    Reason.BAD_SIGNATURE,
                                    f"signature ({known.header.alg}) does not verify: "
                                    f"{_key_words(key)} does not match the signature",
                                )
                            return self._accept(token, raw, known.view)
        known = self._header(token)
        header = known.header
        keys = _held(self.source, header.kid, header.alg)
        return None if keys is None else self._verified(token, header, known.view, keys)

    async def verify_uncached(self, token: str) -> Claims:
        """`verify` for a token `cached` did not hold: every check, then into the cache."""
        known = self._header(token)
        header = known.header
        keys = await self.source.key_for(header.kid, header.alg)
        return self._verified(token, header, known.view, keys)

    def _header(self, token: str) -> _Checked:
        """The size check, then the token's header read and checked (`HEADER_CHECKS`), and its
        read-only view; remembered by segment, so a header seen before is one dict lookup."""
        if len(token) > self.max_token_bytes:
            raise InvalidToken(Reason.TOO_LARGE, f"token is {len(token)} bytes; the limit is {self.max_token_bytes}")
        dot = token.find(".")
        segment = token[:dot]
        known = self._headers.get(segment)
        # Two dots exactly (find: a memchr; count walks every character).
        second = token.find(".", dot + 1)
        if known is None or dot < 0 or second < 0 or token.find(".", second + 1) >= 0:
            header = read_header(token, max_bytes=self.max_token_bytes)
            check_header(header, self.provider)
            known = self._headers.remember(segment, _Checked(header))
        return known

    def _verified(self, token: str, header: TokenHeader, view: Mapping[str, Any], keys: Sequence[Jwk]) -> Claims:
        """The rest of the checks once the keys are known: signature, payload, claims; the
        verified token's `Claims`, into the cache."""
        return self._accept(token, verify_signature(token, header, keys), view)

    def _accept(self, token: str, raw: bytes, view: Mapping[str, Any]) -> Claims:
        """The checks after the signature: `raw`, the payload it signs, as a JSON object, and
        its claims; the verified token's `Claims`, into the cache."""
        # (`_PARSED` asked only for the token it holds, `_json_object` first: a call each fewer)
        payload = _PARSED.take(token, raw) if _PARSED.token is token else None
        if payload is None:
            payload = _json_object(raw)
            if payload is None:
                payload = parse_payload(raw)  # says why, or takes what the fast path did not
        now = self.clock.time()
        if not _plainly_valid(payload, self.provider, now):
            check_claims(payload, self.provider, now)  # raises the reason, or finds nothing wrong
        cache = self.cache
        if cache is None:
            return Claims(self.provider.name, view, MappingProxyType(payload))
        shared = self._shared
        iss, aud = payload.get("iss"), payload.get("aud")
        payload["iss"] = shared.get(iss, iss)  # type: ignore[arg-type]  # iss is a str: checked
        if aud.__class__ is str:
            payload["aud"] = shared.get(aud, aud)
        # A cached token keeps its claims under shared names (one str per config or interned,
        # not a copy per token: bench/FIGURES.md): the kept ones under `keep`'s own names; every
        # claim (keep None) under interned names; an object inside, with its names interned.
        keep = self.keep
        if keep is not None:
            payload = {name: payload[name] for name in keep if name in payload}
        else:
            payload = {_intern(name): value for name, value in payload.items()}
        if raw.find(_BRACE, 1) >= 0:  # an object inside (or a '{' in a string)
            payload = {name: _shared_names(value) for name, value in payload.items()}
        # Read-only views: one Claims object is shared by every request that hits the cache.
        claims = Claims(self.provider.name, view, MappingProxyType(payload))
        cache.put(token, claims, payload.get("exp"))
        return claims


class _Checked:
    """A header segment that passed `HEADER_CHECKS` for a `Verifier`'s provider: the header,
    its read-only view, and what `verify_now`'s straight run checks a signature with, for the
    key set it was bound to (`keyset`; a new key set binds it again): the one key `_held`
    answers for its kid and alg, when that key is bound to the alg and usable (else `key` is
    None: the general way decides), and that key's `_prepare`d check."""

    __slots__ = ("check", "hashing", "header", "key", "keyset", "pkcs1", "public", "view")

    def __init__(self, header: TokenHeader) -> None:
        self.header = header
        self.view: Mapping[str, Any] = MappingProxyType(header.fields)
        self.keyset: object = None
        self.key: Jwk | None = None
        self.public: Any = None
        self.pkcs1: padding.PKCS1v15 | None = None
        self.hashing: Any = None
        self.check: Callable[[bytes, Any, bytes], bool] = _never

    def bind(self, source: KeySource) -> None:
        self.keyset = source.keyset
        self.key = None
        keys = _held(source, self.header.kid, self.header.alg)
        if keys is None or len(keys) != 1 or keys[0].algorithm_name != self.header.alg:
            return
        public, problem, self.pkcs1, self.hashing, self.check = _PREPARED.get(keys[0]) or _PREPARED.make_for(keys[0])
        if problem is None:
            self.key, self.public = keys[0], public


_DOT = ord(".")


def _held(source: KeySource, kid: str | None, alg: str) -> tuple[Jwk, ...] | None:
    """What `source.key_for(kid, alg)` answers at once, without a wait: the candidates when
    the held key set has some and knows the kid (or the token has none); None when `key_for`
    would wait or decide otherwise (a kid not seen yet: a refetch; no keys: the fallback
    source, a fetch or `KeysUnavailable`; no candidate: `UNKNOWN_KID`). keys.py's first
    branch, read here: tests/unit/auth/test_verify.py holds the two together."""
    keyset = source.keyset
    found = keyset.candidates(kid, alg)
    return found if found and (kid is None or kid in keyset.kids) else None


_HEADERS = 16
"""How many header segments a `Verifier` knows as checked: an issuer's few (one per key and
typ); more only start the memo over (a token's header is then read and checked again)."""


def _plainly_valid(payload: dict[str, Any], provider: Provider, now: float) -> bool:
    """True only when `check_claims` would find nothing wrong, for the usual token: exp (and
    iat, nbf when present) an int within the leeway, iss one string and aud one string the
    provider accepts, sub (when present) a string, every required claim there, no
    max_token_age. False means "ask `check_claims`", which names the reason or passes the
    token: this is the shortcut, never the rule (tests/unit/auth/test_verify.py holds the two
    together). One function instead of nine (bench/FIGURES.md)."""
    if provider.max_token_age is not None:
        return False
    leeway = provider.leeway
    exp = payload.get("exp")
    # The range first: an int beyond a double cannot be added to the leeway (OverflowError).
    if exp.__class__ is not int or not _DOUBLE_MIN <= exp <= _DOUBLE_MAX or not now < exp + leeway:
        return False
    iss = payload.get("iss")
    if iss.__class__ is not str or iss not in provider.issuers:
        return False
    aud = payload.get("aud")
    if aud.__class__ is not str or aud not in provider.audiences:
        return False
    # Written out, not a loop over the three names (bench/FIGURES.md); present as null is not absent.
    latest = now + leeway
    iat = payload.get("iat", _ABSENT)
    if iat is not _ABSENT and (iat.__class__ is not int or not _DOUBLE_MIN <= iat <= latest):
        return False
    nbf = payload.get("nbf", _ABSENT)
    if nbf is not _ABSENT and (nbf.__class__ is not int or not _DOUBLE_MIN <= nbf <= latest):
        return False
    sub = payload.get("sub", _ABSENT)
    if sub is not _ABSENT and sub.__class__ is not str:
        return False
    for name in provider.required_claims:  # noqa: SIM110  (a loop: all()'s generator costs more)
        if payload.get(name) is None:
            return False
    return True


_ABSENT: Any = object()


class _Parsed:
    """The payload `by_issuer` parsed to read `iss`, for `verify_uncached` of the same token
    (the same str object, hence the same text and the same bytes), so a `providers:` route's
    cache miss decodes its payload once. One slot: another token's parse replaces it."""

    __slots__ = ("payload", "raw", "token")

    def __init__(self) -> None:
        self.token: str | None = None
        self.raw = b""
        self.payload: dict[str, Any] = {}

    def keep(self, token: str, raw: bytes, payload: dict[str, Any]) -> None:
        self.token, self.raw, self.payload = token, raw, payload

    def take(self, token: str, raw: bytes) -> dict[str, Any] | None:
        """The payload parsed from `raw` of this very `token`, once; else None."""
        if self.token is not token or self.raw != raw:
            return None
        payload, self.token, self.raw, self.payload = self.payload, None, b"", {}
        return payload


_PARSED = _Parsed()
