"""k8s/monitoring: the Grafana dashboard and the PrometheusRule have the shape their loaders expect.

That the metric and label names in them are ones the sidecar really exports is checked
against a running sidecar in tests/integration/test_monitoring_names.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.support.monitoring import (
    DASHBOARD,
    RULES,
    alert_rules,
    dashboard_exprs,
    dashboard_panels,
    groupings,
    load_dashboard,
    load_rules,
    selectors,
)

_DURATION = re.compile(r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$")
_SEVERITIES = {"critical", "warning", "info"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


@pytest.fixture(scope="module")
def rules() -> dict[str, Any]:
    return load_rules()


# -- dashboard -----------------------------------------------------------------------------------


def test_dashboard_is_importable_as_is(dashboard: dict[str, Any]) -> None:
    assert DASHBOARD.is_file()
    assert dashboard["id"] is None  # Grafana assigns it; a fixed id would clash on import
    assert dashboard["uid"] == "jwt-sidecar"
    assert dashboard["title"] == "jwt-sidecar"
    assert dashboard["schemaVersion"] == 39


def test_dashboard_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pod"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] == "${datasource}"
        query = variable["query"] if isinstance(variable["query"], str) else variable["query"]["query"]
        assert query.startswith("label_values(jwt_sidecar_requests_total")
        assert query.endswith(f", {name})")
        # "All" must match every value, including a pod the dropdown has not seen yet.
        assert variable["includeAll"] and variable["allValue"] == ".*"


def test_every_panel_has_a_query_on_the_templated_datasource(dashboard: dict[str, Any]) -> None:
    panels = dashboard_panels(dashboard)
    assert len(panels) >= 10
    for panel in panels:
        targets = [t for t in panel.get("targets", []) if t.get("expr")]
        assert targets, f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]


def test_panel_ids_are_unique_and_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, f"panel {panel['title']!r} overlaps another"
        cells |= mine


def test_every_dashboard_query_is_filtered_by_namespace_and_pod(dashboard: dict[str, Any]) -> None:
    for title, expr in dashboard_exprs(dashboard):
        found = selectors(expr)
        assert found, f"panel {title!r}: no jwt_sidecar_ metric in {expr}"
        for selector in found:
            matchers = {(m.label, m.op, m.value) for m in selector.matchers}
            assert ("namespace", "=~", "$namespace") in matchers, f"panel {title!r}: {expr}"
            assert ("pod", "=~", "$pod") in matchers, f"panel {title!r}: {expr}"


def test_dashboard_covers_the_asked_for_queries(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(expr for _, expr in dashboard_exprs(dashboard))
    for needle in (
        "sum by (decision) (rate(jwt_sidecar_requests_total{",
        'sum by (reason) (rate(jwt_sidecar_requests_total{decision="denied"',
        "histogram_quantile(0.5, sum by (le) (rate(jwt_sidecar_auth_duration_seconds_bucket{",
        "histogram_quantile(0.99, sum by (le) (rate(jwt_sidecar_auth_duration_seconds_bucket{",
        "histogram_quantile(0.5, sum by (le) (rate(jwt_sidecar_upstream_duration_seconds_bucket{",
        "histogram_quantile(0.99, sum by (le) (rate(jwt_sidecar_upstream_duration_seconds_bucket{",
        "sum by (provider) (rate(jwt_sidecar_jwks_fetch_failures_total{",
        "by (provider) (jwt_sidecar_jwks_age_seconds{",
        "jwt_sidecar_provider_ready{",
        'jwt_sidecar_token_cache_requests_total{result="hit"',
        'jwt_sidecar_token_cache_requests_total{result="miss"',
        "jwt_sidecar_in_flight_requests{",
        'jwt_sidecar_requests_total{decision="upstream_error"',
    ):
        assert needle in exprs, needle


def test_dashboard_grouping_clauses_are_readable(dashboard: dict[str, Any]) -> None:
    # groupings() fails on a clause it cannot place; every one it places names a metric.
    for title, expr in dashboard_exprs(dashboard):
        for grouping in groupings(expr):
            assert grouping.metrics, f"panel {title!r}: {grouping.keyword} ({grouping.labels}) over no metric"


# -- PrometheusRule ------------------------------------------------------------------------------


def test_rule_file_is_a_prometheus_rule(rules: dict[str, Any]) -> None:
    assert RULES.is_file()
    assert rules["apiVersion"] == "monitoring.coreos.com/v1"
    assert rules["kind"] == "PrometheusRule"
    assert rules["metadata"]["name"] == "jwt-sidecar"
    groups = rules["spec"]["groups"]
    assert isinstance(groups, list) and groups
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))
    for group in groups:
        assert isinstance(group["rules"], list) and group["rules"], group["name"]


def test_every_rule_is_a_complete_alert(rules: dict[str, Any]) -> None:
    for rule in alert_rules(rules):
        name = rule.get("alert")
        assert isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), rule
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, name
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
        assert isinstance(rule["for"], str) and _DURATION.match(rule["for"]), name
        assert rule["labels"]["severity"] in _SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        assert rule["expr"].count("(") == rule["expr"].count(")"), name
        assert rule["expr"].count("{") == rule["expr"].count("}"), name


def test_the_asked_for_alerts_are_there(rules: dict[str, Any]) -> None:
    by_name = {rule["alert"]: rule for rule in alert_rules(rules)}
    assert set(by_name) == {
        "JwtSidecarKeySetStale",
        "JwtSidecarProviderNotReady",
        "JwtSidecarDenyRateSpike",
        "JwtSidecarUpstreamErrors",
        "JwtSidecarJwksFetchFailing",
        "JwtSidecarConfigReloadFailed",
        "JwtSidecarRevocationListStale",
    }

    def expr(name: str) -> str:
        return " ".join(by_name[name]["expr"].split())

    assert expr("JwtSidecarKeySetStale") == "max by (namespace, pod, provider) (jwt_sidecar_jwks_age_seconds) > 3600"
    assert expr("JwtSidecarProviderNotReady") == "min by (namespace, pod, provider) (jwt_sidecar_provider_ready) == 0"
    assert by_name["JwtSidecarProviderNotReady"]["for"] == "5m"
    deny = expr("JwtSidecarDenyRateSpike")
    assert 'decision="denied"' in deny and "> 0.5" in deny and "[10m]" in deny
    assert re.search(r"\band\b.*rate\(jwt_sidecar_requests_total\[10m\]\)\) > 1$", deny), deny  # traffic guard
    upstream = expr("JwtSidecarUpstreamErrors")
    assert 'decision="upstream_error"' in upstream and upstream.endswith("> 0.05")
    assert by_name["JwtSidecarUpstreamErrors"]["for"] == "10m"
    assert expr("JwtSidecarJwksFetchFailing") == "increase(jwt_sidecar_jwks_fetch_failures_total[15m]) > 3"
    assert expr("JwtSidecarRevocationListStale") == (
        "max by (namespace, pod, store) (jwt_sidecar_revocation_age_seconds) > 60"
    )
    assert (
        expr("JwtSidecarConfigReloadFailed") == 'increase(jwt_sidecar_config_reloads_total{result="failure"}[10m]) > 0'
    )


def test_annotations_only_name_labels_the_alert_keeps(rules: dict[str, Any]) -> None:
    # `sum by (namespace, pod)` drops `provider`: an annotation naming it would render empty.
    for rule in alert_rules(rules):
        kept = None
        for grouping in groupings(rule["expr"]):
            if grouping.keyword == "by":
                labels = set(grouping.labels)
                kept = labels if kept is None else kept & labels
        if kept is None:  # no aggregation: the series keeps all its labels
            continue
        text = " ".join(rule["annotations"].values())
        for label in re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", text):
            assert label in kept, f"{rule['alert']}: annotation uses {label}, the expr keeps only {sorted(kept)}"
