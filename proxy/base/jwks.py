"""JSON Web Key Sets (RFC 7517) turned into an immutable index of usable verification keys.

Owns: which algorithm fits which key type (RFC 7518 §3.1, RFC 8037), which JWKs are usable
for verifying signatures (a key too weak for its algorithm is not: `weakness`), and the
(kid, alg) → keys index that verification reads (a key
without a kid is a candidate for any kid: `KeySet.candidates`).
Does not own: fetching key sets, caching them in time, or anything about tokens.

Each JWK is bound to exactly one algorithm (jwk.py's `Jwk(jwk, algorithm)`), and verify.py
refuses to check a token whose `alg` differs from the key's bound algorithm. So an
HMAC token can never be checked against an RSA public key (the CVE-2022-29217 class):
there simply is no HS256-bound entry for an RSA key in this index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from .jwk import InvalidKeyError, Jwk
from .secretfile import MIN_HMAC_BYTES

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "FAMILIES",
    "MIN_RSA_BITS",
    "SUPPORTED_ALGORITHMS",
    "SYMMETRIC_ALGORITHMS",
    "KeySet",
    "SkippedKey",
    "fits",
    "weakness",
]

# alg → (kty, crv or None): the only key type each algorithm may be verified with.
FAMILIES: Mapping[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
    "HS256": ("oct", None),
    "HS384": ("oct", None),
    "HS512": ("oct", None),
}
SUPPORTED_ALGORITHMS: tuple[str, ...] = tuple(FAMILIES)
SYMMETRIC_ALGORITHMS: tuple[str, ...] = tuple(a for a, (kty, _) in FAMILIES.items() if kty == "oct")
ASYMMETRIC_ALGORITHMS: tuple[str, ...] = tuple(a for a in FAMILIES if a not in SYMMETRIC_ALGORITHMS)


def fits(alg: str, kty: Any, crv: Any) -> bool:
    """Whether a key of this type and curve may verify tokens signed with `alg`."""
    family = FAMILIES.get(alg)
    if family is None:
        return False
    want_kty, want_crv = family
    return kty == want_kty and (want_crv is None or crv == want_crv)


MIN_RSA_BITS = 2048
"""RFC 7518 §3.3 (RS*) and §3.5 (PS*): "A key of size 2048 bits or larger MUST be used with
these algorithms" (and NIST SP 800-131A: under 2048 bits is disallowed for signatures)."""


