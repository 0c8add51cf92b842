"""Micro-benchmark of the revocation check alone: ns per `revocation.revoked` call, and the
memory of a list of 100,000 rules. No HTTP, no Redis: what a request adds on the hot path.

- empty:       revocation on, no rule in force (three truth tests)
- miss:        100,000 rules (jti, sub and a provider-wide cut-off), a token none of them names
- hit jti:     the token's jti is revoked
- hit sub:     the token's subject is revoked (issued-before rule)
- memory:      the rules and the index, as tracemalloc counts them when they are made

    .venv/bin/python bench/revocation_micro.py [--rules N] [--calls N] [--json]

Figures are the best of 5 runs of 200,000 calls each (less noise from other processes);
`--calls` takes fewer (tests/project/test_bench_scripts.py runs it so, as a smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.auth.revocation import RevocationIndex, make_rule, revoked

CALLS = 200_000
RUNS = 5


def build(rules: int, now: float) -> RevocationIndex:
    """`rules` rules: 80% jti (a UUID's length), 20% sub (with an issued-before instant), one provider-wide."""
    jtis = rules * 4 // 5

    def made() -> Any:
        for i in range(jtis):
            yield make_rule(jti=f"{i:08x}-0000-4000-8000-{i:012x}", expires=now + 3600)
        for i in range(rules - jtis - 1):
            yield make_rule(sub=f"user-{i}@example.com", before=now - 60, expires=now + 3600)
        yield make_rule(provider="partners", before=now - 86400, expires=now + 3600)

    return RevocationIndex(made())


def ns_per_call(index: RevocationIndex, claims: dict[str, Any], calls: int = CALLS) -> float:
    best = float("inf")
    for _ in range(RUNS):
        started = time.perf_counter_ns()
        for _ in range(calls):
            revoked(index, "main", claims)
        best = min(best, (time.perf_counter_ns() - started) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=CALLS, help="calls per run (best of 5 runs)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    now = time.time()
    tracemalloc.start()
    index = build(args.rules, now)
    memory, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    token = {"iss": "https://issuer.test", "sub": "someone-else", "jti": "not-revoked", "iat": int(now) - 10}
    results = {
        "rules": index.size,
        "memory_mb": round(memory / 1e6, 1),
        "bytes_per_rule": round(memory / max(1, index.size)),
        "empty_ns": round(ns_per_call(RevocationIndex(), token, args.calls)),
        "miss_ns": round(ns_per_call(index, token, args.calls)),
        "hit_jti_ns": round(ns_per_call(index, {**token, "jti": f"{7:08x}-0000-4000-8000-{7:012x}"}, args.calls)),
        "hit_sub_ns": round(
            ns_per_call(index, {**token, "sub": "user-7@example.com", "iat": int(now) - 120}, args.calls)
        ),
    }
    if args.json:
        print(json.dumps(results))
        return
    print(f"{results['rules']:,} rules: {results['memory_mb']} MB ({results['bytes_per_rule']} bytes a rule)")
    for key in ("empty", "miss", "hit_jti", "hit_sub"):
        print(f"  {key:<8} {results[key + '_ns']:>6} ns a call")


if __name__ == "__main__":
    main()
