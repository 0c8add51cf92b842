"""What one verified token costs in memory while it is cached: bytes per entry of the token
cache, the identity headers rendered for it included (they live as long as the entry).

The real `Verifier`, `TokenCache` and `Renderer`, built from bench/run's config (the
provider's header map: `sub` → X-User-Id, `email` → X-User-Email; the claims a cached token
keeps are the config's, `rules.claims_read`, as the proxy's snapshot has them), N distinct
realistic RS256 tokens (a 2048-bit key, a `kid`, the claims an access token carries: iss,
aud, sub, iat, exp, jti, email, scope). Each token reaches the verifier as a new str decoded
from the request's bytes, as it does in the proxy, so what the cache keeps alive is counted
and nothing else.

- tracemalloc: bytes still allocated after N verifications (each one then rendered),
  divided by N;
- RSS: the process's resident memory after minus before, divided by N (no tracemalloc).

    .venv/bin/python bench/cache_memory.py [--entries 10000] [--payload-header] [--json]

`--payload-header`: the header map also forwards the whole payload (X-Jwt-Payload), so a
cached token keeps every claim.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jwt
import yaml
from cryptography.hazmat.primitives import serialization

from proxy.auth.keys import key_source_for
from proxy.auth.rules import claims_read
from proxy.auth.verify import TokenCache, Verifier
from proxy.base.clock import SystemClock
from proxy.config.builder import parse
from proxy.config.settings import Settings, TokenCacheSettings
from proxy.request.identity import Renderer
from proxy.tools.keygen import generate

ISSUER = "https://issuer.bench.local/"
AUDIENCE = "bench-api"


def _settings(jwks: dict[str, Any], *, payload_header: bool) -> Settings:
    """bench/run's config (as pipeline_micro.py has it), with this run's JWK Set."""
    headers: dict[str, Any] = {"claims": {"sub": "X-User-Id", "email": "X-User-Email"}, "forward_token": False}
    if payload_header:
        headers["payload"] = "X-Jwt-Payload"
    with tempfile.TemporaryDirectory() as folder:
        jwks_file = Path(folder) / "jwks.json"
        jwks_file.write_text(json.dumps(jwks))
        doc = {
            "listen": "127.0.0.1:8080",
            "admin": "127.0.0.1:9901",
            "upstream": {"url": "http://127.0.0.1:9"},
            "providers": {
                "bench": {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "algorithms": ["RS256"],
                    "leeway": "30s",
                    "required_claims": ["exp"],
                    "jwks_file": str(jwks_file),
                    "headers": headers,
                }
            },
            "routes": [{"name": "api", "match": {"path_prefix": "/"}, "auth": {"provider": "bench"}}],
            "token_cache": {"enabled": True, "max_entries": 100, "max_ttl": "5m"},
        }
        return parse(yaml.safe_dump(doc))


def _tokens(count: int) -> tuple[dict[str, Any], list[bytes]]:
    key = generate("RS256", "bench-rs256")
    signing = serialization.load_pem_private_key(key.private_pem, None)
    now = int(time.time())
    tokens = [
        jwt.encode(
            {
                "iss": ISSUER,
                "aud": AUDIENCE,
                "sub": f"user-{i:06d}",
                "iat": now,
                "exp": now + 3600,
                "jti": f"{i:032x}",
                "email": f"user-{i:06d}@example.com",
                "scope": "orders:read orders:write",
            },
            signing,
            algorithm="RS256",
            headers={"kid": key.kid},
        ).encode()
        for i in range(count)
    ]
    return {"keys": [dict(key.public_jwk)]}, tokens


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _fill(settings: Settings, tokens: list[bytes], *, traced: bool) -> tuple[int, int]:
    """(bytes allocated, RSS bytes added) by caching every token and rendering its headers."""
    provider = settings.providers["bench"]
    clock = SystemClock()
    limits = TokenCacheSettings(enabled=True, max_entries=len(tokens), max_ttl=300.0)
    # One warm-up token through a throw-away verifier: imports, code paths and the key's
    # one-off state are not a cached token's cost.
    warm = Verifier(provider, key_source_for(provider, fetcher=None, clock=clock), clock=clock, cache=None)
    Renderer(provider.headers, 1).headers(await warm.verify(tokens[0].decode()))
    cache = TokenCache(limits, clock)
    source = key_source_for(provider, fetcher=None, clock=clock)
    verifier = Verifier(provider, source, clock=clock, cache=cache, keep=claims_read(settings, "bench"))
    renderer = Renderer(provider.headers, len(tokens))
    gc.collect()
    if traced:
        tracemalloc.start()
    before, rss_before = (tracemalloc.get_traced_memory()[0] if traced else 0), _rss()
    for raw in tokens:
        renderer.headers(await verifier.verify(raw.decode()))  # a new str, as from a request
    gc.collect()
    after, rss_after = (tracemalloc.get_traced_memory()[0] if traced else 0), _rss()
    if traced:
        tracemalloc.stop()
    assert len(cache) == len(tokens) and cache.misses == len(tokens)
    for raw in tokens[:100]:  # every one is held: the next verify is a hit
        renderer.headers(await verifier.verify(raw.decode()))
    assert cache.hits == min(100, len(tokens))
    return after - before, rss_after - rss_before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bytes per cached token (token cache + rendered headers)")
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--payload-header", action="store_true", help="the map forwards the whole payload")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    jwks, tokens = _tokens(args.entries)
    settings = _settings(jwks, payload_header=args.payload_header)
    kept = claims_read(settings, "bench")
    _, rss = asyncio.run(_fill(settings, tokens, traced=False))
    traced, _ = asyncio.run(_fill(settings, tokens, traced=True))
    result = {
        "entries": args.entries,
        "token_chars": len(tokens[0]),
        "claims_kept": "all" if kept is None else sorted(kept),
        "tracemalloc_bytes_per_entry": round(traced / args.entries),
        "rss_bytes_per_entry": round(rss / args.entries),
        "rss_mib": round(rss / 2**20, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.entries} cached tokens of {result['token_chars']} characters, claims kept: {result['claims_kept']}: "
            f"{result['tracemalloc_bytes_per_entry']} bytes/entry allocated (tracemalloc), "
            f"{result['rss_bytes_per_entry']} bytes/entry RSS ({result['rss_mib']} MiB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
