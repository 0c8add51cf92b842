"""Micro-benchmark of token verification alone: µs per `Verifier.verify` call, no HTTP.

For each algorithm (RS256, ES256, EdDSA, HS256), with keys held in memory (a static key
source, as `jwks_file` or `secret:` configure it):

- miss:     distinct tokens cycled through a 100-entry cache (every call misses, then stores)
- no cache: the same distinct tokens, no cache at all (the verification itself)
- hit:      one token repeated through the cache

    .venv/bin/python bench/verify_micro.py [--quick] [--json]

Run by bench/run after the proxy benchmark, or alone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jwt
from cryptography.hazmat.primitives import serialization

from proxy.auth.keys import key_source_for
from proxy.auth.verify import TokenCache, Verifier
from proxy.base.clock import SystemClock
from proxy.config.builder import Provider, StaticKeys, TokenCacheSettings
from proxy.tools.keygen import generate, mint

ALGORITHMS = ("RS256", "ES256", "EdDSA", "HS256")
ISSUER = "https://issuer.bench.local/"
AUDIENCE = "bench-api"


def _provider(alg: str, key) -> Provider:  # noqa: ANN001
    if alg == "HS256":
        k = base64.urlsafe_b64encode(key.secret).rstrip(b"=").decode()
        keys = StaticKeys(kind="secret", origin="bench", jwks={"keys": [{"kty": "oct", "k": k}]})
    else:
        keys = StaticKeys(kind="jwks_file", origin="bench", jwks={"keys": [dict(key.public_jwk)]})
    return Provider(
        name="bench",
        issuers=(ISSUER,),
        audiences=(AUDIENCE,),
        algorithms=(alg,),
        keys=keys,
        required_claims=("exp", "sub"),
    )


def _tokens(alg: str, key, count: int) -> list[str]:  # noqa: ANN001
    now = time.time()
    # A `secret:` provider's key has no kid, so HS256 tokens carry none either.
    kid = None if alg == "HS256" else key.kid
    # The first with the operator's tool; the rest with the key loaded once (mint reloads
    # and re-checks a PEM key on every call, ~50 ms for RSA), same payload layout.
    first = mint(
        private_key_pem=key.private_pem,
        secret=key.secret,
        kid=kid,
        iss=ISSUER,
        aud=[AUDIENCE],
        sub="user-0",
        ttl_seconds=3600,
        claims={"email": "user-0@example.com"},
        now=now,
    )
    signing = key.secret if alg == "HS256" else serialization.load_pem_private_key(key.private_pem, None)
    rest = [
        jwt.encode(
            {
                "iss": ISSUER,
                "aud": AUDIENCE,
                "sub": f"user-{i}",
                "iat": int(now),
                "exp": int(now) + 3600,
                "jti": f"j{i}",
                "email": f"user-{i}@example.com",
            },
            signing,
            algorithm=alg,
            headers={"kid": kid} if kid else None,
        )
        for i in range(1, count)
    ]
    return [first, *rest]


async def _time(verifier: Verifier, tokens: list[str], ops: int) -> float:
    """µs per verify over `ops` calls cycling through `tokens` (after a short warm-up)."""
    n = len(tokens)
    for i in range(min(ops, 200)):
        await verifier.verify(tokens[i % n])
    start = time.perf_counter()
    for i in range(ops):
        await verifier.verify(tokens[i % n])
    return (time.perf_counter() - start) / ops * 1e6


async def _bench(alg: str, *, quick: bool) -> dict:
    key = generate(alg, f"bench-{alg.lower()}")
    provider = _provider(alg, key)
    clock = SystemClock()
    source = key_source_for(provider, fetcher=None, clock=clock)
    distinct = 500 if quick else 2000
    tokens = _tokens(alg, key, distinct)
    miss_ops = 1000 if quick else 5000
    hit_ops = 20000 if quick else 200000
    settings = TokenCacheSettings(enabled=True, max_entries=100, max_ttl=300.0)
    miss = await _time(Verifier(provider, source, clock=clock, cache=TokenCache(settings, clock)), tokens, miss_ops)
    nocache = await _time(Verifier(provider, source, clock=clock, cache=None), tokens, miss_ops)
    hit = await _time(Verifier(provider, source, clock=clock, cache=TokenCache(settings, clock)), tokens[:1], hit_ops)
    return {
        "alg": alg,
        "miss_us": miss,
        "no_cache_us": nocache,
        "hit_us": hit,
        "token_bytes": len(tokens[0]),
        "miss_ops": miss_ops,
        "hit_ops": hit_ops,
    }


def run(*, quick: bool = False) -> list[dict]:
    async def all_of() -> list[dict]:
        return [await _bench(alg, quick=quick) for alg in ALGORITHMS]

    return asyncio.run(all_of())


def markdown(results: list[dict]) -> str:
    lines = [
        "| algorithm | cache miss µs/op | no cache µs/op | cache hit µs/op | token bytes |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['alg']} | {r['miss_us']:.1f} | {r['no_cache_us']:.1f} | {r['hit_us']:.2f} | {r['token_bytes']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="µs per Verifier.verify call, per algorithm, cache hit and miss")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    results = run(quick=args.quick)
    print(json.dumps(results) if args.json else markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
