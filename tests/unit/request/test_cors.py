"""CORS policy (request/cors.py): the preflight answers and the headers every answer on a CORS
route gets, as the Fetch standard's CORS protocol has a browser read them.

Built from real configs through the real builder and snapshot: what a route's `cors` says is
what is answered. The cases are the ones that bite: the `null` origin, credentials, `Vary:
Origin` on every answer that depends on the origin, regex origins, names compared with the
case browsers use, ports, international names, and Origin fields no browser sends.
"""

from __future__ import annotations

import base64
import json
import os
import re
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.auth.keys import KeyRing
from proxy.base.clock import SystemClock
from proxy.config.builder import parse
from proxy.request.cors import REFUSALS, UPSTREAM_FIELDS, CorsPolicy, Preflight, preflight, without_upstream_cors
from proxy.request.runtime import Snapshot, build_snapshot
from proxy.telemetry.metrics import Metrics

# Keys that need no fetch (the policy does not care whose they are): a random HMAC secret.
os.environ.setdefault("JWT_SIDECAR_TEST_CORS_SECRET", base64.urlsafe_b64encode(os.urandom(32)).decode())
PROVIDER = (
    "providers:\n  main: {issuer: https://i.test, audiences: [api], algorithms: [HS256],\n"
    "         secret: {env: JWT_SIDECAR_TEST_CORS_SECRET, encoding: base64url}}\n"
)


def snapshot_of(text: str) -> Snapshot:
    settings = parse(PROVIDER + textwrap.dedent(text), file="c.yaml")
    clock = SystemClock()
    keyring = KeyRing(settings.providers, fetcher=None, clock=clock)
    return build_snapshot(settings, keyring=keyring, clock=clock, metrics=Metrics())


LISTED = snapshot_of(
    r"""
    cors:
      allow_origins: [https://app.example.com, http://localhost:3000, https://xn--bcher-kva.example,
                      'regex:https://[a-z0-9-]+\.preview\.example\.com']
      allow_methods: [GET, POST, PUT, DELETE]
      allow_headers: [Authorization, Content-Type, X-Trace]
      expose_headers: [X-Request-Id, ETag]
      max_age: 10m
    routes:
      - {name: api, match: {path_prefix: /api}, auth: {provider: main}}
    """
)
CREDENTIALS = snapshot_of(
    """
    cors: {allow_origins: [https://app.example.com], allow_credentials: true}
    routes:
      - {name: api, match: {path_prefix: /}, auth: {provider: main}}
    """
)
ANY = snapshot_of(
    """
    cors: {allow_origins: ['*'], allow_methods: [GET, POST, PUT], allow_headers: ['*'], expose_headers: ['*']}
    routes:
      - {name: api, match: {path_prefix: /}, auth: none}
    """
)


def ask(
    snapshot: Snapshot,
    origin: bytes | list[bytes] | None = b"https://app.example.com",
    method: bytes | list[bytes] | None = b"PUT",
    headers: bytes | list[bytes] | None = None,
    *,
    path: str = "/api/orders",
    verb: str = "OPTIONS",
) -> Preflight | None:
    fields: list[tuple[bytes, bytes]] = [(b"Host", b"api.example.com")]
    for name, value in ((b"Origin", origin), (b"Access-Control-Request-Method", method)):
        fields += [(name, v) for v in (value if isinstance(value, list) else [value] if value is not None else [])]
    fields += [
        (b"Access-Control-Request-Headers", v)
        for v in (headers if isinstance(headers, list) else [headers] if headers else [])
    ]
    return preflight(verb, fields, path, snapshot.router, snapshot.plans)


def lines(fields: bytes) -> list[str]:
    assert fields.endswith(b"\r\n") or not fields
    return fields.decode("ascii").split("\r\n")[:-1]


def policy(snapshot: Snapshot, route: str = "api") -> CorsPolicy:
    found = snapshot.plans[route].cors
    assert found is not None
    return found


def answer_to(snapshot: Snapshot, *origins: bytes) -> list[str]:
    """The lines an actual request's answer gets, for a request with these Origin fields."""
    fields = [(b"Host", b"api.example.com"), *((b"Origin", o) for o in origins)]
    return lines(policy(snapshot).response_fields(fields))


# -- preflights ---------------------------------------------------------------------------------


def test_an_allowed_preflight_is_a_204_with_every_cors_header() -> None:
    answer = ask(LISTED, headers=b"authorization,content-type,x-trace")
    assert answer is not None and answer.status == 204 and answer.body is None and answer.reason == ""
    assert answer.route == "api"
    assert lines(answer.fields) == [
        "Access-Control-Allow-Origin: https://app.example.com",
        "Access-Control-Allow-Methods: GET, POST, PUT, DELETE",
        "Access-Control-Allow-Headers: Authorization, Content-Type, X-Trace",
        "Access-Control-Max-Age: 600",
        "Vary: Origin",
        "Server: jwt-sidecar",
    ]


