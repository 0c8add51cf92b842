"""Everything built from one config, and the one holder a reload swaps it in.

Owns: `Snapshot` — the router, the strip plan, and for each route a `RoutePlan` with its
resolved upstream, token sources, header map and its renderer (one per header map, shared by
the routes that use it), verifier, compiled CORS policy, the revocation list it checks (or
None) and metric children (a route with `providers:`: one such plan per provider, by issuer,
which the token's `iss` chooses) — built once per config so the request path does no lookups or
parsing; and `Runtime`, the process-wide
holder (key fetcher, clock, metrics, the revocation list's follower, the current
snapshot, draining flag, readiness, which a reload never takes away).
Does not own: reading config files (config/builder.py, reload.py) or handling requests (pipeline.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from ..auth.keys import KeyRing
from ..auth.revocationstore import Revocations
from ..auth.rules import claims_read
from ..auth.verify import TokenCache, Verifier, issuers_in_words
from ..base.clock import Clock
from ..base.memo import Memo
from ..config.routing import Router
from ..config.settings import CorsSettings, HeaderMap, Route, Settings, TokenSource, Upstream
from ..http.fetch import Fetcher
from ..http.upstream import Pool
from ..telemetry.accesslog import AccessLog
from ..telemetry.metrics import NO_ROUTE, Metrics, MetricsView, RouteMetrics
from .cors import CorsPolicy
from .identity import Renderer, StripPlan

__all__ = ["Origin", "RoutePlan", "Runtime", "Snapshot", "build_snapshot"]


# An http(s) URL yarl reads as written (the host lower-cased): a host name or IPv4 address of
# letters, digits, '-' and '.', a port, a path of the characters its path quoter leaves alone.
_PLAIN_URL = re.compile(
    r"(https?)://([A-Za-z0-9][A-Za-z0-9.-]*)(?::([0-9]{1,5}))?((?:/[A-Za-z0-9._~!$'()*,+&=;@:-]*)*)"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a route's upstream lives, parsed once per config."""

    scheme: str
    host: str
    port: int
    base_path: str
    """The upstream URL's path without its trailing slash; the request path is appended."""

    @classmethod
    def parse(cls, url: str) -> Origin:
        """The origin as yarl's `URL(url)` reads it (`scheme`, `host`, `port or 80`, `raw_path`
        less its trailing '/'). A plain URL (`_PLAIN_URL`, no '.' or '..' segment) is one yarl
        leaves as written but for the host's case, and is read here: importing yarl cost every
        process 0.6 MiB, with multidict (http1.py's `query_pairs` says more). Any other (%-escapes, characters yarl
        quotes, dot segments, userinfo, IPv6, an international or punycode host) is yarl's,
        imported then, once per config: yarl stays installed as aiohttp's dependency.
        tests/unit/request/test_origin_differential.py holds the two together."""
        plain = _PLAIN_URL.fullmatch(url)
        if (
            plain is None
            or int(plain[3] or 0) > 65535  # yarl's ValueError
            or "xn--" in url.lower()
            or any(s in (".", "..") for s in url.split("/")[3:])
        ):
            from yarl import URL  # noqa: PLC0415 - the rare URL only: see above

            parts = URL(url)
            return cls(parts.scheme, parts.host or "", parts.port or 80, parts.raw_path.rstrip("/"))
        scheme, host, port, path = plain.groups()
        return cls(scheme, host.lower(), int(port or _DEFAULT_PORTS[scheme]) or 80, path.rstrip("/"))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RoutePlan:
    route: Route
    upstream: Upstream
    origin: Origin
    """Where the upstream lives; the normalised path is appended to its base path as is."""
    sources: tuple[TokenSource, ...]
    header_map: HeaderMap | None
    renderer: Renderer | None
    """The header map's identity headers per verified token; None without a header map."""
    forward_token: bool
    """The header map's `forward_token`: the token goes on to the upstream as it came."""
    verifier: Verifier | None
    """None on a public route."""
    metrics: RouteMetrics
    missing: str
    """The log detail of a `TokenMissing` here ("no token in bearer, cookie"), built once."""
    guarded: bool = False
    """Whether the route has auth (`auth:` other than `none`): then the client's Authorization
    reaches the upstream only as the checked, forwarded token (identity.upstream_fields)."""
    reads_query: bool = False
    """Whether a token source is the query string: only then are its parameters parsed."""
    bearer_only: bool = False
    """Whether the route's one token source is Bearer: then a request with no Authorization line
    has no token, and one with one line has at most that one (pipeline.py looks no further)."""
    needs_bearer: bool = False
    """`bearer_only` on a route that needs a token, in enforce mode: a request with no
    Authorization field is a 401 whatever else it holds (pipeline.py tells it first)."""
    cors: CorsPolicy | None = None
    """The route's CORS policy (its own `cors` or the top-level one); None: no CORS, and
    nothing on this route's path costs more than this one test."""
    report: bool = False
    """`auth.mode: report`: a refusal of the token checks is a `would_deny`, forwarded without
    identity (pipeline.py); read only once a check has refused, so enforce mode pays nothing."""
    revocation: Revocations | None = None
    """The revocation list this route checks every token against (cached ones too); None: no
    `revocation:`, or the route or its provider opts out, and the check is this one test."""
    by_issuer: Mapping[str, RoutePlan] | None = None
    """A route with `providers:`: for each issuer its providers accept, the plan of the
    provider accepting it (that provider's verifier, header map and renderer; the rest the
    route's), which the token's `iss` chooses (pipeline.py); this plan has no verifier.
    None on every other route."""
    accepted: str = ""
    """With `by_issuer`: the issuers each provider accepts, in words, for a refusal's detail."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    settings: Settings
    router: Router
    plans: Mapping[str, RoutePlan]
    strip: StripPlan
    keyring: KeyRing
    cache: TokenCache | None
    unmatched: RouteMetrics
    providers_in_use: frozenset[str]
    cors: bool = False
    """Whether any route has CORS: without, no request is looked at as a preflight."""
    refusals: Memo[tuple[str, str], Any] = field(
        default_factory=lambda: Memo(512), init=False, compare=False, repr=False
    )
    """app.py's prepared refusals by (method, request target), for this config's routes: what
    they hold is app.py's (`app._Quick`); here so that a reload starts afresh."""
    forwards: Memo[tuple[str, str], Any] = field(
        default_factory=lambda: Memo(512), init=False, compare=False, repr=False
    )
    """pipeline.py's prepared forwards by (method, request target) (`pipeline.ForwardPlan`):
    here, as `refusals`, so that none outlives the config it was prepared under."""
    answered: Memo[tuple[Any, ...], Any] = field(
        default_factory=lambda: Memo(1024), init=False, compare=False, repr=False
    )
    """app.py's prepared records of forwarded answers by (route plan's metrics, method, status,
    decision, reason): what they hold is app.py's (`app._Answered`); here so that a reload starts afresh."""


