"""The route table read as a whole: where a guarded request can fall through, and what never matches.

Owns: the checks that need every route at once, run by `config.parse` once each route is
valid on its own. An ERROR (the config is refused, naming the route's line) for a route that
can never match: its path is not in the form the router compares (request paths are
normalised first, so `/a//b` or `/%7Euser` never arrive as written), or every request it
matches is taken by earlier routes. A WARNING (loaded, printed by `check-config` and logged
at start and on reload) whenever a request on a path that an authenticated route guards can
land on another route with weaker auth: a method the route does not list falls through to a
later route, or the other spelling of a `path_exact` (with or without its trailing slash)
goes elsewhere. Weaker is: no auth, an optional token, another provider, fewer scopes or
fewer claim rules, or report mode. A WARNING too for a table that protects nothing: no routes (every request
is a 404), or no route that requires a token (every route `auth: none` or `optional`); and
one for each route in report mode (`auth.mode: report`), which refuses nothing.

The analysis is exact for prefixes and exact paths. A regex is compared by its literal
start (`^/api/v` → every path under `/api/v…`); when that is unknown it is assumed to
overlap everything (a warning too many rather than one too few) and to cover nothing (an
unreachable route is only reported when that is certain).
Does not own: parsing a route (config/builder.py) or matching a request (routing.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..base.errors import BadRequest, ConfigIssue
from ..base.safetext import one_line
from .routing import Router, normalize
from .settings import ClaimRule, Route, RouteAuth
from .yamlsource import Issues

__all__ = ["check", "format_warning"]


def format_warning(issue: ConfigIssue) -> str:
    """`file:line: warning: path: message`, as check-config prints and the log writes it."""
    where = f"{issue.file}:{issue.line}" if issue.line else issue.file
    return one_line(f"{where}: warning: {issue.path}: {issue.message}")  # a route's name may hold anything


def check(
    routes: Sequence[Route], places: Sequence[tuple[str, int | None]], issues: Issues, *, table_line: int | None = None
) -> list[ConfigIssue]:
    """Add an error to `issues` for each route that can never match; return the warnings.

    `places` holds each route's dotted path (`routes[2]`) and line, in the same order;
    `table_line` is the line of the `routes` key (None when there is none).
    """
    line_of = {route.name: line for route, (_, line) in zip(routes, places, strict=True)}
    areas = [_area(route) for route in routes]
    for route, area, (path, line) in zip(routes, areas, places, strict=True):
        problem = _not_normal(route, area)
        if problem:
            issues.add(line, f"{path}.match", f"route '{route.name}' can never match: {problem}")
    if issues.items:
        return []
    for j, (route, area, (path, line)) in enumerate(zip(routes, areas, places, strict=True)):
        left, takers = _methods(route), []
        for k in range(j):
            if _covers(areas[k], area) and not _intersect(left, _methods(routes[k])).empty:
                takers.append(routes[k])
                left = _minus(left, _methods(routes[k]))
                if left.empty:
                    names = ", ".join(f"'{t.name}' (line {line_of[t.name]})" for t in takers)
                    issues.add(
                        line,
                        f"{path}.match",
                        f"route '{route.name}' can never match: every request it "
                        f"matches is taken first by {names}; remove it, or move it before them",
                    )
                    break
    if issues.items:
        return []
    warnings: list[ConfigIssue] = _unguarded(routes, table_line, issues.file)
    router = Router(routes)
    for i, (route, area, (path, line)) in enumerate(zip(routes, areas, places, strict=True)):
        if route.auth is None:
            continue  # a public route guards nothing
        warnings += _fall_through(i, routes, areas, line_of, path, line, issues.file)
        warnings += _other_spelling(route, area, routes, router, line_of, path, line, issues.file)
    warnings += _report_mode(routes, places, issues.file)
    return warnings


def _unguarded(routes: Sequence[Route], line: int | None, file: str) -> list[ConfigIssue]:
    """A table that protects nothing: no routes at all, or none that requires a token.

    Both load (a sidecar that only strips identity headers is a choice), but a first config
    or a copied example often ends up like this by mistake.
    """
    if not routes:
        return [
            ConfigIssue(
                file,
                line,
                "routes",
                "there are no routes, so every request is refused with 404 "
                "(no_route); add one, e.g. - {match: {path_prefix: /}, auth: {provider: NAME}}",
            )
        ]
    if all(route.auth is None for route in routes):
        return [
            ConfigIssue(
                file,
                line,
                "routes",
                "no route needs a token (every route is `auth: none`): "
                "every request reaches the upstream unauthenticated; give the routes to protect "
                "`auth: {provider: NAME}`",
            )
        ]
    if all(route.auth is None or route.auth.optional for route in routes):
        return [
            ConfigIssue(
                file,
                line,
                "routes",
                "no route requires a token (every route is `auth: none` or "
                "`optional: true`): a request without a token reaches the upstream on every route",
            )
        ]
    return []


def _report_mode(routes: Sequence[Route], places: Sequence[tuple[str, int | None]], file: str) -> list[ConfigIssue]:
    """Each route in report mode: it loads (a rollout is a choice), but nothing on it is refused,
    so `check-config --strict` in CI stops a config that would ship it to production unnoticed."""
    return [
        ConfigIssue(
            file,
            line,
            path,
            f"route '{route.name}' is in report mode (auth.mode: report): nothing is refused on it; a request "
            "that fails a check reaches the upstream without identity headers, logged and counted as "
            "decision would_deny. Remove `mode: report` to enforce",
        )
        for route, (path, line) in zip(routes, places, strict=True)
        if route.auth is not None and route.auth.mode == "report"
    ]


# -- methods: every method, or a finite set, or every method but a finite set -------------------
@dataclass(frozen=True, slots=True)
class _Methods:
    but: bool
    """True: every method except `names`; False: exactly `names`."""
    names: frozenset[str]

    @property
    def empty(self) -> bool:
        return not self.but and not self.names

    def __str__(self) -> str:
        if not self.but:
            return ", ".join(sorted(self.names))
        return f"every method but {', '.join(sorted(self.names))}" if self.names else "every method"


def _methods(route: Route) -> _Methods:
    methods = route.match.methods
    return _Methods(True, frozenset()) if methods is None else _Methods(False, frozenset(methods))


def _intersect(a: _Methods, b: _Methods) -> _Methods:
    if a.but and b.but:
        return _Methods(True, a.names | b.names)
    if a.but:
        return _Methods(False, b.names - a.names)
    if b.but:
        return _Methods(False, a.names - b.names)
    return _Methods(False, a.names & b.names)


def _minus(a: _Methods, b: _Methods) -> _Methods:
    return _intersect(a, _Methods(not b.but, b.names))


# -- paths ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Area:
    kind: str
    """`all`, `prefix` (whole segments), `exact` or `regex`."""
    value: str
    """The prefix without its trailing slash, the exact path, or a regex's literal start ("" unknown)."""
    fold: bool
    pattern: re.Pattern[str] | None = None

    def key(self, fold: bool) -> str:
        return self.value.lower() if fold else self.value

    def __str__(self) -> str:
        if self.kind == "all":
            return "every path"
        if self.kind == "prefix":
            return f"{self.value} and below"
        if self.kind == "exact":
            return self.value
        return f"paths matching {self.pattern.pattern!r}"  # type: ignore[union-attr]


