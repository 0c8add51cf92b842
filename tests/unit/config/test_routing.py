"""routing.py: path normalisation (RFC 3986 §6.2.2) and first-match routing."""

from __future__ import annotations

import re

import pytest

from proxy.base.errors import BadRequest, Reason
from proxy.config.builder import Route, RouteMatch
from proxy.config.routing import Router, normalize, split_target, target


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("/", "/"),
        ("/api/v1/orders", "/api/v1/orders"),
        ("/a/b/", "/a/b/"),
        ("//admin/x", "/admin/x"),
        ("/a//b///c", "/a/b/c"),
        ("/public/../admin/x", "/admin/x"),
        ("/public/%2e%2e/admin/x", "/admin/x"),
        ("/public/%2E%2E/admin/x", "/admin/x"),
        ("/public/.%2e/admin/x", "/admin/x"),
        ("/a/./b/.", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/%61dmin/x", "/admin/x"),  # an escaped unreserved character is that character
        ("/a%20b/%7e", "/a%20b/~"),
        ("/a%2fb".replace("2f", "3a"), "/a%3Ab"),  # reserved escapes stay escaped, upper-cased
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/x.", "/x."),
        ("/..x/y", "/..x/y"),
    ],
)
def test_normalize(raw: str, normal: str) -> None:
    assert normalize(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "/admin/%2Fx",
        "/public%2F..%2Fadmin",
        "/public/..%2Fadmin/x",
        "/a%2fb",
        "/public/%5C../admin",
        "/public/\\..\\admin",
        "/x%00",
        "/x\x00",
        "/a b",
        "/..",
        "/public/../../x",
        "/%2e%2e/x",
        "/public/..;/admin/x",
        "/public/.;x/admin",
        "/bad%zz",
        "/bad%2",
        "admin/x",
        "http://evil/admin",
        "*",
    ],
)
def test_refused_paths(raw: str) -> None:
    with pytest.raises(BadRequest) as caught:
        normalize(raw)
    assert caught.value.reason is Reason.BAD_PATH and caught.value.status == 400


def route(name: str, **match: object) -> Route:
    return Route(name=name, match=RouteMatch(**match), auth=None)  # type: ignore[arg-type]


def test_first_match_wins_with_methods_prefix_exact_and_regex() -> None:
    router = Router(
        [
            route("exact", path_exact="/health"),
            route("admin-read", path_prefix="/admin/", methods=frozenset({"GET"})),
            route("versioned", path_regex=re.compile(r"^/v[0-9]+/")),
            route("all", path_prefix="/"),
        ]
    )
    assert router.match("GET", "/health").name == "exact"
    assert router.match("GET", "/health/x").name == "all"
    assert router.match("GET", "/admin/users").name == "admin-read"
    assert router.match("POST", "/admin/users").name == "all"
    assert router.match("GET", "/v2/orders").name == "versioned"
    assert router.match("GET", "/Admin/users").name == "all", "matching is case-sensitive"


def test_no_match_is_none() -> None:
    assert Router([route("only", path_prefix="/only/")]).match("GET", "/other") is None


@pytest.mark.parametrize("prefix", ["/admin", "/admin/"])
@pytest.mark.parametrize(
    "path, covered",
    [
        ("/admin", True),
        ("/admin/", True),
        ("/admin/users", True),
        ("/admin/a/b/", True),
        ("/administrator", False),
        ("/admin.php", False),
        ("/admin-x/y", False),
        ("/adm", False),
        ("/", False),
        ("/x/admin", False),
        ("/Admin/x", False),
    ],
)
def test_a_prefix_covers_whole_segments_with_or_without_its_trailing_slash(
    prefix: str, path: str, covered: bool
) -> None:
    # `/admin/` once left `/admin` to the next (weaker) route; `/admin` once took `/administrator`.
    router = Router([route("admin", path_prefix=prefix), route("rest", path_prefix="/")])
    assert router.match("GET", path).name == ("admin" if covered else "rest")


@pytest.mark.parametrize(
    "prefix, path, covered",
    [
        ("/api/v1", "/api/v1/orders", True),
        ("/api/v1", "/api/v10/orders", False),
        ("/api/v1/", "/api/v1", True),
        ("/a/b", "/a", False),
        ("/a/b", "/a/bc", False),
        ("/a/b", "/a/b/c", True),
    ],
)
def test_multi_segment_prefixes(prefix: str, path: str, covered: bool) -> None:
    assert (Router([route("p", path_prefix=prefix)]).match("GET", path) is not None) is covered


def test_the_root_prefix_covers_every_path() -> None:
    router = Router([route("all", path_prefix="/")])
    for path in ("/", "/x", "/x/", "/a/b/c", "/ADMIN"):
        assert router.match("DELETE", path).name == "all"


@pytest.mark.parametrize("path", ["/ADMIN/x", "/Admin", "/aDmIn/", "/admin/X"])
def test_ignore_case_judges_every_casing_by_the_same_route(path: str) -> None:
    router = Router(
        [
            route("admin", path_prefix="/admin/", ignore_case=True),
            route("rest", path_prefix="/"),
        ]
    )
    assert router.match("GET", path).name == "admin"
    assert router.match("GET", "/ADMINistrator").name == "rest"


