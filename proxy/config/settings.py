"""The settings a config file turns into: frozen, typed dataclasses, and nothing that builds them.

Owns: the shape of every setting the running sidecar reads (providers, routes, upstreams,
limits), their defaults, and the docstrings the README's reference is written from. Does
not own: reading or checking a config file (config/builder.py builds these and reports mistakes;
routecheck.py judges the route table as a whole), or anything that runs per request.

Apart from config/builder.py so that the modules that only read settings (routing.py, routecheck.py)
need not import the builder, and the builder can run the route-table check without an
import cycle.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..base.errors import ConfigIssue
from ..http.causes import shown

__all__ = [
    "BEARER",
    "ORIGIN",
    "ClaimHeader",
    "ClaimRule",
    "CorsSettings",
    "HeaderMap",
    "Listen",
    "Provider",
    "RedisStore",
    "RemoteJwks",
    "RevocationSettings",
    "Route",
    "RouteAuth",
    "RouteMatch",
    "ScopeRule",
    "Settings",
    "StaticKeys",
    "StripSettings",
    "TokenCacheSettings",
    "TokenSource",
    "Upstream",
    "WebSocketSettings",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteJwks:
    """Keys fetched over HTTP: a JWKS URL, or one found by OIDC discovery."""

    url: str | None = None
    """The JWKS URL; None when `discovery_url` is used to find it."""
    discovery_url: str | None = None
    """OpenID Connect discovery document whose `jwks_uri` names the JWKS."""
    cache_ttl: float = 300.0
    """How long a fetched key set counts as fresh; it is refreshed before this runs out."""
    min_refresh_interval: float = 30.0
    """Least time between two refetches caused by unknown `kid`s (a flood costs one fetch)."""
    timeout: float = 5.0
    """Total time allowed for one fetch."""

    @property
    def origin(self) -> str:
        # Shown in logs and messages: a password in the URL never is.
        return f"discovery {shown(self.discovery_url)}" if self.discovery_url else f"jwks {shown(self.url or '')}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticKeys:
    """Keys read once from a file or the environment: a JWKS file, a PEM key or an HS secret."""

    kind: str
    """`jwks_file`, `pem_file` or `secret`."""
    origin: str
    """Where they came from, for summaries and logs (never the key itself)."""
    jwks: Mapping[str, Any] = field(repr=False)
    """The keys as a JWK Set document."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenSource:
    """Where a token may be found in a request."""

    kind: str
    """`bearer` (Authorization: Bearer), `header`, `cookie` or `query`."""
    name: str = "Authorization"
    """The header, cookie or query parameter name."""
    prefix: str = ""
    """For `header`: a prefix the value must start with (stripped), e.g. `Token `."""