_REGEX_SPECIAL = frozenset(".^$*+?{}[]\\|()")


def _literal_start(pattern: re.Pattern[str]) -> str:
    """The text every match starts with, for a pattern anchored at the start; "" when unknown."""
    text = pattern.pattern
    if "|" in text or not text.startswith("^"):
        return ""  # an alternation or an unanchored search can match anywhere
    literal: list[str] = []
    for ch in text[1:]:
        if ch in _REGEX_SPECIAL:
            if ch in "*?{" and literal:
                literal.pop()  # the character before it may be absent
            break
        literal.append(ch)
    return "".join(literal)


def _area(route: Route) -> _Area:
    m = route.match
    if m.path_prefix is not None:
        base = m.path_prefix.rstrip("/")
        return _Area("prefix", base, m.ignore_case) if base else _Area("all", "", False)
    if m.path_exact is not None:
        return _Area("exact", m.path_exact, m.ignore_case)
    assert m.path_regex is not None
    fold = bool(m.path_regex.flags & re.IGNORECASE)
    return _Area("regex", _literal_start(m.path_regex), fold, m.path_regex)


def _in_prefix(path: str, base: str) -> bool:
    return path == base or path.startswith(base + "/")


def _overlaps(a: _Area, b: _Area) -> bool:
    """Whether some path may match both (True when it cannot be ruled out)."""
    if a.kind == "all" or b.kind == "all":
        return True
    if a.kind == "regex" and b.kind != "regex":
        a, b = b, a
    fold = a.fold or b.fold
    va, vb = a.key(fold), b.key(fold)
    if a.kind == "prefix" and b.kind == "prefix":
        return _in_prefix(va, vb) or _in_prefix(vb, va)
    if a.kind == "exact" and b.kind == "exact":
        return va == vb
    if {a.kind, b.kind} == {"prefix", "exact"}:
        base, path = (va, vb) if a.kind == "prefix" else (vb, va)
        return _in_prefix(path, base)
    if b.kind == "regex" and a.kind == "exact":
        pattern = b.pattern
        assert pattern is not None
        if fold and not pattern.flags & re.IGNORECASE:
            pattern = re.compile(pattern.pattern, pattern.flags | re.IGNORECASE)
        return pattern.search(a.value) is not None
    if b.kind == "regex" and a.kind == "prefix":
        return va.startswith(vb) or vb.startswith(va + "/")
    return va.startswith(vb) or vb.startswith(va)  # two regexes, by their literal starts


