"""families.py is the one declaration of the metrics vocabulary; everything else agrees with it.

The README's Metrics table, the Grafana dashboard and the alerts are checked against the
table here (each check also shown to catch a wrong input); that a running sidecar exports
exactly the table, in one process and with `workers: 2`, is tests/integration/
test_metric_families.py. The workers' mirror is run for real (a subprocess with
a multiprocess directory, telemetry/multiproc.py's files) and read back through the supervisor's collector.
"""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from proxy.telemetry.families import FAMILIES, by_name
from tests.support.families import README, query_problems, readme_problems, readme_rows
from tests.support.monitoring import all_exprs, load_dashboard

REPO = Path(__file__).parents[3]


# -- the table itself ------------------------------------------------------------------------------
def test_the_table_is_well_formed() -> None:
    names = [family.name for family in FAMILIES]
    assert len(names) == len(set(names))
    for family in FAMILIES:
        assert family.help.strip(), family.name
        assert len(set(family.labels)) == len(family.labels), family.name
        # A counter's family name is its PromQL name without `_total`; nothing else may end so.
        assert family.name.endswith("_total") == (family.kind == "counter"), family.name
        if family.kind == "histogram":
            assert family.buckets == tuple(sorted(set(family.buckets))), family.name
            assert all(math.isfinite(bound) for bound in family.buckets), family.name
            assert "le" not in family.labels, family.name
        else:
            assert family.buckets == (), family.name
        if family.kind == "gauge" and family.ours:
            assert family.workers in ("livesum", "livemin", "livemax"), family.name
        elif family.ours:
            assert family.workers == "sum", family.name  # counts of exited workers stay
        else:
            assert family.workers == "per_process" and family.name.startswith("process_"), family.name
        assert family.name.startswith("jwt_sidecar_") == family.ours, family.name


def test_a_family_refuses_to_be_built_as_another_type() -> None:
    requests = by_name()["jwt_sidecar_requests_total"]
    assert requests.counter().name == "jwt_sidecar_requests"
    with pytest.raises(TypeError, match="is a counter, not a gauge"):
        requests.gauge()
    with pytest.raises(TypeError, match="not a gauge's multiprocess mode"):
        _ = requests.gauge_mode


def test_the_vocabulary_is_what_users_dashboards_and_alerts_depend_on() -> None:
    # Written out here, not read from families.py: every other check follows the table, so
    # a rename there would pass them all and silently empty users' panels. Changing a line
    # here is changing what users see.
    assert {(f.name, f.kind, f.labels, f.workers, f.workers_only) for f in FAMILIES} == {
        ("jwt_sidecar_requests_total", "counter", ("route", "method", "decision", "reason", "status"), "sum", False),
        ("jwt_sidecar_in_flight_requests", "gauge", (), "livesum", False),
        ("jwt_sidecar_connections_open", "gauge", (), "livesum", False),
        ("jwt_sidecar_connections_rejected_total", "counter", ("reason",), "sum", False),
        ("jwt_sidecar_auth_duration_seconds", "histogram", ("route",), "sum", False),
        ("jwt_sidecar_upstream_duration_seconds", "histogram", ("route",), "sum", False),
        ("jwt_sidecar_jwks_fetches_total", "counter", ("provider",), "sum", False),
        ("jwt_sidecar_jwks_fetch_failures_total", "counter", ("provider",), "sum", False),
        ("jwt_sidecar_jwks_discovery_fetches_total", "counter", ("provider",), "sum", False),
        ("jwt_sidecar_jwks_keys", "gauge", ("provider",), "livemin", False),
        ("jwt_sidecar_jwks_keys_skipped_total", "counter", ("provider",), "sum", False),
        ("jwt_sidecar_jwks_age_seconds", "gauge", ("provider",), "livemax", False),
        ("jwt_sidecar_provider_ready", "gauge", ("provider",), "livemin", False),
        ("jwt_sidecar_token_cache_requests_total", "counter", ("result",), "sum", False),
        ("jwt_sidecar_token_cache_entries", "gauge", (), "livesum", False),
        ("jwt_sidecar_config_reloads_total", "counter", ("result",), "sum", False),
        ("jwt_sidecar_workers_ready", "gauge", (), "livesum", True),
        ("jwt_sidecar_revocation_age_seconds", "gauge", ("store",), "livemax", False),
        ("jwt_sidecar_revocation_rules", "gauge", ("store",), "livemin", False),
        ("jwt_sidecar_provider_requests_total", "counter", ("route", "provider", "decision", "reason"), "sum", False),
        ("jwt_sidecar_log_lines_dropped_total", "counter", ("log",), "sum", False),
        ("process_cpu_seconds_total", "counter", (), "per_process", False),
        ("process_resident_memory_bytes", "gauge", (), "per_process", False),
        ("process_virtual_memory_bytes", "gauge", (), "per_process", False),
        ("process_start_time_seconds", "gauge", (), "per_process", False),
        ("process_open_fds", "gauge", (), "per_process", False),
        ("process_max_fds", "gauge", (), "per_process", False),
    }
    declared = by_name()
    assert declared["jwt_sidecar_auth_duration_seconds"].buckets == (
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    )  # fmt: skip
    assert declared["jwt_sidecar_upstream_duration_seconds"].buckets == (
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    )  # fmt: skip


