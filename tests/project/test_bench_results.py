"""The README's "Performance" section against bench/RESULTS.md, where every measured run is kept.

The README shows one current table, taken from the newest full run in bench/RESULTS.md, and
the last soak: every figure it shows must be one measured there (nothing invented, nothing
stale after a new run is added), and it names no git commits or issues (the history, with
those, lives in bench/RESULTS.md).
"""

from __future__ import annotations

import re

from tests.k8s_support import REPO

README = (REPO / "README.md").read_text()
RESULTS = (REPO / "bench" / "RESULTS.md").read_text()
DATE = r"\d{4}-\d{2}-\d{2}"


def section(text: str, heading: str) -> str:
    """From a heading line to the next heading of the same or a higher level."""
    level = heading.split()[0]
    start = text.index(f"\n{heading}\n")
    rest = text[start + len(heading) + 2 :]
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", rest, re.MULTILINE)]
    return rest[: ends[0]] if ends else rest


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in the text, as rows keyed by their column headers."""
    found = []
    for block in re.findall(r"(?:^\|.*\|\n)+", text + "\n", re.MULTILINE):
        rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in block.splitlines()]
        header, body = rows[0], rows[2:]
        found.append([dict(zip(header, row, strict=True)) for row in body])
    return found


def dated_sections() -> list[tuple[str, str]]:
    """(date, text) of bench/RESULTS.md's `## YYYY-MM-DD: ...` sections, in file order."""
    parts = re.split(rf"^## ({DATE})\b.*$", RESULTS, flags=re.MULTILINE)
    return list(zip(parts[1::2], parts[2::2], strict=True))


def newest(predicate: str) -> tuple[str, str]:
    return next((date, text) for date, text in dated_sections() if predicate in text)


PERFORMANCE = section(README, "## Performance")
FULL_RUN_HEADER = "| workload | target | req/s median (min–max) |"


def test_results_sections_are_dated_newest_first() -> None:
    dates = [date for date, _ in dated_sections()]
    assert dates and dates == sorted(dates, reverse=True)
    assert all(re.fullmatch(rf"## {DATE}: .+", line) for line in RESULTS.splitlines() if line.startswith("## "))


def test_the_readme_table_is_the_newest_full_run() -> None:
    date, run = newest(FULL_RUN_HEADER)
    assert "The latest full run (" in PERFORMANCE and f"): {date}, on " in PERFORMANCE
    full = next(t for t in tables(run) if "target" in t[0] and "req/s median (min–max)" in t[0])
    by = {(row["workload"], row["target"]): row for row in full}
    (shown,) = tables(PERFORMANCE)
    assert len(shown) >= 6
    for row in shown:
        two = row["workload"].endswith(", 2 workers")
        ours, envoy = ("jwt-sidecar-2w", "envoy-2") if two else ("jwt-sidecar", "envoy")
        a, b = by[(row["workload"], ours)], by[(row["workload"], envoy)]
        assert row["jwt-sidecar req/s"] == a["req/s median (min–max)"].split(" (")[0]
        assert row["Envoy req/s"] == b["req/s median (min–max)"].split(" (")[0]
        assert row["vs Envoy"] == a["vs Envoy"]
        assert row["p99 ms, jwt-sidecar / Envoy"] == f"{a['p99 ms']} / {b['p99 ms']}"
        assert row["CPU s / 1k req, jwt-sidecar / Envoy"] == f"{a['CPU s / 1k req']} / {b['CPU s / 1k req']}"
        assert row["peak RSS MiB, jwt-sidecar / Envoy"] == f"{a['peak RSS MiB']} / {b['peak RSS MiB']}"
    fixed = {row["target"]: row for t in tables(run) if "added p99 ms" in t[0] for row in t}
    ours, envoy = fixed["jwt-sidecar"], fixed["envoy"]
    assert (
        f"jwt-sidecar added {ours['added p50 ms']} ms at p50 and {ours['added p99 ms']} ms at p99 to the "
        f"upstream's own latency (Envoy: {envoy['added p50 ms']} and {envoy['added p99 ms']} ms), at "
        f"{ours['CPU s / 1k req']} s of CPU per 1k requests (Envoy: {envoy['CPU s / 1k req']})"
    ) in " ".join(PERFORMANCE.split())


def test_the_readme_soak_summary_is_the_newest_soak() -> None:
    date, run = newest("bench/soak.py")
    summary = " ".join(section(PERFORMANCE, "### Soak").split("The last 10-minute run (", 1)[1].split())
    assert summary.startswith(f"{date}, ")
    numbers = re.findall(r"\d[\d,.]*\d|\d", summary.removeprefix(date))
    measured = set(re.findall(r"\d[\d,.]*\d|\d", run))
    assert numbers and set(numbers) <= measured


def test_the_readme_performance_section_is_no_lab_diary() -> None:
    # Runs named by commit, "the run before", issue numbers: history, kept in bench/RESULTS.md.
    for pattern in (r"\bgit [0-9a-f]{7,}\b", r"\bissue\b", r"#\d", r"the run before", r"previous session"):
        assert not re.search(pattern, PERFORMANCE, re.IGNORECASE), pattern
    assert "bench/RESULTS.md" in PERFORMANCE
    for command in ("bash bench/run", "bench/pipeline_micro.py", "bash bench/instructions", "python bench/soak.py"):
        assert command in PERFORMANCE, f"how to reproduce: {command}"