def _covers(a: _Area, b: _Area) -> bool:
    """Whether every path that `b` matches is certainly matched by `a`."""
    if a.kind == "all":
        return True
    if b.kind == "all" or (b.fold and not a.fold):
        return False  # b takes casings that a does not
    va, vb = a.key(a.fold), b.key(a.fold)
    if a.kind == "prefix":
        if b.kind in ("prefix", "exact"):
            return _in_prefix(vb, va)
        return bool(vb) and vb.startswith(va + "/")  # a regex whose every match starts below a
    if a.kind == "exact":
        return b.kind == "exact" and va == vb
    assert a.pattern is not None
    if b.kind == "exact":
        return a.pattern.search(b.value) is not None
    return (
        b.kind == "regex"
        and b.pattern is not None
        and (a.pattern.pattern, a.pattern.flags) == (b.pattern.pattern, b.pattern.flags)
    )


def _not_normal(route: Route, area: _Area) -> str:
    """Why a prefix or exact path can never equal a request path, or ""."""
    m = route.match
    key, value = ("path_prefix", m.path_prefix) if m.path_prefix is not None else ("path_exact", m.path_exact)
    if value is None or area.kind == "all":
        return ""
    if not value.isascii():
        # A request target is ASCII on the wire: other characters arrive percent-encoded.
        encoded = "".join(ch if ch.isascii() else "".join(f"%{b:02X}" for b in ch.encode()) for ch in value)
        return f"{key} {value!r}: request paths are ASCII, so write it as {encoded!r}"
    try:
        normal = normalize(value)
    except BadRequest as error:
        return f"{key} {value!r}: a request path like it is refused with 400 ({error.detail})"
    if normal != value:
        return f"{key} {value!r}: request paths are normalised before matching, so write it as {normal!r}"
    return ""


