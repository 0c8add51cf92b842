"""exposition.py against prometheus-client, the reference it replaces at run time.

A populated `Metrics` (every family; routes and providers whose names hold quotes,
backslashes, newlines and unicode) is rendered by our code, and the same numbers are fed to
prometheus-client's own instruments and families, rendered by its `generate_latest` (text
0.0.4 and OpenMetrics 1.0.0). The bodies must be the same bytes (the process_* families
aside, which two reads of /proc a moment apart cannot give alike), parse with
prometheus-client's own parsers to the same families, and be served with the same content
type for each `Accept`.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Iterator

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families as text_parse
from prometheus_client.utils import floatToGoString

from proxy.auth.keys import KeySource, key_source_for
from proxy.auth.verify import TokenCache, Verifier
from proxy.base import outlet
from proxy.config.builder import Provider, RemoteJwks, StaticKeys, TokenCacheSettings
from proxy.http.fetch import Fetcher
from proxy.telemetry import families as F
from proxy.telemetry.exposition import ProcessCollector, choose, float_text
from proxy.telemetry.metrics import NO_ROUTE, Decision, Metrics, MetricsView
from tests.conftest import AUDIENCE, ISSUER, FakeClock, TestKey, jwks_of, mint
from tests.support.jwks_server import JwksServer

ODD_ROUTE = 'we"ird\\route\nline ✓'
ODD_STATIC = 'lo"cal\\keys\nü'
ODD_REMOTE = "corp ☃ \\n literal"
ROUTES = ("api", ODD_ROUTE, NO_ROUTE)


@pytest.fixture(autouse=True)
def no_created() -> Iterator[None]:
    """The reference without `_created` samples, as `jwt-sidecar run` always exported."""
    prometheus_client.disable_created_metrics()
    yield
    prometheus_client.enable_created_metrics()


@pytest.fixture
async def fetcher() -> AsyncIterator[Fetcher]:
    async with Fetcher() as client:
        yield client


class Reference:
    """prometheus-client's instruments, fed the same numbers as the `Metrics` under test."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(F.REQUESTS.name, F.REQUESTS.help, F.REQUESTS.labels, registry=r)
        self.in_flight = Gauge(F.IN_FLIGHT.name, F.IN_FLIGHT.help, registry=r)
        self.auth = Histogram(
            F.AUTH_DURATION.name, F.AUTH_DURATION.help, F.AUTH_DURATION.labels, registry=r, buckets=F.AUTH_BUCKETS
        )
        self.upstream = Histogram(
            F.UPSTREAM_DURATION.name,
            F.UPSTREAM_DURATION.help,
            F.UPSTREAM_DURATION.labels,
            registry=r,
            buckets=F.UPSTREAM_BUCKETS,
        )
        self.open = Gauge(F.CONNECTIONS_OPEN.name, F.CONNECTIONS_OPEN.help, registry=r)
        self.rejected = Counter(
            F.CONNECTIONS_REJECTED.name, F.CONNECTIONS_REJECTED.help, F.CONNECTIONS_REJECTED.labels, registry=r
        )
        self.by_provider = Counter(
            F.PROVIDER_REQUESTS.name, F.PROVIDER_REQUESTS.help, F.PROVIDER_REQUESTS.labels, registry=r
        )
        self.dropped = Counter(
            F.LOG_LINES_DROPPED.name, F.LOG_LINES_DROPPED.help, F.LOG_LINES_DROPPED.labels, registry=r
        )
        self.reloads = Counter(F.CONFIG_RELOADS.name, F.CONFIG_RELOADS.help, F.CONFIG_RELOADS.labels, registry=r)


