"""Report-only rollout: the `auth.mode` key, its warnings, its metric label and its dashboard panel.

The request path in report mode is tested on the real proxy in
tests/integration/test_report_mode.py.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.base.errors import ConfigError, Reason
from proxy.config.builder import parse
from proxy.config.routecheck import format_warning
from proxy.telemetry.families import REQUESTS
from proxy.telemetry.metrics import Decision, RouteMetrics
from proxy.tools.cli import main
from tests.support.monitoring import all_exprs, dashboard_exprs, load_dashboard, selectors

PROVIDER = "providers:\n  main: {issuer: https://i.test, audiences: [api], jwks: {url: 'https://i.test/jwks'}}\n"


def route(auth: str, name: str = "orders") -> str:
    return PROVIDER + f"routes:\n  - name: {name}\n    match: {{path_prefix: /}}\n    auth: {auth}\n"


def mode_of(value: str) -> str:
    return parse(route(f"{{provider: main, mode: {value}}}"), file="c.yaml").routes[0].auth.mode  # type: ignore[union-attr]


def issues_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text, file="c.yaml")
    return [str(issue) for issue in caught.value.issues]


# -- the key ------------------------------------------------------------------------------------
def test_mode_is_enforce_unless_report_is_written() -> None:
    assert parse(route("{provider: main}"), file="c.yaml").routes[0].auth.mode == "enforce"  # type: ignore[union-attr]
    assert mode_of("enforce") == "enforce"
    assert mode_of("report") == "report"
    assert mode_of("Report") == "report"  # any case, as log_format and log_level
    assert mode_of("' REPORT '") == "report"


def test_mode_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SIDECAR_TEST_MODE", "report")
    assert mode_of('"${JWT_SIDECAR_TEST_MODE}"') == "report"
    monkeypatch.delenv("JWT_SIDECAR_TEST_MODE")
    assert issues_of(route('{provider: main, mode: "${JWT_SIDECAR_TEST_MODE}"}')) == [
        "c.yaml:6: routes[0].auth.mode: environment variable JWT_SIDECAR_TEST_MODE is not set"
    ]


CHOICES = "write enforce (the default: refuse what fails a check) or report (refuse nothing: log and count it)"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("reports", f"'reports' is not a mode; did you mean report? {CHOICES}"),
        ("repot", f"'repot' is not a mode; did you mean report? {CHOICES}"),
        ("dry-run", f"'dry-run' is not a mode; did you mean report? {CHOICES}"),
        ("dry_run", f"'dry_run' is not a mode; did you mean report? {CHOICES}"),
        ("DryRun", f"'DryRun' is not a mode; did you mean report? {CHOICES}"),
        ("audit", f"'audit' is not a mode; did you mean report? {CHOICES}"),
        ("shadow", f"'shadow' is not a mode; did you mean report? {CHOICES}"),
        ("permissive", f"'permissive' is not a mode; did you mean report? {CHOICES}"),
        ("report-only", f"'report-only' is not a mode; did you mean report? {CHOICES}"),
        ("log only", f"'log only' is not a mode; did you mean report? {CHOICES}"),
        ("enforcing", f"'enforcing' is not a mode; did you mean enforce? {CHOICES}"),
        ("enforced", f"'enforced' is not a mode; did you mean enforce? {CHOICES}"),
        ("deny", f"'deny' is not a mode; did you mean enforce? {CHOICES}"),
        ("sideways", f"'sideways' is not a mode; {CHOICES}"),
        ("''", f"'' is not a mode; {CHOICES}"),
        ("off", f"false is a boolean (YAML reads on, off, yes and no so), not a mode; {CHOICES}"),
        ("on", f"true is a boolean (YAML reads on, off, yes and no so), not a mode; {CHOICES}"),
        ("1", f"1 is not a mode; {CHOICES}"),
        ("[report]", f"a list is not a mode; {CHOICES}"),
        ("{report: true}", f"a mapping is not a mode; {CHOICES}"),
    ],
)
def test_a_wrong_mode_is_one_message_naming_its_line(value: str, message: str) -> None:
    text = PROVIDER + "routes:\n  - name: orders\n    match: {path_prefix: /}\n    auth:\n      provider: main\n"
    text += f"      mode: {value}\n"
    assert issues_of(text) == [f"c.yaml:8: routes[0].auth.mode: {message}"]


def test_a_misspelt_mode_key_is_an_unknown_key_naming_mode() -> None:
    [issue] = issues_of(route("{provider: main, mdoe: report}"))
    assert issue.startswith("c.yaml:6: routes[0].auth.mdoe: unknown key; did you mean mode? allowed here: ")


# -- check-config and the start-up log ------------------------------------------------------------
def test_each_route_in_report_mode_is_a_warning_naming_it() -> None:
    text = PROVIDER + textwrap.dedent("""\
        routes:
          - {name: public, match: {path_prefix: /public/}, auth: none}
          - name: orders
            match: {path_prefix: /orders/}
            auth: {provider: main, mode: report}
          - {name: users, match: {path_prefix: /users/}, auth: {provider: main, mode: report}}
          - {name: api, match: {path_prefix: /}, auth: {provider: main, mode: enforce}}
        """)
    warnings = [format_warning(w) for w in parse(text, file="c.yaml").warnings]
    assert [w.split(": nothing is refused")[0] for w in warnings] == [
        "c.yaml:5: warning: routes[1]: route 'orders' is in report mode (auth.mode: report)",
        "c.yaml:8: warning: routes[2]: route 'users' is in report mode (auth.mode: report)",
    ]


def test_check_config_marks_the_route_and_strict_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(route("{provider: main, mode: report}"))
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "  orders: prefix / [any method] -> main (report mode: refuses nothing)\n" in out
    assert "warning: routes[0]: route 'orders' is in report mode" in out
    assert main(["check-config", "--strict", str(path)]) == 1
    assert "1 warning(s), and --strict fails on any" in capsys.readouterr().err
    path.write_text(route("{provider: main, mode: enforce}"))
    assert main(["check-config", "--strict", str(path)]) == 0
    assert "report mode" not in capsys.readouterr().out


def test_a_method_falling_through_to_a_route_in_report_mode_falls_to_weaker_auth() -> None:
    text = PROVIDER + textwrap.dedent("""\
        routes:
          - {name: admin, match: {path_prefix: /admin/, methods: [GET]}, auth: {provider: main}}
          - {name: rest, match: {path_prefix: /}, auth: {provider: main, mode: report}}
        """)
    warnings = [format_warning(w) for w in parse(text, file="c.yaml").warnings]
    [fall] = [w for w in warnings if "route 'admin' guards" in w]
    assert fall.endswith(
        "fall through to route 'rest' (line 5), whose auth is weaker: it is in report mode (it refuses nothing). "
        "List every method on 'admin', or add a route as strict for the others before 'rest'"
    ), fall
    # Both in report mode: the one falling through is not weaker for that.
    both = text.replace("auth: {provider: main}}", "auth: {provider: main, mode: report}}")
    assert not [w for w in parse(both, file="c.yaml").warnings if "guards" in w.message]


# -- the metric label and the dashboard ----------------------------------------------------------
def test_would_deny_is_a_decision_of_its_own_not_other() -> None:
    metrics = RouteMetrics("orders")
    metrics.count("GET", Decision.WOULD_DENY, str(Reason.EXPIRED), 200)
    assert metrics.counts == {("GET", "would_deny", "expired", "2xx"): 1}
    assert "decision" in REQUESTS.labels


def test_the_dashboard_shows_would_deny_by_route_and_reason() -> None:
    exprs = dict(dashboard_exprs(load_dashboard()))
    expr = exprs["Would deny by route and reason (report mode)"]
    assert expr.startswith('sum by (route, reason) (rate(jwt_sidecar_requests_total{decision="would_deny", ')
    [selector] = selectors(expr)
    assert selector.metric == REQUESTS.name


def test_every_decision_and_reason_a_query_matches_is_one_the_sidecar_gives() -> None:
    # A label value no request can have selects nothing, silently ("No data", an alert that never fires).
    values = {"decision": {str(d) for d in Decision}, "reason": {str(r) for r in Reason} | {""}}
    checked = set()
    for where, expr in all_exprs():
        for selector in selectors(expr):
            for matcher in selector.matchers:
                if matcher.label in values and matcher.op in ("=", "!="):
                    assert matcher.value in values[matcher.label], f"{where}: {matcher.label}={matcher.value!r}"
                    checked.add(matcher.value)
    assert {"denied", "would_deny", "upstream_error"} <= checked
