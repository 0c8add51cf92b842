"""metrics.py: what a scrape shows, parsed back with prometheus_client's own parser.

Key sources, the token cache and the verifier are the real ones (static keys, or a JWKS
server on loopback); only the "odd objects" a broken view may hand the collector are made up.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.auth.keys import KeySource, RemoteKeySource, key_source_for
from proxy.auth.verify import TokenCache, Verifier
from proxy.base.errors import InvalidToken, Reason
from proxy.config.builder import Provider, RemoteJwks, StaticKeys, TokenCacheSettings
from proxy.http.fetch import Fetcher
from proxy.telemetry.metrics import METHODS, NO_ROUTE, Decision, Metrics, MetricsView
from tests.conftest import AUDIENCE, ISSUER, FakeClock, TestKey, jwks_of, mint
from tests.support.jwks_server import JwksServer

Labels = tuple[tuple[str, str], ...]


# -- reading a scrape -----------------------------------------------------------------------
def series(metrics: Metrics, name: str) -> dict[Labels, float]:
    """Every sample called `name` in a text-format scrape, by its sorted labels."""
    body, _ = metrics.render()
    found: dict[Labels, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return series(metrics, name).get(tuple(sorted(labels.items())))


def requests(metrics: Metrics) -> dict[tuple[str, str, str, str, str], float]:
    """jwt_sidecar_requests_total as {(route, method, decision, reason, status): count}."""
    return {
        (d["route"], d["method"], d["decision"], d["reason"], d["status"]): v
        for labels, v in series(metrics, "jwt_sidecar_requests_total").items()
        for d in [dict(labels)]
    }


def by_provider(metrics: Metrics, name: str) -> dict[str, float]:
    return {dict(labels)["provider"]: v for labels, v in series(metrics, name).items()}


# -- real objects to watch ------------------------------------------------------------------
def static_provider(
    name: str, jwks: dict[str, Any], algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
) -> Provider:
    return Provider(
        name=name,
        issuers=(ISSUER,),
        audiences=(AUDIENCE,),
        algorithms=algorithms,
        keys=StaticKeys(kind="jwks_file", origin="jwks_file (test)", jwks=jwks),
    )


def remote_provider(url: str, name: str = "corp", **options: float) -> Provider:
    return Provider(
        name=name,
        issuers=(ISSUER,),
        audiences=(AUDIENCE,),
        algorithms=("RS256",),
        keys=RemoteJwks(url=url, **options),
    )


def view_of(sources: dict[str, KeySource], clock: FakeClock, cache: TokenCache | None = None) -> MetricsView:
    return MetricsView(sources=sources, cache=cache, monotonic=clock.monotonic)


@pytest.fixture
async def fetcher() -> AsyncIterator[Fetcher]:
    async with Fetcher() as client:
        yield client


@pytest.fixture
async def remote(fetcher: Fetcher, clock: FakeClock) -> AsyncIterator[Callable[..., RemoteKeySource]]:
    made: list[KeySource] = []

    def make(url: str, **options: float) -> RemoteKeySource:
        source = key_source_for(remote_provider(url, **options), fetcher=fetcher, clock=clock)
        assert isinstance(source, RemoteKeySource)
        made.append(source)
        return source

    yield make
    for source in made:
        await source.close()


# -- requests ----------------------------------------------------------------------------------
def test_requests_are_counted_per_route_decision_reason_and_status_class() -> None:
    metrics = Metrics()
    api, admin, unmatched = metrics.route("api"), metrics.route("admin"), metrics.route(NO_ROUTE)

    for _ in range(3):
        api.count("GET", Decision.ALLOWED, "", 200)
    api.count("GET", Decision.ALLOWED, "", 204)  # same status class: same series
    api.count("POST", Decision.DENIED, Reason.EXPIRED, 401)
    api.count("POST", Decision.DENIED, "expired", 401)  # a Reason or its value: one series
    api.count("GET", Decision.DENIED, Reason.NO_KEYS, 503)
    api.count("PUT", Decision.UPSTREAM_ERROR, Reason.UPSTREAM_TIMEOUT, 504)
    admin.count("DELETE", Decision.DENIED, Reason.SCOPE, 403)
    unmatched.count("GET", Decision.REJECTED, Reason.NO_ROUTE, 404)

    assert requests(metrics) == {
        ("api", "GET", "allowed", "", "2xx"): 4.0,
        ("api", "POST", "denied", "expired", "4xx"): 2.0,
        ("api", "GET", "denied", "no_keys", "5xx"): 1.0,
        ("api", "PUT", "upstream_error", "upstream_timeout", "5xx"): 1.0,
        ("admin", "DELETE", "denied", "scope", "4xx"): 1.0,
        ("(none)", "GET", "rejected", "no_route", "4xx"): 1.0,
    }


@pytest.mark.parametrize(
    ("method", "label"),
    [*((m, m) for m in METHODS), ("PROPFIND", "other"), ("get", "other"), ("", "other"), ("X" * 500, "other")],
    ids=[*METHODS, "propfind", "lower-case-get", "empty", "long"],
)
def test_method_is_one_of_the_known_methods_or_other(method: str, label: str) -> None:
    metrics = Metrics()
    metrics.route("api").count(method, Decision.ALLOWED, "", 200)
    assert requests(metrics) == {("api", label, "allowed", "", "2xx"): 1.0}


@pytest.mark.parametrize(
    ("status", "label"),
    [(101, "1xx"), (200, "2xx"), (302, "3xx"), (413, "4xx"), (502, "5xx"), (599, "5xx"), (0, "other"), (600, "other")],
    ids=lambda v: str(v),
)
def test_status_is_recorded_as_its_class(status: int, label: str) -> None:
    metrics = Metrics()
    metrics.route("api").count("GET", Decision.ALLOWED, "", status)
    assert requests(metrics) == {("api", "GET", "allowed", "", label): 1.0}


def test_repeated_counts_reuse_one_cached_child() -> None:
    metrics = Metrics()
    api = metrics.route("api")
    for _ in range(500):
        api.count("GET", Decision.DENIED, Reason.BAD_SIGNATURE, 401)
    assert requests(metrics) == {("api", "GET", "denied", "bad_signature", "4xx"): 500.0}
    assert len(api.counts) == 1
    # Unknown methods all share the one "other" child: a client cannot grow the cache.
    for verb in ("PROPFIND", "MKCOL", "BREW", "get"):
        api.count(verb, Decision.DENIED, Reason.BAD_SIGNATURE, 401)
    assert len(api.counts) == 2


def test_values_outside_the_closed_sets_are_recorded_as_other_without_growing_the_cache() -> None:
    metrics = Metrics()
    api = metrics.route("api")
    for i in range(50):
        api.count("GET", Decision.DENIED, f"/users/{i}", 401)  # a caller bug: never a label
    api.count("GET", "maybe", "", 200)  # type: ignore[arg-type]

    assert requests(metrics) == {
        ("api", "GET", "denied", "other", "4xx"): 50.0,
        ("api", "GET", "other", "", "2xx"): 1.0,
    }
    assert len(api.counts) == 2


def test_route_recorders_are_made_once_and_export_their_histograms_at_zero() -> None:
    metrics = Metrics()
    assert metrics.route("api") is metrics.route("api")
    assert metrics.route(NO_ROUTE) is not metrics.route("api")

    # Resolved at creation, so dashboards see the route before its first request.
    assert value(metrics, "jwt_sidecar_auth_duration_seconds_count", route="api") == 0.0
    assert value(metrics, "jwt_sidecar_upstream_duration_seconds_count", route="(none)") == 0.0
    assert requests(metrics) == {}


def test_auth_and_upstream_durations_land_in_their_buckets() -> None:
    metrics = Metrics()
    api = metrics.route("api")
    api.observe_auth(0.0003)
    api.observe_auth(0.00004)
    api.observe_upstream(2.0)

    auth = "jwt_sidecar_auth_duration_seconds"
    assert value(metrics, f"{auth}_bucket", route="api", le="5e-05") == 1.0
    assert value(metrics, f"{auth}_bucket", route="api", le="0.00025") == 1.0
    assert value(metrics, f"{auth}_bucket", route="api", le="0.0005") == 2.0
    assert value(metrics, f"{auth}_bucket", route="api", le="+Inf") == 2.0
    assert value(metrics, f"{auth}_count", route="api") == 2.0
    assert value(metrics, f"{auth}_sum", route="api") == pytest.approx(0.00034)

    upstream = "jwt_sidecar_upstream_duration_seconds"
    assert value(metrics, f"{upstream}_bucket", route="api", le="1.0") == 0.0
    assert value(metrics, f"{upstream}_bucket", route="api", le="2.5") == 1.0
    assert value(metrics, f"{upstream}_bucket", route="api", le="30.0") == 1.0
    assert value(metrics, f"{upstream}_sum", route="api") == 2.0
    # The two histograms are separate: auth timings never reach the upstream one.
    assert value(metrics, f"{upstream}_count", route="api") == 1.0


def test_a_duration_on_a_bound_counts_in_that_bucket_and_beyond_the_last_in_inf_only() -> None:
    # Prometheus buckets are `le`: a value equal to a bound belongs to it.
    metrics = Metrics()
    api = metrics.route("api")
    api.observe_auth(0.001)
    api.observe_auth(5.0)
    auth = "jwt_sidecar_auth_duration_seconds"
    assert value(metrics, f"{auth}_bucket", route="api", le="0.0005") == 0.0
    assert value(metrics, f"{auth}_bucket", route="api", le="0.001") == 1.0
    assert value(metrics, f"{auth}_bucket", route="api", le="1.0") == 1.0
    assert value(metrics, f"{auth}_bucket", route="api", le="+Inf") == 2.0
    assert value(metrics, f"{auth}_count", route="api") == 2.0


def test_in_flight_goes_up_and_down() -> None:
    metrics = Metrics()
    assert value(metrics, "jwt_sidecar_in_flight_requests") == 0.0
    metrics.in_flight += 1
    metrics.in_flight += 1
    assert value(metrics, "jwt_sidecar_in_flight_requests") == 2.0
    metrics.in_flight -= 1
    assert value(metrics, "jwt_sidecar_in_flight_requests") == 1.0


def test_reloads_are_counted_by_result_both_present_from_the_start() -> None:
    metrics = Metrics()
    name = "jwt_sidecar_config_reloads_total"
    assert series(metrics, name) == {(("result", "success"),): 0.0, (("result", "failure"),): 0.0}
    metrics.count_reload(True)
    metrics.count_reload(False)
    metrics.count_reload(False)
    assert series(metrics, name) == {(("result", "success"),): 1.0, (("result", "failure"),): 2.0}


def test_two_instances_share_nothing_and_never_touch_the_default_registry() -> None:
    first, second = Metrics(), Metrics()
    assert first.registry is not second.registry
    first.route("api").count("GET", Decision.ALLOWED, "", 200)
    first.in_flight += 1
    first.count_reload(True)

    assert requests(first) == {("api", "GET", "allowed", "", "2xx"): 1.0}
    assert requests(second) == {}
    assert value(second, "jwt_sidecar_in_flight_requests") == 0.0
    assert value(second, "jwt_sidecar_config_reloads_total", result="success") == 0.0
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "jwt_sidecar_" not in default


# -- key sources and the token cache, read at scrape time --------------------------------------
async def test_static_providers_export_keys_and_readiness_but_no_fetches(
    clock: FakeClock, rsa_key: TestKey, ec_key: TestKey, ed_key: TestKey
) -> None:
    good = key_source_for(static_provider("local", jwks_of(rsa_key, ec_key, ed_key)), fetcher=None, clock=clock)
    # An HS-only provider given an RSA key: nothing usable, so not ready, and the key skipped.
    empty = key_source_for(static_provider("hs", jwks_of(rsa_key), algorithms=("HS256",)), fetcher=None, clock=clock)
    metrics = Metrics()
    metrics.watch(lambda: view_of({"local": good, "hs": empty}, clock))
    clock.advance(3600)

    assert by_provider(metrics, "jwt_sidecar_provider_ready") == {"local": 1.0, "hs": 0.0}
    assert by_provider(metrics, "jwt_sidecar_jwks_keys") == {"local": 3.0, "hs": 0.0}
    assert by_provider(metrics, "jwt_sidecar_jwks_keys_skipped_total") == {"local": 0.0, "hs": 1.0}
    # Static keys are never fetched: no fetch counts, and no age to alert on.
    for name in (
        "jwt_sidecar_jwks_fetches_total",
        "jwt_sidecar_jwks_fetch_failures_total",
        "jwt_sidecar_jwks_discovery_fetches_total",
        "jwt_sidecar_jwks_age_seconds",
    ):
        assert series(metrics, name) == {}, name


async def test_remote_provider_exports_fetches_failures_and_the_age_of_its_keys(
    jwks_server: JwksServer, remote: Callable[..., RemoteKeySource], clock: FakeClock, rsa_key: TestKey
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    source = remote(jwks_server.url())
    await source.start()
    metrics = Metrics()
    metrics.watch(lambda: view_of({"corp": source}, clock))

    assert by_provider(metrics, "jwt_sidecar_jwks_fetches_total") == {"corp": 1.0}
    assert by_provider(metrics, "jwt_sidecar_jwks_fetch_failures_total") == {"corp": 0.0}
    assert by_provider(metrics, "jwt_sidecar_jwks_discovery_fetches_total") == {"corp": 0.0}
    assert by_provider(metrics, "jwt_sidecar_jwks_keys") == {"corp": 1.0}
    assert by_provider(metrics, "jwt_sidecar_provider_ready") == {"corp": 1.0}
    assert by_provider(metrics, "jwt_sidecar_jwks_age_seconds") == {"corp": 0.0}

    # The issuer breaks; an unknown kid, past the rate limit, costs one failed refetch.
    jwks_server.mode = "fail"
    clock.advance(42)
    with pytest.raises(InvalidToken):
        await source.key_for("rotated-away", "RS256")

    assert by_provider(metrics, "jwt_sidecar_jwks_fetches_total") == {"corp": 2.0}
    assert by_provider(metrics, "jwt_sidecar_jwks_fetch_failures_total") == {"corp": 1.0}
    assert by_provider(metrics, "jwt_sidecar_provider_ready") == {"corp": 1.0}  # last good keys kept
    assert by_provider(metrics, "jwt_sidecar_jwks_age_seconds") == {"corp": 42.0}


async def test_a_provider_that_never_loaded_keys_has_no_age_and_is_not_ready(
    jwks_server: JwksServer, remote: Callable[..., RemoteKeySource], clock: FakeClock
) -> None:
    jwks_server.mode = "fail"
    source = remote(jwks_server.url())
    await source.start()
    metrics = Metrics()
    metrics.watch(lambda: view_of({"corp": source}, clock))

    assert by_provider(metrics, "jwt_sidecar_provider_ready") == {"corp": 0.0}
    assert by_provider(metrics, "jwt_sidecar_jwks_fetch_failures_total") == {"corp": 1.0}
    assert series(metrics, "jwt_sidecar_jwks_age_seconds") == {}


async def test_fetch_counters_never_go_down_while_a_failing_fetch_is_in_flight(
    jwks_server: JwksServer, remote: Callable[..., RemoteKeySource], clock: FakeClock, rsa_key: TestKey
) -> None:
    # KeySource counts an attempt when it starts and a failure when it ends. A "success"
    # series derived as attempts - failures would read 2 mid-fetch and 1 after it failed,
    # which Prometheus takes for a counter reset; attempts and failures each only grow.
    jwks_server.document = jwks_of(rsa_key)
    source = remote(jwks_server.url(), timeout=0.3)
    await source.start()
    metrics = Metrics()
    metrics.watch(lambda: view_of({"corp": source}, clock))
    jwks_server.mode, jwks_server.delay = "slow", 1.0
    clock.advance(60)

    refetch = asyncio.create_task(source.key_for("rotated-away", "RS256"))
    while source.fetches < 2:
        await asyncio.sleep(0.01)
    during = (
        by_provider(metrics, "jwt_sidecar_jwks_fetches_total"),
        by_provider(metrics, "jwt_sidecar_jwks_fetch_failures_total"),
    )
    with pytest.raises(InvalidToken):
        await refetch
    after = (
        by_provider(metrics, "jwt_sidecar_jwks_fetches_total"),
        by_provider(metrics, "jwt_sidecar_jwks_fetch_failures_total"),
    )
    jwks_server.delay = 0.0  # let the server's sleeping handler be quick about it

    assert during == ({"corp": 2.0}, {"corp": 0.0})
    assert after == ({"corp": 2.0}, {"corp": 1.0})


async def test_token_cache_hits_misses_and_entries(clock: FakeClock, rsa_key: TestKey) -> None:
    provider = static_provider("local", jwks_of(rsa_key))
    cache = TokenCache(TokenCacheSettings(max_entries=10, max_ttl=60.0), clock)
    source = key_source_for(provider, fetcher=None, clock=clock)
    verifier = Verifier(provider, source, clock=clock, cache=cache)
    metrics = Metrics()
    metrics.watch(lambda: view_of({"local": source}, clock, cache))
    name = "jwt_sidecar_token_cache_requests_total"
    assert series(metrics, name) == {(("result", "hit"),): 0.0, (("result", "miss"),): 0.0}
    assert value(metrics, "jwt_sidecar_token_cache_entries") == 0.0

    first, second = mint(key=rsa_key, now=clock.time()), mint({"sub": "other"}, key=rsa_key, now=clock.time())
    for token in (first, first, first, second):
        await verifier.verify(token)

    assert series(metrics, name) == {(("result", "hit"),): 2.0, (("result", "miss"),): 2.0}
    assert value(metrics, "jwt_sidecar_token_cache_entries") == 2.0


def test_no_token_cache_means_no_cache_samples(clock: FakeClock) -> None:
    metrics = Metrics()
    metrics.watch(lambda: view_of({}, clock, cache=None))
    assert series(metrics, "jwt_sidecar_token_cache_requests_total") == {}
    assert series(metrics, "jwt_sidecar_token_cache_entries") == {}


def test_the_view_is_read_again_at_every_scrape(clock: FakeClock, rsa_key: TestKey, ec_key: TestKey) -> None:
    # What a hot reload does: the running snapshot, and with it the key ring, is swapped.
    old = {"old": key_source_for(static_provider("old", jwks_of(rsa_key)), fetcher=None, clock=clock)}
    new = {"new": key_source_for(static_provider("new", jwks_of(rsa_key, ec_key)), fetcher=None, clock=clock)}
    current = [old]
    metrics = Metrics()
    metrics.watch(lambda: view_of(current[0], clock))
    assert by_provider(metrics, "jwt_sidecar_jwks_keys") == {"old": 1.0}

    current[0] = new
    assert by_provider(metrics, "jwt_sidecar_jwks_keys") == {"new": 2.0}


def test_watching_again_replaces_the_view_and_registers_once(clock: FakeClock, rsa_key: TestKey) -> None:
    source = key_source_for(static_provider("local", jwks_of(rsa_key)), fetcher=None, clock=clock)
    metrics = Metrics()
    metrics.watch(lambda: view_of({"first": source}, clock))
    metrics.watch(lambda: view_of({"second": source}, clock))  # a second register would raise

    assert by_provider(metrics, "jwt_sidecar_provider_ready") == {"second": 1.0}
    body, _ = metrics.render()
    assert body.decode().count("# TYPE jwt_sidecar_provider_ready gauge") == 1


# -- a scrape never breaks -----------------------------------------------------------------------
class _Raises:
    """Any attribute read raises, as a half-swapped object might."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"{name} is gone")


