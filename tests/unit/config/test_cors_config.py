"""`cors:` in config.yaml: what it loads to, and one clear message naming the line for each
mistake a first-time operator makes (check-config reads the same builder)."""

from __future__ import annotations

import re
import textwrap

import pytest

from proxy.base.errors import ConfigError
from proxy.config.builder import CorsSettings, parse
from proxy.tools.cli import main

PROVIDER = "providers:\n  main: {issuer: https://i.test, audiences: [api], jwks: {url: 'https://i.test/jwks'}}\n"
ROUTES = "routes:\n  - {name: api, match: {path_prefix: /api}, auth: {provider: main}}\n"


def load(text: str) -> CorsSettings | None:
    return parse(PROVIDER + textwrap.dedent(text) + ROUTES, file="c.yaml").routes[0].cors


def issues_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(PROVIDER + textwrap.dedent(text) + ROUTES, file="c.yaml")
    return [str(issue) for issue in caught.value.issues]


def test_the_defaults() -> None:
    cors = load("cors: {allow_origins: [https://app.example.com]}\n")
    assert cors == CorsSettings(allow_origins=("https://app.example.com",))
    assert cors.allow_methods == ("GET", "HEAD", "POST")
    assert cors.allow_headers == ("Authorization", "Content-Type")
    assert cors.expose_headers == () and cors.allow_credentials is False and cors.max_age is None


def test_every_key_loads() -> None:
    cors = load(
        r"""
        cors:
          allow_origins:
            - https://app.example.com
            - http://localhost:3000
            - 'regex:https://[a-z0-9-]+\.preview\.example\.com'
          allow_methods: [GET, PUT, PATCH, DELETE]
          allow_headers: [Authorization, X-Trace]
          expose_headers: [ETag]
          allow_credentials: true
          max_age: 1h
        """
    )
    assert cors is not None
    assert cors.allow_origins == ("https://app.example.com", "http://localhost:3000")
    assert [p.pattern for p in cors.origin_patterns] == [r"https://[a-z0-9-]+\.preview\.example\.com"]
    assert cors.allow_methods == ("GET", "PUT", "PATCH", "DELETE") and cors.allow_headers == (
        "Authorization",
        "X-Trace",
    )
    assert cors.expose_headers == ("ETag",) and cors.allow_credentials and cors.max_age == 3600


def test_a_routes_cors_replaces_the_top_level_one_whole_and_false_turns_it_off() -> None:
    settings = parse(
        PROVIDER
        + textwrap.dedent(
            """
            cors: {allow_origins: [https://app.example.com], allow_credentials: true, max_age: 10m}
            routes:
              - {name: inherits, match: {path_prefix: /a}, auth: none}
              - {name: own, match: {path_prefix: /b}, auth: none, cors: {allow_origins: ['*']}}
              - {name: closed, match: {path_prefix: /c}, auth: none, cors: false}
            """
        ),
        file="c.yaml",
    )
    inherits, own, closed = settings.routes
    assert inherits.cors is settings.cors
    assert own.cors == CorsSettings(any_origin=True)  # nothing of the top level's: no credentials, no max_age
    assert closed.cors is None


def test_without_cors_no_route_has_one() -> None:
    settings = parse(PROVIDER + ROUTES, file="c.yaml")
    assert settings.cors is None and settings.routes[0].cors is None
    assert load("cors: false\n") is None