def weakness(key: Any, alg: str) -> str | None:
    """Why a key (cryptography's key object, or an HMAC secret's bytes) is too weak to verify
    `alg`, or None. Checked when a key set is loaded, so such a key is left out (logged, a
    provider with no other key is not ready) rather than held and failing token by token;
    auth/verify.py keeps the same check per key as a second line."""
    if isinstance(key, RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return f"an RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} are required (RFC 7518 §3.3)"
    if isinstance(key, bytes) and len(key) < MIN_HMAC_BYTES.get(alg, 0):
        return f"{alg} needs a secret of at least {MIN_HMAC_BYTES[alg]} bytes, this one has {len(key)} (RFC 7518 §3.2)"
    return None


@dataclass(frozen=True, slots=True)
class SkippedKey:
    """A JWK that was left out of the index, and why (logged and counted by the caller)."""

    kid: str | None
    reason: str


class KeySet:
    """The usable keys of one JWK Set, indexed for verification. Immutable once built."""

    __slots__ = ("_by_alg", "_by_kid", "kids", "size", "skipped")

    def __init__(
        self,
        by_kid: dict[tuple[str | None, str], tuple[Jwk, ...]],
        by_alg: dict[str, tuple[Jwk, ...]],
        kids: frozenset[str],
        skipped: tuple[SkippedKey, ...],
        size: int,
    ) -> None:
        self._by_kid = by_kid
        self._by_alg = by_alg
        self.kids = kids
        self.skipped = skipped
        self.size = size

    @classmethod
    def empty(cls) -> KeySet:
        return cls({}, {}, frozenset(), (), 0)

    @classmethod
    def from_jwks(cls, document: Any, algorithms: Iterable[str]) -> KeySet:
        """Index `document` (a parsed JWK Set) for the allowed `algorithms`.

        Raises `ValueError` when the document is not a JWK Set at all; single unusable keys
        are skipped and reported in `skipped`, as RFC 7517 §5 asks ("ignore JWKs ... that
        use values that they do not understand").
        """
        if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
            raise ValueError('not a JWK Set: expected a JSON object with a "keys" array')
        allowed = tuple(algorithms)
        by_kid: dict[tuple[str | None, str], list[Jwk]] = {}
        by_alg: dict[str, list[Jwk]] = {}
        anonymous: dict[str, list[Jwk]] = {}
        kids: set[str] = set()
        skipped: list[SkippedKey] = []
        size = 0
        for jwk in document["keys"]:
            kid, bound, why = _bind(jwk, allowed)
            if why:
                skipped.append(SkippedKey(kid, why))
                continue
            size += 1
            if kid is not None:
                kids.add(kid)
            for alg, key in bound:
                by_alg.setdefault(alg, []).append(key)
                if kid is not None:
                    by_kid.setdefault((kid, alg), []).append(key)
                else:
                    anonymous.setdefault(alg, []).append(key)
        # A key without a kid is a candidate for every kid of its algorithm, after the keys
        # that carry that kid; the key `(None, alg)` holds them alone, for kids we do not know.
        for (_, alg), keys in by_kid.items():
            keys += anonymous.get(alg, ())
        by_kid.update(((None, alg), keys) for alg, keys in anonymous.items())
        return cls(
            {k: tuple(v) for k, v in by_kid.items()},
            {k: tuple(v) for k, v in by_alg.items()},
            frozenset(kids),
            tuple(skipped),
            size,
        )

    def candidates(self, kid: str | None, alg: str) -> tuple[Jwk, ...]:
        """The keys that may verify a token with this `kid` (or none) and `alg`.

        The kid is a hint (RFC 7515 §4.1.4), and a key may be published without one. A token
        without a kid: every key that fits the algorithm. A token with a kid: the keys that
        carry that kid, then every key without a kid that fits the algorithm; never a key
        that carries another kid.
        """
        if kid is None:
            return self._by_alg.get(alg, ())
        found = self._by_kid.get((kid, alg))
        return found if found is not None else self._by_kid.get((None, alg), ())

    def __len__(self) -> int:
        return self.size


def _bind(jwk: Any, allowed: tuple[str, ...]) -> tuple[str | None, list[tuple[str, Jwk]], str]:
    """Bind one JWK to each allowed algorithm it fits; the third item says why it is unusable."""
    if not isinstance(jwk, Mapping):
        return None, [], "not a JSON object"
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None, [], "kid is not a string"
    kty, crv = jwk.get("kty"), jwk.get("crv")
    use = jwk.get("use")
    if use is not None and use != "sig":
        # RFC 7517 §4.2: an encryption key must not verify signatures.
        return kid, [], f"use is {use!r}, not 'sig'"
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return kid, [], "key_ops does not include 'verify'"
    if kty != "oct" and "d" in jwk:
        # A published private key is a leak on the issuer's side; never use it.
        return kid, [], "holds private key material"
    declared = jwk.get("alg")
    bound: list[tuple[str, Jwk]] = []
    errors: list[str] = []
    weak: list[str] = []
    for alg in allowed:
        if not fits(alg, kty, crv) or (declared is not None and declared != alg):
            continue
        try:
            key = Jwk(jwk, alg)
        except InvalidKeyError as error:
            errors.append(f"{alg}: {type(error).__name__}")
            continue
        why = weakness(key.key, alg)
        if why is None:
            bound.append((alg, key))
        elif why not in weak:
            weak.append(why)
    if bound:
        return kid, bound, ""
    if weak:
        return kid, [], "too weak: " + "; ".join(weak)
    if errors:
        return kid, [], "could not be loaded (" + ", ".join(errors) + ")"
    wanted = f"kty={kty!r}" + (f", crv={crv!r}" if crv else "") + (f", alg={declared!r}" if declared else "")
    return kid, [], f"no allowed algorithm fits {wanted}"