def build_snapshot(
    settings: Settings, *, keyring: KeyRing, clock: Clock, metrics: Metrics, revocation: Revocations | None = None
) -> Snapshot:
    # A fresh cache per config: a token verified under the old rules (audiences, leeway…)
    # must be verified again under the new ones.
    cache = TokenCache(settings.token_cache, clock) if settings.token_cache.enabled else None
    verifiers = {
        name: Verifier(
            provider,
            keyring[name],
            clock=clock,
            cache=cache,
            max_token_bytes=settings.max_token_bytes,
            keep=claims_read(settings, name),
        )
        for name, provider in settings.providers.items()
    }
    plans: dict[str, RoutePlan] = {}
    # One compiled policy per `cors` section: every route that inherits the top-level one shares it.
    policies: dict[int, CorsPolicy] = {}

    def compiled(cors: CorsSettings | None) -> CorsPolicy | None:
        if cors is None:
            return None
        found = policies.get(id(cors))
        if found is None:
            found = policies[id(cors)] = CorsPolicy(cors)
        return found

    # One renderer per header map, keyed by the map object: routes that share their
    # provider's map share its renderings.
    renderers: dict[int, Renderer] = {}
    remembered = settings.token_cache.max_entries if cache is not None else 0
    for route in settings.routes:
        if route.auth is not None and route.auth.providers:
            plans[route.name] = _several(
                route, settings, verifiers, renderers, remembered, metrics, compiled, revocation
            )
            continue
        upstream = route.upstream or settings.upstream
        provider = settings.providers[route.auth.provider] if route.auth is not None else None
        sources = route.token_sources or (provider.token_sources if provider else ())
        header_map = route.headers or (provider.headers if provider else None)
        renderer = None
        if header_map is not None:
            renderer = renderers.get(id(header_map))
            if renderer is None:
                renderer = renderers[id(header_map)] = Renderer(header_map, remembered)
        plans[route.name] = RoutePlan(
            route=route,
            upstream=upstream,
            origin=Origin.parse(upstream.url),
            sources=sources,
            header_map=header_map,
            renderer=renderer,
            forward_token=header_map is not None and header_map.forward_token,
            verifier=verifiers[provider.name] if provider else None,
            guarded=route.auth is not None,
            metrics=metrics.route(route.name),
            missing="no token in " + ", ".join(source.kind for source in sources),
            reads_query=any(source.kind == "query" for source in sources),
            bearer_only=len(sources) == 1 and sources[0].kind == "bearer",
            needs_bearer=route.auth is not None
            and not route.auth.optional
            and route.auth.mode != "report"
            and all(source.kind == "bearer" for source in sources),
            cors=compiled(route.cors),
            report=route.auth is not None and route.auth.mode == "report",
            revocation=revocation
            if provider is not None and route.auth is not None and route.auth.revocation and provider.revocation
            else None,
        )
    return Snapshot(
        settings=settings,
        router=Router(settings.routes),
        plans=MappingProxyType(plans),
        strip=StripPlan.build(settings),
        keyring=keyring,
        cache=cache,
        unmatched=metrics.route(NO_ROUTE),
        # A provider only report-mode routes use does not hold readiness back: without keys,
        # its requests are would_deny (no_keys) and still served.
        providers_in_use=frozenset(
            name for r in settings.routes if r.auth is not None and r.auth.mode != "report" for name in r.auth.names
        ),
        cors=any(plan.cors is not None for plan in plans.values()),
    )