@pytest.mark.parametrize(
    ("origin", "method", "headers", "reason"),
    [
        (b"https://evil.example", b"PUT", None, "cors_origin"),
        (b"https://app.example.com", b"PATCH", None, "cors_method"),
        (b"https://app.example.com", b"PUT", b"x-other", "cors_headers"),
    ],
)
def test_a_refused_preflight_is_a_403_saying_what_was_refused_and_no_cors_header(
    origin: bytes, method: bytes, headers: bytes | None, reason: str
) -> None:
    answer = ask(LISTED, origin, method, headers)
    assert answer is not None and answer.status == 403 and answer.reason == reason
    assert json.loads(answer.body or b"") == {"error": "cors_refused", "error_description": REFUSALS[reason]}
    shown = lines(answer.fields)
    assert not any(line.lower().startswith("access-control-") for line in shown)
    # The answer depends on the origin: a cache (some CDNs store OPTIONS) must not give it to another.
    assert "Vary: Origin" in shown and "Content-Type: application/json; charset=utf-8" in shown
    assert answer.detail  # the operator's log says exactly what


def test_the_refusal_names_the_value_refused_for_the_operator() -> None:
    assert ask(LISTED, b"https://evil.example").detail == "origin 'https://evil.example' is not in allow_origins"  # type: ignore[union-attr]
    assert "PATCH" in ask(LISTED, method=b"PATCH").detail  # type: ignore[union-attr]
    assert "x-other" in ask(LISTED, headers=b"X-Other").detail  # type: ignore[union-attr]


def test_safelisted_methods_always_pass_as_they_pass_the_browsers_own_check() -> None:
    narrow = snapshot_of(
        "cors: {allow_origins: [https://app.example.com], allow_methods: [PUT]}\nroutes:\n  - {name: api, match: {path_prefix: /}, auth: none}\n"
    )
    for method in (b"GET", b"HEAD", b"POST", b"PUT"):
        assert ask(narrow, method=method).status == 204, method  # type: ignore[union-attr]
    assert ask(narrow, method=b"DELETE").status == 403  # type: ignore[union-attr]


def test_methods_are_compared_as_sent_header_names_in_any_case() -> None:
    # Browsers upper-case put (Fetch "normalize a method") but send patch as written.
    assert ask(LISTED, method=b"put").reason == "cors_method"  # type: ignore[union-attr]
    assert ask(LISTED, headers=b"AUTHORIZATION, Content-TYPE, x-TrAcE").status == 204  # type: ignore[union-attr]


def test_origins_are_compared_byte_for_byte() -> None:
    for origin in (
        b"https://APP.example.com",  # browsers send the host in lower case
        b"HTTPS://app.example.com",
        b"https://app.example.com:443",  # and never the default port
        b"https://app.example.com/",
        b"https://app.example.com.evil.example",
        b"http://app.example.com",  # another scheme is another origin
        b" https://app.example.com",
    ):
        assert ask(LISTED, origin).reason == "cors_origin", origin  # type: ignore[union-attr]


def test_the_port_is_part_of_the_origin() -> None:
    assert ask(LISTED, b"http://localhost:3000").status == 204  # type: ignore[union-attr]
    for origin in (b"http://localhost:3001", b"http://localhost", b"https://localhost:3000"):
        assert ask(LISTED, origin).reason == "cors_origin", origin  # type: ignore[union-attr]


def test_an_international_name_is_allowed_in_punycode_and_echoed_as_sent() -> None:
    answer = ask(LISTED, b"https://xn--bcher-kva.example")
    assert answer is not None and answer.status == 204
    assert "Access-Control-Allow-Origin: https://xn--bcher-kva.example" in lines(answer.fields)
    # The same name in UTF-8 is no origin a browser sends: refused, not crashed.
    assert ask(LISTED, "https://bücher.example".encode()).reason == "cors_origin"  # type: ignore[union-attr]


