"""Driving load and measuring the target: wrk runs, fixed-rate runs, CPU and RSS of a pid.

`measure(pid, fn)` reads the target's utime+stime (/proc/<pid>/stat) before and after `fn`
and samples its VmRSS every 50 ms while `fn` runs; the wrk and rate runners return parsed
results. Every run is bounded: wrk by -d (plus a hard timeout), the rate generator by its
duration and timeout.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LUA = HERE / "lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- /proc ----------------------------------------------------------------------------------
def tree(pid: int) -> list[int]:
    """`pid` and every process below it (a supervisor with its workers, Envoy is one process)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                queue += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` and of the processes below it, in seconds."""
    total = 0.0
    for each in tree(pid):
        try:
            stat = Path(f"/proc/{each}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def status_kib(pid: int, key: str) -> int:
    """A /proc/<pid>/status figure (VmRSS, VmHWM), summed over `pid` and the processes below it."""
    total = 0
    for each in tree(pid):
        try:
            lines = Path(f"/proc/{each}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith(key + ":"):
                total += int(line.split()[1])
                break
    return total


def pss_kib(pid: int) -> int:
    """Proportional set size (`/proc/<pid>/smaps_rollup`'s Pss), summed over `pid` and the
    processes below it: each shared page (the interpreter, OpenSSL, what a fork left shared)
    divided among the processes that map it. What a memory cgroup charges a container is
    closer to this than to the VmRSS sum, which counts a shared page once per process."""
    total = 0
    for each in tree(pid):
        try:
            lines = Path(f"/proc/{each}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in lines if line.startswith("Pss:")), 0)
    return total


def threads(pid: int) -> list[Path]:
    """/proc/<pid>/task/<tid> of every thread of `pid` and of the processes below it."""
    found = []
    for each in tree(pid):
        try:
            found += list(Path(f"/proc/{each}/task").iterdir())
        except OSError:
            continue
    return found


def affinity(pid: int) -> dict[str, str]:
    """Each thread's name and the CPUs it may run on (Cpus_allowed_list): a pinned proxy's
    threads created after the pinning inherit it, and this shows that they did."""
    found = {}
    for task in threads(pid):
        try:
            comm = (task / "comm").read_text().strip()
            allowed = next(
                line.split(":", 1)[1].strip()
                for line in (task / "status").read_text().splitlines()
                if line.startswith("Cpus_allowed_list:")
            )
        except (OSError, StopIteration):
            continue
        found[f"{task.name} {comm}"] = allowed
    return found


def waits(pid: int) -> tuple[dict[str, float], int]:
    """Seconds each thread of `pid` (and below) spent runnable but waiting for a CPU (the
    second field of /proc/<tid>/schedstat), and their context switches (voluntary and not)."""
    delay: dict[str, float] = {}
    switches = 0
    for task in threads(pid):
        try:
            delay[str(task)] = int((task / "schedstat").read_text().split()[1]) / 1e9
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    switches += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return delay, switches


def steal_seconds() -> float:
    """CPU time the hypervisor gave to others while this machine's CPUs wanted it (all CPUs)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return int(fields[7]) / CLK_TCK if len(fields) > 7 else 0.0


def machine_busy_seconds() -> float:
    """CPU time every CPU spent busy since boot (user, nice, system, irq, softirq), in seconds."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def _ours() -> float:
    """CPU time of this process and of its waited-for children (wrk, rate.py)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Usage:
    cpu_s: float = 0.0
    peak_rss_kib: int = 0
    peak_pss_kib: int = 0
    """The tree's PSS, sampled every 0.5 s (`pss_kib`; smaps_rollup walks the page tables,
    so it is read ten times less often than VmRSS)."""
    other_cpu_s: float = 0.0
    """CPU time the machine spent on anything but the target, `also`, this process and its
    load generators: other work on a shared machine, which makes the numbers noisy."""
    runq_wait_s: float = 0.0
    """Time the target's thread that waited most was ready to run but waited for a CPU
    (schedstat; Envoy's worker, our one thread): with the target pinned to one CPU, anything
    else on that CPU shows here (and costs the target CPU time per request too: its caches are
    refilled after each turn of the other work)."""
    switches: int = 0
    """The target's context switches, voluntary and not, summed over its threads."""
    steal_s: float = 0.0
    """CPU time the hypervisor took away from this VM during the run (all CPUs)."""
    load_cpu_s: float = 0.0
    """CPU time of the load generator (wrk, rate.py), this process and `also` (the upstream):
    with the target pinned, whether the other CPU could have kept it busy."""


def measure(pid: int | None, fn: Callable[[], Any], *, also: tuple[int, ...] = ()) -> tuple[Any, Usage]:
    if pid is None:
        return fn(), Usage()
    usage = Usage(peak_rss_kib=status_kib(pid, "VmRSS"), peak_pss_kib=pss_kib(pid))
    also = tuple(p for p in also if p != pid)
    busy0, ours0, also0 = machine_busy_seconds(), _ours(), sum(cpu_seconds(p) for p in also)
    stop = threading.Event()

    def sample() -> None:
        ticks = 0
        while not stop.wait(0.05):
            ticks += 1
            try:
                usage.peak_rss_kib = max(usage.peak_rss_kib, status_kib(pid, "VmRSS"))
                if ticks % 10 == 0:
                    usage.peak_pss_kib = max(usage.peak_pss_kib, pss_kib(pid))
            except OSError:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    before = cpu_seconds(pid)
    wait0, switches0 = waits(pid)
    steal0 = steal_seconds()
    sampler.start()
    try:
        result = fn()
    finally:
        stop.set()
        sampler.join()
    usage.cpu_s = cpu_seconds(pid) - before
    wait1, switches1 = waits(pid)
    usage.runq_wait_s = max((wait1[t] - wait0.get(t, 0.0) for t in wait1), default=0.0)
    usage.switches = switches1 - switches0
    usage.steal_s = steal_seconds() - steal0
    busy = machine_busy_seconds() - busy0
    usage.load_cpu_s = (_ours() - ours0) + (sum(cpu_seconds(p) for p in also) - also0)
    usage.other_cpu_s = max(0.0, busy - usage.cpu_s - usage.load_cpu_s)
    usage.peak_rss_kib = max(usage.peak_rss_kib, status_kib(pid, "VmRSS"))
    usage.peak_pss_kib = max(usage.peak_pss_kib, pss_kib(pid))
    return result, usage


# -- wrk ------------------------------------------------------------------------------------
@dataclass
class WrkResult:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    """Only when the status-counting script ran."""
    raw: str = ""


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot read a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    r = WrkResult(raw=out)
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),", out, re.M)
    if not m:
        raise ValueError(f"cannot find the request count in wrk's output:\n{out}")
    r.requests = int(m.group(1))
    r.seconds = _ms(m.group(2) + m.group(3)) / 1000
    m = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    r.rps = float(m.group(1)) if m else r.requests / r.seconds
    dist = out.split("Latency Distribution", 1)
    if len(dist) == 2:
        for q, value in re.findall(r"^\s+(\d+)%\s+([\d.]+(?:us|ms|s|m))\s*$", dist[1], re.M):
            r.latency_ms[f"p{q}"] = _ms(value)
    m = re.search(r"^\s+Latency\s+([\d.]+(?:us|ms|s|m))\s+[\d.]+\S*\s+([\d.]+(?:us|ms|s|m))", out, re.M)
    if m:
        r.latency_ms["mean"] = _ms(m.group(1))
        r.latency_ms["max"] = _ms(m.group(2))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    r.non_2xx_3xx = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r.socket_errors = {
            k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), m.groups(), strict=True) if int(v)
        }
    for code, count in re.findall(r"^STATUS (\d+) (\d+)$", out, re.M):
        r.statuses[code] = r.statuses.get(code, 0) + int(count)
    return r


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is not installed (apt-get install wrk); bench/run installs it")
    return found


def run_wrk(
    url: str,
    *,
    duration: float,
    connections: int,
    threads: int = 1,
    headers: list[str] = (),
    script: str | None = None,
    script_args: list[str] = (),
    cpus: set[int] | None = None,
) -> WrkResult:
    argv = [wrk_binary(), f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", "--timeout", "10s"]
    for h in headers:
        argv += ["-H", h]
    if script:
        argv += ["-s", str(LUA / script)]
    argv.append(url)
    if script_args:
        argv += ["--", *script_args]

    def child_setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, preexec_fn=child_setup)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {' '.join(argv[:8])} …\n{proc.stdout}\n{proc.stderr}")
    return parse_wrk(proc.stdout + proc.stderr)


# -- the fixed-rate generator ---------------------------------------------------------------
def run_rate(url: str, *, rate: float, duration: float, headers: list[str] = (), cpus: set[int] | None = None) -> dict:
    """bench/rate.py's result, with every request's latency (`samples`: due time, ms)."""
    argv = [sys.executable, str(HERE / "rate.py"), "--url", url, "--rate", f"{rate:g}", "--duration", f"{duration:g}"]
    argv.append("--samples")
    for h in headers:
        argv += ["-H", h]

    def child_setup() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, preexec_fn=child_setup)
    if proc.returncode != 0:
        raise RuntimeError(f"rate.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout)