# -- authentication strength ------------------------------------------------------------------
def _weaker(guard: RouteAuth, other: RouteAuth | None) -> list[str]:
    """How `other` lets through what `guard` refuses; [] when it is at least as strict."""
    if other is None:
        return ["no token is needed (auth: none)"]
    reasons = []
    extra = [name for name in other.names if name not in guard.names]  # `providers:` routes: any name more
    if extra:
        reasons.append(f"another provider ({', '.join(extra)}, not {' or '.join(guard.names)})")
    if other.optional and not guard.optional:
        reasons.append("a token is optional")
    missing = sorted(set(guard.scopes.all_of) - set(other.scopes.all_of))
    if missing:
        reasons.append(f"scope {', '.join(missing)} is not required")
    if guard.scopes.any_of:
        any_of = set(guard.scopes.any_of)
        if not ((other.scopes.any_of and set(other.scopes.any_of) <= any_of) or any_of & set(other.scopes.all_of)):
            reasons.append(f"none of the scopes {', '.join(guard.scopes.any_of)} is required")
    kept = {_rule_key(rule) for rule in other.claims}
    for rule in guard.claims:
        if _rule_key(rule) not in kept:
            reasons.append(f"claim rule {rule.claim} {rule.op} is not applied")
    if other.mode == "report" and guard.mode != "report":
        reasons.append("it is in report mode (it refuses nothing)")
    return reasons


def _rule_key(rule: ClaimRule) -> tuple[object, ...]:
    value = rule.value
    if isinstance(value, re.Pattern):
        value = ("re", value.pattern, value.flags)
    return (rule.path, rule.op, repr(value))


def _fall_through(
    i: int,
    routes: Sequence[Route],
    areas: Sequence[_Area],
    line_of: dict[str, int | None],
    path: str,
    line: int | None,
    file: str,
) -> list[ConfigIssue]:
    """Methods the route does not list, on its paths, that later routes with weaker auth take."""
    guard = routes[i]
    if guard.match.methods is None:
        return []
    assert guard.auth is not None
    left = _Methods(True, frozenset(guard.match.methods))
    found = []
    for j in range(i + 1, len(routes)):
        other = routes[j]
        if not _overlaps(areas[i], areas[j]):
            continue
        caught = _intersect(left, _methods(other))
        if caught.empty:
            continue
        reasons = _weaker(guard.auth, other.auth)
        if reasons:
            found.append(
                ConfigIssue(
                    file,
                    line,
                    path,
                    (
                        f"route '{guard.name}' guards {areas[i]} for {_methods(guard)} only: {caught} there "
                        f"{'fall' if caught.but or len(caught.names) > 1 else 'falls'} through to route '{other.name}' "
                        f"(line {line_of[other.name]}), whose auth is weaker: {'; '.join(reasons)}. List every method "
                        f"on '{guard.name}', or add a route as strict for the others before '{other.name}'"
                    ),
                )
            )
        if _covers(areas[j], areas[i]):
            left = _minus(left, _methods(other))
            if left.empty:
                break
    return found


def _other_spelling(
    route: Route,
    area: _Area,
    routes: Sequence[Route],
    router: Router,
    line_of: dict[str, int | None],
    path: str,
    line: int | None,
    file: str,
) -> list[ConfigIssue]:
    """`path_exact: /admin` leaves `/admin/` (and the reverse) to whatever route matches it."""
    if area.kind != "exact" or area.value == "/":
        return []
    assert route.auth is not None
    sibling = area.value[:-1] if area.value.endswith("/") else area.value + "/"
    methods = sorted(route.match.methods) if route.match.methods else ["GET"]
    landed = {router.match(method, sibling) for method in methods} - {None, route}
    found = []
    for other in sorted(landed, key=lambda r: routes.index(r)):
        assert other is not None
        reasons = _weaker(route.auth, other.auth)
        if reasons:
            found.append(
                ConfigIssue(
                    file,
                    line,
                    path,
                    (
                        f"path_exact {area.value} does not cover {sibling}, which most upstreams serve alike: route "
                        f"'{other.name}' (line {line_of[other.name]}) judges it, and its auth is weaker: {'; '.join(reasons)}. "
                        f"Use path_prefix {area.value.rstrip('/')}, or add {sibling} to a route as strict"
                    ),
                )
            )
    return found