def test_regex_origins_match_the_whole_origin_and_only_a_well_formed_one() -> None:
    assert ask(LISTED, b"https://pr-42.preview.example.com").status == 204  # type: ignore[union-attr]
    assert "Access-Control-Allow-Origin: https://pr-42.preview.example.com" in answer_to(
        LISTED, b"https://pr-42.preview.example.com"
    )
    for origin in (
        b"https://pr-42.preview.example.com.evil.example",  # fullmatch: the pattern's end is the origin's
        b"https://evil.example/.preview.example.com",  # a path: no origin, never shown to the pattern
        b"https://evil.example?.preview.example.com",
        b"https://evil.example#.preview.example.com",
        b"https://x@pr.preview.example.com",
        b"https://PR.preview.example.com",
        b"https://pr.preview.example.com:8443",
        b"https://a.b.preview.example.com",
        "https://pr\u0131.preview.example.com".encode(),
    ):
        assert ask(LISTED, origin).reason == "cors_origin", origin  # type: ignore[union-attr]
        assert answer_to(LISTED, origin) == ["Vary: Origin"], origin


def test_the_null_origin_is_allowed_only_by_star() -> None:
    # Any site can send Origin: null (a sandboxed iframe, a data: URL): a list never allows it.
    assert ask(LISTED, b"null").reason == "cors_origin"  # type: ignore[union-attr]
    assert answer_to(LISTED, b"null") == ["Vary: Origin"]
    answer = ask(ANY, b"null", path="/x")
    assert answer is not None and answer.status == 204
    assert "Access-Control-Allow-Origin: *" in lines(answer.fields)


@pytest.mark.parametrize(
    "origin",
    [
        b"https://app.example.com, https://app.example.com",  # RFC 6454's list form: no browser sends it
        b"https://app.example.com ",
        b"https://app.example.com\t",
        b"",
        b"https://" + b"a" * 100_000 + b".example.com",
        b"https://" + b"a." * 50_000 + b"preview.example.com",
        b"\xff\xfe",
        b"https://pr.preview.example.com\x00",
    ],
)
def test_malformed_or_huge_origins_are_refused_never_crash(origin: bytes) -> None:
    assert ask(LISTED, origin).reason == "cors_origin"  # type: ignore[union-attr]
    assert answer_to(LISTED, origin) == ["Vary: Origin"]


def test_two_origin_fields_allow_nothing() -> None:
    # Two Origin fields: which one a cache or the upstream reads is anyone's guess.
    twice = [b"https://app.example.com", b"https://app.example.com"]
    answer = ask(LISTED, twice)
    assert answer is not None and answer.reason == "cors_origin" and "2 Origin fields" in answer.detail
    assert answer_to(LISTED, *twice) == ["Vary: Origin"]
    assert answer_to(ANY, *twice) == ["Access-Control-Allow-Origin: *", "Access-Control-Expose-Headers: *"]


def test_two_request_method_fields_are_refused() -> None:
    assert ask(LISTED, method=[b"PUT", b"PUT"]).reason == "cors_method"  # type: ignore[union-attr]


@pytest.mark.parametrize("method", [b"P UT", b"PUT,GET", b"", b"PU\xffT"])
def test_a_request_method_that_is_no_method_is_refused(method: bytes) -> None:
    answer = ask(LISTED, method=method)
    # No route takes such a method on a route that lists its methods; this one lists none.
    assert answer is not None and answer.reason == "cors_method"


@pytest.mark.parametrize("headers", [b"x a", b"x-trace;", b"\xff", b"x-trace, x:y"])
def test_request_headers_that_are_no_names_are_refused(headers: bytes) -> None:
    assert ask(LISTED, headers=headers).reason == "cors_headers"  # type: ignore[union-attr]


def test_request_headers_on_several_lines_and_empty_items_are_read_as_one_list() -> None:
    assert ask(LISTED, headers=[b"authorization", b" , x-trace ,,", b""]).status == 204  # type: ignore[union-attr]
    assert ask(LISTED, headers=[b"authorization", b"x-other"]).reason == "cors_headers"  # type: ignore[union-attr]
    many = b", ".join([b"x-trace"] * 5000)  # within a field's size limit: answered, in time
    assert ask(LISTED, headers=many).status == 204  # type: ignore[union-attr]


def test_star_headers_never_cover_authorization_unless_listed() -> None:
    assert ask(ANY, b"https://a.example", headers=b"x-anything, x-else", path="/x").status == 204  # type: ignore[union-attr]
    refused = ask(ANY, b"https://a.example", headers=b"x-anything, authorization", path="/x")
    assert refused is not None and refused.reason == "cors_headers" and "list it" in refused.detail
    listed = snapshot_of(
        "cors: {allow_origins: ['*'], allow_headers: ['*', Authorization]}\n"
        "routes:\n  - {name: api, match: {path_prefix: /}, auth: none}\n"
    )
    answer = ask(listed, b"https://a.example", b"GET", b"x-anything, authorization", path="/x")
    assert answer is not None and answer.status == 204
    assert "Access-Control-Allow-Headers: *, Authorization" in lines(answer.fields)


