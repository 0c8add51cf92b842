"""The metrics vocabulary: every family the sidecar exports, declared once in `FAMILIES`.

Owns: each family's name, type, label names, help text, how worker 0 of `workers: N`
combines the workers' values (`Family.workers`), and its histogram buckets; building the
empty family objects a scrape fills (exposition.py's) (`Family.counter`, `gauge`,
`histogram`); and the sample names a query may use (`sample_labels`). The exposition (metrics.py), the workers' mirror and
worker 0's view of it (metrics.py), the README's Metrics table, the Grafana dashboard and
the alerts in k8s/monitoring/ are made from or checked against this table (tests/unit/
test_metric_families.py, tests/integration/test_metric_families.py).
Does not own: recording or reading any value (metrics.py), or what a label value means
(metrics.py's closed sets, errors.Reason).

Names, labels and help are what users' dashboards and alerts match on: changing one is a
breaking change, and adding a family is adding it here (and to the README, which a test checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .exposition import CounterFamily, GaugeFamily, HistogramFamily

__all__ = [
    "AUTH_BUCKETS",
    "AUTH_DURATION",
    "CONFIG_RELOADS",
    "CONNECTIONS_OPEN",
    "CONNECTIONS_REJECTED",
    "FAMILIES",
    "IN_FLIGHT",
    "JWKS_AGE",
    "JWKS_DISCOVERY_FETCHES",
    "JWKS_FETCHES",
    "JWKS_FETCH_FAILURES",
    "JWKS_KEYS",
    "JWKS_KEYS_SKIPPED",
    "PROCESS_FAMILIES",
    "PROVIDER_READY",
    "PROVIDER_REQUESTS",
    "REQUESTS",
    "REVOCATION_AGE",
    "REVOCATION_RULES",
    "TOKEN_CACHE_ENTRIES",
    "TOKEN_CACHE_REQUESTS",
    "UPSTREAM_BUCKETS",
    "UPSTREAM_DURATION",
    "WORKERS_READY",
    "Family",
    "by_name",
    "sample_labels",
]

Kind = Literal["counter", "gauge", "histogram"]
Combine = Literal["sum", "livesum", "livemin", "livemax", "per_process"]
"""How worker 0 of `workers: N` shows one family (prometheus-client's multiprocess modes):
`sum`: counters and histograms, added over every worker that has run (an exited worker's
counts stay, so a restart is not a counter reset); `livesum`/`livemin`/`livemax`: gauges, over
the workers alive now; `per_process`: the process_* families, one series per process,
labelled `worker` ("0" .. "N-1")."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Family:
    """One metric family, as users' queries see it."""

    name: str
    """As PromQL reads it: a counter with its `_total`, a histogram without `_bucket`."""
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    workers: Combine
    buckets: tuple[float, ...] = ()
    """Histograms only: the upper bounds (`le`), +Inf implied."""
    ours: bool = True
    """False for the process_* families (exposition.ProcessCollector makes them, as prometheus-client's does)."""
    workers_only: bool = False
    """Exported only by worker 0 of `workers: N`, for the set."""

    @property
    def family(self) -> str:
        """The name of the family in the exposition (prometheus-client drops a counter's `_total`)."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name

    def counter(self) -> CounterFamily:
        """A fresh, empty family for a scrape to fill (this family must be a counter)."""
        self._expect("counter")
        return CounterFamily(self.family, self.help, self.labels)

    def gauge(self) -> GaugeFamily:
        self._expect("gauge")
        return GaugeFamily(self.family, self.help, self.labels)

    def histogram(self) -> HistogramFamily:
        self._expect("histogram")
        return HistogramFamily(self.family, self.help, self.labels)

    @property
    def gauge_mode(self) -> Literal["livesum", "livemin", "livemax"]:
        """A gauge's prometheus-client multiprocess mode (how worker 0 combines the workers)."""
        mode = self.workers
        if self.kind != "gauge" or mode not in ("livesum", "livemin", "livemax"):
            raise TypeError(f"{self.name}: {mode!r} is not a gauge's multiprocess mode")
        return mode

    def _expect(self, kind: Kind) -> None:
        if self.kind != kind:
            raise TypeError(f"{self.name} is a {self.kind}, not a {kind}")

    def samples(self, *, workers: bool = False) -> dict[str, frozenset[str]]:
        """Sample name -> its label names, as a scrape (one process, or worker 0 for the set) shows them."""
        labels = frozenset(self.labels) | ({"worker"} if workers and self.workers == "per_process" else set())
        if self.kind == "histogram":
            return {self.name + "_bucket": labels | {"le"}, self.name + "_count": labels, self.name + "_sum": labels}
        return {self.name: labels}


AUTH_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
"""A cached token costs tens of microseconds, an RSA verify well under a millisecond, a key
refetch on an unknown kid up to the JWKS timeout: 50µs to 1s covers all three."""

UPSTREAM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Loopback upstreams answer in about a millisecond; 30s is the default upstream timeout."""

_P = "jwt_sidecar_"

# -- per request (metrics.RouteMetrics keeps these as plain numbers) -------------------------------
REQUESTS = Family(
    name=_P + "requests_total",
    kind="counter",
    # route: the route name, `(none)` when none matched; method: one of metrics.METHODS, else
    # `other`; decision: a metrics.Decision; reason: an errors.Reason value, "" for none;
    # status: the status class, `1xx`..`5xx`.
    help="Requests answered, by route, method class, decision, refusal reason and status class.",
    labels=("route", "method", "decision", "reason", "status"),
    workers="sum",
)
IN_FLIGHT = Family(
    name=_P + "in_flight_requests", kind="gauge", help="Requests being handled right now.", workers="livesum"
)
AUTH_DURATION = Family(
    name=_P + "auth_duration_seconds",
    kind="histogram",
    help="Time spent deciding whether a request may pass (token extraction, keys, verification, rules).",
    labels=("route",),
    workers="sum",
    buckets=AUTH_BUCKETS,
)
UPSTREAM_DURATION = Family(
    name=_P + "upstream_duration_seconds",
    kind="histogram",
    help="Time spent waiting for the upstream's response, or for it to fail.",
    labels=("route",),
    workers="sum",
    buckets=UPSTREAM_BUCKETS,
)
PROVIDER_REQUESTS = Family(
    name=_P + "provider_requests_total",
    kind="counter",
    # Only routes with `providers:` (a `provider:` route's provider is its config's); a request
    # whose iss named none of the route's providers is in requests_total alone.
    help="Requests on routes with several providers, by route, the provider the token's iss chose, "
    "decision and refusal reason.",
    labels=("route", "provider", "decision", "reason"),
    workers="sum",
)
# -- connections (the proxy's http1.Server counts them) --------------------------------------------
CONNECTIONS_OPEN = Family(
    name=_P + "connections_open",
    kind="gauge",
    help="Client connections open on the proxy port.",
    workers="livesum",
)
CONNECTIONS_REJECTED = Family(
    name=_P + "connections_rejected_total",
    kind="counter",
    help="Client connections closed at accept, by reason (limit: max_connections were open).",
    labels=("reason",),
    workers="sum",
)
CONFIG_RELOADS = Family(
    name=_P + "config_reloads_total",
    kind="counter",
    help="Config reload attempts, by result.",
    labels=("result",),  # success, failure: both exported from the start, at 0
    workers="sum",
)
# -- key sources, read at scrape time (remote providers only for fetches and age) -------------------
# Attempts and failures rather than a success/failure label: KeySource counts an attempt when
# it starts and a failure when it ends, so "attempts - failures" read during a fetch that then
# fails would go down, which Prometheus takes for a reset. (Prometheus's own metrics follow
# this shape, e.g. rule_evaluations_total and rule_evaluation_failures_total.)
JWKS_FETCHES = Family(
    name=_P + "jwks_fetches_total",
    kind="counter",
    help="Key refresh attempts (each one GET of the JWKS), counted as they start.",
    labels=("provider",),
    workers="sum",
)
JWKS_FETCH_FAILURES = Family(
    name=_P + "jwks_fetch_failures_total",
    kind="counter",
    help="Key refresh attempts that yielded no usable key set.",
    labels=("provider",),
    workers="sum",
)
JWKS_DISCOVERY_FETCHES = Family(
    name=_P + "jwks_discovery_fetches_total",
    kind="counter",
    help="GETs of the OpenID Connect discovery document.",
    labels=("provider",),
    workers="sum",
)
JWKS_KEYS = Family(
    name=_P + "jwks_keys",
    kind="gauge",
    help="Usable verification keys held.",
    labels=("provider",),
    workers="livemin",  # the worst-off worker is what a request may meet
)
JWKS_KEYS_SKIPPED = Family(
    name=_P + "jwks_keys_skipped_total",
    kind="counter",
    help="Keys left out of loaded key sets as unusable, summed over every load.",
    labels=("provider",),
    workers="sum",
)
JWKS_AGE = Family(
    name=_P + "jwks_age_seconds",
    kind="gauge",
    help="Seconds since the last good key load.",
    labels=("provider",),
    workers="livemax",  # the stalest worker is the one a staleness alert is for
)
PROVIDER_READY = Family(
    name=_P + "provider_ready",
    kind="gauge",
    help="1 when the provider holds at least one usable key.",
    labels=("provider",),
    workers="livemin",
)
# -- the verified-token cache (no samples when it is disabled) ----------------------------------------
TOKEN_CACHE_REQUESTS = Family(
    name=_P + "token_cache_requests_total",
    kind="counter",
    help="Verified-token cache lookups, by result.",
    labels=("result",),  # hit, miss
    workers="sum",
)
TOKEN_CACHE_ENTRIES = Family(
    name=_P + "token_cache_entries", kind="gauge", help="Verified tokens held in the cache.", workers="livesum"
)
# -- `workers: N` only: each worker sets its own 1 or 0 (ops/server.py), worker 0 sums ----------
WORKERS_READY = Family(
    name=_P + "workers_ready",
    kind="gauge",
    help="Workers that are ready (1 each).",
    workers="livesum",
    workers_only=True,
)

# -- the revocation list (no samples without `revocation:`), read from its follower at scrape time --
REVOCATION_AGE = Family(
    name=_P + "revocation_age_seconds",
    kind="gauge",
    help="Seconds since the revocation list was last known current (no sample until it first loads).",
    labels=("store",),  # file, redis
    workers="livemax",  # the stalest worker is the one a staleness alert is for
)
REVOCATION_RULES = Family(
    name=_P + "revocation_rules",
    kind="gauge",
    help="Revocation rules in force in the in-memory list.",
    labels=("store",),
    workers="livemin",  # a worker behind the others holds fewer
)
# -- the logs (base/outlet.py counts, read at scrape time) ------------------------------------------
LOG_LINES_DROPPED = Family(
    name=_P + "log_lines_dropped_total",
    kind="counter",
    help="Log lines never written, by log (access: stdout, operator: stderr): a reader that stopped "
    "reading left more than 4 MiB held, or the stream is closed.",
    labels=("log",),  # access, operator: both exported from the start, at 0
    workers="sum",
)


def _process(name: str, kind: Kind, text: str) -> Family:
    return Family(name=name, kind=kind, help=text, workers="per_process", ours=False)


# exposition.ProcessCollector (from /proc, as prometheus-client's own); with `workers: N` worker 0
# reads each process's /proc/PID at scrape time (metrics.ProcessesCollector). Help as prometheus-client words it.
PROCESS_FAMILIES = (
    _process("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds."),
    _process("process_resident_memory_bytes", "gauge", "Resident memory size in bytes."),
    _process("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes."),
    _process("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds."),
    _process("process_open_fds", "gauge", "Number of open file descriptors."),
    _process("process_max_fds", "gauge", "Maximum number of open file descriptors."),
)

FAMILIES: tuple[Family, ...] = (
    REQUESTS,
    IN_FLIGHT,
    CONNECTIONS_OPEN,
    CONNECTIONS_REJECTED,
    AUTH_DURATION,
    UPSTREAM_DURATION,
    JWKS_FETCHES,
    JWKS_FETCH_FAILURES,
    JWKS_DISCOVERY_FETCHES,
    JWKS_KEYS,
    JWKS_KEYS_SKIPPED,
    JWKS_AGE,
    PROVIDER_READY,
    TOKEN_CACHE_REQUESTS,
    TOKEN_CACHE_ENTRIES,
    CONFIG_RELOADS,
    WORKERS_READY,
    REVOCATION_AGE,
    REVOCATION_RULES,
    PROVIDER_REQUESTS,
    LOG_LINES_DROPPED,
    *PROCESS_FAMILIES,
)
"""Every family, in the README's order."""


def by_name() -> dict[str, Family]:
    """Family name as PromQL reads it -> its declaration."""
    return {family.name: family for family in FAMILIES}


def sample_labels(*, workers: bool = False) -> dict[str, frozenset[str]]:
    """Every sample name a query may use -> its label names (`_bucket`, `_count`, `_sum` for
    histograms), as one process (`workers=False`) or worker 0 of `workers: N` exports them."""
    found: dict[str, frozenset[str]] = {}
    for family in FAMILIES:
        found.update(family.samples(workers=workers))
    return found