MISTAKES = [
    (
        "misspelt key",
        "cors:\n  allow_origin: [https://app.example.com]\n",
        [
            "c.yaml:4: cors.allow_origin: unknown key; did you mean allow_origins? allowed here: allow_credentials, "
            "allow_headers, allow_methods, allow_origins, expose_headers, max_age"
        ],
    ),
    (
        "no origins",
        "cors: {allow_credentials: true}\n",
        ["c.yaml:3: cors.allow_origins: is required: a list of origins, e.g. [https://app.example.com]"],
    ),
    (
        "empty origins",
        "cors: {allow_origins: []}\n",
        ["c.yaml:3: cors.allow_origins: must not be empty: a list of origins, e.g. [https://app.example.com]"],
    ),
    (
        "a path",
        "cors:\n  allow_origins:\n    - https://app.example.com\n    - https://admin.example.com/app\n",
        [
            "c.yaml:6: cors.allow_origins[1]: 'https://admin.example.com/app': an origin has no path, and browsers "
            "send it without a path; write https://admin.example.com (the route's match decides the paths)"
        ],
    ),
    (
        "a trailing slash",
        "cors:\n  allow_origins: [https://app.example.com/]\n",
        [
            "c.yaml:4: cors.allow_origins[0]: 'https://app.example.com/': an origin has no path, and browsers send "
            "it without a trailing slash; write https://app.example.com (the route's match decides the paths)"
        ],
    ),
    (
        "no scheme",
        "cors: {allow_origins: [app.example.com]}\n",
        [
            "c.yaml:3: cors.allow_origins[0]: 'app.example.com' is not an origin: it has no scheme; write https://app.example.com"
        ],
    ),
    (
        "upper case",
        "cors: {allow_origins: ['https://App.Example.com']}\n",
        [
            "c.yaml:3: cors.allow_origins[0]: 'https://App.Example.com': browsers send the scheme and host in lower "
            "case; write https://app.example.com"
        ],
    ),
    (
        "default port",
        "cors: {allow_origins: ['https://app.example.com:443']}\n",
        [
            "c.yaml:3: cors.allow_origins[0]: 'https://app.example.com:443': browsers leave out the default port; "
            "write https://app.example.com"
        ],
    ),
    (
        "port out of range",
        "cors: {allow_origins: ['http://localhost:70000']}\n",
        ["c.yaml:3: cors.allow_origins[0]: 'http://localhost:70000': port 70000 is out of range; a port is 1 to 65535"],
    ),
    (
        "an international name",
        "cors: {allow_origins: ['https://bücher.example']}\n",
        [
            "c.yaml:3: cors.allow_origins[0]: 'https://bücher.example': browsers send an international domain name "
            "in punycode; write https://xn--bcher-kva.example"
        ],
    ),
    (
        "a wildcard host",
        "cors: {allow_origins: ['https://*.example.com']}\n",
        [
            "c.yaml:3: cors.allow_origins[0]: 'https://*.example.com': an exact origin has no wildcards; for every "
            r"subdomain write regex:https://[a-z0-9-]+\.example\.com (with your domain, the dots escaped)"
        ],
    ),
    (
        "null",
        "cors: {allow_origins: ['null']}\n",
        [
            "c.yaml:3: cors.allow_origins[0]: the origin `null` cannot be allowed: any site can send `Origin: null` "
            "(a sandboxed iframe, a data: URL, a redirect), so allowing it allows every site; use `*` (without "
            "credentials) if every site may call this"
        ],
    ),
    (
        "star with credentials",
        "cors:\n  allow_origins: ['*']\n  allow_credentials: true\n",
        [
            "c.yaml:4: cors.allow_origins[0]: `*` cannot be used with allow_credentials: true: the Fetch standard "
            "forbids a browser to pass a credentialed answer that says `Access-Control-Allow-Origin: *`, and "
            "echoing every origin instead would let any site act as the user; list the origins (or a regex:)"
        ],
    ),
    (
        "star among origins",
        "cors: {allow_origins: [https://app.example.com, '*']}\n",
        ["c.yaml:3: cors.allow_origins[1]: `*` already allows every origin: list either `*` alone or the origins"],
    ),
    (
        "twice",
        "cors: {allow_origins: [https://app.example.com, https://app.example.com]}\n",
        ["c.yaml:3: cors.allow_origins[1]: 'https://app.example.com' is listed twice"],
    ),
    (
        "a bad regex",
        "cors: {allow_origins: ['regex:https://(app']}\n",
        [
            "c.yaml:3: cors.allow_origins[0]: 'https://(app' is not a valid regular expression: missing ), "
            "unterminated subpattern at position 8"
        ],
    ),
    (
        "an unescaped dot",
        "cors: {allow_origins: ['regex:https://app.example.com']}\n",
        [
            "c.yaml:3: cors.allow_origins[0]: regex:https://app.example.com: a `.` matches any character, so it also "
            r"matches 'https://appxexamplexcom', a name anyone can register; write `\.` for a dot"
        ],
    ),
    (
        "open at the end",
        "cors: {allow_origins: ['regex:https://app\\.example\\.com.*']}\n",
        [
            r"c.yaml:3: cors.allow_origins[0]: regex:https://app\.example\.com.*: it is open at the end: it also "
            "matches 'https://app.example.com.attacker.example'; end it with the host (and `(:[0-9]+)?` for any port)"
        ],
    ),
    (
        "open at the start of the domain",
        "cors: {allow_origins: ['regex:^https://.*example\\.com$']}\n",
        [
            r"c.yaml:3: cors.allow_origins[0]: regex:^https://.*example\.com$: the start of its domain is open: it "
            "also matches 'https://attackerexample.com', a domain anyone can register; put `\\.` before the domain, "
            r"e.g. https://([a-z0-9-]+\.)*example\.com"
        ],
    ),
    (
        "a regex with a path",
        "cors: {allow_origins: ['regex:https://[a-z]+\\.example\\.com/']}\n",
        [
            r"c.yaml:3: cors.allow_origins[0]: regex:https://[a-z]+\.example\.com/: it matches "
            "'https://a.example.com/', which is not an origin: a pattern describes whole origins like "
            "https://app.example.com (scheme://host[:port], no path), matched from start to end"
        ],
    ),
    (
        "a method no token",
        "cors: {allow_origins: [https://app.example.com], allow_methods: ['GET,PUT']}\n",
        ["c.yaml:3: cors.allow_methods: 'GET,PUT' is not a method name (an HTTP token: no spaces or commas)"],
    ),
    (
        "a lower-case method",
        "cors: {allow_origins: [https://app.example.com], allow_methods: [delete]}\n",
        ["c.yaml:3: cors.allow_methods: 'delete': browsers send it upper-cased, as DELETE; write that"],
    ),
    (
        "patch in lower case",
        "cors: {allow_origins: [https://app.example.com], allow_methods: [patch]}\n",
        [
            "c.yaml:3: cors.allow_methods: 'patch': methods are compared as sent, and a page that writes patch sends "
            "`patch`, which servers do not take for PATCH; write PATCH"
        ],
    ),
    (
        "a forbidden method",
        "cors: {allow_origins: [https://app.example.com], allow_methods: [TRACE]}\n",
        ["c.yaml:3: cors.allow_methods: 'TRACE': a browser never sends it (a forbidden method in the Fetch standard)"],
    ),
    (
        "star methods with credentials",
        "cors: {allow_origins: [https://app.example.com], allow_credentials: true, allow_methods: ['*']}\n",
        [
            "c.yaml:3: cors.allow_methods: `*` is no wildcard with allow_credentials: true (the Fetch standard reads "
            "it as a method named `*`); list the methods"
        ],
    ),
    (
        "star headers with credentials",
        "cors: {allow_origins: [https://app.example.com], allow_credentials: true, expose_headers: ['*']}\n",
        [
            "c.yaml:3: cors.expose_headers: `*` is no wildcard with allow_credentials: true (the Fetch standard "
            "reads it as a header named `*`); list the header names"
        ],
    ),
    (
        "a header no token",
        "cors: {allow_origins: [https://app.example.com], allow_headers: ['X-Trace:']}\n",
        ["c.yaml:3: cors.allow_headers: 'X-Trace:' is not a header name (an HTTP token: no spaces, colons or commas)"],
    ),
    (
        "max_age in words",
        "cors: {allow_origins: [https://app.example.com], max_age: 10 minutes}\n",
        ["c.yaml:3: cors.max_age: '10 minutes' is not a duration like 30s, 5m, 1h or 250ms; write 10m"],
    ),
    (
        "credentials a string",
        "cors: {allow_origins: [https://app.example.com], allow_credentials: 'true'}\n",
        [
            "c.yaml:3: cors.allow_credentials: 'true' is not true or false (it is in quotes, so it is text: write "
            "it without quotes)"
        ],
    ),
    (
        "cors a list",
        "cors: [https://app.example.com]\n",
        [
            "c.yaml:3: cors: a list is not a mapping: write {allow_origins: [https://app.example.com]}, or false for no CORS"
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [case[1:] for case in MISTAKES], ids=[case[0] for case in MISTAKES])
def test_each_mistake_is_one_message_naming_its_line(text: str, expected: list[str]) -> None:
    assert issues_of(text) == expected


def test_a_routes_cors_mistakes_name_the_route() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(
            PROVIDER
            + "routes:\n"
            + "  - name: api\n"
            + "    match: {path_prefix: /api}\n"
            + "    auth: none\n"
            + "    cors: true\n"
            + "  - name: web\n"
            + "    match: {path_prefix: /web}\n"
            + "    auth: none\n"
            + "    cors:\n"
            + "      allow_origins: [https://app.example.com/]\n",
            file="c.yaml",
        )
    assert [str(issue) for issue in caught.value.issues] == [
        "c.yaml:7: routes[0].cors: true is not a mapping: write {allow_origins: [https://app.example.com]}, or false "
        "for no CORS (leave it out to use the top-level one)",
        "c.yaml:12: routes[1].cors.allow_origins[0]: 'https://app.example.com/': an origin has no path, and browsers "
        "send it without a trailing slash; write https://app.example.com (the route's match decides the paths)",
    ]


@pytest.mark.parametrize(
    "pattern",
    [
        r"https://[a-z0-9-]+\.example\.com",
        r"^https://([a-z0-9-]+\.)*example\.com$",
        r"https://(app|admin)\.example\.com(:[0-9]+)?",
        r"http://localhost:[0-9]+",
        r"https://[a-z]+\.example\.co\.uk",
        r"https://pr-[0-9]+\.preview\.example\.com",
    ],
)
def test_well_anchored_patterns_load(pattern: str) -> None:
    cors = load(f"cors: {{allow_origins: ['regex:{pattern}']}}\n")
    assert cors is not None and cors.origin_patterns[0].pattern == pattern


def test_check_config_reports_the_same_messages(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    config = Path(str(tmp_path)) / "config.yaml"
    config.write_text(PROVIDER + "cors:\n  allow_origins: ['*']\n  allow_credentials: true\n" + ROUTES)
    assert main(["check-config", str(config)]) != 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert re.search(
        r"config\.yaml:4: cors\.allow_origins\[0\]: `\*` cannot be used with allow_credentials: true", text
    )