class _OddSource:
    """A key-source-like object whose numbers are not numbers."""

    keyset = None
    skipped = "three"
    fetches = math.nan
    failures = True  # a bool is not a count
    discovery_fetches = -1
    last_success = "yesterday"

    @property
    def ready(self) -> bool:
        raise RuntimeError("swapped mid-scrape")


class _OddCache:
    hits = 5
    misses = None

    def __len__(self) -> int:
        raise RuntimeError("evicting")


def _raise() -> MetricsView:
    raise RuntimeError("no snapshot yet")


def _raising_clock() -> float:
    raise RuntimeError("clock")


BROKEN_VIEWS: dict[str, Callable[[dict[str, KeySource], FakeClock], Any]] = {
    "view-raises": lambda good, clock: _raise,
    "view-returns-none": lambda good, clock: lambda: None,
    "view-returns-a-string": lambda good, clock: lambda: "view",
    "sources-not-a-mapping": lambda good, clock: (
        lambda: MetricsView(sources=[1, 2], cache=None, monotonic=clock.monotonic)
    ),  # type: ignore[arg-type]
    "sources-raise-on-read": lambda good, clock: (
        lambda: MetricsView(sources=_Raises(), cache=_Raises(), monotonic=clock.monotonic)
    ),  # type: ignore[arg-type]
    "odd-source-beside-a-good-one": lambda good, clock: (
        lambda: MetricsView(
            sources={**good, "odd": _OddSource(), "gone": _Raises(), "none": None},  # type: ignore[dict-item]
            cache=_OddCache(),
            monotonic=clock.monotonic,
        )
    ),  # type: ignore[arg-type]
    "clock-raises": lambda good, clock: lambda: MetricsView(sources=good, cache=None, monotonic=_raising_clock),
}