def test_star_methods_allow_any_method_name() -> None:
    star = snapshot_of(
        "cors: {allow_origins: ['*'], allow_methods: ['*']}\nroutes:\n  - {name: api, match: {path_prefix: /}, auth: none}\n"
    )
    answer = ask(star, b"https://a.example", method=b"PROPFIND", path="/x")
    assert answer is not None and answer.status == 204 and "Access-Control-Allow-Methods: *" in lines(answer.fields)


# -- credentials ----------------------------------------------------------------------------------


def test_with_credentials_the_origin_is_echoed_and_credentials_allowed() -> None:
    answer = ask(CREDENTIALS, method=b"GET", path="/x")
    assert answer is not None and answer.status == 204
    assert lines(answer.fields)[:2] == [
        "Access-Control-Allow-Origin: https://app.example.com",
        "Access-Control-Allow-Credentials: true",
    ]
    assert answer_to(CREDENTIALS, b"https://app.example.com") == [
        "Access-Control-Allow-Origin: https://app.example.com",
        "Access-Control-Allow-Credentials: true",
        "Vary: Origin",
    ]
    # A disallowed origin is told nothing, credentials included.
    assert answer_to(CREDENTIALS, b"https://evil.example") == ["Vary: Origin"]


def test_no_answer_ever_says_star_and_credentials_together() -> None:
    for snapshot in (LISTED, CREDENTIALS, ANY):
        for origin in (b"https://app.example.com", b"null", b"https://evil.example"):
            for route in snapshot.plans:
                shown = lines(policy(snapshot, route).response_fields([(b"Origin", origin)]))
                assert not (
                    "Access-Control-Allow-Origin: *" in shown and "Access-Control-Allow-Credentials: true" in shown
                )


# -- Vary: Origin on actual answers ---------------------------------------------------------------


def test_every_answer_of_a_listed_policy_varies_on_origin() -> None:
    assert answer_to(LISTED, b"https://app.example.com") == [
        "Access-Control-Allow-Origin: https://app.example.com",
        "Access-Control-Expose-Headers: X-Request-Id, ETag",
        "Vary: Origin",
    ]
    # A disallowed origin's answer and a same-origin (no Origin) one: a cache must not give
    # them to an allowed origin (Fetch: "CORS protocol and HTTP caches").
    assert answer_to(LISTED, b"https://evil.example") == ["Vary: Origin"]
    assert answer_to(LISTED) == ["Vary: Origin"]


def test_a_star_policy_says_star_to_everyone_and_varies_on_nothing() -> None:
    for origins in ((b"https://a.example",), (b"null",), ()):
        assert answer_to(ANY, *origins) == ["Access-Control-Allow-Origin: *", "Access-Control-Expose-Headers: *"]


# -- which requests are preflights, and which route judges them ------------------------------------


def test_what_is_no_preflight_falls_through_to_ordinary_handling() -> None:
    assert ask(LISTED, method=None) is None  # an OPTIONS without Access-Control-Request-Method
    assert ask(LISTED, origin=None) is None  # or without Origin
    assert ask(LISTED, verb="GET") is None
    assert ask(LISTED, path="/elsewhere") is None  # no route


def test_a_preflight_is_judged_by_the_route_of_the_request_it_announces() -> None:
    snapshot = snapshot_of(
        """
        cors: {allow_origins: [https://app.example.com], allow_methods: [PUT]}
        routes:
          - {name: writes, match: {path_prefix: /api, methods: [PUT]}, auth: {provider: main}}
          - {name: reads, match: {path_prefix: /api}, auth: {provider: main}, cors: {allow_origins: [https://other.example]}}
          - {name: closed, match: {path_prefix: /closed}, auth: none, cors: false}
        """
    )
    answer = ask(snapshot, method=b"PUT")
    assert answer is not None and answer.route == "writes" and answer.status == 204
    # A GET on the same path is the `reads` route's: its own cors replaces the top-level one whole.
    refused = ask(snapshot, method=b"GET")
    assert refused is not None and refused.route == "reads" and refused.reason == "cors_origin"
    assert ask(snapshot, b"https://other.example", b"GET").status == 204  # type: ignore[union-attr]
    assert ask(snapshot, path="/closed/x") is None  # cors: false: an OPTIONS like any other
    assert snapshot.plans["closed"].cors is None


