"""Prometheus metrics: recording and exporting the families of families.py, in one private registry.

Owns: a `Registry` (exposition.py's) per `Metrics` instance (nothing global, so two apps in
one process, or two tests, never share a count); the per-request recording
path (`RouteMetrics`, label children resolved once and cached; `ProviderMetrics` for a route
with several providers, by the provider chosen); a scrape-time collector that
reads key sources and the token cache through a `MetricsView`; rendering the exposition body
for `/metrics` (exposition.py writes it: no process imports prometheus-client); and,
with `workers: N`, each worker's copy of its metrics into prometheus-client's multiprocess
files (`Metrics.mirror`) and worker 0's reading of them (`WorkersCollector`), both through
multiproc.py, which writes and reads those files itself.
Does not own: the names, labels and help of the families (families.py), serving `/metrics`
(admin.py), deciding what a request's decision or reason is
(pipeline.py), or the counters it reads at scrape time (keys.py and verify.py keep those).

Labels are bounded by construction: route and provider names come from the config, methods,
decisions, reasons and status classes from closed sets (anything else is recorded as
`other`). Never a path, a subject, a claim or a token: each distinct label value is a time
series kept for the life of the process.

Every family (name, type, labels, help, how `workers: N` combines it, buckets) is declared
once, in families.py; this module builds the exposition from those declarations. Durations
are in seconds, Prometheus base units.

The process_* families are prometheus-client's (read from /proc by exposition.py's
`ProcessCollector` as prometheus-client's own reads them). One process: unlabelled,
as any Python exporter gives them. With `workers: N` worker 0 exports them for each
worker, itself included, labelled `worker` ("0" .. "N-1"), read from /proc/PID at
scrape time (`ProcessesCollector`): prometheus-client's multiprocess mode has no process
metrics, and /proc is exact where copies in the multiprocess files would lag a second.

The per-request families (`requests_total`, `in_flight_requests` and the two durations) and
the connection families (`connections_open`, `connections_rejected_total`: the proxy's
`http1.Server` adds to `Metrics.connections`) are plain Python numbers, read at scrape time: a prometheus-client Counter or Histogram takes a
lock per increment and walks its buckets in Python, which was an eighth of a refused
request's instructions (bench/instructions); a caller that knows a series ahead counts into
its `Cell` (`RouteMetrics.cell`), added to `requests_total` at scrape time. The `jwks_*`, `provider_ready`,
`token_cache_*` and `revocation_*` families are read from the live objects at each scrape (`Metrics.watch`), so a hot reload that swaps the key ring or the cache is seen at
the next scrape. A key source or cache that a reload replaces starts its counters again from
0, which Prometheus' `rate()` and `increase()` treat as an ordinary counter reset.
"""

from __future__ import annotations

import enum
import logging
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..base import outlet
from ..base.errors import Reason
from ..base.oplog import event
from ..config.settings import StaticKeys
from ..http.http1 import ConnectionCounts
from . import families as F
from . import multiproc
from .exposition import (
    CounterFamily,
    GaugeFamily,
    HistogramFamily,
    MetricFamily,
    ProcessCollector,
    Registry,
    choose,
    float_text,
)
from .exposition import Family as Metric
from .families import AUTH_BUCKETS, UPSTREAM_BUCKETS, Family

if TYPE_CHECKING:
    from ..auth.keys import KeySource
    from ..auth.verify import TokenCache

__all__ = [
    "AUTH_BUCKETS",
    "METHODS",
    "NO_ROUTE",
    "UPSTREAM_BUCKETS",
    "Cell",
    "Decision",
    "Metrics",
    "MetricsView",
    "ProcessesCollector",
    "ProviderMetrics",
    "RouteMetrics",
    "WorkersCollector",
]

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
"""Methods recorded by name; any other (including lower case: RFC 9110 §9.1 methods are
case-sensitive) is recorded as `other`, so a client cannot mint new series."""

NO_ROUTE = "(none)"
"""The `route` label of a request no route matched. Parenthesised to stand apart from route
names; config/builder.py does not reserve it yet, so a route literally named `(none)` would share it."""

OTHER = "other"
"""The label value for anything outside a closed set."""