BEARER = TokenSource(kind="bearer")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimHeader:
    claim: str
    path: tuple[str, ...]
    header: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMap:
    """What the upstream is told about a verified caller."""

    claims: tuple[ClaimHeader, ...] = (ClaimHeader(claim="sub", path=("sub",), header="X-User-Id"),)
    """Claim → header; lists are joined with `,`, objects sent as JSON."""
    payload: str | None = None
    """A header that carries the whole verified payload as base64url JSON."""
    forward_token: bool = False
    """Keep the token where it came from (stripped by default)."""
    provider: str | None = None
    """A header naming the provider that admitted the request (its name in the config), e.g.
    `X-Auth-Provider`: on a route with `providers:`, which issuer's token this was."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Provider:
    """One token issuer we trust, how its tokens are checked, and where its keys come from."""

    name: str
    issuers: tuple[str, ...]
    """Accepted `iss` values, compared as exact strings (RFC 7519 §4.1.1)."""
    audiences: tuple[str, ...]
    """The token's `aud` must contain at least one of these (RFC 7519 §4.1.3)."""
    algorithms: tuple[str, ...]
    """Allow-list of `alg` values; default by key source. `none` is never allowed."""
    keys: RemoteJwks | StaticKeys
    leeway: float = 30.0
    """Clock skew tolerated on exp, nbf and iat, in seconds."""
    required_claims: tuple[str, ...] = ("exp",)
    """Claims every token must carry (iss and aud are always required)."""
    max_token_age: float | None = None
    """Optional cap on a token's lifetime, `exp - iat`, in seconds (needs both claims)."""
    typ: str | None = None
    """Required `typ` header, e.g. `at+jwt` (RFC 9068 §2.1); compared case-insensitively."""
    token_sources: tuple[TokenSource, ...] = (BEARER,)
    """Where this provider's tokens are looked for; more than one found is a 400."""
    headers: HeaderMap = HeaderMap()
    revocation: bool = True
    """`revocation: false`: this provider's tokens are not checked against the revocation list."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimRule:
    """One condition on a claim: `claim` is a dotted path into the payload."""

    claim: str
    path: tuple[str, ...]
    op: str
    """One of equals, one_of, contains, matches, present."""
    value: Any = None
    """The operand: a value, a tuple for one_of, a compiled pattern for matches."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScopeRule:
    """Scopes the token must grant: every one of `all_of` and at least one of `any_of`."""

    all_of: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteAuth:
    provider: str
    optional: bool = False
    """Validate a token when one is present, let the request through when none is."""
    scopes: ScopeRule = ScopeRule()
    claims: tuple[ClaimRule, ...] = ()
    revocation: bool = True
    """`revocation: false`: this route does not check tokens against the revocation list."""
    mode: str = "enforce"
    """`enforce` (refuse what fails a check) or `report`: every check runs, but a refusal is
    only logged and counted (decision `would_deny`) and the request goes on without identity
    headers (request/pipeline.py)."""
    providers: tuple[str, ...] = ()
    """`providers: [A, B]`: the providers whose tokens this route accepts, the token's `iss`
    choosing one (their issuers are disjoint: the builder refuses an overlap); `provider` is
    then "". Empty for `provider: NAME`."""

    @property
    def names(self) -> tuple[str, ...]:
        """Every provider this route accepts tokens of, in the config's order."""
        return self.providers or (self.provider,)


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteMatch:
    path_prefix: str | None = None
    path_exact: str | None = None
    path_regex: re.Pattern[str] | None = None
    methods: frozenset[str] | None = None
    """None means every method."""
    ignore_case: bool = False
    """Match the path case-insensitively (for upstreams that fold case); it is sent as is."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    url: str = "http://127.0.0.1:8000"
    """Where allowed requests go: scheme, host, port and an optional base path."""
    connect_timeout: float = 2.0
    timeout: float = 30.0
    """Longest wait for the upstream's answer, and between two reads of its body."""
    max_body: int = 10 * 1000**2
    """Largest request body accepted; larger is a 413 (0 means no limit)."""
    body_timeout: float = 60.0
    """Longest time a client may take to send a whole request body: the waits for its bytes,
    added up (the time the upstream takes to read them does not count). Then 408 and the
    upstream request is aborted. `timeout` bounds each wait for body bytes; this their sum."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSocketSettings:
    """How long a WebSocket tunnel may stay open (the frames are never parsed)."""

    idle_timeout: float = 300.0
    """Close the tunnel after this long without a byte either way (0: never)."""
    max_lifetime: float = 86400.0
    """Close the tunnel this long after the upgrade, whatever passes through it (0: never)."""
    close_on_token_expiry: bool = False
    """Close the tunnel when the token that opened it would no longer be accepted (its `exp`
    plus the provider's leeway)."""


# What a browser sends as `Origin` (Fetch: "serialization of an origin"): scheme "://" host
# [":" port], in lower case and ASCII (an international name in punycode), the default port
# left out, no path. The config's exact origins must have this form, and a request's Origin
# must have it before any `regex:` is tried on it (so `https://evil.test/.example.com` never
# reaches a pattern). `_` stays: browsers keep it in host names.
ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://([a-z0-9_-]+(?:\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?")


@dataclass(frozen=True, slots=True, kw_only=True)
class CorsSettings:
    """Which browser origins may call a route cross-origin, and how (the Fetch standard's CORS
    protocol); request/cors.py compiles it. Origins are serialised origins, compared byte for
    byte as browsers send them (lower-case scheme and host, no default port, no path)."""

    allow_origins: tuple[str, ...] = ()
    """Exact origins, e.g. `https://app.example.com`."""
    any_origin: bool = False
    """`allow_origins: ["*"]`: every origin (never with `allow_credentials`)."""
    origin_patterns: tuple[re.Pattern[str], ...] = ()
    """`regex:` entries, matched against the whole origin (fullmatch)."""
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST")
    """Methods a preflight may ask for (case-sensitive, as browsers send them); `*`: any."""
    allow_headers: tuple[str, ...] = ("Authorization", "Content-Type")
    """Request headers a preflight may ask for (compared case-insensitively); `*`: any but
    `Authorization`, which the Fetch standard never lets `*` cover."""
    expose_headers: tuple[str, ...] = ()
    """Answer headers the page's script may read beyond the CORS-safelisted ones; `*`: all."""
    allow_credentials: bool = False
    """Let the page send cookies (and read answers to requests that carry them)."""
    max_age: float | None = None
    """How long a browser may reuse a preflight's answer; None: not sent (browsers: 5 s)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    name: str
    match: RouteMatch
    auth: RouteAuth | None
    """None means `auth: none`: a public route."""
    upstream: Upstream | None = None
    """Overrides the top-level upstream."""
    token_sources: tuple[TokenSource, ...] | None = None
    """Overrides the provider's token sources."""
    headers: HeaderMap | None = None
    """Overrides the provider's header mapping."""
    websocket: WebSocketSettings | None = None
    """Overrides the top-level `websocket` settings (keys it leaves out are the top-level's)."""
    cors: CorsSettings | None = None
    """The CORS policy in force on this route: its own `cors`, else the top-level one; None
    when neither is set or the route says `cors: false`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_CLIENT_ADDRESS = (
    # The client's address as an ingress or CDN writes it, which frameworks read in place of the
    # peer (nginx's realip, Go's chi, Rails, Akamai, Cloudflare, Fastly, Zend/Symfony's
    # X-Cluster-Client-IP and Client-IP).
    "X-Real-IP",
    "True-Client-IP",
    "X-Client-IP",
    "CF-Connecting-IP",
    "Fastly-Client-IP",
    "X-Cluster-Client-IP",
    "Client-IP",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class StripSettings:
    """Client headers removed from every request before anything else (spoofable identity)."""

    KEEPABLE: ClassVar[tuple[str, ...]] = ("Forwarded", *_CLIENT_ADDRESS)
    """The built-in names `keep` may name: only the client-address headers, which an ingress in
    front may write and overwrite; the method and path overrides are never kept."""

    names: tuple[str, ...] = (
        # Headers some frameworks let override the method or the path after we routed it.
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
        "X-Original-URL",
        "X-Rewrite-URL",
        # We append X-Forwarded-*; a client's own RFC 7239 header would contradict it.
        "Forwarded",
        # The client's address as an ingress or CDN writes it (`_CLIENT_ADDRESS`): sent by a
        # client, it is spoofed. `strip_headers.keep` lets a deployment behind an ingress that
        # writes one keep it.
        *_CLIENT_ADDRESS,
    )
    prefixes: tuple[str, ...] = ("X-User-", "X-Jwt-", "X-Auth-")
    kept: tuple[str, ...] = ()
    """Built-in names the config keeps (`strip_headers.keep`), already left out of `names`:
    the client-address headers a trusted ingress in front writes itself."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenCacheSettings:
    enabled: bool = True
    max_entries: int = 10_000
    max_ttl: float = 300.0
    """No entry lives longer than this, and never past the token's `exp`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisStore:
    """The revocation list in Redis, shared by every sidecar that names the same URL and prefix."""

    url: str
    """`redis://[:PASSWORD@]HOST[:PORT][/DB]`, `rediss://` for TLS, or `unix:///PATH[?db=N]`."""
    key_prefix: str = "jwt-sidecar"
    """The Redis keys are `PREFIX:revocation:rules` (a hash), `PREFIX:revocation:expiry` (a
    sorted set by expiry) and the pub/sub channel `PREFIX:revocation`."""
    timeout: float = 2.0
    """Longest wait to connect to Redis, and for one answer."""
    resync_interval: float = 300.0
    """Reload the whole list this often, besides after every reconnect."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RevocationSettings:
    """The revocation list: where it is kept, and what to do when it cannot be kept current."""

    file: str | None = None
    """A YAML or JSON file of rules (absolute path), reloaded when it changes."""
    redis: RedisStore | None = None
    """Or Redis: the list shared by every replica."""
    max_staleness: float = 30.0
    """How old the list may get (the store unreachable, the file unreadable) before `fail` applies."""
    fail: str = "open"
    """Past `max_staleness`: `open` keeps serving with the last list; `closed` turns /readyz false
    and the routes that check revocation answer 503."""
    default_ttl: float | None = None
    """How long a rule written by `jwt-sidecar revoke` lasts without `--ttl`; None: the
    provider's `max_token_age` plus its `leeway` (the longest a token it accepts can live)."""

    @property
    def store(self) -> str:
        return "redis" if self.redis is not None else "file"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    source: str
    """The file these settings came from (or `<string>`)."""
    providers: Mapping[str, Provider]
    routes: tuple[Route, ...] = ()
    warnings: tuple[ConfigIssue, ...] = ()
    """Route-table warnings (routecheck.py): loaded anyway, printed by check-config and logged."""
    token_cache: TokenCacheSettings = TokenCacheSettings()
    max_token_bytes: int = 8192
    """Tokens longer than this are refused before any decoding work."""
    listen: Listen = Listen(host="0.0.0.0", port=8080)
    """Proxied traffic."""
    admin: Listen = Listen(host="0.0.0.0", port=9901)
    """/healthz, /readyz and /metrics; never proxied."""
    upstream: Upstream = Upstream()
    realm: str = "jwt-sidecar"
    """The realm of the `WWW-Authenticate: Bearer` challenge (RFC 6750 §3)."""
    strip: StripSettings = StripSettings()
    drain_timeout: float = 20.0
    """On SIGTERM: how long in-flight requests may take to finish."""
    drain_delay: float = 0.0
    """On SIGTERM: how long to keep accepting after readiness turns false (endpoint removal
    lags behind it), before the listener closes and `drain_timeout` starts."""
    access_log: bool = True
    """One JSON line per request on stdout (never the token)."""
    workers: int = 1
    """Proxy processes sharing the listening port (SO_REUSEPORT); one is usually enough per core."""
    max_connections: int | None = None
    """Client connections open at once on the proxy port (per process); over it, a new one is
    closed at accept. None: derived from the open-file limit at start (limits.py)."""
    header_timeout: float = 10.0
    """Longest time from the first byte of a request head to its end; then 408 and close."""
    keep_alive_timeout: float = 75.0
    """How long a client connection may wait, sending nothing, for its next request; then it
    is closed without an answer."""
    websocket: WebSocketSettings = WebSocketSettings()
    log_format: str = "text"
    """The operator log on stderr: `text`, `json` (one object per line) or `auto` (json when
    stderr is not a terminal). Read at start; `run --log-format` overrides it."""
    log_level: str = "INFO"
    """The operator log's least level: DEBUG, INFO, WARNING or ERROR. `run --log-level` overrides it."""
    cors: CorsSettings | None = None
    """The top-level `cors`: the policy of every route that does not set its own."""
    revocation: RevocationSettings | None = None
    """The revocation list (`revocation:`); None: no token is checked against one."""
