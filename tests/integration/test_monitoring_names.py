"""The dashboard and the alerts only use metric names, labels and label values the sidecar exports.

A renamed metric or label does not break a dashboard loudly: the panel just says "No data"
and the alert never fires. So this runs the real sidecar (remote JWKS provider, token cache
on: the defaults of the integration fixture), sends one request of every kind so every
labelled family has samples, scrapes the admin `/metrics`, and checks every `jwt_sidecar_*`
name in k8s/monitoring/ against the sample names of that scrape (which carry the `_total`,
`_bucket`, `_count` and `_sum` suffixes PromQL queries use).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TestKey, mint
from tests.integration.conftest import BASE_CONFIG
from tests.support.monitoring import SCRAPE_LABELS, all_exprs, groupings, selectors

# A short upstream timeout, so /slow gives a 504 (decision upstream_error) quickly; a route in
# report mode, so a request without a token there is a would_deny.
CONFIG = BASE_CONFIG.replace("timeout: 2s", "timeout: 250ms").replace(
    "  - name: api\n",
    "  - name: rollout\n    match: {path_prefix: /rollout/}\n    auth: {provider: main, mode: report}\n  - name: api\n",
)
assert CONFIG.count("mode: report") == 1 and "timeout: 250ms" in CONFIG
CONFIG += "revocation: {file: revoked.yaml}\n"  # an (empty) revocation list: its families have samples


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Scrape:
    """Sample name → the label names and the values of each label seen on its samples."""

    def __init__(self, text: str) -> None:
        self.labels: dict[str, set[str]] = defaultdict(set)
        self.values: dict[tuple[str, str], set[str]] = defaultdict(set)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.labels[sample.name] |= set(sample.labels)
                for label, value in sample.labels.items():
                    self.values[(sample.name, label)].add(value)

    def names(self) -> set[str]:
        return set(self.labels)


@pytest.fixture
async def scrape(sidecar: Any, rsa_key: TestKey) -> Scrape:
    s = await sidecar(CONFIG)
    token = mint(key=rsa_key)
    for path, headers, status in (
        ("/orders", bearer(token), 200),  # allowed: a cache miss, then ...
        ("/orders", bearer(token), 200),  # ... a cache hit
        ("/orders", {}, 401),  # denied: token_missing
        ("/public/%2Fx", {}, 400),  # rejected: bad_path, route "(none)"
        ("/slow?seconds=1", bearer(token), 504),  # upstream_error: upstream_timeout
        ("/rollout/x", {}, 200),  # would_deny: token_missing (report mode)
    ):
        async with await s.get(path, headers=headers) as response:
            assert response.status == status, path
    async with s.client.get(s.admin_url + "/metrics") as response:
        assert response.status == 200
        return Scrape(await response.text())


async def test_the_scrape_has_every_labelled_family(scrape: Scrape) -> None:
    # If one of these is missing the checks below would be weaker than they look.
    assert scrape.values[("jwt_sidecar_requests_total", "decision")] >= {
        "allowed",
        "denied",
        "rejected",
        "upstream_error",
        "would_deny",
    }
    assert scrape.values[("jwt_sidecar_token_cache_requests_total", "result")] == {"hit", "miss"}
    assert scrape.values[("jwt_sidecar_config_reloads_total", "result")] == {"success", "failure"}
    for family in (
        "jwt_sidecar_jwks_age_seconds",
        "jwt_sidecar_jwks_fetch_failures_total",
        "jwt_sidecar_provider_ready",
        "jwt_sidecar_jwks_keys",
    ):
        assert scrape.values[(family, "provider")] == {"main"}, family


async def test_every_metric_in_the_dashboard_and_alerts_is_exported(scrape: Scrape) -> None:
    exported = scrape.names()
    missing = {
        (where, selector.metric)
        for where, expr in all_exprs()
        for selector in selectors(expr)
        if selector.metric not in exported
    }
    assert not missing, f"not exported by the sidecar: {sorted(missing)}"


async def test_every_label_matched_on_is_one_the_metric_has(scrape: Scrape) -> None:
    wrong = []
    for where, expr in all_exprs():
        for selector in selectors(expr):
            for matcher in selector.matchers:
                if matcher.label in SCRAPE_LABELS:
                    continue
                if matcher.label not in scrape.labels[selector.metric]:
                    wrong.append(f"{where}: {selector.metric} has no label {matcher.label!r}")
                elif matcher.op == "=":
                    # An equality matcher on a value never exported selects nothing, silently.
                    seen = scrape.values[(selector.metric, matcher.label)]
                    if matcher.value not in seen:
                        wrong.append(
                            f"{where}: {selector.metric}{{{matcher.label}={matcher.value!r}}}: "
                            f"the sidecar exports only {sorted(seen)}"
                        )
                elif matcher.op == "=~" and "$" not in matcher.value:
                    seen = scrape.values[(selector.metric, matcher.label)]
                    for value in matcher.value.split("|"):
                        if value not in seen:
                            wrong.append(
                                f"{where}: {selector.metric}{{{matcher.label}=~...{value}...}}: "
                                f"the sidecar exports only {sorted(seen)}"
                            )
    assert not wrong, "\n".join(wrong)


async def test_every_label_grouped_by_is_one_the_metrics_have(scrape: Scrape) -> None:
    wrong = []
    for where, expr in all_exprs():
        for grouping in groupings(expr):
            assert grouping.metrics, f"{where}: {grouping.keyword} ({', '.join(grouping.labels)}) over no metric"
            for label in grouping.labels:
                if label in SCRAPE_LABELS:
                    continue
                # `le` too is checked: it is on the `_bucket` samples, and only there.
                for metric in grouping.metrics:
                    if label not in scrape.labels[metric]:
                        wrong.append(f"{where}: {grouping.keyword} ({label}) but {metric} has no such label")
    assert not wrong, "\n".join(wrong)


async def test_the_checks_would_catch_a_wrong_name(scrape: Scrape) -> None:
    # The helpers see through the shapes used in the files: a family name without its
    # sample suffix, a misspelt label, a `by` over a label the metric lacks.
    assert "jwt_sidecar_requests" not in scrape.names()  # the family; queries need _total
    assert "jwt_sidecar_auth_duration_seconds" not in scrape.names()  # histograms: _bucket/_count/_sum
    [selector] = selectors('rate(jwt_sidecar_requests_total{decison="denied"}[5m])')
    assert "decison" not in scrape.labels[selector.metric]
    [grouping] = groupings("sum by (provider) (rate(jwt_sidecar_requests_total[5m]))")
    assert grouping.metrics == ("jwt_sidecar_requests_total",)
    assert "provider" not in scrape.labels["jwt_sidecar_requests_total"]
    [postfix] = groupings("sum(rate(jwt_sidecar_jwks_fetches_total[5m])) by (provider)")
    assert postfix.metrics == ("jwt_sidecar_jwks_fetches_total",) and postfix.labels == ("provider",)