class Decision(enum.StrEnum):
    """What became of a request: the `decision` label."""

    ALLOWED = "allowed"
    DENIED = "denied"
    """Refused for its credentials (400/401/403 with a Bearer challenge) or our key outage (503)."""
    UPSTREAM_ERROR = "upstream_error"
    """Allowed, but the upstream failed or timed out (502/504)."""
    REJECTED = "rejected"
    """Refused before authentication: a bad request, no route, a body too large."""
    WOULD_DENY = "would_deny"
    """A route in report mode (`auth: {mode: report}`): refused by a check, as `denied` would be
    in enforce mode (the reason says which), and forwarded without identity headers."""


_METHODS = frozenset(METHODS)
_DECISIONS = frozenset(Decision)
# StrEnum members hash and compare as their values, so plain strings match too.
_REASONS = frozenset(Reason) | {""}
_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}

_log = logging.getLogger("proxy.metrics")  # the name it has always logged under
_T = TypeVar("_T")


class _Durations:
    """One histogram series as plain numbers: a count per bucket (not cumulative) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: the first bound >= seconds, as Prometheus buckets are `le` (<=); the first
        # bound asked alone first: a refusal's auth step lands there, and a C call costs ~600
        # instructions (bench/FIGURES.md, "The 401 from the head").
        bounds = self.bounds
        self.counts[0 if seconds <= bounds[0] else bisect_left(bounds, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        total = 0
        buckets = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=False):
            total += count
            buckets.append((float_text(bound), float(total)))
        return buckets


class Cell:
    """The count of one `requests_total` series, kept by whoever counts into it often: one
    `cell.n += 1` per request instead of `RouteMetrics.count`'s key and lookup (a caller that
    knows the series ahead, e.g. app.py's prepared 401). Folded into the family at scrape time."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class RouteMetrics:
    """The recording side for one route: plain numbers, added to on every request.

    Made by `Metrics.route`, once per route name; keep it with the route and call it on every
    request. A method, decision, reason or status outside its closed set is recorded as
    `other` rather than raising: the request has been answered by then.
    """

    __slots__ = ("auth", "cells", "counts", "name", "upstream")

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: dict[tuple[str, str, str, str], int] = {}
        """(method, decision, reason, status class) -> requests answered."""
        self.cells: dict[tuple[str, str, str, str], Cell] = {}
        """The same keys -> requests counted in a `Cell` (`cell`): added to `counts` at scrape time."""
        self.auth = _Durations(AUTH_BUCKETS)
        self.upstream = _Durations(UPSTREAM_BUCKETS)

    def observe_auth(self, seconds: float) -> None:
        self.auth.observe(seconds)

    def observe_upstream(self, seconds: float) -> None:
        self.upstream.observe(seconds)

    def count(self, method: str, decision: Decision, reason: str, status: int) -> None:
        """One answered request. `reason` is an `errors.Reason` value, or "" for none."""
        # Method and status are normalised before the lookup, so the dict stays as bounded
        # as the labels are, whatever a client sends.
        key: tuple[str, str, str, str] = (
            method if method in _METHODS else OTHER,
            decision,
            reason,
            _STATUS_CLASSES.get(status // 100, OTHER),
        )
        counts = self.counts
        seen = counts.get(key)
        if seen is None:
            key = self._checked(key)
            seen = counts.get(key, 0)
        counts[key] = seen + 1

    def cell(self, method: str, decision: Decision, reason: str, status: int) -> Cell:
        """The series `count(method, decision, reason, status)` adds to, as a `Cell` to add to
        directly (`cell.n += 1` is that `count`); one per series, made once."""
        key = self._checked(
            (method if method in _METHODS else OTHER, decision, reason, _STATUS_CLASSES.get(status // 100, OTHER))
        )
        found = self.cells.get(key)
        if found is None:
            found = self.cells[key] = Cell()
        return found

    def totals(self) -> dict[tuple[str, str, str, str], int]:
        """Requests answered by series: `counts` and the cells together (a copy, for a scrape)."""
        totals = dict(self.counts)
        for key, cell in list(self.cells.items()):
            if cell.n:
                totals[key] = totals.get(key, 0) + cell.n
        return totals

    @staticmethod
    def _checked(key: tuple[str, str, str, str]) -> tuple[str, str, str, str]:
        # A decision or reason outside the closed sets is a bug in the caller; record it as
        # `other` (so bogus values cannot grow the dict) rather than fail a request that has
        # already been answered.
        method, decision, reason, status = key
        if decision in _DECISIONS and reason in _REASONS:
            return key
        return (method, decision if decision in _DECISIONS else OTHER, reason if reason in _REASONS else OTHER, status)

    def __repr__(self) -> str:
        return f"<RouteMetrics {self.name} series={len(self.counts)}>"


class ProviderMetrics(RouteMetrics):
    """A route with `providers:`, as one of its providers records it: into the route's own
    numbers (shared with its `RouteMetrics`), and by provider (`provider_requests_total`).

    The route plan the token's `iss` chose holds this in place of the route's recorder, so
    other routes record nothing more. It has no cells (`cell`): its counts go by provider too."""

    __slots__ = ("decisions", "provider")

    def __init__(self, route: RouteMetrics, provider: str) -> None:
        # The route's numbers, shared: requests_total and the durations stay one series per route.
        self.name, self.counts, self.auth, self.upstream = route.name, route.counts, route.auth, route.upstream
        self.cells = route.cells
        self.provider = provider
        self.decisions: dict[tuple[str, str], int] = {}
        """(decision, reason) -> requests answered."""

    def count(self, method: str, decision: Decision, reason: str, status: int) -> None:
        super().count(method, decision, reason, status)
        key = (decision, reason) if decision in _DECISIONS and reason in _REASONS else (OTHER, OTHER)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def cell(self, method: str, decision: Decision, reason: str, status: int) -> Cell:
        raise TypeError("a provider's requests are counted by `count` (by provider as well)")


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsView:
    """What the scrape-time collector reads: the live key sources, token cache and clock."""

    sources: Mapping[str, KeySource]
    """Provider name → key source (a `KeyRing.sources`)."""
    cache: TokenCache | None
    """The verified-token cache, or None when it is disabled."""
    monotonic: Callable[[], float]
    """The clock the key sources stamp `last_success` with (`clock.monotonic`)."""
    revocation: Any = None
    """The revocation list's follower (`auth.revocationstore.Revocations`: `store`, `size`,
    `age()`), or None without `revocation:`."""


class Metrics:
    """Every metric of one app, in its own registry."""

    registry: Registry
    in_flight: int
    """Requests being handled right now: the handler adds and subtracts 1."""
    connections: ConnectionCounts
    """Client connections open and rejected: the proxy's server keeps these (`Proxy.server`)."""

    def __init__(self) -> None:
        self.registry = Registry()
        # CPU, memory and open files of this process (process_*), which prometheus-client's
        # default registry gives any Python exporter; the README's sizing advice reads these.
        self.registry.register(ProcessCollector())
        self.in_flight = 0
        self.connections = ConnectionCounts()
        self._routes: dict[str, RouteMetrics] = {}
        self._providers: dict[tuple[str, str], ProviderMetrics] = {}
        self.registry.register(_Calls(lambda: _request_families(self)))
        # Both present from the start, so a failure series exists at 0 before the first failure
        # (an alert on increase() needs a previous sample to compare against).
        self.reloads = {"success": 0, "failure": 0}
        self.registry.register(_Calls(lambda: _reload_families(self)))
        self._collector: _ViewCollector | None = None
        self._mirror: _Mirror | None = None

    def route(self, name: str) -> RouteMetrics:
        """The recorder for route `name` (`NO_ROUTE` for unmatched requests), made once."""
        found = self._routes.get(name)
        if found is None:
            found = self._routes[name] = RouteMetrics(name)
        return found

    def route_provider(self, route: str, provider: str) -> ProviderMetrics:
        """The recorder of route `route` (one with `providers:`) for the requests `provider` decided, made once."""
        found = self._providers.get((route, provider))
        if found is None:
            found = self._providers[(route, provider)] = ProviderMetrics(self.route(route), provider)
        return found

    def count_reload(self, ok: bool) -> None:
        self.reloads["success" if ok else "failure"] += 1

    def watch(self, view: Callable[[], MetricsView]) -> None:
        """Export key-source and token-cache metrics, read through `view()` at every scrape.

        `view` is called at scrape time, so it should return whatever is current (the key
        ring of the running config snapshot). Calling `watch` again replaces it.
        """
        if self._collector is None:
            self._collector = _ViewCollector(view)
            self.registry.register(self._collector)
        else:
            self._collector.view = view

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition body and its content type, in the format the `Accept` header asks for."""
        encoder, content_type = choose(accept)
        return encoder(self.registry.collect()), content_type

    def mirror(self) -> None:
        """Copy the scrape-time families into this process's multiprocess files (multiproc.py,
        in `PROMETHEUS_MULTIPROC_DIR`).

        With `workers: N` worker 0 scrapes the files every worker writes
        (`WorkersCollector`); a scrape-time collector in a worker is never asked. So each
        worker calls this every second (and once more as it stops): counters and histograms
        advance by what they grew, gauges are set.
        """
        if self._mirror is None:
            self._mirror = _Mirror(multiproc.own())
        families = [*_request_families(self), *_reload_families(self)]
        if self._collector is not None:
            families += self._collector.collect()
        self._mirror.copy(families)


class ProcessesCollector:
    """The process_* metrics of several processes, each labelled `worker`, read at scrape time.

    `processes()` returns (label, pid) pairs: it is called at every scrape, so a restarted
    worker is read under its new pid and keeps its label (its CPU counter starts again from
    0, which `rate()` takes for a reset; `process_start_time_seconds` says when). A process
    that has gone between the call and the read costs its own samples only.
    """

    def __init__(self, processes: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._processes = processes
        self._pid = 0
        # One reader, pointed at each pid in turn: prometheus-client's /proc parsing and names.
        self._reader = ProcessCollector(pid=lambda: self._pid)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, MetricFamily] = {}
        for label, pid in list(self._processes()):
            self._pid = pid
            try:
                read = list(self._reader.collect())
            except Exception:  # noqa: BLE001 - one odd /proc file must cost its own samples, not the scrape
                event(
                    _log,
                    logging.DEBUG,
                    "metrics_failed",
                    "metrics: reading /proc/%(pid)d failed",
                    pid=pid,
                    exc_info=True,
                )
                continue
            for family in read:
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = MetricFamily(family.name, family.documentation, family.type)
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "worker": label}, sample.value)
        yield from families.values()


# -- scrape time -------------------------------------------------------------------------------


def _request_families(metrics: Metrics) -> Iterator[Metric]:
    """The per-request families, from the numbers `RouteMetrics` keeps."""
    requests = F.REQUESTS.counter()
    auth = F.AUTH_DURATION.histogram()
    upstream = F.UPSTREAM_DURATION.histogram()
    # Copies: a request landing between two reads must not change a dict being iterated.
    for route in list(metrics._routes.values()):
        for key, count in route.totals().items():
            requests.add_metric((route.name, *key), count)
        for family, durations in ((auth, route.auth), (upstream, route.upstream)):
            family.add_metric((route.name,), durations.cumulative(), durations.sum)
    yield requests
    in_flight = F.IN_FLIGHT.gauge()
    in_flight.add_metric((), metrics.in_flight)
    yield in_flight
    yield auth
    yield upstream
    connections = metrics.connections
    opened = F.CONNECTIONS_OPEN.gauge()
    opened.add_metric((), connections.open)
    yield opened
    rejected = F.CONNECTIONS_REJECTED.counter()
    rejected.add_metric(("limit",), connections.rejected)
    yield rejected
    by_provider = F.PROVIDER_REQUESTS.counter()
    for recorder in list(metrics._providers.values()):
        for (decision, reason), count in list(recorder.decisions.items()):
            by_provider.add_metric((recorder.name, recorder.provider, decision, reason), count)
    yield by_provider
    dropped = F.LOG_LINES_DROPPED.counter()
    dropped.add_metric(("access",), outlet.stdout().lost())
    dropped.add_metric(("operator",), outlet.stderr().lost())
    yield dropped


def _reload_families(metrics: Metrics) -> Iterator[Metric]:
    reloads = F.CONFIG_RELOADS.counter()
    for result, count in list(metrics.reloads.items()):
        reloads.add_metric((result,), count)
    yield reloads


class _Calls:
    """A collector that is one function, called at each scrape."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.collect = collect


_VIEW_FAMILIES = (
    F.JWKS_FETCHES,
    F.JWKS_FETCH_FAILURES,
    F.JWKS_DISCOVERY_FETCHES,
    F.JWKS_KEYS,
    F.JWKS_KEYS_SKIPPED,
    F.JWKS_AGE,
    F.PROVIDER_READY,
    F.TOKEN_CACHE_REQUESTS,
    F.TOKEN_CACHE_ENTRIES,
    F.REVOCATION_AGE,
    F.REVOCATION_RULES,
)


def _families() -> dict[Family, CounterFamily | GaugeFamily]:
    """Fresh, empty families of every metric the collector exports (one set per scrape)."""
    return {family: family.counter() if family.kind == "counter" else family.gauge() for family in _VIEW_FAMILIES}


def _number(read: Callable[[], Any]) -> float | None:
    """`read()` as a finite number, or None for anything else (or an exception)."""
    try:
        value = read()
    except Exception:  # noqa: BLE001 - one odd attribute must cost one sample, not the scrape
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _ViewCollector:
    """Reads a `MetricsView` at scrape time. Never raises: a reload may swap objects mid-scrape.

    Each part (the view, each provider, the cache) is read on its own, so one that fails
    costs its own samples and the rest of the scrape still renders.
    """

    def __init__(self, view: Callable[[], MetricsView]) -> None:
        self.view = view
        self._warned = False

    def collect(self) -> Iterator[Metric]:
        families = _families()
        view = self._guard(self.view)
        if view is not None:
            now = self._guard(lambda: _number(view.monotonic))
            sources = self._guard(lambda: _items(view.sources)) or ()
            for name, source in sources:
                # Called at once by _guard, so the loop variables are the current ones.
                self._guard(lambda: _source(families, str(name), source, now))  # noqa: B023
            self._guard(lambda: _cache(families, view.cache))
            self._guard(lambda: _revocation(families, view.revocation))
        yield from families.values()

    def _guard(self, read: Callable[[], _T]) -> _T | None:
        try:
            return read()
        except Exception:  # noqa: BLE001 - a scrape must never fail for what it reads
            # Once at WARNING (someone should look), then quietly: scrapes come every few seconds.
            event(
                _log,
                logging.DEBUG if self._warned else logging.WARNING,
                "metrics_failed",
                "metrics: reading key sources or the token cache failed",
                exc_info=True,
            )
            self._warned = True
            return None


def _items(sources: Any) -> list[tuple[Any, Any]]:
    if not isinstance(sources, Mapping):
        raise TypeError(f"MetricsView.sources is a {type(sources).__name__}, not a mapping")
    # A copy, so a mapping that changes under us cannot break the loop.
    return list(sources.items())


def _is_static(source: Any) -> bool:
    try:
        return isinstance(source.provider.keys, StaticKeys)
    except Exception:  # noqa: BLE001 - an odd object is treated as fetched, and read defensively
        return False


def _source(families: dict[Family, CounterFamily | GaugeFamily], name: str, source: Any, now: float | None) -> None:
    labels = (name,)
    samples: list[tuple[Family, float | None]] = [
        (F.JWKS_KEYS, _number(lambda: source.keyset.size)),
        (F.JWKS_KEYS_SKIPPED, _number(lambda: source.skipped)),
        (F.PROVIDER_READY, _number(lambda: 1 if source.ready else 0)),
    ]
    # Static keys (a file, a PEM, a secret) are read once with the config: they are never
    # fetched, so fetch counts and key age would be noise (and an age alert a false alarm).
    if not _is_static(source):
        last = _number(lambda: source.last_success)
        samples += [
            (F.JWKS_FETCHES, _number(lambda: source.fetches)),
            (F.JWKS_FETCH_FAILURES, _number(lambda: source.failures)),
            (F.JWKS_DISCOVERY_FETCHES, _number(lambda: source.discovery_fetches)),
            # max(0, …): a clock that is not the sources' own must not give a negative age.
            (F.JWKS_AGE, max(0.0, now - last) if now is not None and last is not None else None),
        ]
    for family, value in samples:
        if value is not None:
            families[family].add_metric(labels, value)


def _cache(families: dict[Family, CounterFamily | GaugeFamily], cache: Any) -> None:
    if cache is None:  # disabled: no samples rather than zeros that look like a cold cache
        return
    for result, value in (("hit", _number(lambda: cache.hits)), ("miss", _number(lambda: cache.misses))):
        if value is not None:
            families[F.TOKEN_CACHE_REQUESTS].add_metric((result,), value)
    entries = _number(lambda: len(cache))
    if entries is not None:
        families[F.TOKEN_CACHE_ENTRIES].add_metric((), entries)


def _revocation(families: dict[Family, CounterFamily | GaugeFamily], store: Any) -> None:
    if store is None:  # no `revocation:`: no samples
        return
    labels = (str(store.store),)
    rules = _number(lambda: store.size)
    if rules is not None:
        families[F.REVOCATION_RULES].add_metric(labels, rules)
    age = _number(store.age)
    if age is not None:
        families[F.REVOCATION_AGE].add_metric(labels, age)


_DECLARED = {family.family: family for family in F.FAMILIES if family.ours}
"""Exposition family name -> declaration, for the families a worker mirrors."""

_HISTOGRAMS = tuple(family for family in F.FAMILIES if family.kind == "histogram")


class _Mirror:
    """One worker's scrape-time families, copied into its multiprocess files (multiproc.py).

    Counters and histograms grow by what their scrape-time values grew (so a key source a
    reload replaced, counting from 0 again, adds its new counts rather than taking back the
    old); gauges are set, in the file of the mode the family declares. A histogram is written
    as prometheus-client's `Histogram` writes one: its `_sum`, then each bucket's own count.
    """

    def __init__(self, files: multiproc.Files) -> None:
        self._files = files
        self._keys: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._last: dict[str, float] = {}

    def copy(self, families: Iterable[Metric]) -> None:
        for family in families:
            if family.type == "histogram":
                self._copy_histogram(family)
                continue
            kind: multiproc.Kind = "counter"
            if family.type != "counter":
                kind = multiproc.GAUGES[_DECLARED[family.name].gauge_mode]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                series = self._key(family, sample.name, sample.labels)
                if kind == "counter":
                    self._add(kind, series, sample.value)
                else:
                    self._files.set(kind, series, sample.value)
        # Every series of this copy seen by worker 0 at once, or none of them.
        self._files.commit()

    def _add(self, kind: multiproc.Kind, series: str, value: float) -> None:
        grown = value - self._last.get(series, 0.0)
        self._last[series] = value
        # A source replaced by a reload starts from 0 again: count it anew.
        self._files.set(kind, series, self._files.value(kind, series) + (grown if grown >= 0 else value))

    def _copy_histogram(self, family: Metric) -> None:
        labels = _DECLARED[family.name].labels
        series: dict[tuple[str, ...], tuple[list[tuple[dict[str, str], float]], list[float]]] = {}
        # HistogramFamily: each series' cumulative buckets (ascending, +Inf last), its count, its sum.
        for sample in family.samples:
            values = tuple(sample.labels[name] for name in labels)
            buckets, total = series.setdefault(values, ([], []))
            if sample.name.endswith("_bucket"):
                buckets.append((sample.labels, sample.value))
            elif sample.name.endswith("_sum"):
                total.append(sample.value)
        for values, (buckets, total) in series.items():
            own = dict(zip(labels, values, strict=True))
            for value in total:
                self._add("histogram", self._key(family, family.name + "_sum", own), value)
            below = 0.0
            for bucket, cumulative in buckets:
                self._add("histogram", self._key(family, family.name + "_bucket", bucket), cumulative - below)
                below = cumulative

    def _key(self, family: Metric, name: str, labels: dict[str, str]) -> str:
        ident = (name, tuple(labels.items()))
        found = self._keys.get(ident)
        if found is None:
            found = self._keys[ident] = multiproc.key(family.name, name, labels, family.documentation)
        return found


class WorkersCollector:
    """Worker 0's `/metrics` for `workers: N`: what the workers wrote to the multiprocess files.

    multiproc.py reads and combines them as prometheus-client's `MultiProcessCollector` would
    (counters and histograms summed over every worker that has run, gauges in their declared
    mode over the live ones); the histograms come last, each written as one process writes it
    (every series' buckets, `_count`, `_sum`).
    """

    def __init__(self, path: str) -> None:
        self._path = path

    def collect(self) -> Iterator[Metric]:
        histograms: dict[str, Metric] = {}
        for family in multiproc.read(self._path):
            if family.type == "histogram":
                histograms[family.name] = family
            else:
                yield family
        for declared in _HISTOGRAMS:
            found = histograms.get(declared.family)
            if found is not None:  # as before: no family until a worker has written one
                yield _histogram(declared, found)


def _histogram(declared: Family, merged: Metric) -> HistogramFamily:
    labels = declared.labels
    totals: dict[tuple[str, ...], float] = {}
    series: dict[tuple[str, ...], dict[str, float]] = {}
    for sample in merged.samples:
        key = tuple(sample.labels[name] for name in labels)
        if sample.name.endswith("_bucket"):
            series.setdefault(key, {})[sample.labels["le"]] = sample.value
        elif sample.name.endswith("_sum"):
            totals[key] = sample.value
    bounds = {float_text(bound) for bound in (*declared.buckets, math.inf)}
    histogram = declared.histogram()
    for key, by_bound in series.items():
        # Never met from our own writer (a copy is committed whole); files written otherwise
        # could hold a series without every bucket, or without a sum.
        if set(by_bound) != bounds or key not in totals:
            continue
        histogram.add_metric(key, sorted(by_bound.items(), key=lambda item: float(item[0])), totals[key])
    return histogram
