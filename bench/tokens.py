"""Key material and tokens for the benchmark: one RS256 key, its JWK Set, and tokens signed with it.

The single "alice" token is minted with `proxy.tools.keygen.mint`, the tool operators use. The
10,000 distinct tokens need a faster path: `mint` loads (and fully checks) the PEM key on
every call, about 50 ms for RSA, so those are signed with PyJWT and the key loaded once, with
the same payload layout `mint` writes (iss, aud, sub, iat, exp, jti, then extra claims).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization

from proxy.tools.keygen import GeneratedKey, generate, mint

ISSUER = "https://issuer.bench.local/"
AUDIENCE = "bench-api"
KID = "bench-rs256"
TTL = 2 * 3600


@dataclass(frozen=True)
class TokenSet:
    jwks_path: Path
    token: str
    """One valid token, sub=alice, repeated by the cache-hit workloads."""
    tokens_path: Path
    """Distinct valid tokens, one a line."""
    count: int


def _claims(i: int) -> tuple[str, dict[str, str]]:
    return f"user-{i:05d}", {"email": f"user-{i:05d}@example.com"}


def _sign_range(pem: bytes, start: int, stop: int, now: int) -> list[str]:
    key = serialization.load_pem_private_key(pem, password=None)
    out = []
    for i in range(start, stop):
        sub, extra = _claims(i)
        payload = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": now,
            "exp": now + TTL,
            "jti": secrets.token_urlsafe(16),
            **extra,
        }
        out.append(jwt.encode(payload, key, algorithm="RS256", headers={"kid": KID}))
    return out


def mint_many(key: GeneratedKey, count: int, *, now: int | None = None) -> list[str]:
    """`count` distinct RS256 tokens (user-00000 ...), signed on every core."""
    assert key.private_pem is not None
    now = int(time.time()) if now is None else now
    workers = max(1, min(os.cpu_count() or 1, 8))
    step = -(-count // workers)
    ranges = [(i, min(i + step, count)) for i in range(0, count, step)]
    if len(ranges) == 1:
        return _sign_range(key.private_pem, 0, count, now)
    with ProcessPoolExecutor(len(ranges)) as pool:
        parts = pool.map(_sign_range, [key.private_pem] * len(ranges), *zip(*ranges, strict=True), [now] * len(ranges))
        return [t for part in parts for t in part]


def make(directory: Path, *, distinct: int) -> TokenSet:
    """Write jwks.json and tokens.txt into `directory` and return them with the alice token."""
    key = generate("RS256", KID)
    assert key.private_pem is not None and key.public_jwk is not None
    jwks_path = directory / "jwks.json"
    jwks_path.write_text(json.dumps({"keys": [dict(key.public_jwk)]}, indent=2) + "\n")
    token = mint(
        private_key_pem=key.private_pem,
        kid=KID,
        iss=ISSUER,
        aud=[AUDIENCE],
        sub="alice",
        ttl_seconds=TTL,
        claims={"email": "alice@example.com"},
        now=time.time(),
    )
    tokens = mint_many(key, distinct)
    if len(set(tokens)) != distinct:
        raise RuntimeError("minted tokens are not distinct")
    tokens_path = directory / "tokens.txt"
    tokens_path.write_text("\n".join(tokens) + "\n")
    return TokenSet(jwks_path=jwks_path, token=token, tokens_path=tokens_path, count=distinct)
