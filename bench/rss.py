"""Resident memory of `jwt-sidecar run`: one process idle, after 10,000 requests of workload (a),
and a `workers: 2` set (worker 0 alone, and the whole tree): `bench/rss.py`.

Starts bench/targets.py's nginx (upstream and JWKS server) and the sidecar with bench's
config (the 100-entry token cache), waits for /readyz, reads VmRSS (and VmHWM, the peak) of
the process, then sends 10,000 requests of workload (a) (one valid RS256 token, proxied) over
32 keep-alive connections from a raw-socket client in this process (no HTTP library: the
figures are the sidecar's) and reads them again. `--workers 2` does the same for worker 0 and
the worker it forks (ops/workers.py): worker 0's own figure and the tree's sum. Prints one line per
figure, in MiB, as bench/FIGURES.md quotes them. RSS counts a page shared between processes
(the interpreter, OpenSSL, cryptography's library) in each of them, as the issue's targets
do; PSS (`/proc/PID/smaps_rollup`, bench/load.py's `pss_kib`; its peak sampled every 0.5 s
during the requests) shares it out, closer to what a container's memory cgroup is charged
for a tree. Environment variables reach the sidecar (`MALLOC_ARENA_MAX=1 .venv/bin/python
bench/rss.py` measures glibc's malloc settings).

    .venv/bin/python bench/rss.py                 # one process, then workers: 2
    .venv/bin/python bench/rss.py --workers 1
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import load  # noqa: E402
import targets as T  # noqa: E402
import tokens  # noqa: E402

REQUESTS = 10_000
CONNECTIONS = 32


async def _client(port: int, head: bytes, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            writer.write(head)
            status = await reader.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"workload (a) answered {status!r}")
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
    finally:
        writer.close()


async def _drive(port: int, token: str, total: int) -> None:
    head = (
        f"GET {T.PROTECTED_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    each, extra = divmod(total, CONNECTIONS)
    await asyncio.gather(*(_client(port, head, each + (i < extra)) for i in range(CONNECTIONS)))


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def _own_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def measure(workers: int, run_dir: Path, toks: tokens.TokenSet, nginx: T.Nginx, procs: T.Processes) -> None:
    access_log = str(run_dir / f"rss-{workers}w.access.log")  # one line per request, as bench/run writes
    target = T.start_sidecar(procs, run_dir, nginx, cpus=None, access_log=access_log, workers=workers)
    pid = target.pid
    time.sleep(1.0)  # the first key fetch's and the start's garbage settle
    label = "one process" if workers == 1 else f"workers: {workers}"
    if workers > 1:
        print(f"{label}: worker 0 alone idle    VmRSS {_mib(_own_kib(pid, 'VmRSS'))} MiB")
    print(
        f"{label}: idle                    VmRSS {_mib(load.status_kib(pid, 'VmRSS'))} MiB, "
        f"PSS {_mib(load.pss_kib(pid))} MiB (tree)"
    )
    _, usage = load.measure(pid, lambda: asyncio.run(_drive(target.port, toks.token, REQUESTS)))
    time.sleep(0.5)
    print(
        f"{label}: after {REQUESTS:,} of (a)     VmRSS {_mib(load.status_kib(pid, 'VmRSS'))} MiB, "
        f"peak VmHWM {_mib(load.status_kib(pid, 'VmHWM'))} MiB, PSS {_mib(load.pss_kib(pid))} MiB, "
        f"peak PSS {_mib(usage.peak_pss_kib)} MiB (tree)"
    )
    if workers > 1:
        print(f"{label}: worker 0 alone after   VmRSS {_mib(_own_kib(pid, 'VmRSS'))} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, action="append", help="1, 2 or both (the default)")
    args = parser.parse_args(argv)
    procs = T.Processes()
    with tempfile.TemporaryDirectory(prefix="jwt-sidecar-rss-") as tmp:
        run_dir = Path(tmp)
        try:
            toks = tokens.make(run_dir, distinct=1)
            nginx = T.start_nginx(procs, run_dir, cpus=None)
            for workers in args.workers or [1, 2]:
                measure(workers, run_dir, toks, nginx, procs)
                for proc in procs.procs[1:]:
                    T._stop(proc.popen)
                del procs.procs[1:]
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