class ViewReference:
    """The key sources' and the cache's families, read from the same live objects at collect time."""

    def __init__(self, view: MetricsView) -> None:
        self.view = view

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        made = {
            f: (CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily)(f.name, f.help, labels=f.labels)
            for f in (
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
        }
        now = self.view.monotonic()
        for name, source in self.view.sources.items():
            made[F.JWKS_KEYS].add_metric([name], source.keyset.size)
            made[F.JWKS_KEYS_SKIPPED].add_metric([name], source.skipped)
            made[F.PROVIDER_READY].add_metric([name], 1 if source.ready else 0)
            if not isinstance(source.provider.keys, StaticKeys):
                made[F.JWKS_FETCHES].add_metric([name], source.fetches)
                made[F.JWKS_FETCH_FAILURES].add_metric([name], source.failures)
                made[F.JWKS_DISCOVERY_FETCHES].add_metric([name], source.discovery_fetches)
                if source.last_success is not None:
                    made[F.JWKS_AGE].add_metric([name], max(0.0, now - source.last_success))
        cache = self.view.cache
        assert cache is not None
        made[F.TOKEN_CACHE_REQUESTS].add_metric(["hit"], cache.hits)
        made[F.TOKEN_CACHE_REQUESTS].add_metric(["miss"], cache.misses)
        made[F.TOKEN_CACHE_ENTRIES].add_metric([], len(cache))
        yield from made.values()


def static_provider(name: str, key: TestKey) -> Provider:
    return Provider(
        name=name,
        issuers=(ISSUER,),
        audiences=(AUDIENCE,),
        algorithms=("RS256",),
        keys=StaticKeys(kind="jwks_file", origin="jwks_file (test)", jwks=jwks_of(key)),
    )


async def populated(
    clock: FakeClock, key: TestKey, jwks_server: JwksServer, fetcher: Fetcher
) -> tuple[Metrics, Reference, list[KeySource]]:
    """A Metrics with a sample in every family it exports, and its reference fed alike."""
    metrics, ref = Metrics(), Reference()
    for route in ROUTES:
        metrics.route(route)
        ref.auth.labels(route)
        ref.upstream.labels(route)

    # Fed route by route: a scrape lists a route's series together, prometheus-client's
    # Counter in the order they were first counted.
    def count(route: str, method: str, decision: Decision, reason: str, status: int) -> None:
        metrics.route(route).count(method, decision, reason, status)
        label = method if method != "PROPFIND" else "other"
        ref.requests.labels(route, label, str(decision), reason, f"{status // 100}xx").inc()

    count("api", "GET", Decision.ALLOWED, "", 200)
    count("api", "GET", Decision.ALLOWED, "", 200)
    count("api", "PUT", Decision.UPSTREAM_ERROR, "upstream_timeout", 504)
    # A cell: ten million requests, a number written in Go's exponent form.
    metrics.route("api").cell("HEAD", Decision.DENIED, "token_missing", 401).n += 10_000_000
    ref.requests.labels("api", "HEAD", "denied", "token_missing", "4xx").inc(10_000_000)
    count(ODD_ROUTE, "POST", Decision.DENIED, "expired", 401)
    count(ODD_ROUTE, "PROPFIND", Decision.REJECTED, "malformed_request", 400)
    for route, seconds in [("api", 0.00004), ("api", 0.001), (ODD_ROUTE, 0.3), ("api", 2.5), (ODD_ROUTE, 0.00025)]:
        metrics.route(route).observe_auth(seconds)
        ref.auth.labels(route).observe(seconds)
    for route, seconds in [("api", 0.02), ("api", 12_345_678.9), (ODD_ROUTE, 30.0), (ODD_ROUTE, 1e-9)]:
        metrics.route(route).observe_upstream(seconds)
        ref.upstream.labels(route).observe(seconds)
    metrics.in_flight = 7
    ref.in_flight.set(7)
    metrics.connections.open, metrics.connections.rejected = 3, 123_456_789
    ref.open.set(3)
    ref.rejected.labels("limit").inc(123_456_789)
    for provider, decision, reason in [
        (ODD_REMOTE, Decision.ALLOWED, ""),
        (ODD_STATIC, Decision.DENIED, "bad_signature"),
        (ODD_REMOTE, Decision.ALLOWED, ""),
    ]:
        metrics.route_provider(ODD_ROUTE, provider).count("GET", decision, reason, 200 if not reason else 401)
        ref.requests.labels(ODD_ROUTE, "GET", str(decision), reason, "2xx" if not reason else "4xx").inc()
        ref.by_provider.labels(ODD_ROUTE, provider, str(decision), reason).inc()
    count(NO_ROUTE, "GET", Decision.REJECTED, "no_route", 404)
    ref.dropped.labels("access").inc(outlet.stdout().lost())
    ref.dropped.labels("operator").inc(outlet.stderr().lost())
    ref.reloads.labels("success")
    ref.reloads.labels("failure")
    for ok in (True, False, False):
        metrics.count_reload(ok)
        ref.reloads.labels("success" if ok else "failure").inc()

    jwks_server.document = jwks_of(key)
    static = key_source_for(static_provider(ODD_STATIC, key), fetcher=None, clock=clock)
    remote = key_source_for(
        Provider(
            name=ODD_REMOTE,
            issuers=(ISSUER,),
            audiences=(AUDIENCE,),
            algorithms=("RS256",),
            keys=RemoteJwks(url=jwks_server.url()),
        ),
        fetcher=fetcher,
        clock=clock,
    )
    await remote.start()
    clock.advance(42.5)
    cache = TokenCache(TokenCacheSettings(max_entries=10, max_ttl=60.0), clock)
    verifier = Verifier(static.provider, static, clock=clock, cache=cache)
    token = mint(key=key, now=clock.time())
    for _ in range(3):
        await verifier.verify(token)
    view = MetricsView(sources={ODD_STATIC: static, ODD_REMOTE: remote}, cache=cache, monotonic=clock.monotonic)
    metrics.watch(lambda: view)
    ref.registry.register(ViewReference(view))
    return metrics, ref, [remote]


def without_process(body: bytes) -> bytes:
    lines = body.splitlines(keepends=True)
    return b"".join(
        line for line in lines if not line.removeprefix(b"# HELP ").removeprefix(b"# TYPE ").startswith(b"process_")
    )


def families(parsed: object) -> list[tuple[str, str, str, list[tuple[str, tuple[tuple[str, str], ...], float]]]]:
    return [
        (
            f.name,
            f.type,
            f.documentation,
            [(s.name, tuple(sorted(s.labels.items())), s.value) for s in f.samples],
        )
        for f in parsed  # type: ignore[attr-defined]
    ]


async def test_text_and_openmetrics_bodies_are_prometheus_clients_byte_for_byte(
    clock: FakeClock, rsa_key: TestKey, jwks_server: JwksServer, fetcher: Fetcher
) -> None:
    metrics, ref, sources = await populated(clock, rsa_key, jwks_server, fetcher)
    try:
        ours_text, text_type = metrics.render(None)
        ours_om, om_type = metrics.render("application/openmetrics-text; version=1.0.0")
        theirs_text = prometheus_client.generate_latest(ref.registry)
        theirs_om = om_exposition.generate_latest(ref.registry)
    finally:
        for source in sources:
            await source.close()
    assert (text_type, om_type) == (
        "text/plain; version=0.0.4; charset=utf-8",
        "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores",
    )
    # Every family has a sample; the odd names are there, escaped.
    for family in F.FAMILIES:
        if family.ours and not family.workers_only and not family.name.startswith("jwt_sidecar_revocation"):
            assert f"\n{family.name}".encode() in ours_text, family.name
    assert b'route="we\\"ird\\\\route\\nline \xe2\x9c\x93"' in ours_text
    assert without_process(ours_text) == theirs_text
    assert ours_om.startswith(b"# HELP process_") and ours_om.endswith(b"# EOF\n")
    assert without_process(ours_om) == theirs_om
    # Parsed by prometheus-client's own parsers: the same families and samples.
    ours_parsed = families(text_parse(ours_text.decode()))
    assert [f for f in ours_parsed if not f[0].startswith("process_")] == families(text_parse(theirs_text.decode()))
    ours_om_parsed = families(om_parse(ours_om.decode()))
    assert [f for f in ours_om_parsed if not f[0].startswith("process_")] == families(om_parse(theirs_om.decode()))
    process = {f[0]: f for f in ours_om_parsed if f[0].startswith("process_")}
    assert sorted(process) == sorted(f.name.removesuffix("_total") for f in F.PROCESS_FAMILIES)


def test_process_families_are_those_prometheus_clients_collector_reads() -> None:
    ours = ProcessCollector().collect()
    theirs = list(prometheus_client.ProcessCollector(registry=None).collect())
    assert [(f.name, f.documentation, f.type) for f in ours] == [(f.name, f.documentation, f.type) for f in theirs]
    for mine, reference in zip(ours, theirs, strict=True):
        ((_, labels, value),) = ((s.name, s.labels, s.value) for s in mine.samples)
        (expected,) = reference.samples
        assert (mine.samples[0].name, labels) == (expected.name, expected.labels)
        if mine.name in ("process_start_time_seconds", "process_max_fds"):
            assert value == expected.value
        else:  # read a moment apart: CPU time, memory and descriptors may move a little
            assert value == pytest.approx(expected.value, rel=0.2, abs=2), mine.name
    # Another process's, by pid (worker 0 reads each worker's so).
    parent = os.getppid()
    ours_of = {f.name: f.samples[0].value for f in ProcessCollector(lambda: parent).collect()}
    theirs_of = {
        f.name: f.samples[0].value
        for f in prometheus_client.ProcessCollector(pid=lambda: parent, registry=None).collect()
    }
    assert ours_of["process_start_time_seconds"] == theirs_of["process_start_time_seconds"]


@pytest.mark.parametrize(
    "value",
    [
        0,
        1,
        -1,
        0.1,
        1e-05,
        5e-05,
        2.5,
        1234567.0,
        12345678.9,
        123456789,
        1e22,
        -1e22,
        5e-324,
        1.7976931348623157e308,
        math.inf,
        -math.inf,
        math.nan,
        0.00025,
        30.0,
        10_000_000,
    ],
)
def test_numbers_are_written_as_float_to_go_string_writes_them(value: float) -> None:
    assert float_text(value) == floatToGoString(value)


@pytest.mark.parametrize(
    "accept",
    [
        None,
        "",
        "*/*",
        "text/plain",
        "text/plain; version=0.0.4",
        "text/plain; version=1.0.0",
        "text/plain;version=1.0.0;escaping=allow-utf-8",
        "text/plain; version=1.0.0; escaping=bogus",
        "application/openmetrics-text",
        "application/openmetrics-text; version=1.0.0",
        "application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        "application/openmetrics-text;version=1.0.0;escaping=values;q=0.6,text/plain;q=0.5",
        "application/openmetrics-text; version=2.0.0; escaping=dots",
        "application/json, application/openmetrics-text; version=1.0.0",
    ],
)
def test_the_format_and_content_type_are_those_choose_encoder_gives(accept: str | None) -> None:
    registry = CollectorRegistry()  # names with `_`, which the `dots` and `values` schemes rewrite
    Gauge("jwt_sidecar_in_flight", "Help with a \\ and a \n.", registry=registry).set(1)
    Counter("jwt_sidecar_things", "Things.", ["route"], registry=registry).labels('a"b').inc(12_345_678)
    Histogram("jwt_sidecar_seconds", "Seconds.", ["route"], registry=registry, buckets=(0.5,)).labels("x").observe(1)
    encoder, content_type = choose(accept)
    reference, reference_type = choose_encoder(accept or "")
    assert content_type == reference_type
    assert encoder(registry.collect()) == reference(registry)
