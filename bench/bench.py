"""jwt-sidecar against Envoy's jwt_authn, same rules, same upstream, same load: `bench/run`.

Starts an nginx upstream (fixed 200 "ok", a 1 MiB file, a 1 MiB upload sink) that also
serves the JWKS, Envoy with jwt_authn (remote RS256 JWKS, claim headers, a 100-entry JWT
cache), Envoy with the router alone, jwt-sidecar with the same rules, and python-floor
(bench/floor.py: HTTP in and out in Python and no token verification, the ceiling of any
Python proxy here); checks that each answers as it should; then runs every workload against
every target in turn, interleaved over rounds, and prints a Markdown table (raw results:
bench/results/latest.json).

    bench/run                     # 3 rounds of 5 s per run
    bench/run --quick             # 1 round of 2 s
    bench/run --targets sidecar,envoy --workloads a,b
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import load  # noqa: E402
import report  # noqa: E402
import targets as T  # noqa: E402
import tokens  # noqa: E402

RESULTS = HERE / "results" / "latest.json"
DISTINCT_TOKENS = 10_000
RATE = 200.0

# python-floor verifies nothing: it is there to show what HTTP alone costs in Python.
FLOOR = "python-floor"
PROXIES = ("envoy", "jwt-sidecar", FLOOR)
# Two-way: Envoy --concurrency 2 against jwt-sidecar `workers: 2`, unpinned (they need both CPUs).
PROXIES_2 = ("envoy-2", "jwt-sidecar-2w")
TARGET_NAMES = ("envoy", "jwt-sidecar", FLOOR, "envoy-router", "nginx", *PROXIES_2)
ALIASES = {
    "sidecar": "jwt-sidecar",
    "jwt-sidecar": "jwt-sidecar",
    "envoy": "envoy",
    "envoy-router": "envoy-router",
    "router": "envoy-router",
    "nginx": "nginx",
    "upstream": "nginx",
    FLOOR: FLOOR,
    "floor": FLOOR,
    "envoy-2": "envoy-2",
    "jwt-sidecar-2w": "jwt-sidecar-2w",
    "sidecar-2w": "jwt-sidecar-2w",
}


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    path: str
    targets: tuple[str, ...]
    expect: int = 200
    token: str = "one"
    """`one` (the alice token in Authorization), `none`, or `cycle` (the 10,000 distinct tokens)."""
    kind: str = "wrk"
    """`wrk` (as fast as it goes) or `rate` (fixed rate, bench/rate.py)."""
    script: str | None = None
    large: bool = False
    """1 MiB bodies: fewer connections."""
    rate: float = RATE


WORKLOADS = [
    Workload("a", "(a) one valid token", T.PROTECTED_PATH, PROXIES, script="status.lua"),
    Workload("a2", "(a) one valid token, 2 workers", T.PROTECTED_PATH, PROXIES_2, script="status.lua"),
    Workload(
        "b2", "(b) 10,000 distinct tokens, 2 workers", T.PROTECTED_PATH, PROXIES_2, token="cycle", script="tokens.lua"
    ),
    Workload("b", "(b) 10,000 distinct tokens", T.PROTECTED_PATH, PROXIES, token="cycle", script="tokens.lua"),
    Workload("c", "(c) no token → 401", T.PROTECTED_PATH, PROXIES, expect=401, token="none", script="status.lua"),
    Workload(
        "d", "(d) public route", T.PUBLIC_PATH, (*PROXIES, "envoy-router", "nginx"), token="none", script="status.lua"
    ),
    # No status counting here: wrk would hand every 1 MiB body to Lua, loading the load
    # generator more than the proxies. wrk's own non-2xx/3xx count and the sanity check remain.
    Workload("e-down", "(e) 1 MiB response", T.BIG_PATH, (*PROXIES, "nginx"), large=True),
    Workload("e-up", "(e) 1 MiB upload", T.UPLOAD_PATH, (*PROXIES, "nginx"), script="upload.lua", large=True),
    Workload("f", "(f) 200 req/s, one valid token", T.PROTECTED_PATH, (*PROXIES, "nginx"), kind="rate"),
]


class Failure(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--quick", action="store_true", help="1 round of 2 s per run (and a quicker micro-benchmark)")
    p.add_argument("--rounds", type=int, help="rounds (default 3; 1 with --quick)")
    p.add_argument("--duration", type=float, help="seconds per run (default 5; 2 with --quick)")
    p.add_argument(
        "--targets",
        default=",".join(TARGET_NAMES),
        help="comma list of envoy, sidecar, python-floor, envoy-router, nginx, envoy-2, sidecar-2w (default: all)",
    )
    p.add_argument(
        "--workloads",
        default=",".join(w.key for w in WORKLOADS),
        help="comma list of " + ", ".join(w.key for w in WORKLOADS) + " (default: all; e = e-down,e-up)",
    )
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--connections-large", type=int, default=8, help="wrk connections for 1 MiB bodies (default 8)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the proxy and the load generator to separate CPUs")
    p.add_argument("--no-micro", action="store_true", help="skip bench/verify_micro.py")
    p.add_argument(
        "--output", type=Path, default=RESULTS, help=f"raw results (default {RESULTS.relative_to(HERE.parent)})"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, tokens)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    names = []
    for raw in args.targets.split(","):
        name = ALIASES.get(raw.strip())
        if name is None:
            p.error(f"unknown target {raw!r}; choose from {', '.join(sorted(ALIASES))}")
        names.append(name)
    args.target_names = [n for n in TARGET_NAMES if n in names]
    keys = set()
    for raw in args.workloads.split(","):
        raw = raw.strip()
        matched = [w.key for w in WORKLOADS if w.key == raw or w.key.split("-")[0] == raw]
        if not matched:
            p.error(f"unknown workload {raw!r}; choose from {', '.join(w.key for w in WORKLOADS)}")
        keys.update(matched)
    args.workload_list = [w for w in WORKLOADS if w.key in keys and set(w.targets) & set(args.target_names)]
    if args.rounds < 1 or args.duration <= 0:
        p.error("--rounds and --duration must be positive")
    return args


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"? ({error})"
        text = (proc.stdout + proc.stderr).strip()
        return text.splitlines()[0] if text else "?"

    envoy = first_line([T.envoy_binary(), "--version"])
    return {
        "envoy": envoy.split("version:")[-1].strip().split("/")[1] if "/" in envoy else envoy,
        "envoy_full": envoy,
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line([load.wrk_binary(), "-v"]),
        "python": platform.python_version(),
        "sidecar_loop": T.event_loop_of_sidecar(),
        "git": first_line(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"]),
        # The sidecar measured is the working tree, which may differ from HEAD.
        "proxy_dirty": "yes"
        if subprocess.run(
            ["git", "-C", str(HERE.parent), "status", "--porcelain", "proxy"], capture_output=True, text=True
        ).stdout.strip()
        else "no",
    }


# -- sanity checks ----------------------------------------------------------------------------
def check(cond: bool, what: str) -> None:
    if not cond:
        raise Failure(what)


def sanity(target: T.Target, toks: tokens.TokenSet) -> None:
    """Prove each target answers as configured before timing it."""
    name, port = target.name, target.port
    bearer = {"Authorization": f"Bearer {toks.token}"}
    status, _, body = T.http_get(port, T.PUBLIC_PATH)
    check(
        status == 200 and body == b"ok",
        f"{name}: GET {T.PUBLIC_PATH} without a token → {status} {body[:80]!r}, want 200 ok",
    )
    if target.kind == "nginx" or name == "envoy-router":
        return
    # python-floor verifies no token and rewrites no header: only the 401 without a token and
    # the 1 MiB bodies apply to it.
    verifies = target.kind != "floor"
    if verifies:
        sanity_identity(name, port, bearer)
    status, headers, _ = T.http_get(port, T.PROTECTED_PATH)
    check(status == 401, f"{name}: no token → {status}, want 401")
    check(
        headers.get("www-authenticate", "").startswith("Bearer"),
        f"{name}: no token → WWW-Authenticate {headers.get('www-authenticate')!r}, want a Bearer challenge",
    )
    if verifies:
        head, payload, sig = toks.token.split(".")
        forged = ".".join((head, payload, ("A" if sig[0] != "A" else "B") + sig[1:]))
        status, _, _ = T.http_get(port, T.PROTECTED_PATH, {"Authorization": f"Bearer {forged}"})
        check(status == 401, f"{name}: a bad signature → {status}, want 401")
    lines = toks.tokens_path.read_text().split()
    for tok in (lines[0], lines[len(lines) // 2], lines[-1]):
        status, _, _ = T.http_get(port, T.PROTECTED_PATH, {"Authorization": f"Bearer {tok}"})
        check(status == 200, f"{name}: a token from tokens.txt → {status}, want 200")
    status, _, body = T.http_get(port, T.BIG_PATH, bearer)
    check(
        status == 200 and len(body) == T.MIB, f"{name}: GET {T.BIG_PATH} → {status}, {len(body)} bytes, want 200, 1 MiB"
    )
    status, _, body = T.http_get(
        port, T.UPLOAD_PATH, {**bearer, "Content-Type": "application/octet-stream"}, method="POST", body=b"x" * T.MIB
    )
    check(
        status == 200 and body == b"ok", f"{name}: POST {T.UPLOAD_PATH} (1 MiB) → {status} {body[:80]!r}, want 200 ok"
    )


def sanity_identity(name: str, port: int, bearer: dict[str, str]) -> None:
    """Claims to headers, the token not forwarded, a client's identity headers removed."""
    status, headers, _ = T.http_get(port, T.WHOAMI_PATH, {**bearer, "X-User-Id": "mallory"})
    check(status == 200, f"{name}: GET {T.WHOAMI_PATH} with the token → {status}, want 200")
    check(
        headers.get("x-seen-user-id") == "alice",
        f"{name}: upstream saw X-User-Id {headers.get('x-seen-user-id')!r}, want 'alice'",
    )
    check(
        headers.get("x-seen-user-email") == "alice@example.com",
        f"{name}: upstream saw X-User-Email {headers.get('x-seen-user-email')!r}, want 'alice@example.com'",
    )
    check(
        "x-seen-authorization" not in headers,
        f"{name}: the token was forwarded to the upstream ({headers.get('x-seen-authorization', '')[:20]}…)",
    )
    status, headers, _ = T.http_get(port, "/public" + T.WHOAMI_PATH, {"X-User-Id": "mallory", "X-User-Email": "m@x"})
    check(
        status == 200 and "x-seen-user-id" not in headers and "x-seen-user-email" not in headers,
        f"{name}: a client's X-User-Id reached the upstream on the public route ({status}, {headers.get('x-seen-user-id')!r})",
    )


