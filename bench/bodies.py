"""What one 1 MiB body costs a proxy in the kernel as well as in Python: CPU (user and system)
and system calls per request, for bench/run's (e) workloads (a 1 MiB answer, a 1 MiB upload).

`bench/instructions h i` counts user-space instructions only; an (e) body's CPU above Envoy's
is mostly system time (a recv and a send per read), which it cannot see. This starts bench/run's
nginx upstream and the proxies (jwt-sidecar; with --targets also python-floor, envoy), drives
each with wrk (pinned: the proxy on CPU 0, wrk and nginx on CPU 1, when there are 2 CPUs),
reads the proxy's utime and stime from /proc and counts its system calls with `perf stat`
(tracepoints, no slowdown to speak of), and prints per request: requests/s, user and system
µs, and the calls (read, write, writev, epoll_wait, all).

    .venv/bin/python bench/bodies.py [--seconds 5] [--targets jwt-sidecar,python-floor,envoy] [--workloads e-down,e-up]

`jwt-sidecar-copied` is the sidecar with bodies never spliced, uploads or answers (splice.py's `ENABLED`
off): `--targets jwt-sidecar,jwt-sidecar-copied --workloads e-down,e-up --rounds N` interleaves the two.

Timings on a shared machine are noisy (say so with any figure); the call counts are steady.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import load  # noqa: E402
import targets as T  # noqa: E402
import tokens  # noqa: E402

CALLS = ("read", "readv", "write", "writev", "splice", "epoll_wait", "epoll_pwait")
WORKLOADS = {"e-down": (T.BIG_PATH, None), "e-up": (T.UPLOAD_PATH, "upload.lua")}


def ticks(pid: int) -> tuple[int, int]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]), int(fields[12])


def perf_counts(pid: int, seconds: float, out: dict[str, int]) -> None:
    """System calls of `pid` over `seconds`, by name (and `all`), into `out`."""
    events = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{name}" for name in CALLS]
    perf = shutil.which("perf") or "perf"
    proc = subprocess.run(
        [perf, "stat", "-x", ",", "-e", ",".join(events), "-p", str(pid), "--", "sleep", f"{seconds:g}"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    for line in proc.stderr.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].strip().isdigit():
            name = parts[2].rsplit("sys_enter_", 1)[-1] if "sys_enter_" in parts[2] else "all"
            out[name] = int(parts[0])


def run(
    target: T.Target, workload: str, seconds: float, connections: int, load_cpus: set[int] | None, token: str
) -> dict:
    path, script = WORKLOADS[workload]
    counts: dict[str, int] = {}
    pid = target.pid
    before = ticks(pid)
    counter = threading.Thread(target=perf_counts, args=(pid, seconds + 0.5, counts))
    counter.start()
    res = load.run_wrk(
        f"http://127.0.0.1:{target.port}{path}",
        duration=seconds,
        connections=connections,
        headers=[f"Authorization: Bearer {token}"],
        script=script,
        cpus=load_cpus,
    )
    counter.join()
    after = ticks(pid)
    n = max(res.requests, 1)
    us = 1e6 / load.CLK_TCK / n
    row = {
        "target": target.name,
        "workload": workload,
        "rps": res.rps,
        "user_us": (after[0] - before[0]) * us,
        "sys_us": (after[1] - before[1]) * us,
    }
    row.update({name: counts.get(name, 0) / n for name in ("all", *CALLS)})
    if script is not None and any(code != "200" for code in res.statuses):
        row["statuses"] = res.statuses
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--targets", default="jwt-sidecar")
    p.add_argument("--workloads", default="e-down,e-up")
    p.add_argument("--unpinned", action="store_true")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    pinned = not args.unpinned and T.pin_available()
    target_cpus, load_cpus = (T.TARGET_CPUS, T.LOAD_CPUS) if pinned else (None, None)
    procs = T.Processes()
    with tempfile.TemporaryDirectory(prefix="bench-bodies-") as tmp:
        run_dir = Path(tmp)
        toks = tokens.make(run_dir, distinct=1)
        try:
            nginx = T.start_nginx(procs, run_dir, cpus=load_cpus)
            running = []
            for name in args.targets.split(","):
                if name in ("jwt-sidecar", "jwt-sidecar-copied"):
                    # (-copied: bodies never spliced, proxy/http/splice.py's `ENABLED` off)
                    running.append(
                        T.start_sidecar(
                            procs,
                            run_dir,
                            nginx,
                            cpus=target_cpus,
                            access_log=os.devnull,
                            spliced=name == "jwt-sidecar",
                        )
                    )
                elif name == "python-floor":
                    running.append(T.start_floor(procs, run_dir, nginx, cpus=target_cpus))
                elif name == "envoy":
                    running.append(
                        T.start_envoy(
                            procs, run_dir, nginx, name=name, jwt=True, cpus=target_cpus, access_log=os.devnull
                        )
                    )
                else:
                    raise SystemExit(f"unknown target {name}")
            print(f"pinned: {pinned}; {args.seconds:g} s a run, {args.connections} connections")
            print(
                "| target | workload | req/s | user µs | sys µs | CPU µs | calls | read(v) | write | writev | splice | epoll |"
            )
            print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            for _ in range(args.rounds):
                for workload in args.workloads.split(","):
                    for target in running:
                        load.run_wrk(  # warm-up: connections pooled, caches filled
                            f"http://127.0.0.1:{target.port}{WORKLOADS[workload][0]}",
                            duration=1,
                            connections=args.connections,
                            headers=[f"Authorization: Bearer {toks.token}"],
                            script=WORKLOADS[workload][1],
                            cpus=load_cpus,
                        )
                        r = run(target, workload, args.seconds, args.connections, load_cpus, toks.token)
                        print(
                            f"| {r['target']} | {r['workload']} | {r['rps']:.0f} | {r['user_us']:.0f} "
                            f"| {r['sys_us']:.0f} | {r['user_us'] + r['sys_us']:.0f} | {r['all']:.1f} "
                            f"| {r['read'] + r['readv']:.1f} | {r['write']:.1f} | {r['writev']:.1f} "
                            f"| {r['splice']:.1f} | {r['epoll_wait'] + r['epoll_pwait']:.1f} |"
                            + (f" {r['statuses']}" if "statuses" in r else ""),
                            flush=True,
                        )
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
