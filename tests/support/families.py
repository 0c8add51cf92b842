"""Checks of the README's Metrics table, the monitoring queries and a real scrape against
proxy/telemetry/families.py, the one declaration of every metric family.

Each check returns the list of what is wrong (empty when all is well), so a test can assert
both that the real files pass and that a deliberately wrong input is caught.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from proxy.telemetry.families import FAMILIES, Family, by_name, sample_labels
from tests.support.monitoring import SCRAPE_LABELS, groupings, selectors

README = Path(__file__).parents[2] / "README.md"

_CODE = re.compile(r"`([^`]+)`")
_PARENTHESISED = re.compile(r"\([^()]*\)")


@dataclass(frozen=True)
class Row:
    """One row of the README's Metrics table."""

    line: str
    names: tuple[str, ...]
    kind: str
    labels: frozenset[str]
    """The label names: code spans in the labels column outside parentheses (notes and values
    are in parentheses)."""


def readme_rows(text: str | None = None) -> list[Row]:
    """The rows of the table under "### Metrics" in the README (or in `text`)."""
    text = README.read_text() if text is None else text
    section = text.split("\n### Metrics\n", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"a Metrics row has three columns: {line}"
        names, kind, labels = cells
        rows.append(
            Row(
                line=line,
                names=tuple(_CODE.findall(names)),
                kind=kind,
                labels=frozenset(_CODE.findall(_PARENTHESISED.sub("", labels))),
            )
        )
    assert rows, "the README's Metrics table"
    return rows


def readme_problems(rows: Iterable[Row]) -> list[str]:
    """Families, types or labels in the README table that families.py does not declare, and
    declared families the table leaves out."""
    declared = by_name()
    wrong: list[str] = []
    seen: set[str] = set()
    for row in rows:
        for name in row.names:
            family = declared.get(name)
            if family is None:
                wrong.append(f"README names {name!r}, which families.py does not declare: {row.line}")
                continue
            if name in seen:
                wrong.append(f"README lists {name!r} twice")
            seen.add(name)
            if row.kind != family.kind:
                wrong.append(f"README: {name} is a {row.kind}, families.py says {family.kind}")
            labels = set(family.labels) | ({"worker"} if family.workers == "per_process" else set())
            if row.labels != labels:
                wrong.append(f"README: {name} has labels {sorted(row.labels)}, families.py {sorted(labels)}")
    wrong += [f"README's Metrics table omits {name!r}" for name in declared if name not in seen]
    return wrong


def query_problems(exprs: Iterable[tuple[str, str]]) -> list[str]:
    """Metrics and labels in PromQL expressions ((where, expr) pairs) that families.py does not
    declare: a sample name (with `_bucket`/`_count`/`_sum` for histograms), a label matched on,
    a label grouped by."""
    # A query may be for one process or for the supervisor of `workers: N`: either's labels.
    single, workers = sample_labels(), sample_labels(workers=True)
    known = {name: single.get(name, frozenset()) | workers.get(name, frozenset()) for name in {*single, *workers}}
    wrong: list[str] = []
    for where, expr in exprs:
        for selector in selectors(expr):
            if selector.metric not in known:
                wrong.append(f"{where}: {selector.metric} is not a declared metric (families.py)")
                continue
            for matcher in selector.matchers:
                if matcher.label not in SCRAPE_LABELS and matcher.label not in known[selector.metric]:
                    wrong.append(f"{where}: {selector.metric} has no label {matcher.label!r} (families.py)")
        for grouping in groupings(expr):
            for label in grouping.labels:
                for metric in grouping.metrics:
                    if label not in SCRAPE_LABELS and metric in known and label not in known[metric]:
                        wrong.append(f"{where}: {grouping.keyword} ({label}) but {metric} has no such label")
    return wrong


def scrape_problems(text: str, *, workers: bool) -> list[str]:
    """What a `/metrics` body (text format) exports that families.py does not declare (a family,
    its type or help, a sample name, a label set), and declared families it lacks."""
    declared = {family.family: family for family in FAMILIES if workers or not family.workers_only}
    wrong: list[str] = []
    seen: set[str] = set()
    for found in text_string_to_metric_families(text):
        family: Family | None = declared.get(found.name)
        if family is None:
            wrong.append(f"exported, not declared: {found.name} ({found.type})")
            continue
        seen.add(found.name)
        if found.type != family.kind:
            wrong.append(f"{family.name}: exported as a {found.type}, declared a {family.kind}")
        if family.ours and found.documentation != family.help:
            wrong.append(f"{family.name}: help {found.documentation!r}, declared {family.help!r}")
        samples = family.samples(workers=workers)
        for sample in found.samples:
            labels = samples.get(sample.name)
            if labels is None:
                wrong.append(f"{family.name}: sample {sample.name} is not one of {sorted(samples)}")
            elif set(sample.labels) != labels:
                wrong.append(f"{sample.name}: labels {sorted(sample.labels)}, declared {sorted(labels)}")
        if not found.samples:
            wrong.append(f"{family.name}: no samples (the scrape should have them all)")
    wrong += [f"declared, not exported: {family.name}" for name, family in declared.items() if name not in seen]
    return wrong