def test_routes_that_inherit_the_top_level_policy_share_one_compiled_policy() -> None:
    snapshot = snapshot_of(
        """
        cors: {allow_origins: [https://app.example.com]}
        routes:
          - {name: a, match: {path_prefix: /a}, auth: none}
          - {name: b, match: {path_prefix: /b}, auth: none}
          - {name: c, match: {path_prefix: /c}, auth: none, cors: {allow_origins: [https://app.example.com]}}
        """
    )
    assert snapshot.cors
    assert snapshot.plans["a"].cors is snapshot.plans["b"].cors is not snapshot.plans["c"].cors


def test_without_cors_no_route_has_a_policy_and_no_request_is_a_preflight() -> None:
    snapshot = snapshot_of("routes:\n  - {name: api, match: {path_prefix: /}, auth: {provider: main}}\n")
    assert snapshot.cors is False and snapshot.plans["api"].cors is None
    assert ask(snapshot) is None


def test_the_upstreams_own_cors_fields_are_dropped_and_the_rest_kept() -> None:
    upstream = [
        (b"Content-Type", b"application/json"),
        (b"access-control-allow-origin", b"*"),
        (b"Access-Control-Allow-Credentials", b"true"),
        (b"ACCESS-CONTROL-EXPOSE-HEADERS", b"X-Secret"),
        (b"Access-Control-Max-Age", b"1"),
        (b"Access-Control-Allow-Methods", b"*"),
        (b"Access-Control-Allow-Headers", b"*"),
        (b"Vary", b"Accept-Encoding"),
    ]
    assert without_upstream_cors(upstream) == [(b"Content-Type", b"application/json"), (b"Vary", b"Accept-Encoding")]
    assert len(UPSTREAM_FIELDS) == 6


# -- whatever a client sends -----------------------------------------------------------------------

_FIELD = st.binary(max_size=300)


@settings(max_examples=300, deadline=None)
@given(
    origins=st.lists(
        st.one_of(_FIELD, st.sampled_from([b"https://app.example.com", b"null", b"https://a.preview.example.com"])),
        max_size=3,
    ),
    methods=st.lists(st.one_of(_FIELD, st.sampled_from([b"PUT", b"GET", b"put"])), max_size=3),
    headers=st.lists(_FIELD, max_size=3),
)
def test_any_fields_get_a_204_or_a_403_and_only_a_listed_origin_is_ever_allowed(
    origins: list[bytes], methods: list[bytes], headers: list[bytes]
) -> None:
    answer = ask(LISTED, origins, methods, headers)
    if not origins or not methods:
        assert answer is None
        return
    if answer is None:
        return  # a method no route takes: an ordinary request
    assert answer.status in (204, 403)
    if answer.status == 204:
        assert len(origins) == 1 and (
            origins[0] in (b"https://app.example.com", b"http://localhost:3000", b"https://xn--bcher-kva.example")
            or (origins[0].endswith(b".preview.example.com") and origins[0].startswith(b"https://"))
        )
        assert b"Access-Control-Allow-Origin: " + origins[0] + b"\r\n" in answer.fields
    actual = policy(LISTED).response_fields([(b"Origin", o) for o in origins])
    assert actual.endswith(b"Vary: Origin\r\n")


# -- the README's worked example -------------------------------------------------------------------


def test_the_readme_example_answers_as_the_readme_shows() -> None:
    from tests.project.test_readme_reference import fenced_blocks, section

    text = section("### CORS")
    config = next(body for language, body in fenced_blocks(text) if language == "yaml")
    snapshot = snapshot_of(config + "\n")
    shell = next(body for language, body in fenced_blocks(text) if body.startswith("$ curl"))
    command, _, shown = shell.partition("HTTP/1.1 204 No Content\n")
    sent = dict(re.findall(r"-H '([^:]+): ([^']*)'", command))
    path = re.search(r"http://127\.0\.0\.1:8080(\S+)", command).group(1)  # type: ignore[union-attr]
    answer = ask(
        snapshot,
        sent["Origin"].encode(),
        sent["Access-Control-Request-Method"].encode(),
        sent["Access-Control-Request-Headers"].encode(),
        path=path,
    )
    assert answer is not None and answer.status == 204
    assert lines(answer.fields) == shown.strip().splitlines()
    # The actual request's answer, and the refusal of another origin, as the prose says.
    words = " ".join(text.split())
    actual = answer_to_route(snapshot, "api", sent["Origin"].encode())
    assert all(f"`{line}`" in words for line in actual), actual
    refused = ask(snapshot, b"https://evil.example", b"PUT", path=path)
    assert refused is not None and f"`{(refused.body or b'').decode()}`" in words


def answer_to_route(snapshot: Snapshot, route: str, origin: bytes) -> list[str]:
    return lines(policy(snapshot, route).response_fields([(b"Origin", origin)]))