def test_ignore_case_for_exact_and_regex_and_its_absence() -> None:
    router = Router(
        [
            route("health", path_exact="/Health", ignore_case=True),
            route("versioned", path_regex=re.compile(r"^/v[0-9]+/orders"), ignore_case=True),
            route("strict", path_exact="/Strict"),
            route("rest", path_prefix="/"),
        ]
    )
    assert router.match("GET", "/HEALTH").name == "health"
    assert router.match("GET", "/health/x").name == "rest"
    assert router.match("GET", "/V2/ORDERS/1").name == "versioned"
    assert router.match("GET", "/strict").name == "rest"
    assert router.match("GET", "/Strict").name == "strict"


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/adm%C4%B1n/x", "admin"),
        ("/ADM%C4%B0N", "admin"),
        ("/%E2%84%AAit", "kit"),
        ("/adm\u0131n/x", "admin"),
        ("/ADM\u0130N", "admin"),
        ("/\u212ait", "kit"),
        ("/k\u0131t/x", "kit"),
        ("/v1/%C5%BFtatus", "status"),
        ("/v1/\u017ftatus", "status"),
        ("/KI%C5%BF", "kis"),
        ("/kit%C5%BF", "rest"),
        ("/adm%C4%B1nistrator", "rest"),
        ("/adm%C3%ADn", "rest"),
    ],
    ids=[
        "dotless-i-escaped",
        "dotted-I-escaped",
        "kelvin-escaped",
        "dotless-i-raw",
        "dotted-I-raw",
        "kelvin-raw",
        "kit-dotless",
        "regex-long-s-escaped",
        "regex-long-s-raw",
        "exact-long-s",
        "still-whole-segments",
        "longer-segment",
        "i-acute-is-another-letter",
    ],
)
def test_ignore_case_folds_the_letters_case_insensitive_upstreams_fold_to_ascii(path: str, expected: str) -> None:
    # Java's equalsIgnoreCase (Spring), .NET's OrdinalIgnoreCase (IIS) compare per character
    # through upper and lower case: ı and İ are i, ſ is s, the Kelvin sign is k, once the
    # upstream has decoded the path. str.lower() leaves ı and ſ as they are.
    router = Router(
        [
            route("admin", path_prefix="/admin", ignore_case=True),
            route("kit", path_prefix="/kit", ignore_case=True),
            route("kis", path_exact="/kis", ignore_case=True),
            route("status", path_regex=re.compile(r"^/v[0-9]+/status$"), ignore_case=True),
            route("rest", path_prefix="/"),
        ]
    )
    assert router.match("GET", path).name == expected


def test_ignore_case_routes_and_case_sensitive_routes_mix_in_order() -> None:
    router = Router(
        [
            route("exact-case", path_prefix="/Docs"),
            route("folded", path_prefix="/docs", ignore_case=True),
        ]
    )
    assert router.match("GET", "/Docs/a").name == "exact-case"
    assert router.match("GET", "/DOCS/a").name == "folded"
    assert router.match("GET", "/docs").name == "folded"


@pytest.mark.parametrize(
    "raw_target",
    [
        "/api/v1/orders?x=1",
        "/a//b/../c",
        "/%61dmin/x?q=%2F",
        "/",
        "/x.?",
        "/" + "a" * 200,
        "/a b",
        "/..",
        "/x#",
        "/x?y#z",
    ],
)
def test_target_is_split_target_then_normalize_asked_twice(raw_target: str) -> None:
    # `target` memoises a path's normal form: its first and second answers, and its refusals,
    # are those of split_target then normalize (a refused path is never remembered, and a `#`
    # in the query of a remembered path is still refused).
    for _ in range(2):
        try:
            raw_path, query = split_target(raw_target)
            expected: object = (normalize(raw_path), query)
        except BadRequest as error:
            expected = (type(error), error.reason, error.detail)
        try:
            got: object = target(raw_target)
        except BadRequest as error:
            got = (type(error), error.reason, error.detail)
        assert got == expected
    if "#" not in raw_target:  # a remembered path, then a fragment in the query
        with pytest.raises(BadRequest):
            target(raw_target.partition("?")[0] + "?q#f")


def test_a_remembered_route_is_the_one_the_table_gives_for_every_method_and_path() -> None:
    # `match` remembers its answer per (method, path); asked again (and after the memo overflows
    # and starts over), it must answer what walking the table answers, methods and case folding included.
    routes = [
        route("get-only", path_prefix="/api/", methods=frozenset({"GET"})),
        route("folded", path_prefix="/Admin", ignore_case=True),
        route("exact", path_exact="/api/exact"),
        route("regex", path_regex=re.compile(r"^/v[0-9]+/")),
        route("rest", path_prefix="/rest/"),
    ]
    paths = ["/api/x", "/api/exact", "/ADMIN/a", "/adm\u0131n", "/v1/a", "/vx/a", "/rest", "/rest/a", "/none", "/"]
    paths += [f"/v{i}/x" for i in range(600)] + ["/" + "a" * 200]
    walked = Router(routes)
    remembered = Router(routes)
    for _ in range(3):
        for method in ("GET", "POST", "get"):
            for path in paths:
                expected = walked._walk(method, path)
                assert remembered.match(method, path) is expected, (method, path)
    assert remembered.match("GET", "/none") is None