# -- one run ----------------------------------------------------------------------------------
def run_one(
    w: Workload,
    target: T.Target,
    toks: tokens.TokenSet,
    args: argparse.Namespace,
    duration: float,
    load_cpus: set[int] | None,
    upstream_pid: int,
) -> dict:
    url = f"http://127.0.0.1:{target.port}{w.path}"
    headers = [f"Authorization: Bearer {toks.token}"] if w.token == "one" else []
    if w.kind == "rate":
        res, usage = load.measure(
            target.pid,
            lambda: load.run_rate(url, rate=w.rate, duration=duration, headers=headers, cpus=load_cpus),
            also=(upstream_pid,),
        )
        requests = res["requests"]
        statuses = res["statuses"]
        errors = sum(res["errors"].values()) + sum(n for code, n in statuses.items() if code != str(w.expect))
        record = {
            "rps": requests / duration,
            "latency_ms": res["latency_ms"],
            "requests": requests,
            "statuses": statuses,
            "socket_errors": res["errors"],
            "non_2xx_3xx": None,
            "sent": res["sent"],
        }
        if res["sent"] != requests:
            errors += res["sent"] - requests
    else:
        script_args = [str(toks.tokens_path)] if w.token == "cycle" else []
        res, usage = load.measure(
            target.pid,
            lambda: load.run_wrk(
                url,
                duration=duration,
                connections=args.connections_large if w.large else args.connections,
                headers=headers,
                script=w.script,
                script_args=script_args,
                cpus=load_cpus,
            ),
            also=(upstream_pid,),
        )
        requests = res.requests
        if w.script is None:
            # No per-status counts: every answer must at least be a 2xx/3xx.
            unexpected = res.non_2xx_3xx if w.expect < 300 else requests
        else:
            unexpected = abs(requests - sum(res.statuses.values())) + sum(
                n for code, n in res.statuses.items() if code != str(w.expect)
            )
        errors = unexpected + sum(res.socket_errors.values())
        record = {
            "rps": res.rps,
            "latency_ms": res.latency_ms,
            "requests": requests,
            "statuses": res.statuses,
            "socket_errors": res.socket_errors,
            "non_2xx_3xx": res.non_2xx_3xx,
        }
    record.update(
        workload=w.key,
        target=target.name,
        errors=errors,
        cpu_s=usage.cpu_s,
        cpu_s_per_1k=usage.cpu_s / requests * 1000 if requests and target.pid else None,
        peak_rss_kib=usage.peak_rss_kib,
        duration_s=duration,
        other_cpu_share=usage.other_cpu_s / duration,
    )
    if requests == 0:
        record["errors"] = record["errors"] or 1
    return record