# -- the README's Metrics table --------------------------------------------------------------------
def test_the_readme_table_is_the_declared_families_types_and_labels() -> None:
    assert readme_problems(readme_rows()) == []


ROW = "| `jwt_sidecar_jwks_keys` | gauge | `provider` (usable keys held) |"


@pytest.mark.parametrize(
    ("replacement", "complaint"),
    [
        ("| `jwt_sidecar_jwks_key` | gauge | `provider` |", "which families.py does not declare"),
        ("| `jwt_sidecar_jwks_keys` | gauge | `providers` |", "has labels ['providers']"),
        ("| `jwt_sidecar_jwks_keys` | gauge | `provider`, `route` |", "has labels ['provider', 'route']"),
        ("| `jwt_sidecar_jwks_keys` | counter | `provider` |", "is a counter, families.py says gauge"),
        ("", "omits 'jwt_sidecar_jwks_keys'"),
        (ROW + "\n" + ROW, "lists 'jwt_sidecar_jwks_keys' twice"),
    ],
    ids=["unknown-family", "wrong-label", "extra-label", "wrong-type", "row-missing", "row-twice"],
)
def test_the_readme_check_catches_a_wrong_row(replacement: str, complaint: str) -> None:
    text = README.read_text()
    assert text.count(ROW) == 1
    problems = readme_problems(readme_rows(text.replace(ROW, replacement)))
    assert problems and all(complaint in p or "omits" in p for p in problems), problems
    assert any(complaint in p for p in problems), problems


# -- the dashboard and the alerts ------------------------------------------------------------------
def templating_queries() -> list[tuple[str, str]]:
    found = []
    for variable in load_dashboard()["templating"]["list"]:
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        found.append((f"variable {variable['name']!r}", query))
    return found


def test_the_dashboard_and_alerts_use_only_declared_families_and_labels() -> None:
    exprs = all_exprs() + templating_queries()
    assert len(exprs) > 20  # the panels, the alerts and the two label_values() variables
    assert query_problems(exprs) == []


@pytest.mark.parametrize(
    ("expr", "complaint"),
    [
        ("rate(jwt_sidecar_request_total[5m])", "jwt_sidecar_request_total is not a declared metric"),
        ("rate(jwt_sidecar_requests[5m])", "jwt_sidecar_requests is not a declared metric"),  # needs _total
        ("rate(jwt_sidecar_auth_duration_seconds[5m])", "is not a declared metric"),  # needs _bucket, ...
        ('rate(jwt_sidecar_requests_total{decison="denied"}[5m])', "has no label 'decison'"),
        ('jwt_sidecar_auth_duration_seconds_count{le="1.0"}', "has no label 'le'"),  # only on _bucket
        ("sum by (provider) (rate(jwt_sidecar_requests_total[5m]))", "by (provider) but jwt_sidecar_requests_total"),
        ("sum(jwt_sidecar_jwks_keys) by (route)", "by (route) but jwt_sidecar_jwks_keys"),
    ],
)
def test_the_query_check_catches_an_undeclared_name_or_label(expr: str, complaint: str) -> None:
    problems = query_problems([("test", expr)])
    assert any(complaint in p for p in problems), problems


def test_the_query_check_accepts_the_shapes_queries_use() -> None:
    assert (
        query_problems(
            [
                (
                    "a",
                    'histogram_quantile(0.99, sum by (le) (rate(jwt_sidecar_auth_duration_seconds_bucket{route="x"}[5m])))',
                ),
                ("b", 'sum by (namespace, pod) (jwt_sidecar_workers_ready{pod=~"$pod"})'),
                ("c", "sum by (worker) (rate(process_cpu_seconds_total[5m]))"),  # not jwt_sidecar_: not read
            ]
        )
        == []
    )


