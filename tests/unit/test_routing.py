"""routing.py: path normalisation (RFC 3986 §6.2.2) and first-match routing."""

from __future__ import annotations

import re

import pytest

from proxy.config import Route, RouteMatch
from proxy.errors import BadRequest, Reason
from proxy.routing import Router, normalize


@pytest.mark.parametrize("raw, normal", [
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
    ("/%61dmin/x", "/admin/x"),            # an escaped unreserved character is that character
    ("/a%20b/%7e", "/a%20b/~"),
    ("/a%2fb".replace("2f", "3a"), "/a%3Ab"),  # reserved escapes stay escaped, upper-cased
    ("/caf%c3%a9", "/caf%C3%A9"),
    ("/x.", "/x."),
    ("/..x/y", "/..x/y"),
])
def test_normalize(raw: str, normal: str) -> None:
    assert normalize(raw) == normal


@pytest.mark.parametrize("raw", [
    "/admin/%2Fx", "/public%2F..%2Fadmin", "/public/..%2Fadmin/x", "/a%2fb",
    "/public/%5C../admin", "/public/\\..\\admin", "/x%00", "/x\x00", "/a b",
    "/..", "/public/../../x", "/%2e%2e/x",
    "/public/..;/admin/x", "/public/.;x/admin",
    "/bad%zz", "/bad%2", "admin/x", "http://evil/admin", "*",
])
def test_refused_paths(raw: str) -> None:
    with pytest.raises(BadRequest) as caught:
        normalize(raw)
    assert caught.value.reason is Reason.BAD_PATH and caught.value.status == 400


def route(name: str, **match: object) -> Route:
    return Route(name=name, match=RouteMatch(**match), auth=None)  # type: ignore[arg-type]


def test_first_match_wins_with_methods_prefix_exact_and_regex() -> None:
    router = Router([
        route("exact", path_exact="/health"),
        route("admin-read", path_prefix="/admin/", methods=frozenset({"GET"})),
        route("versioned", path_regex=re.compile(r"^/v[0-9]+/")),
        route("all", path_prefix="/"),
    ])
    assert router.match("GET", "/health").name == "exact"
    assert router.match("GET", "/health/x").name == "all"
    assert router.match("GET", "/admin/users").name == "admin-read"
    assert router.match("POST", "/admin/users").name == "all"
    assert router.match("GET", "/v2/orders").name == "versioned"
    assert router.match("GET", "/Admin/users").name == "all", "matching is case-sensitive"


def test_no_match_is_none() -> None:
    assert Router([route("only", path_prefix="/only/")]).match("GET", "/other") is None