def describe_failure(w: Workload, target: T.Target, r: dict) -> str:
    what = f"{r['requests']} requests"
    if r.get("statuses"):
        what += ", statuses " + ", ".join(f"{c}×{n}" for c, n in sorted(r["statuses"].items()))
    if r.get("non_2xx_3xx"):
        what += f", {r['non_2xx_3xx']} non-2xx/3xx"
    if r.get("socket_errors"):
        what += ", socket errors " + json.dumps(r["socket_errors"])
    return f"{w.title} against {target.name}: {r['errors']} unexpected ({what}; every answer should be {w.expect})"


# -- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    # Ctrl-C (even when started with SIGINT ignored, as `cmd &` does), SIGTERM and SIGHUP all
    # unwind through the `finally` below, which stops everything this run started.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    pin = not args.no_pin and T.pin_available()
    target_cpus = T.TARGET_CPUS if pin else None
    load_cpus = T.LOAD_CPUS if pin else None
    ver = versions()
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "connections": args.connections,
        "connections_large": args.connections_large,
        "wrk_threads": 1,
        "rate": RATE,
        "pinned": pin,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "envoy_version": ver["envoy"],
        "sidecar_loop": ver["sidecar_loop"],
        "versions": ver,
        "distinct_tokens": DISTINCT_TOKENS,
        "targets": args.target_names,
        "workloads": [w.key for w in args.workload_list],
    }
    procs = T.Processes()
    runs: list[dict] = []
    failures: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="jwt-sidecar-bench-"))
    try:
        print(f"bench: temp dir {tmp}; minting {DISTINCT_TOKENS:,} RS256 tokens…", flush=True)
        toks = tokens.make(tmp, distinct=DISTINCT_TOKENS)
        nginx = T.start_nginx(procs, tmp, cpus=load_cpus)
        print(f"bench: nginx upstream :{nginx.port}, JWKS {nginx.jwks_url}", flush=True)
        running: dict[str, T.Target] = {}
        for name in args.target_names:
            if name == "envoy":
                running[name] = T.start_envoy(procs, tmp, nginx, name="envoy", jwt=True, cpus=target_cpus)
            elif name == "envoy-router":
                running[name] = T.start_envoy(procs, tmp, nginx, name="envoy-router", jwt=False, cpus=target_cpus)
            elif name == "jwt-sidecar":
                running[name] = T.start_sidecar(procs, tmp, nginx, cpus=target_cpus)
            elif name == FLOOR:
                running[name] = T.start_floor(procs, tmp, nginx, cpus=target_cpus)
            elif name == "envoy-2":
                running[name] = T.start_envoy(procs, tmp, nginx, name="envoy-2", jwt=True, cpus=None, concurrency=2)
            elif name == "jwt-sidecar-2w":
                running[name] = T.start_sidecar(procs, tmp, nginx, cpus=None, workers=2)
            else:
                running[name] = T.Target("nginx", nginx.proc, nginx.port, "nginx")
            print(f"bench: {name} on :{running[name].port} (pid {running[name].pid})", flush=True)
        for target in running.values():
            sanity(target, toks)
        print(
            "bench: sanity checks passed (claim headers, token stripped, spoofed headers removed, 401s, "
            "1 MiB both ways"
            + (f"; {FLOOR}: 401 and 1 MiB only, it verifies nothing" if FLOOR in running else "")
            + ")",
            flush=True,
        )

        # Warm-up, not recorded: connection pools, caches, lazy initialisation.
        warm = min(1.0, args.duration / 2)
        for w in args.workload_list:
            for name in w.targets:
                if name in running and w.kind == "wrk":
                    run_one(w, running[name], toks, args, warm, load_cpus, nginx.proc.measure_pid)

        plan = [(w, name) for w in args.workload_list for name in w.targets if name in running]
        total = len(plan) * args.rounds
        n = 0
        for rnd in range(args.rounds):
            for w in args.workload_list:
                names = [name for name in w.targets if name in running]
                # Rotate the order each round, so no target always runs first (or after the same one).
                shift = rnd % len(names)
                for name in names[shift:] + names[:shift]:
                    n += 1
                    target = running[name]
                    if not target.proc or not target.proc.alive():
                        raise Failure(f"{name} died; its log:\n{target.proc.log_tail() if target.proc else ''}")
                    r = run_one(w, target, toks, args, args.duration, load_cpus, nginx.proc.measure_pid)
                    r["round"] = rnd + 1
                    runs.append(r)
                    p50, p99 = r["latency_ms"].get("p50"), r["latency_ms"].get("p99")
                    print(
                        f"  [{n:>3}/{total}] round {rnd + 1} {w.key:<6} {name:<13} {r['rps']:>9,.0f} req/s  "
                        f"p50 {p50 if p50 is not None else float('nan'):7.2f} ms  p99 {p99 if p99 is not None else float('nan'):7.2f} ms  "
                        f"cpu/1k {r['cpu_s_per_1k'] or 0:.3f} s  rss {r['peak_rss_kib'] / 1024:6.1f} MiB"
                        + (f"  other work {r['other_cpu_share']:.0%} of a CPU" if r["other_cpu_share"] > 0.1 else "")
                        + (f"  ERRORS {r['errors']}" if r["errors"] else ""),
                        flush=True,
                    )
                    if r["errors"]:
                        msg = describe_failure(w, target, r)
                        failures.append(msg)
                        print(f"FAIL: {msg}", file=sys.stderr, flush=True)
        for name, target in running.items():
            if target.proc is not None:
                meta.setdefault("vm_hwm_mib", {})[name] = load.status_kib(target.pid, "VmHWM") / 1024
    except (Failure, RuntimeError) as error:
        # A failed check, or a server that would not start (its log tail is in the message).
        failures.append(str(error))
        print(f"\nFAIL: {error}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping everything it started", file=sys.stderr, flush=True)
        raise
    finally:
        procs.stop_all()
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"bench: kept {tmp}")

    micro = None
    if not args.no_micro and not failures:
        print("bench: verification micro-benchmark…", flush=True)
        argv_micro = [sys.executable, str(HERE / "verify_micro.py"), "--json"] + (["--quick"] if args.quick else [])
        proc = subprocess.run(
            argv_micro,
            capture_output=True,
            text=True,
            timeout=600,
            preexec_fn=(lambda: os.sched_setaffinity(0, T.TARGET_CPUS)) if pin else None,
        )
        if proc.returncode != 0:
            failures.append(f"verify_micro.py failed:\n{proc.stderr}")
        else:
            micro = json.loads(proc.stdout)

    rows = report.summarise(runs, args.workload_list, args.target_names)
    if runs:
        shares = sorted(r["other_cpu_share"] for r in runs)
        meta["other_cpu_share"] = {"median": shares[len(shares) // 2], "max": shares[-1]}
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    report.write_json(args.output, {"meta": meta, "summary": rows, "runs": runs, "micro": micro, "failures": failures})
    print()
    print(report.markdown(rows, args.workload_list, micro, meta))
    print()
    print(f"bench: {meta['elapsed_s']:.0f} s; raw results in {args.output}")
    if failures:
        print(f"\nFAILED: {len(failures)} problem(s):", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