# -- no prometheus-client internals (multiproc.py writes its files itself) ----------------------------------------
def prometheus_client_internals(tmp_path: Path) -> set[str]:
    """Every single-underscore attribute name prometheus-client's metric, collector and
    registry objects have (read off real instances, so a new version's names are included)."""
    objects: list[object] = [CollectorRegistry(), MultiProcessCollector(None, path=str(tmp_path))]
    for kind in (Counter, Gauge, Histogram, Summary):
        parent = kind("x", "x", ("l",), registry=None)
        objects += [parent, parent.labels("v"), kind("y", "y", registry=None)]
    objects.append(prometheus_client.ProcessCollector(registry=None))
    names: set[str] = set()
    for obj in objects:
        names |= set(vars(obj)) | set(dir(type(obj)))
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def test_no_module_writes_or_reads_prometheus_client_internals(tmp_path: Path) -> None:
    # `other._x` where `_x` is a prometheus-client internal and `other` is not our own `self`:
    # what the workers' mirror once did (`child._buckets[i].inc`, `child._sum.inc`), which a
    # prometheus-client release may rename without notice.
    internals = prometheus_client_internals(tmp_path)
    assert {"_buckets", "_sum", "_value", "_labelnames"} <= internals  # the scan knows what to look for
    found = []
    for path in sorted((REPO / "proxy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in internals
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: .{node.attr}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus_client."):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path}: imports {private} from {node.module}"
                assert node.module not in ("prometheus_client.values", "prometheus_client.mmap_dict"), path
    assert not found, "prometheus-client internals used:\n" + "\n".join(found)


_WORKER = """
import json, sys
from prometheus_client import CollectorRegistry, generate_latest
from proxy.telemetry.metrics import NO_ROUTE, Decision, Metrics, WorkersCollector

supervisor = CollectorRegistry()
supervisor.register(WorkersCollector(sys.argv[1]))
before = generate_latest(supervisor).decode()  # no worker has written anything yet
metrics = Metrics()
api = metrics.route("api")
metrics.route(NO_ROUTE)  # a route with no traffic yet: its histograms at 0
for seconds in (0.00004, 0.0003, 0.001, 0.001, 2.0):
    api.observe_auth(seconds)
api.observe_upstream(0.02)
api.count("GET", Decision.ALLOWED, "", 200)
metrics.mirror()
for seconds in (0.3, 45.0):  # a second copy adds what grew since the first
    api.observe_auth(seconds)
    api.observe_upstream(seconds)
api.count("GET", Decision.ALLOWED, "", 200)
api.count("POST", Decision.DENIED, "expired", 401)
metrics.in_flight = 3
metrics.mirror()
# A worker part-way through a copy: a new series written, not yet committed.
from proxy.telemetry import multiproc
series = multiproc.key("jwt_sidecar_auth_duration_seconds", "jwt_sidecar_auth_duration_seconds_bucket", {"route": "partial", "le": "+Inf"}, "x")
multiproc.own().set("histogram", series, 1.0)
shown = {"before": before, "worker": metrics.render()[0].decode(), "supervisor": generate_latest(supervisor).decode()}
print(json.dumps(shown))
"""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if family.name.startswith("jwt_sidecar_") and not sample.name.endswith("_created")
    }


def test_the_supervisor_shows_a_workers_metrics_as_the_worker_does(tmp_path: Path) -> None:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    run = subprocess.run(
        [sys.executable, "-c", _WORKER, str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert shown["before"] == ""  # no family at all until a worker has written it
    worker, supervisor = samples(shown["worker"]), samples(shown["supervisor"])
    # A series written but not yet committed is left out (the next copy commits it).
    assert not [key for key in supervisor if ("route", "partial") in key[1]]
    # The same series, and nothing else.
    assert set(supervisor) == set(worker)
    for key, value in worker.items():
        # A sum is carried as the differences between copies: equal to within rounding.
        assert supervisor[key] == pytest.approx(value, rel=1e-12), key
    auth = "jwt_sidecar_auth_duration_seconds"
    assert supervisor[(f"{auth}_count", (("route", "api"),))] == 7
    assert supervisor[(f"{auth}_bucket", (("le", "0.001"), ("route", "api")))] == 4
    assert supervisor[(f"{auth}_bucket", (("le", "1.0"), ("route", "api")))] == 5
    assert supervisor[(f"{auth}_count", (("route", "(none)"),))] == 0
    families = {f.name: f for f in text_string_to_metric_families(shown["supervisor"])}
    declared = by_name()
    for name in (auth, "jwt_sidecar_upstream_duration_seconds"):
        assert families[name].type == "histogram"
        assert families[name].documentation == declared[name].help
