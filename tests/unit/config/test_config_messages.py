"""Config messages a first-time operator meets: one clear error per mistake, naming its line.

And the two tables that load but protect nothing (no routes; no route that requires a
token), which are warnings: printed by `check-config`, failing it with `--strict`.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import itertools
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy.base.errors import ConfigError
from proxy.config import builder as config
from proxy.config.builder import parse
from proxy.config.routecheck import format_warning
from proxy.tools.cli import main

REPO = Path(__file__).parents[3]
PROVIDER = "providers:\n  main: {issuer: https://i.test, audiences: [api], jwks: {url: 'https://i.test/jwks'}}\n"


def issues_of(text: str, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(textwrap.dedent(text), file="c.yaml", **kwargs)  # type: ignore[arg-type]
    return [str(issue) for issue in caught.value.issues]


def warnings_of(text: str) -> list[str]:
    return [format_warning(w) for w in parse(textwrap.dedent(text), file="c.yaml").warnings]


# -- one mistake, one message -------------------------------------------------------------------
ONE_MISTAKE = [
    (
        "scopes a string (the issue's case)",
        PROVIDER + "routes:\n  - match: {path_prefix: /}\n    auth: {provider: main, scopes: {all_of: admin ops}}\n",
        "c.yaml:5: routes[0].auth.scopes.all_of: must be a list of scopes, e.g. [admin, ops]",
    ),
    (
        "jwks and secret",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: {url: 'https://x'}\n    secret: {env: HOME}\n",
        "c.yaml:6: providers.main.secret: jwks and secret are mutually exclusive: a provider has exactly one key "
        "source (jwks, discovery, jwks_file, pem_file, secret); keep one of them",
    ),
    (
        "no key source",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n",
        "c.yaml:2: providers.main: needs a key source: one of jwks, discovery, jwks_file, pem_file, secret",
    ),
    (
        "misspelt key source",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwsk: {url: 'https://x'}\n",
        "c.yaml:5: providers.main.jwsk: unknown key; did you mean jwks? allowed here: algorithms, audiences, discovery, "
        "headers, issuer, jwks, jwks_file, leeway, max_token_age, pem_file, required_claims, revocation, secret, token_sources, typ",
    ),
    (
        "misspelt required key",
        "providers:\n  main:\n    issuer: i\n    audience: [a]\n    jwks: {url: 'https://x'}\n",
        "c.yaml:4: providers.main.audience: unknown key; did you mean audiences? allowed here: algorithms, audiences, "
        "headers, issuer, jwks, leeway, max_token_age, required_claims, revocation, token_sources, typ",
    ),
    (
        "key in the wrong case",
        "providers:\n  main:\n    Issuer: i\n    audiences: [a]\n    jwks: {url: 'https://x'}\n",
        "c.yaml:3: providers.main.Issuer: unknown key; did you mean issuer? allowed here: algorithms, audiences, "
        "headers, issuer, jwks, leeway, max_token_age, required_claims, revocation, token_sources, typ",
    ),
    (
        "misspelt top-level key",
        PROVIDER + "upsteam: {url: 'http://127.0.0.1:8000'}\n",
        "c.yaml:3: upsteam: unknown key; did you mean upstream? allowed here: access_log, admin, …",
    ),
    (
        "misspelt match",
        PROVIDER + "routes:\n  - mach: {path_prefix: /}\n    auth: none\n",
        "c.yaml:4: routes[0].mach: unknown key; did you mean match? allowed here: auth, cors, headers, match, name, "
        "token_sources, upstream, websocket",
    ),
    (
        "misspelt auth",
        PROVIDER + "routes:\n  - match: {path_prefix: /}\n    auht: none\n",
        "c.yaml:5: routes[0].auht: unknown key; did you mean auth? allowed here: auth, cors, headers, match, name, "
        "token_sources, upstream, websocket",
    ),
    (
        "misspelt path_prefix",
        PROVIDER + "routes:\n  - match: {path_prefx: /}\n    auth: none\n",
        "c.yaml:4: routes[0].match.path_prefx: unknown key; did you mean path_prefix? allowed here: ignore_case, "
        "methods, path_exact, path_prefix, path_regex",
    ),
    (
        "misspelt claim operator",
        PROVIDER + "routes:\n  - match: {path_prefix: /}\n    auth: {provider: main, claims: [{claim: x, equal: 1}]}\n",
        "c.yaml:5: routes[0].auth.claims[0].equal: unknown key; did you mean equals? allowed here: claim, contains, "
        "equals, matches, one_of, present",
    ),
    (
        "misspelt secret env",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    secret: {evn: S}\n",
        "c.yaml:5: providers.main.secret.evn: unknown key; did you mean env? allowed here: encoding, env, file, kid",
    ),
    (
        "misspelt provider in auth",
        PROVIDER + "routes:\n  - match: {path_prefix: /}\n    auth: {provder: main}\n",
        "c.yaml:5: routes[0].auth.provder: unknown key; did you mean provider? allowed here: claims, mode, "
        "optional, provider, revocation, scopes",
    ),
    (
        "two paths in one match",
        PROVIDER + "routes:\n  - match: {path_prefix: /a, path_exact: /b}\n    auth: none\n",
        "c.yaml:4: routes[0].match.path_exact: path_prefix and path_exact are mutually exclusive: a match has exactly "
        "one of path_prefix, path_exact, path_regex",
    ),
    (
        "a relative path_prefix",
        PROVIDER + "routes:\n  - match: {path_prefix: api/}\n    auth: none\n",
        "c.yaml:4: routes[0].match.path_prefix: 'api/' must start with /",
    ),
    (
        "empty path_prefix",
        PROVIDER + "routes:\n  - match: {path_prefix: }\n    auth: none\n",
        "c.yaml:4: routes[0].match: needs one of path_prefix, path_exact, path_regex",
    ),
    (
        "two claim operators",
        PROVIDER + "routes:\n  - match: {path_prefix: /}\n    auth: {provider: main, claims: [{claim: x, equals: 1, "
        "one_of: [1]}]}\n",
        "c.yaml:5: routes[0].auth.claims[0].one_of: equals and one_of are mutually exclusive: a claim rule has exactly "
        "one of equals, one_of, contains, matches, present",
    ),
    (
        "secret env and file",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    secret: {env: S, file: s.txt}\n",
        "c.yaml:5: providers.main.secret.file: env and file are mutually exclusive: give exactly one of `env: NAME` "
        "or `file: PATH`",
    ),
    (
        "empty jwks",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks:\n",
        "c.yaml:5: providers.main.jwks: is required: a mapping, e.g. {url: https://login.example.com/jwks.json}",
    ),
    (
        "empty secret",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    secret:\n",
        "c.yaml:5: providers.main.secret: is required: a mapping, e.g. {env: NAME} or {file: PATH}",
    ),
    (
        "boolean for a duration",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: {url: 'https://x'}\n    leeway: true\n",
        "c.yaml:6: providers.main.leeway: true is not a duration like 30s, 5m, 1h or 250ms",
    ),
    (
        "duration written in words",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: {url: 'https://x', cache_ttl: 5 min}\n",
        "c.yaml:5: providers.main.jwks.cache_ttl: '5 min' is not a duration like 30s, 5m, 1h or 250ms; write 5m",
    ),
    (
        "duration with two units in words",
        PROVIDER + "drain_timeout: 1 minute 30 seconds\n",
        "c.yaml:3: drain_timeout: '1 minute 30 seconds' is not a duration like 30s, 5m, 1h or 250ms; write 1m30s",
    ),
    (
        "duration with an unknown unit",
        PROVIDER + "drain_timeout: 5x\n",
        "c.yaml:3: drain_timeout: '5x' is not a duration like 30s, 5m, 1h or 250ms",
    ),
    (
        "quoted boolean",
        PROVIDER + "access_log: 'false'\n",
        "c.yaml:3: access_log: 'false' is not true or false (it is in quotes, so it is text: write it without quotes)",
    ),
    (
        "quoted number",
        PROVIDER + 'workers: "2"\n',
        "c.yaml:3: workers: '2' is not a whole number ≥ 1 (it is in quotes, so it is text: write it without quotes)",
    ),
    (
        "a word for a number",
        PROVIDER + "max_token_bytes: lots\n",
        "c.yaml:3: max_token_bytes: 'lots' is not a whole number ≥ 256",
    ),
    (
        "jwks URL without a scheme",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks:\n      url: login.example.com/jwks.json\n",
        "c.yaml:6: providers.main.jwks.url: 'login.example.com/jwks.json' is not an http(s) URL with a host: it has no "
        "scheme; write https://login.example.com/jwks.json",
    ),
    (
        "jwks URL of another scheme",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks:\n      url: ftp://x/jwks.json\n",
        "c.yaml:6: providers.main.jwks.url: 'ftp://x/jwks.json' is not an http(s) URL with a host",
    ),
    (
        "URL with a port out of range",
        PROVIDER + "upstream: {url: 'http://127.0.0.1:99999'}\n",
        "c.yaml:3: upstream.url: 'http://127.0.0.1:99999' is not an http(s) URL with a host: its port is not a number "
        "from 1 to 65535",
    ),
    (
        "listen port out of range",
        PROVIDER + "listen: 0.0.0.0:99999\n",
        "c.yaml:3: listen: '0.0.0.0:99999': port 99999 is out of range; a port is 1 to 65535",
    ),
    (
        "listen port zero",
        PROVIDER + "admin: 127.0.0.1:0\n",
        "c.yaml:3: admin: '127.0.0.1:0': port 0 is out of range; a port is 1 to 65535",
    ),
    (
        "listen a bare port",
        PROVIDER + "listen: 8080\n",
        "c.yaml:3: listen: '8080' has no host: write :8080 (every interface) or 127.0.0.1:8080",
    ),
    (
        "listen not host:port",
        PROVIDER + "listen: localhost\n",
        "c.yaml:3: listen: 'localhost' is not host:port (e.g. 0.0.0.0:8080, 127.0.0.1:9901, [::]:8080)",
    ),
    (
        "auth names the provider alone",
        PROVIDER + "routes:\n  - match: {path_prefix: /}\n    auth: main\n",
        "c.yaml:5: routes[0].auth: 'main' is a provider: write `auth: {provider: main}`",
    ),
    (
        "auth neither none nor a mapping",
        PROVIDER + "routes:\n  - match: {path_prefix: /}\n    auth: false\n",
        "c.yaml:5: routes[0].auth: false is not `none` or a mapping like {provider: NAME}",
    ),
    (
        "match a string",
        PROVIDER + "routes:\n  - match: /api/\n    auth: none\n",
        "c.yaml:4: routes[0].match: '/api/' is not a mapping, e.g. {path_prefix: /api/}",
    ),
    (
        "routes a mapping",
        PROVIDER + "routes:\n  api:\n    match: {path_prefix: /}\n    auth: none\n",
        "c.yaml:3: routes: must be a list of routes, e.g. - {match: {path_prefix: /}, auth: none}; found a mapping",
    ),
    (
        "unquoted ${VAR} in a flow mapping",
        "providers:\n  main: {issuer: i, audiences: [a], jwks: {url: ${JWKS_URL}}}\n",
        "c.yaml:2: invalid YAML: while parsing a flow mapping expected ',' or '}', but got '{'; inside { } or [ ], "
        'a value holding ${JWKS_URL} must be quoted, e.g. "${JWKS_URL}"',
    ),
    (
        "an unset ${VAR} in a list",
        "providers:\n  main:\n    issuer: i\n    audiences: [\"${JWT_SIDECAR_TEST_UNSET_AUD}\"]\n    jwks: {url: 'https://x'}\n",
        "c.yaml:4: providers.main.audiences[0]: environment variable JWT_SIDECAR_TEST_UNSET_AUD is not set",
    ),
    (
        "an unset ${VAR} as the only issuer of discovery: true",
        "providers:\n  main:\n    issuer: ${JWT_SIDECAR_TEST_UNSET_ISS}\n    audiences: [a]\n    discovery: true\n",
        "c.yaml:3: providers.main.issuer: environment variable JWT_SIDECAR_TEST_UNSET_ISS is not set",
    ),
    (
        "claim written as the key",
        PROVIDER
        + "routes:\n  - match: {path_prefix: /}\n    auth: {provider: main, claims: [{email_verified: true}]}\n",
        "c.yaml:5: routes[0].auth.claims[0]: a claim rule names the claim and one of equals, one_of, contains, matches, "
        "present: write {claim: email_verified, equals: true}",
    ),
    (
        "a wildcard in path_prefix",
        PROVIDER + "routes:\n  - match: {path_prefix: /api/*}\n    auth: {provider: main}\n",
        "c.yaml:4: routes[0].match.path_prefix: '/api/*': a path has no wildcards here; path_prefix matches whole "
        "segments (/api covers everything below it), path_regex takes a pattern",
    ),
    (
        "a wildcard method",
        PROVIDER + "routes:\n  - match: {path_prefix: /, methods: ['*']}\n    auth: {provider: main}\n",
        "c.yaml:4: routes[0].match.methods: a method list has no wildcard: leave `methods` out to match every method",
    ),
    (
        "provider in another case",
        PROVIDER + "routes:\n  - match: {path_prefix: /}\n    auth: {provider: Main}\n",
        "c.yaml:5: routes[0].auth.provider: unknown provider 'Main'; did you mean main? known providers: main",
    ),
    (
        "auth None",
        PROVIDER + "routes:\n  - match: {path_prefix: /}\n    auth: None\n",
        "c.yaml:5: routes[0].auth: 'None' is not `none`: write none in lower case",
    ),
    (
        "upstream a URL",
        PROVIDER + "upstream: http://127.0.0.1:8000\n",
        "c.yaml:3: upstream: 'http://127.0.0.1:8000' is not a mapping: write upstream: {url: http://127.0.0.1:8000}",
    ),
    (
        "jwks a URL",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: https://i.test/jwks\n",
        "c.yaml:5: providers.main.jwks: 'https://i.test/jwks' is not a mapping: write jwks: {url: https://i.test/jwks}",
    ),
    (
        "scopes a list",
        PROVIDER + "routes:\n  - match: {path_prefix: /}\n    auth: {provider: main, scopes: [admin, ops]}\n",
        "c.yaml:5: routes[0].auth.scopes: a list is not a mapping: write scopes: {all_of: [admin, ops]} (each needed) "
        "or {any_of: [admin, ops]} (one of them)",
    ),
    (
        "claim headers a list",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: {url: 'https://x'}\n    headers:\n"
        "      claims: [sub]\n",
        "c.yaml:7: providers.main.headers.claims: a list is not a mapping, e.g. {sub: X-User-Id, email: X-User-Email}",
    ),
    (
        "token_cache a boolean",
        PROVIDER + "token_cache: true\n",
        "c.yaml:3: token_cache: true is not a mapping, e.g. {enabled: true, max_entries: 10000, max_ttl: 5m}",
    ),
    (
        "no providers",
        "listen: 127.0.0.1:8080\n",
        "c.yaml:1: providers: is required: a mapping, e.g. {main: {issuer: URL, audiences: [NAME], jwks: {url: URL}}}",
    ),
    (
        "providers misspelt, a route names one",
        "provider:\n  main: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}\n"
        "routes:\n  - {match: {path_prefix: /}, auth: {provider: main}}\n",
        "c.yaml:1: provider: unknown key; did you mean providers? allowed here: access_log, admin, …",
    ),
    (
        "providers a list, a route names one",
        "providers:\n  - main: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}\n"
        "routes:\n  - {match: {path_prefix: /}, auth: {provider: main}}\n",
        "c.yaml:1: providers: a list is not a mapping, e.g. {main: {issuer: URL, audiences: [NAME], jwks: {url: URL}}}",
    ),
    (
        "providers empty, a route names one",
        "providers: {}\nroutes:\n  - {match: {path_prefix: /}, auth: {provider: main}}\n",
        "c.yaml:1: providers: at least one provider is required",
    ),
    (
        "a key YAML reads as a boolean",
        PROVIDER + "yes: 1\n",
        "c.yaml:3: true: unknown key; allowed here: access_log, admin, …",
    ),
    (
        "a tab in the indentation",
        PROVIDER + "routes:\n\t- match: {path_prefix: /}\n",
        "c.yaml:4: invalid YAML: while scanning for the next token found character '\\t' that cannot start any token; "
        "indent with spaces: YAML does not allow tabs",
    ),
    (
        "an unset ${VAR} in a token source",
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: {url: 'https://x'}\n"
        "    token_sources: [{header: '${JWT_SIDECAR_TEST_UNSET_H}'}]\n",
        "c.yaml:6: providers.main.token_sources[0].header: environment variable JWT_SIDECAR_TEST_UNSET_H is not set",
    ),
    (
        "a ${VAR} in a duration is read as written (README: Configuration)",
        PROVIDER + "drain_timeout: ${JWT_SIDECAR_TEST_DRAIN}\n",
        "c.yaml:3: drain_timeout: '${JWT_SIDECAR_TEST_DRAIN}' is not a duration like 30s, 5m, 1h or 250ms",
    ),
    (
        "a list item that is a list",
        PROVIDER + "routes:\n  - match: {path_prefix: /, methods: [GET, [POST]]}\n    auth: none\n",
        "c.yaml:4: routes[0].match.methods[1]: a list cannot be an item here: each item is one value, e.g. [GET, POST]",
    ),
]


@pytest.mark.parametrize("text, expected", [case[1:] for case in ONE_MISTAKE], ids=[case[0] for case in ONE_MISTAKE])
def test_a_mistake_is_exactly_one_message_naming_its_line(text: str, expected: str) -> None:
    found = issues_of(text)
    if expected.endswith("…"):  # the top level's allowed keys, which other settings join over time
        assert len(found) == 1 and found[0].startswith(expected[:-1]), found
    else:
        assert found == [expected]


# -- a scalar where a list belongs --------------------------------------------------------------
def _provider_with(line: str) -> str:
    return f"providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: {{url: 'https://x'}}\n    {line}\n"


def _route_with(auth: str = "{provider: main}", match: str = "{path_prefix: /}", extra: str = "") -> str:
    return PROVIDER + f"routes:\n  - match: {match}\n    auth: {auth}\n" + extra


# (the key as config/builder.py reads it, a config with a scalar there, the expected message)
LIST_KEYS = [
    (
        "audiences",
        "providers:\n  main:\n    issuer: i\n    audiences: orders web\n    jwks: {url: 'https://x'}\n",
        "c.yaml:4: providers.main.audiences: must be a list of audiences, e.g. [orders, web]",
    ),
    (
        "algorithms",
        _provider_with("algorithms: RS256 ES256"),
        "c.yaml:6: providers.main.algorithms: must be a list of algorithms, e.g. [RS256, ES256]",
    ),
    (
        "required_claims",
        _provider_with("required_claims: exp, sub"),
        "c.yaml:6: providers.main.required_claims: must be a list of claim names, e.g. [exp, sub]",
    ),
    (
        "token_sources",
        _provider_with("token_sources: bearer"),
        "c.yaml:6: providers.main.token_sources: must be a list of token sources, e.g. [bearer, {cookie: "
        "access_token}]; found 'bearer'",
    ),
    (
        "token_sources",
        _route_with(extra="    token_sources: {cookie: at}\n"),
        "c.yaml:6: routes[0].token_sources: must be a list of token sources, e.g. [bearer, {cookie: access_token}]; "
        "found a mapping",
    ),
    (
        "routes",
        PROVIDER + "routes: {match: {path_prefix: /}, auth: none}\n",
        "c.yaml:3: routes: must be a list of routes, e.g. - {match: {path_prefix: /}, auth: none}; found a mapping",
    ),
    (
        "methods",
        _route_with(match="{path_prefix: /, methods: GET POST}"),
        "c.yaml:4: routes[0].match.methods: must be a list of methods, e.g. [GET, POST]",
    ),
    (
        "methods",
        _route_with(match="{path_prefix: /, methods: GET}"),
        "c.yaml:4: routes[0].match.methods: must be a list of methods, e.g. [GET]",
    ),
    (
        "all_of",
        _route_with(auth="{provider: main, scopes: {all_of: admin ops}}"),
        "c.yaml:5: routes[0].auth.scopes.all_of: must be a list of scopes, e.g. [admin, ops]",
    ),
    (
        "any_of",
        _route_with(auth="{provider: main, scopes: {any_of: ops}}"),
        "c.yaml:5: routes[0].auth.scopes.any_of: must be a list of scopes, e.g. [ops]",
    ),
    (
        "claims",
        _route_with(auth="{provider: main, claims: {claim: email_verified, equals: true}}"),
        "c.yaml:5: routes[0].auth.claims: must be a list of claim rules, e.g. [{claim: email_verified, equals: true}]; "
        "found a mapping",
    ),
    (
        "one_of",
        _route_with(auth="{provider: main, claims: [{claim: tier, one_of: gold silver}]}"),
        "c.yaml:5: routes[0].auth.claims[0].one_of: must be a non-empty list of values, e.g. [gold, silver]",
    ),
    (
        "names",
        PROVIDER + "strip_headers: {names: X-Internal-Role X-Tenant}\n",
        "c.yaml:3: strip_headers.names: must be a list of header names, e.g. [X-Internal-Role, X-Tenant]",
    ),
    (
        "keep",
        PROVIDER + "strip_headers: {keep: X-Real-IP True-Client-IP}\n",
        "c.yaml:3: strip_headers.keep: must be a list of header names, e.g. [X-Real-IP, True-Client-IP]",
    ),
    (
        "prefixes",
        PROVIDER + "strip_headers: {prefixes: X-User-}\n",
        "c.yaml:3: strip_headers.prefixes: must be a list of header name prefixes, e.g. [X-User-]",
    ),
    (
        "allow_origins",
        PROVIDER + "cors: {allow_origins: https://app.example.com https://admin.example.com}\n",
        "c.yaml:3: cors.allow_origins: must be a list of origins, e.g. ['https://app.example.com', "
        "'https://admin.example.com']",
    ),
    (
        "allow_methods",
        PROVIDER + "cors: {allow_origins: [https://app.example.com], allow_methods: GET PUT}\n",
        "c.yaml:3: cors.allow_methods: must be a list of methods, e.g. [GET, PUT]",
    ),
    (
        "allow_headers",
        PROVIDER + "cors: {allow_origins: [https://app.example.com], allow_headers: Authorization}\n",
        "c.yaml:3: cors.allow_headers: must be a list of header names, e.g. [Authorization]",
    ),
    (
        "expose_headers",
        PROVIDER + "cors: {allow_origins: [https://app.example.com], expose_headers: X-Request-Id ETag}\n",
        "c.yaml:3: cors.expose_headers: must be a list of header names, e.g. [X-Request-Id, ETag]",
    ),
    (
        "providers",
        _route_with(auth="{providers: main}"),
        "c.yaml:5: routes[0].auth.providers: must be a list of provider names, e.g. [main]",
    ),
]


@pytest.mark.parametrize(
    "text, expected", [case[1:] for case in LIST_KEYS], ids=[f"{case[0]}-{i}" for i, case in enumerate(LIST_KEYS)]
)
def test_a_scalar_where_a_list_belongs_is_one_error_asking_for_the_list(text: str, expected: str) -> None:
    assert issues_of(text) == [expected]


def _list_keys_in_config_py() -> tuple[set[str], set[str]]:
    """The keys config/builder.py reads as lists (string_list, items, a one_of check) and as string-or-list."""
    tree = ast.parse((REPO / "proxy" / "config" / "builder.py").read_text(encoding="utf-8"))
    lists, either = set(), set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        args = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
        if node.func.attr in ("string_list", "items") and args and args[0] is not None:
            lists.add(args[0])
        elif node.func.attr == "token_sources" and len(args) > 1:  # self.token_sources(s, "token_sources")
            lists.add(args[1])
        elif node.func.attr == "strings" and args:
            either.add(args[0])
    lists.add("one_of")  # a claim rule's operand, checked in claim_rule
    return lists, either


def test_every_list_key_of_config_py_is_tested_and_in_the_readme() -> None:
    lists, either = _list_keys_in_config_py()
    assert lists == {case[0] for case in LIST_KEYS}, "a key read as a list needs its case in LIST_KEYS"
    assert either == {"issuer"}, "only issuer takes one string or a list (README: Configuration)"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- list keys:")[1].split("<!-- end list keys -->")[0].split("-->", 1)[1]
    assert set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", section))) == lists  # (of `auth`) says where


@pytest.mark.parametrize(
    "text",
    [
        _provider_with("algorithms: [RS256]"),
        _route_with(match="{path_prefix: /, methods: [GET]}"),
        _route_with(auth="{provider: main, scopes: {all_of: [admin], any_of: [ops]}}"),
        PROVIDER + "strip_headers: {names: [X-A], prefixes: [X-B-]}\n",
    ],
    ids=["algorithms", "methods", "scopes", "strip"],
)
def test_a_list_of_one_item_is_fine(text: str) -> None:
    parse(text, file="c.yaml")


# -- key sources: alternatives, one error for the choice ----------------------------------------
KEY_SOURCES = ("jwks", "discovery", "jwks_file", "pem_file", "secret")
SOURCE_VALUES = {
    "jwks": "{url: 'https://x/jwks'}",
    "discovery": "true",
    "jwks_file": "k.json",
    "pem_file": "k.pem",
    "secret": "{env: S}",
}


@pytest.mark.parametrize(
    "given",
    [
        *itertools.combinations(KEY_SOURCES, 2),
        *itertools.combinations(KEY_SOURCES, 3),
        KEY_SOURCES,
    ],
    ids=lambda given: "+".join(given),
)
def test_several_key_sources_are_one_error_naming_them(given: tuple[str, ...]) -> None:
    lines = "".join(f"    {k}: {SOURCE_VALUES[k]}\n" for k in reversed(given))  # file order is not name order
    found = issues_of(f"providers:\n  main:\n    issuer: i\n    audiences: [a]\n{lines}")
    assert found == [
        f"c.yaml:{4 + len(given)}: providers.main.{given[0]}: {' and '.join(given)} are mutually exclusive: a provider "
        "has exactly one key source (jwks, discovery, jwks_file, pem_file, secret); keep one of them"
    ]


def test_the_key_sources_in_the_readme_are_the_code_s() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("and exactly one key source")[1].split("How keys behave")[0]
    assert re.findall(r"^\| `(\w+):", table, re.MULTILINE) == [
        "jwks",
        "discovery",
        "discovery",
        "jwks_file",
        "pem_file",
        "secret",
    ]
    assert config.KEY_SOURCES == KEY_SOURCES


# -- an HS secret's length ----------------------------------------------------------------------
def _secret_file(tmp_path: Path, size: int) -> None:
    # Fixed bytes (a hash, not a random draw) so the randomness rules can never refuse them by chance.
    data = (hashlib.sha512(b"jwt-sidecar config messages").digest() * 2)[:size]
    (tmp_path / "s.secret").write_text(base64.urlsafe_b64encode(data).decode().rstrip("="))


HS_CASES = [
    (
        20,
        "",
        "is 20 bytes; HS256 needs at least 32, HS384 needs at least 48, HS512 needs at least 64 (RFC 7518 §3.2): "
        "make a longer one with `jwt-sidecar keys generate --alg HS256`",
    ),
    (
        32,
        "",
        "is 32 bytes; HS384 needs at least 48, HS512 needs at least 64 (RFC 7518 §3.2): the default algorithms "
        "are HS256, HS384, HS512: set `algorithms: [HS256]` or use a longer secret",
    ),
    (
        47,
        "",
        "is 47 bytes; HS384 needs at least 48, HS512 needs at least 64 (RFC 7518 §3.2): the default algorithms "
        "are HS256, HS384, HS512: set `algorithms: [HS256]` or use a longer secret",
    ),
    (
        48,
        "",
        "is 48 bytes; HS512 needs at least 64 (RFC 7518 §3.2): the default algorithms are HS256, HS384, HS512: "
        "set `algorithms: [HS256, HS384]` or use a longer secret",
    ),
    (
        63,
        "",
        "is 63 bytes; HS512 needs at least 64 (RFC 7518 §3.2): the default algorithms are HS256, HS384, HS512: "
        "set `algorithms: [HS256, HS384]` or use a longer secret",
    ),
    (
        40,
        "[HS256, HS512]",
        "is 40 bytes; HS512 needs at least 64 (RFC 7518 §3.2): drop HS512 (`algorithms: [HS256]`) "
        "or use a longer secret",
    ),
    (
        40,
        "[RS256, HS512]",
        "is 40 bytes; HS512 needs at least 64 (RFC 7518 §3.2): make a longer one with "
        "`jwt-sidecar keys generate --alg HS256`",
    ),
    (
        31,
        "[HS256]",
        "is 31 bytes; HS256 needs at least 32 (RFC 7518 §3.2): make a longer one with "
        "`jwt-sidecar keys generate --alg HS256`",
    ),
]


@pytest.mark.parametrize("size, algorithms, expected", HS_CASES, ids=[f"{c[0]}B{c[1]}" for c in HS_CASES])
def test_a_short_secret_is_one_error_saying_which_algorithms_it_fits(
    tmp_path: Path, size: int, algorithms: str, expected: str
) -> None:
    _secret_file(tmp_path, size)
    algs = f"    algorithms: {algorithms}\n" if algorithms else ""
    text = f"providers:\n  p:\n    issuer: i\n    audiences: [a]\n{algs}    secret: {{file: s.secret, encoding: base64url}}\n"
    found = [
        issue for issue in issues_of(text, base_dir=tmp_path) if "cannot be used with a shared secret" not in issue
    ]
    assert found == [f"c.yaml:{5 + bool(algs)}: providers.p.secret: {expected}"]
    suggested = re.search(r"`algorithms: (\[.*?\])`", expected)
    if suggested:  # and the advice works
        fixed = (
            f"providers:\n  p:\n    issuer: i\n    audiences: [a]\n    algorithms: {suggested.group(1)}\n"
            "    secret: {file: s.secret, encoding: base64url}\n"
        )
        assert parse(fixed, base_dir=tmp_path).providers["p"].algorithms == tuple(suggested.group(1)[1:-1].split(", "))


@pytest.mark.parametrize("size", [64, 100])
def test_a_secret_long_enough_for_every_default_algorithm_loads(tmp_path: Path, size: int) -> None:
    _secret_file(tmp_path, size)
    s = parse(
        "providers: {p: {issuer: i, audiences: [a], secret: {file: s.secret, encoding: base64url}}}", base_dir=tmp_path
    )
    assert s.providers["p"].algorithms == ("HS256", "HS384", "HS512")


# -- unset ${VAR}: one error each -----------------------------------------------------------------
def test_each_unset_variable_is_one_error_naming_its_line_and_name(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN", "UP", "ISS", "AUD", "SECRET", "JWKS", "PREFIX", "PROV", "SCOPE", "RE", "STRIP", "A", "B"):
        monkeypatch.delenv(f"JWT_SIDECAR_TEST_{name}", raising=False)
    found = issues_of("""\
        listen: ${JWT_SIDECAR_TEST_LISTEN}
        upstream:
          url: ${JWT_SIDECAR_TEST_UP}
        providers:
          main:
            issuer: ${JWT_SIDECAR_TEST_ISS}
            audiences: ["${JWT_SIDECAR_TEST_AUD}", b]
            discovery: true
          hs:
            issuer: "https://${JWT_SIDECAR_TEST_A}/${JWT_SIDECAR_TEST_B}"
            audiences: [a]
            secret: {env: JWT_SIDECAR_TEST_SECRET}
          j:
            issuer: i
            audiences: [a]
            jwks:
              url: ${JWT_SIDECAR_TEST_JWKS}
        routes:
          - match:
              path_prefix: ${JWT_SIDECAR_TEST_PREFIX}
            auth:
              provider: ${JWT_SIDECAR_TEST_PROV}
              scopes: {all_of: ["${JWT_SIDECAR_TEST_SCOPE}"]}
          - match: {path_regex: "${JWT_SIDECAR_TEST_RE}"}
            auth: {provider: main}
        strip_headers: {names: ["${JWT_SIDECAR_TEST_STRIP}"]}
        """)
    assert found == [
        "c.yaml:1: listen: environment variable JWT_SIDECAR_TEST_LISTEN is not set",
        "c.yaml:3: upstream.url: environment variable JWT_SIDECAR_TEST_UP is not set",
        "c.yaml:6: providers.main.issuer: environment variable JWT_SIDECAR_TEST_ISS is not set",
        "c.yaml:7: providers.main.audiences[0]: environment variable JWT_SIDECAR_TEST_AUD is not set",
        "c.yaml:10: providers.hs.issuer: environment variable JWT_SIDECAR_TEST_A is not set",
        "c.yaml:10: providers.hs.issuer: environment variable JWT_SIDECAR_TEST_B is not set",
        "c.yaml:12: providers.hs.secret.env: environment variable JWT_SIDECAR_TEST_SECRET is not set",
        "c.yaml:17: providers.j.jwks.url: environment variable JWT_SIDECAR_TEST_JWKS is not set",
        "c.yaml:20: routes[0].match.path_prefix: environment variable JWT_SIDECAR_TEST_PREFIX is not set",
        "c.yaml:22: routes[0].auth.provider: environment variable JWT_SIDECAR_TEST_PROV is not set",
        "c.yaml:23: routes[0].auth.scopes.all_of[0]: environment variable JWT_SIDECAR_TEST_SCOPE is not set",
        "c.yaml:24: routes[1].match.path_regex: environment variable JWT_SIDECAR_TEST_RE is not set",
        "c.yaml:26: strip_headers.names[0]: environment variable JWT_SIDECAR_TEST_STRIP is not set",
    ]


def test_a_variable_that_is_set_is_used_where_it_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SIDECAR_TEST_HOST", "login.test")
    monkeypatch.setenv("JWT_SIDECAR_TEST_AUD", "orders")
    s = parse(
        "providers:\n  m:\n    issuer: 'https://${JWT_SIDECAR_TEST_HOST}/'\n"
        "    audiences: ['${JWT_SIDECAR_TEST_AUD}', web]\n    jwks: {url: 'https://${JWT_SIDECAR_TEST_HOST}/k'}\n"
    )
    assert s.providers["m"].issuers == ("https://login.test/",) and s.providers["m"].audiences == ("orders", "web")
    assert s.providers["m"].keys.url == "https://login.test/k"


# -- warnings: a table that protects nothing ----------------------------------------------------
WARNED = {
    "routes: []": (
        PROVIDER + "routes: []\n",
        "c.yaml:3: warning: routes: there are no routes, so every request is refused with 404 (no_route); "
        "add one, e.g. - {match: {path_prefix: /}, auth: {provider: NAME}}",
    ),
    "no routes key": (
        PROVIDER,
        "c.yaml: warning: routes: there are no routes, so every request is refused with 404 (no_route); "
        "add one, e.g. - {match: {path_prefix: /}, auth: {provider: NAME}}",
    ),
    "all auth none": (
        PROVIDER + "routes:\n  - {match: {path_prefix: /public/}, auth: none}\n"
        "  - {match: {path_prefix: /}, auth: none}\n",
        "c.yaml:3: warning: routes: no route needs a token (every route is `auth: none`): every request "
        "reaches the upstream unauthenticated; give the routes to protect `auth: {provider: NAME}`",
    ),
    "none or optional": (
        PROVIDER + "routes:\n  - {match: {path_prefix: /public/}, auth: none}\n"
        "  - {match: {path_prefix: /}, auth: {provider: main, optional: true}}\n",
        "c.yaml:3: warning: routes: no route requires a token (every route is `auth: none` or "
        "`optional: true`): a request without a token reaches the upstream on every route",
    ),
    "report mode": (
        PROVIDER + "routes:\n  - {name: orders, match: {path_prefix: /}, auth: {provider: main, mode: report}}\n",
        "c.yaml:4: warning: routes[0]: route 'orders' is in report mode (auth.mode: report): nothing is refused "
        "on it; a request that fails a check reaches the upstream without identity headers, logged and counted "
        "as decision would_deny. Remove `mode: report` to enforce",
    ),
}


@pytest.mark.parametrize("name", list(WARNED))
def test_a_table_that_protects_nothing_loads_with_one_warning(name: str) -> None:
    text, expected = WARNED[name]
    assert warnings_of(text) == [expected]


@pytest.mark.parametrize(
    "routes",
    [
        "  - {match: {path_prefix: /}, auth: {provider: main}}\n",
        "  - {match: {path_prefix: /public/}, auth: none}\n  - {match: {path_prefix: /}, auth: {provider: main}}\n",
        "  - {match: {path_prefix: /a/}, auth: {provider: main, optional: true}}\n"
        "  - {match: {path_prefix: /}, auth: {provider: main}}\n",
    ],
    ids=["one guarded", "public and guarded", "optional and guarded"],
)
def test_a_table_with_one_route_that_requires_a_token_has_no_such_warning(routes: str) -> None:
    assert warnings_of(PROVIDER + "routes:\n" + routes) == []


@pytest.mark.parametrize("name", list(WARNED))
def test_check_config_prints_the_warning_and_strict_fails(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(WARNED[name][0])
    expected = WARNED[name][1].replace("c.yaml", str(path), 1)
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: OK (1 warning(s) below)" and out[-1] == expected
    assert main(["check-config", "--strict", str(path)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == expected


def test_every_warning_kind_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- warnings:")[1].split("<!-- end warnings -->")[0]
    documented = re.findall(r"^- `([^`]+)`", section, re.MULTILINE)
    patterns = {d: re.compile(re.escape(d).replace("NAME", "[^']+").replace("PATH", r"\S+")) for d in documented}
    samples = [text for text, _ in WARNED.values()] + [
        # a method that falls through to weaker auth; the other spelling of a path_exact
        PROVIDER + "routes:\n  - {name: admin, match: {path_prefix: /admin/, methods: [GET]}, auth: {provider: main}}\n"
        "  - {match: {path_prefix: /}, auth: none}\n",
        PROVIDER + "routes:\n  - {name: admin, match: {path_exact: /admin}, auth: {provider: main}}\n"
        "  - {match: {path_prefix: /}, auth: none}\n",
    ]
    seen = set()
    for text in samples:
        for warning in config.parse(text, file="c.yaml").warnings:
            kinds = [d for d, p in patterns.items() if p.match(warning.message)]
            assert kinds, f"a warning the README does not list: {warning.message}"
            seen.update(kinds)
    assert seen == set(documented), "a README warning no code gives"


# -- any value in any place: an error with a line, never a crash ----------------------------------
ODD_VALUES = [None, True, -1, 1.5, "", [], {}, ["x"], [[1]], {"a": 1}, "${JWT_SIDECAR_TEST_UNSET_ODD}"]


def _places(node: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    found: list[tuple[object, ...]] = []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in children:
        found += [(*prefix, key), *_places(value, (*prefix, key))]
    return found


def assert_odd_values_are_refused_by_line(good: dict[str, Any], places: list[tuple[object, ...]]) -> None:
    """Each of ODD_VALUES put at each of `places` of the document `good`, one at a time: the
    config parses, or is refused with issues that each name a line and show no Python value
    (None, True); never a crash."""
    import copy

    import yaml

    for place in places:
        for value in ODD_VALUES:
            document = copy.deepcopy(good)
            parent: Any = document
            for step in place[:-1]:
                parent = parent[step]
            parent[place[-1]] = value
            try:
                parse(yaml.safe_dump(document, sort_keys=False), file="c.yaml")
            except ConfigError as error:
                for issue in error.issues:
                    assert issue.line, (place, value, str(issue))
                    assert "None" not in issue.message and "True" not in issue.message, (place, value, str(issue))


def test_any_odd_value_in_any_place_is_an_error_naming_its_line_never_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from tests.unit.config.test_config import GOOD

    monkeypatch.delenv("JWT_SIDECAR_TEST_UNSET_ODD", raising=False)
    good = yaml.safe_load(GOOD)
    good["providers"]["main"]["token_sources"] = ["bearer", {"header": "X-T", "prefix": "T "}]
    good["providers"]["main"]["headers"] = {"claims": {"sub": "X-User-Id"}, "payload": "X-Jwt-Payload"}
    good.update(
        strip_headers={"names": ["X-A"], "prefixes": ["X-B-"]},
        listen="127.0.0.1:8080",
        upstream={"url": "http://127.0.0.1:8000", "timeout": "5s", "max_body": "1MB"},
        cors={
            "allow_origins": ["https://app.example.com", "regex:https://[a-z]+\\.example\\.com"],
            "allow_methods": ["GET", "PUT"],
            "allow_headers": ["Authorization"],
            "expose_headers": ["ETag"],
            "allow_credentials": True,
            "max_age": "10m",
        },
    )
    good["routes"][0]["cors"] = {"allow_origins": ["*"], "allow_headers": ["*", "Authorization"]}
    assert_odd_values_are_refused_by_line(good, _places(good))


def test_any_odd_value_in_any_key_source_is_an_error_naming_its_line_never_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every way a provider gets its keys; `secret: {file: ${UNSET}}` (or a list, or null) was a
    # TypeError out of the builder, a traceback instead of one line.
    import yaml

    monkeypatch.delenv("JWT_SIDECAR_TEST_UNSET_ODD", raising=False)
    monkeypatch.setenv("JWT_SIDECAR_TEST_ODD_SECRET", "k" * 64)
    good = yaml.safe_load(
        "providers:\n"
        "  hs: {issuer: i, audiences: [a], algorithms: [HS256], secret: {file: s.txt, encoding: utf-8, kid: k1}}\n"
        "  envs: {issuer: j, audiences: [a], algorithms: [HS256], secret: {env: JWT_SIDECAR_TEST_ODD_SECRET}}\n"
        "  pem: {issuer: k, audiences: [a], algorithms: [RS256], pem_file: key.pem, kid: p1}\n"
        "  jf: {issuer: l, audiences: [a], jwks_file: keys.json}\n"
        "  disc: {issuer: 'https://m', audiences: [a], discovery: {url: 'https://m/.well-known/x', timeout: 2s}}\n"
        "  disc2: {issuer: 'https://n', audiences: [a], discovery: true}\n"
        "routes:\n  - {match: {path_prefix: /}, auth: {provider: hs}}\n"
    )
    assert_odd_values_are_refused_by_line(good, _places(good))


@pytest.mark.parametrize("key", ["file", "env"])
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("null", "is required: a string"),
        ("[a]", "a list is not a string"),
        ('"${JWT_SIDECAR_TEST_UNSET_ODD}"', "environment variable JWT_SIDECAR_TEST_UNSET_ODD is not set"),
    ],
    ids=["null", "list", "unset-variable"],
)
def test_a_secret_without_a_usable_file_or_env_name_is_one_error(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str, problem: str
) -> None:
    monkeypatch.delenv("JWT_SIDECAR_TEST_UNSET_ODD", raising=False)
    text = f"providers:\n  p: {{issuer: i, audiences: [a], algorithms: [HS256], secret: {{{key}: {value}}}}}\n"
    with pytest.raises(ConfigError) as refused:
        parse(text, file="c.yaml")
    assert [str(issue) for issue in refused.value.issues] == [f"c.yaml:2: providers.p.secret.{key}: {problem}"]


@pytest.mark.parametrize(
    ("where", "url"),
    [
        ("jwks", "https://u:hunter2@i.test:44x3/jwks"),  # a port that is no number
        ("jwks", "https://u:Ab/hunter2@i.test/jwks"),  # a password with '/': the port seems to be `Ab`
        ("jwks", "https://i.test:44x3/jwks?api_key=hunter2"),
        ("jwks", "i.test/jwks?api_key=hunter2"),  # no scheme: the hint repeats it
        ("jwks", "ftp://u:hunter2@i.test/jwks"),
        ("discovery", "https://u:Ab?hunter2@i.test/.well-known/openid-configuration"),
        ("upstream", "http://app.internal:8080/?token=hunter2"),  # an upstream URL has no query
        ("upstream", "http://u:hunter2@app.internal:80800/"),
    ],
)
def test_a_secret_in_a_url_is_never_shown_by_its_error(where: str, url: str) -> None:
    # As logs show a URL (http/causes.py `shown`): no password, no query value.
    if where == "upstream":
        text = PROVIDER + f"upstream: {{url: '{url}'}}\n"
    else:
        key = f"jwks: {{url: '{url}'}}" if where == "jwks" else f"discovery: '{url}'"
        text = f"providers:\n  main: {{issuer: https://i.test, audiences: [api], {key}}}\n"
    issues = issues_of(text)
    assert issues, "the URL is refused"
    assert not [issue for issue in issues if "hunter2" in issue]
