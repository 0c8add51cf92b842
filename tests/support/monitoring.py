"""The monitoring files in k8s/monitoring/, and just enough PromQL reading to check them.

Not a PromQL parser: it finds the selectors of `jwt_sidecar_*` metrics (name and label
matchers) and the `by (...)` / `without (...)` / `on (...)` / `ignoring (...)` label lists,
with the metrics each list applies to. That covers the shapes the dashboard and alerts use;
a shape it cannot place (a `by` with no parenthesised argument next to it) fails loudly
rather than being skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).parents[2]
DASHBOARD = REPO / "k8s" / "monitoring" / "grafana-dashboard.json"
RULES = REPO / "k8s" / "monitoring" / "prometheus-rule.yaml"

SCRAPE_LABELS = frozenset({"namespace", "pod"})
"""Labels the scrape adds (Kubernetes service discovery and relabelling), not the sidecar."""

_METRIC = re.compile(r"\b(jwt_sidecar_[A-Za-z0-9_]+)\b(\s*\{([^}]*)\})?")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring)\s*\(([^()]*)\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[Matcher, ...]


@dataclass(frozen=True)
class Grouping:
    keyword: str
    labels: tuple[str, ...]
    metrics: tuple[str, ...]
    """The metrics in the expression the label list applies to."""


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def load_rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data: rows left out, panels inside collapsed rows included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def alert_rules(rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in rules["spec"]["groups"] for rule in group["rules"]]


def all_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every dashboard query and every alert."""
    found = [(f"panel {title!r}", expr) for title, expr in dashboard_exprs(load_dashboard())]
    found += [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules(load_rules())]
    return found


def selectors(expr: str) -> list[Selector]:
    """Every `jwt_sidecar_*` metric in `expr`, with its label matchers."""
    return [
        Selector(m.group(1), tuple(Matcher(*found) for found in _MATCHER.findall(m.group(3) or "")))
        for m in _METRIC.finditer(expr)
    ]


def metric_names(expr: str) -> set[str]:
    return {s.metric for s in selectors(expr)}


def groupings(expr: str) -> Iterator[Grouping]:
    """Every by/without/on/ignoring label list, with the metrics it applies to.

    `agg by (l) (arg)` and `agg (arg) by (l)` apply to the metrics in `arg`; `on`/`ignoring`
    (vector matching) to every metric on either side, taken here as the whole expression.
    """
    # Blank out string literals so a matcher value can neither hide nor fake a clause.
    text = _STRING.sub(lambda m: '"' + " " * (len(m.group()) - 2) + '"', expr)
    for m in _GROUPING.finditer(text):
        keyword = m.group(1)
        labels = tuple(label.strip() for label in m.group(2).split(",") if label.strip())
        if keyword in ("on", "ignoring"):
            scope = text
        else:
            after = text[m.end() :].lstrip()
            before = text[: m.start()].rstrip()
            if after.startswith("("):
                start = len(text) - len(after)
                scope = text[start : _close(text, start) + 1]
            elif before.endswith(")"):
                end = len(before) - 1
                scope = text[_open(text, end) : end + 1]
            else:
                raise AssertionError(f"cannot tell what {keyword} ({m.group(2)}) applies to in: {expr}")
        yield Grouping(keyword, labels, tuple(sorted(metric_names(scope))))


def _close(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced parentheses in: {text}")


def _open(text: str, end: int) -> int:
    depth = 0
    for i in range(end, -1, -1):
        depth += {")": 1, "(": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced parentheses in: {text}")
