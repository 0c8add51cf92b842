"""The README's "Performance" section against bench/RESULTS.md, where every measured run is kept.

The README shows the tables of the newest full `bench/run` in bench/RESULTS.md verbatim (the
first of them, the table of every workload against Envoy and the floor, always; the targets'
PASS/FAIL table whenever that run has one), the newest instruction counts (`bash
bench/instructions`, ours and the floor's) verbatim, and the last soak: every figure it shows
is one measured there (nothing invented, nothing stale after a new run is added), and it names
no git commits or issues (the history, with those, lives in bench/RESULTS.md).

So after a new full run: add its report as a dated section of bench/RESULTS.md, and copy its
tables into the README's "The latest full run" (and its date).
"""

from __future__ import annotations

import re

from tests.k8s_support import REPO

README = (REPO / "README.md").read_text()
RESULTS = (REPO / "bench" / "RESULTS.md").read_text()
DATE = r"\d{4}-\d{2}-\d{2}"
# The first line of a full run's report (report.header; older runs began with the rounds).
FULL_RUN = re.compile(r"^(?:Full run: )?\d+ round\(s\) of [\d.]+ s per run", re.MULTILINE)
GOALS_HEADER = "| target | pinned | unpinned |"
INSTRUCTIONS_HEADER = "| workload | jwt-sidecar instructions/request | python-floor | jwt-sidecar / floor |"


def section(text: str, heading: str) -> str:
    """From a heading line to the next heading of the same or a higher level."""
    level = heading.split()[0]
    start = text.index(f"\n{heading}\n")
    rest = text[start + len(heading) + 2 :]
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", rest, re.MULTILINE)]
    return rest[: ends[0]] if ends else rest


def table_blocks(text: str) -> list[str]:
    """Every Markdown table in the text, as its lines (stripped of trailing space)."""
    return [
        "\n".join(line.rstrip() for line in block.splitlines())
        for block in re.findall(r"(?:^\|.*\|[ \t]*\n)+", text + "\n", re.MULTILINE)
    ]


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in the text, as rows keyed by their column headers."""
    found = []
    for block in table_blocks(text):
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


def newest_full_run() -> tuple[str, str]:
    """(date, report) of the newest full bench/run: its text from the report's first line on,
    up to the next report or the section's end. A `--quick` run is never one."""
    for date, text in dated_sections():
        starts = [m.start() for m in FULL_RUN.finditer(text)]
        if starts:
            return date, text[starts[0] :]
    raise AssertionError("bench/RESULTS.md holds no full bench/run")


PERFORMANCE = section(README, "## Performance")
LATEST = section(PERFORMANCE, "### The latest full run")


def test_results_sections_are_dated_newest_first() -> None:
    dates = [date for date, _ in dated_sections()]
    assert dates and dates == sorted(dates, reverse=True)
    assert all(re.fullmatch(rf"## {DATE}: .+", line) for line in RESULTS.splitlines() if line.startswith("## "))


def test_no_quick_or_partial_run_is_taken_for_a_full_one() -> None:
    assert not FULL_RUN.search("Quick run (`--quick`: to check the tooling, not to compare): 1 round(s) of 2 s per run")
    assert not FULL_RUN.search(
        "Partial run (a part of the workloads, targets or passes, or shorter: not a full run): 2"
    )
    assert FULL_RUN.search("Full run: 2 round(s) of 5 s per run, interleaved")


def test_the_readme_shows_the_newest_full_run_verbatim() -> None:
    date, run = newest_full_run()
    assert f"The latest full run ({date}, " in " ".join(LATEST.split())
    measured, shown = table_blocks(run), table_blocks(LATEST)
    assert measured and shown, "the README shows the run's tables"
    # The first table of the run is the one of every workload against Envoy (and the floor).
    assert shown[0] == measured[0]
    for block in shown:
        assert block in measured, f"not a table of the {date} run in bench/RESULTS.md:\n{block}"
    goals = [block for block in measured if block.startswith(GOALS_HEADER)]
    for block in goals:
        assert block in shown, "the README shows the run's targets (PASS/FAIL)"


def test_the_readme_main_table_has_the_floor_and_both_passes_once_measured() -> None:
    # From the first run with the pinned and unpinned passes on: both passes of every workload.
    (shown, *_) = tables(LATEST)
    if "CPUs" not in shown[0]:
        return  # a run from before the two passes
    workloads = {row["workload"] for row in shown}
    assert {(w, mode) for w in workloads for mode in ("pinned", "unpinned")} <= {
        (row["workload"], row["CPUs"]) for row in shown
    } | {(w, "pinned") for w in workloads if w.endswith("(Envoy --concurrency 2)")}
    for row in shown:
        if not row["workload"].endswith("(Envoy --concurrency 2)"):
            assert row["python-floor req/s"] != "–", f"{row['workload']}, {row['CPUs']}: the floor beside it"


def test_the_readme_instruction_counts_are_the_newest() -> None:
    _, counted = newest(INSTRUCTIONS_HEADER)
    (measured,) = [block for block in table_blocks(counted) if block.startswith(INSTRUCTIONS_HEADER)]
    shown = table_blocks(section(PERFORMANCE, "### Instructions per request"))
    assert shown == [measured]
    rows = {row["workload"][:3]: row for row in tables(measured)[0]}
    assert {"(a)", "(c)"} <= set(rows), "the issue's targets are on (a) and (c)"
    for row in rows.values():
        ours, floor = (int(row[k].replace(",", "")) for k in ("jwt-sidecar instructions/request", "python-floor"))
        assert row["jwt-sidecar / floor"] == f"{ours / floor:.2f}×"


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
    for command in (
        "bash bench/run",
        "--quick",
        "--goals",
        "bench/pipeline_micro.py",
        "bash bench/instructions",
        "python bench/soak.py",
    ):
        assert command in PERFORMANCE, f"how to reproduce: {command}"