@pytest.mark.parametrize("make_view", BROKEN_VIEWS.values(), ids=BROKEN_VIEWS.keys())
def test_a_broken_view_never_breaks_the_scrape(
    make_view: Callable[[dict[str, KeySource], FakeClock], Any], clock: FakeClock, rsa_key: TestKey
) -> None:
    good: dict[str, KeySource] = {
        "local": key_source_for(static_provider("local", jwks_of(rsa_key)), fetcher=None, clock=clock)
    }
    metrics = Metrics()
    metrics.route("api").count("GET", Decision.ALLOWED, "", 200)
    metrics.watch(make_view(good, clock))

    body, content_type = metrics.render()  # must not raise

    assert content_type.startswith("text/plain")
    assert requests(metrics) == {("api", "GET", "allowed", "", "2xx"): 1.0}
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"jwt_sidecar_provider_ready", "jwt_sidecar_jwks_keys", "jwt_sidecar_token_cache_entries"} <= families


def test_odd_values_drop_single_samples_and_keep_the_good_ones(clock: FakeClock, rsa_key: TestKey) -> None:
    good = key_source_for(static_provider("local", jwks_of(rsa_key)), fetcher=None, clock=clock)
    metrics = Metrics()
    metrics.watch(BROKEN_VIEWS["odd-source-beside-a-good-one"]({"local": good}, clock))

    assert by_provider(metrics, "jwt_sidecar_provider_ready") == {"local": 1.0}
    assert by_provider(metrics, "jwt_sidecar_jwks_keys") == {"local": 1.0}
    # -1 is a number, so it is shown as it is: the collector filters junk, it does not judge.
    assert by_provider(metrics, "jwt_sidecar_jwks_discovery_fetches_total") == {"odd": -1.0}
    assert series(metrics, "jwt_sidecar_jwks_fetches_total") == {}  # NaN is dropped
    assert series(metrics, "jwt_sidecar_jwks_fetch_failures_total") == {}  # so is a bool
    assert series(metrics, "jwt_sidecar_token_cache_requests_total") == {(("result", "hit"),): 5.0}
    assert series(metrics, "jwt_sidecar_token_cache_entries") == {}


