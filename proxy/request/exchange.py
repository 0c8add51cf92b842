"""One request on its way through the proxy: the object every step reads and fills in.

Owns: `Exchange`, made once per request by app.py and handed from step to step
(pipeline.py's, forward.py's), so a step takes the request and
returns nothing beside it: where it goes (route plan, normalised path, raw query), what is
sent (the client's fields after the strip, the token found, the verified claims, our identity
headers, the header pairs for the upstream), and how it ended (decision, reason, status),
which the access log and metrics read. `__slots__`: one is made per request.
Does not own: any step (each module owns its own), or building anything it points at
(runtime.py builds the snapshot and route plans).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..telemetry.metrics import Decision

if TYPE_CHECKING:
    from ..auth.extract import Found
    from ..auth.verify import Claims
    from ..http.http1 import Request
    from ..telemetry.metrics import RouteMetrics
    from .identity import Outbound, Pairs
    from .runtime import RoutePlan, Runtime, Snapshot

__all__ = ["NO_ROUTE_NAME", "Exchange"]

_NONE: list[Any] = []  # shared, never appended to: pipeline._inject sets fresh lists
NO_ROUTE_NAME = "(none)"
"""The route the log names for a request that matched none."""


class Exchange:
    """One request, from the head read to the last byte of the answer."""

    __slots__ = (
        "added",
        "claims",
        "decision",
        "fields",
        "found",
        "identity",
        "outbound",
        "path",
        "plan",
        "query",
        "reason",
        "request",
        "request_id",
        "runtime",
        "snapshot",
        "started",
        "status",
    )

    def __init__(self, request: Request, runtime: Runtime, request_id: str, started: float) -> None:
        self.request = request
        """The client's request (http1.py): its method, raw target and fields, and where the answer goes."""
        self.runtime = runtime
        """The process-wide holder: the upstream pool, the clock, the metrics."""
        self.request_id = request_id
        """The client's X-Request-Id when sane, else ours (identity.request_id)."""
        self.started = started
        """`time.perf_counter()` at entry, for the access log's latency."""
        self.snapshot: Snapshot | None = None
        """The config this request is served from, read once at entry (a reload cannot mix two)."""
        self.plan: RoutePlan | None = None
        """The matched route's plan; None until routed, and for a request no route matches."""
        self.path = ""
        """The normalised path: the one the router matched and the one forwarded."""
        self.query = ""
        """The raw query string, as sent; without the token once identity took it out (pipeline._inject)."""
        self.outbound: Outbound | None = None
        """The client's fields less what it must not control (identity.strip_inbound)."""
        self.found: Found | None = None
        """The one token the request offered under the route's sources (extract.extract)."""
        self.claims: Claims | None = None
        """The verified token (verify.py), before the route's rules are checked."""
        self.identity: tuple[tuple[bytes, bytes], ...] = ()
        """The identity headers the route's rules admitted (identity.Renderer), encoded."""
        self.fields: Pairs = _NONE
        """The client's fields that go upstream, as it sent them (pipeline._inject, by identity.upstream_fields)."""
        self.added: Pairs = _NONE
        """The fields the proxy adds after them: identity, X-Forwarded-*, X-Request-Id
        (pipeline._inject, by identity.upstream_fields). The HTTP layer encodes both (`upstream.Fields.of_bytes`)."""
        self.decision = Decision.REJECTED
        self.reason = ""
        self.status = 0
        """The status the client got; 499 when nothing was written (it left)."""

    @property
    def route(self) -> str:
        """The matched route's name, for the log and metrics."""
        return self.plan.route.name if self.plan is not None else NO_ROUTE_NAME

    @property
    def metrics(self) -> RouteMetrics | None:
        """The matched route's metric children; None before routing."""
        return self.plan.metrics if self.plan is not None else None

    @property
    def subject(self) -> str | None:
        """The verified token's `sub`, for the access log (a token the rules refused included)."""
        return self.claims.subject if self.claims is not None else None

    @property
    def provider(self) -> str | None:
        """The provider of the matched route (on a route with `providers:`, the one the token's
        iss chose); None before routing, on a public route, and before a choice."""
        verifier = self.plan.verifier if self.plan is not None else None
        return verifier.provider.name if verifier is not None else None
