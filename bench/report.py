"""Summaries of the raw runs, the Markdown tables, and the JSON written to bench/results/."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

BASELINE = "envoy"
UPSTREAM_ALONE = "nginx"


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict], workloads: list[Any], targets: list[str]) -> list[dict]:
    """One row per (workload, target) over the rounds: medians, min–max, peaks, ratios to Envoy."""
    rows: list[dict] = []
    for w in workloads:
        by_target: dict[str, dict] = {}
        for t in targets:
            mine = [r for r in runs if r["workload"] == w.key and r["target"] == t]
            if not mine:
                continue
            rps = [r["rps"] for r in mine]
            row = {
                "workload": w.key,
                "title": w.title,
                "target": t,
                "rounds": len(mine),
                "rps_median": _median(rps),
                "rps_min": min(rps),
                "rps_max": max(rps),
                "p50_ms": _median([r["latency_ms"].get("p50") for r in mine]),
                "p99_ms": _median([r["latency_ms"].get("p99") for r in mine]),
                "peak_rss_mib": max(r["peak_rss_kib"] for r in mine) / 1024,
                "cpu_s_per_1k": _median([r["cpu_s_per_1k"] for r in mine]),
                "requests": sum(r["requests"] for r in mine),
                "errors": sum(r["errors"] for r in mine),
                "statuses": _sum_statuses(mine),
            }
            by_target[t] = row
            rows.append(row)
        # The two-way rows compare with Envoy --concurrency 2, the rest with one worker.
        base = by_target.get("envoy-2") or by_target.get(BASELINE)
        alone = by_target.get(UPSTREAM_ALONE)
        for row in by_target.values():
            row["rps_vs_envoy"] = _ratio(row["rps_median"], base and base["rps_median"])
            row["cpu_vs_envoy"] = _ratio(row["cpu_s_per_1k"], base and base["cpu_s_per_1k"])
            if alone is not None and row is not alone:
                row["added_p50_ms"] = _diff(row["p50_ms"], alone["p50_ms"])
                row["added_p99_ms"] = _diff(row["p99_ms"], alone["p99_ms"])
        if base is not None and alone is not None:
            for row in by_target.values():
                if row is not alone:
                    row["added_p50_vs_envoy"] = _ratio(row.get("added_p50_ms"), base.get("added_p50_ms"))
                    row["added_p99_vs_envoy"] = _ratio(row.get("added_p99_ms"), base.get("added_p99_ms"))
    return rows


def _sum_statuses(runs: list[dict]) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in runs:
        for code, n in r.get("statuses", {}).items():
            total[code] = total.get(code, 0) + n
    return total


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


# -- Markdown -------------------------------------------------------------------------------
def _f(value: float | None, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, fmt) + suffix


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown(rows: list[dict], workloads: list[Any], micro: list[dict] | None, meta: dict) -> str:
    out: list[str] = []
    out.append(
        f"{meta['rounds']} round(s) of {meta['duration_s']:g} s per run, interleaved; "
        f"wrk {meta['wrk_threads']} thread, {meta['connections']} connections "
        f"({meta['connections_large']} for 1 MiB); "
        + ("proxy pinned to CPU 1, wrk/nginx to CPU 0; " if meta["pinned"] else "no CPU pinning; ")
        + f"Envoy {meta['envoy_version']} --concurrency 1; jwt-sidecar one process ({meta['sidecar_loop']}); "
        f"{meta['cpus']} CPUs; git {meta['versions']['git']}"
        + (" + uncommitted changes under proxy/" if meta["versions"].get("proxy_dirty") == "yes" else "")
        + "."
    )
    other = meta.get("other_cpu_share")
    if other and other["max"] > 0.1:
        out.append("")
        out.append(
            f"Note: other work on this machine used {other['median']:.0%} of a CPU (median over runs, "
            f"max {other['max']:.0%}) while the runs ran; the numbers are noisier than on an idle machine."
        )
    out.append("")
    out.append(
        "| workload | target | req/s median (min–max) | vs Envoy | p50 ms | p99 ms | peak RSS MiB "
        "| CPU s / 1k req | CPU vs Envoy | errors |"
    )
    out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for w in workloads:
        if w.kind != "wrk":
            continue
        for row in (r for r in rows if r["workload"] == w.key):
            out.append(
                f"| {w.title} | {row['target']} | {row['rps_median']:,.0f} ({row['rps_min']:,.0f}–{row['rps_max']:,.0f}) "
                f"| {_x(row['rps_vs_envoy'])} | {_ms(row['p50_ms'])} | {_ms(row['p99_ms'])} "
                f"| {row['peak_rss_mib']:.1f} | {_f(row['cpu_s_per_1k'], '.3f')} | {_x(row['cpu_vs_envoy'])} "
                f"| {row['errors']} |"
            )
    rate = [w for w in workloads if w.kind == "rate"]
    for w in rate:
        mine = [r for r in rows if r["workload"] == w.key]
        if not mine:
            continue
        out.append("")
        out.append(
            f"{w.title}: latency at a fixed {w.rate:g} req/s (bench/rate.py, open loop), median over rounds; "
            '"added" is the target\'s minus the upstream alone (nginx direct).'
        )
        out.append("")
        out.append(
            "| target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | added p50 vs Envoy "
            "| peak RSS MiB | CPU s / 1k req | errors |"
        )
        out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in mine:
            out.append(
                f"| {row['target']} | {row['rps_median']:,.0f} | {_ms(row['p50_ms'])} | {_ms(row['p99_ms'])} "
                f"| {_ms(row.get('added_p50_ms'))} | {_ms(row.get('added_p99_ms'))} "
                f"| {_x(row.get('added_p50_vs_envoy'))} | {row['peak_rss_mib']:.1f} "
                f"| {_f(row['cpu_s_per_1k'], '.3f')} | {row['errors']} |"
            )
    hwm = meta.get("vm_hwm_mib")
    if hwm:
        out.append("")
        out.append(
            "Peak RSS over the whole run (VmHWM): " + ", ".join(f"{k} {v:.1f} MiB" for k, v in hwm.items()) + "."
        )
    if micro:
        out.append("")
        out.append("Verification alone (bench/verify_micro.py: `Verifier.verify`, static keys, no HTTP):")
        out.append("")
        out.append("| algorithm | cache miss µs/op | no cache µs/op | cache hit µs/op |")
        out.append("| --- | ---: | ---: | ---: |")
        for r in micro:
            out.append(f"| {r['alg']} | {r['miss_us']:.1f} | {r['no_cache_us']:.1f} | {r['hit_us']:.2f} |")
    return "\n".join(out)


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