def _several(
    route: Route,
    settings: Settings,
    verifiers: Mapping[str, Verifier],
    renderers: dict[int, Renderer],
    remembered: int,
    metrics: Metrics,
    compiled: Callable[[CorsSettings | None], CorsPolicy | None],
    revocation: Revocations | None,
) -> RoutePlan:
    """The plan of a route with `providers:`, and one per provider that the token's `iss`
    chooses: each the route's (upstream, metrics, CORS, token sources) with that provider's
    verifier, header map and renderer, as a `provider:` route of that provider would have."""
    assert route.auth is not None
    upstream = route.upstream or settings.upstream
    providers = [settings.providers[name] for name in route.auth.providers]
    # The builder made the providers' sources the same, or the route says where to look.
    sources = route.token_sources or providers[0].token_sources
    base = RoutePlan(
        route=route,
        upstream=upstream,
        origin=Origin.parse(upstream.url),
        sources=sources,
        header_map=None,
        renderer=None,
        forward_token=False,
        verifier=None,
        guarded=True,
        metrics=metrics.route(route.name),
        missing="no token in " + ", ".join(source.kind for source in sources),
        reads_query=any(source.kind == "query" for source in sources),
        bearer_only=len(sources) == 1 and sources[0].kind == "bearer",
        needs_bearer=not route.auth.optional
        and route.auth.mode != "report"
        and all(source.kind == "bearer" for source in sources),
        cors=compiled(route.cors),
        report=route.auth.mode == "report",
    )
    by_issuer: dict[str, RoutePlan] = {}
    for provider in providers:
        header_map = route.headers or provider.headers
        renderer = renderers.get(id(header_map))
        if renderer is None:
            renderer = renderers[id(header_map)] = Renderer(header_map, remembered)
        chosen = replace(
            base,
            header_map=header_map,
            renderer=renderer,
            forward_token=header_map.forward_token,
            verifier=verifiers[provider.name],
            metrics=metrics.route_provider(route.name, provider.name),
            # each provider's own opt-out, as on a `provider:` route of it
            revocation=revocation if route.auth.revocation and provider.revocation else None,
        )
        for issuer in provider.issuers:  # disjoint across the route's providers (the builder checks)
            by_issuer[issuer] = chosen
    return replace(base, by_issuer=MappingProxyType(by_issuer), accepted=issuers_in_words(providers))


@dataclass(eq=False)
class Runtime:
    """The process-wide state. `snapshot` is replaced whole by a reload, never edited."""

    settings: Settings
    clock: Clock
    metrics: Metrics = field(default_factory=Metrics)
    config_path: str | None = None
    fetcher: Fetcher | None = None
    """The client of key fetches (JWKS, OIDC discovery), on a pool of its own."""
    pool: Pool | None = None
    """The pooled HTTP/1.1 client every proxied request goes through."""
    snapshot: Snapshot | None = None
    draining: bool = False
    was_ready: bool = False
    """Set the first time `readiness` finds every provider in use with keys (see there)."""
    access_log: AccessLog | None = None
    """None when the access log is off (or in tests that do not read it)."""
    revocation: Revocations | None = None
    """The revocation list's follower, one per process, outside the snapshot (a reload keeps it
    unless `revocation:` changed); each snapshot's route plans point at the one they check."""
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("jwt_sidecar"))

    def __post_init__(self) -> None:
        self.metrics.watch(self._view)

    def _view(self) -> MetricsView:
        snap = self.snapshot
        return MetricsView(
            sources=snap.keyring.sources if snap else {},
            cache=snap.cache if snap else None,
            monotonic=self.clock.monotonic,
            revocation=self.revocation,
        )

    def readiness(self) -> tuple[bool, str]:
        """Ready when not draining, every provider a route uses holds keys, and the revocation
        list is current enough (only `fail: closed` makes that a condition).

        Once ready, only draining makes the sidecar unready: a source never loses the keys
        it has, a replaced one serves until its successor has keys, and a provider that a
        reload added without keys yet costs its own routes a 503 each, not the whole pod
        its traffic (every pod of a fleet reloads the same config at once).
        """
        if self.draining:
            return False, "draining: shutting down"
        snap = self.snapshot
        if snap is None:
            return False, "starting: config not loaded"
        # `fail: closed` and a list too old: not ready whatever came before, with the store's reason.
        stale = self.revocation.ready() if self.revocation is not None else None
        if stale is not None:
            return False, stale
        missing = sorted(name for name in snap.providers_in_use if not snap.keyring[name].ready)
        if missing:
            if self.was_ready:
                return True, f"ready, but no signing keys yet for provider(s): {', '.join(missing)}"
            return False, f"no signing keys yet for provider(s): {', '.join(missing)}"
        self.was_ready = True
        return True, "ready"