def test_a_failing_view_is_logged_once_as_a_warning_then_quietly(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    metrics.watch(_raise)
    with caplog.at_level(logging.DEBUG, logger="proxy.metrics"):
        for _ in range(3):
            metrics.render()
    levels = [r.levelno for r in caplog.records if r.name == "proxy.metrics"]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


# -- rendering ----------------------------------------------------------------------------------
def test_render_defaults_to_the_text_format() -> None:
    body, content_type = Metrics().render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# TYPE jwt_sidecar_requests_total counter" in body


def test_render_speaks_openmetrics_when_asked() -> None:
    metrics = Metrics()
    metrics.route("api").count("GET", Decision.ALLOWED, "", 200)
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0, text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    sample = b'jwt_sidecar_requests_total{decision="allowed",method="GET",reason="",route="api",status="2xx"} 1.0'
    assert sample in body


def test_a_cell_counts_into_the_same_series_as_count_at_scrape_time() -> None:
    metrics = Metrics()
    api = metrics.route("api")
    api.count("GET", Decision.DENIED, "token_missing", 401)
    cell = api.cell("GET", Decision.DENIED, "token_missing", 401)
    assert api.cell("GET", Decision.DENIED, "token_missing", 403) is api.cell(
        "GET", Decision.DENIED, "token_missing", 401
    )
    cell.n += 2
    other = api.cell("BREW", "bogus", "nonsense", 999)  # type: ignore[arg-type]
    other.n += 1
    assert api.totals() == {
        ("GET", "denied", "token_missing", "4xx"): 3,
        ("other", "other", "other", "other"): 1,
    }
    text = metrics.render()[0].decode()
    assert 'requests_total{decision="denied",method="GET",reason="token_missing",route="api",status="4xx"} 3.0' in text
    unused = metrics.route("quiet")
    unused.cell("GET", Decision.ALLOWED, "", 200)
    assert 'route="quiet"' not in metrics.render()[0].decode().split("auth_duration")[0], (
        "no series for a cell never added to"
    )
    with pytest.raises(TypeError):
        metrics.route_provider("api", "main").cell("GET", Decision.DENIED, "token_missing", 401)
