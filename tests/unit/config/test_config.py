"""config/builder.py: good files become frozen settings; every mistake names file, line, path and the fix."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import secrets
import textwrap
from pathlib import Path

import pytest

from proxy.base.errors import ConfigError
from proxy.config.builder import RemoteJwks, StaticKeys, load, parse
from tests.conftest import TestKey, jwks_of

GOOD = """\
providers:
  main:
    issuer: https://issuer.test
    audiences: [api://orders]
    jwks:
      url: https://issuer.test/jwks.json
      cache_ttl: 10m
      min_refresh_interval: 15s
      timeout: 2s
    leeway: 1m
    max_token_age: 1h
    typ: at+jwt
  oidc:
    issuer: https://login.test/realm
    audiences: [a, b]
    discovery: true
routes:
  - name: public
    match: {path_prefix: /public/}
    auth: none
  - match: {path_prefix: /admin/, methods: [get, POST]}
    auth:
      provider: main
      scopes: {all_of: [admin]}
      claims:
        - {claim: realm_access.roles, contains: admin}
        - {claim: email, matches: '.*@example\\.com'}
        - {claim: tier, one_of: [gold, silver]}
  - match: {path_regex: '^/v[0-9]+/'}
    auth: {provider: oidc, optional: true}
token_cache: {max_entries: 500, max_ttl: 1m}
"""


def issues_of(text: str, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(textwrap.dedent(text), file="c.yaml", **kwargs)  # type: ignore[arg-type]
    return [str(issue) for issue in caught.value.issues]


def test_good_config_parses_into_frozen_typed_settings() -> None:
    s = parse(GOOD, file="c.yaml")
    main = s.providers["main"]
    assert main.issuers == ("https://issuer.test",)
    assert main.algorithms[:3] == ("RS256", "RS384", "RS512") and "HS256" not in main.algorithms
    assert main.keys == RemoteJwks(
        url="https://issuer.test/jwks.json", cache_ttl=600.0, min_refresh_interval=15.0, timeout=2.0
    )
    assert (main.leeway, main.max_token_age, main.typ, main.required_claims) == (60.0, 3600.0, "at+jwt", ("exp",))
    assert s.providers["oidc"].keys.discovery_url == "https://login.test/realm/.well-known/openid-configuration"
    public, admin, versioned = s.routes
    assert public.auth is None and public.name == "public"
    assert admin.match.methods == frozenset({"GET", "HEAD", "POST"}), "HEAD goes with GET"
    assert [r.op for r in admin.auth.claims] == ["contains", "matches", "one_of"]
    assert admin.auth.claims[1].value.fullmatch("ann@example.com")
    assert versioned.auth.optional and versioned.match.path_regex.match("/v2/x")
    assert s.token_cache.max_entries == 500 and s.token_cache.max_ttl == 60.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        main.leeway = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.providers["x"] = main  # type: ignore[index]


def test_the_repository_config_is_valid() -> None:
    settings = load(Path(__file__).parents[3] / "config.yaml")
    assert settings.providers


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "providers: {main: {issuer: i, audiences: [a], jwks: {url: 'ftp://x'}}}",
            "c.yaml:1: providers.main.jwks.url: 'ftp://x' is not an http(s) URL with a host",
        ),
        (
            "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: {url: 'https://x', cahce_ttl: 5m}\n",
            "c.yaml:5: providers.main.jwks.cahce_ttl: unknown key; did you mean cache_ttl? allowed here: cache_ttl, "
            "min_refresh_interval, timeout, url",
        ),
        (
            "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: {url: 'https://x'}\n    leeway: 5 minutes\n",
            "c.yaml:6: providers.main.leeway: '5 minutes' is not a duration like 30s, 5m, 1h or 250ms",
        ),
        (
            "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: {url: 'https://x'}\n    algorithms: [RS256, none]\n",
            "c.yaml:6: providers.main.algorithms: 'none' is never allowed: unsigned tokens are refused (RFC 8725 §3.1)",
        ),
        (
            "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: {url: 'https://x'}\n    algorithms: [RS256, HS256]\n",
            "c.yaml:6: providers.main.algorithms: HS256 needs a shared `secret`; this provider's keys are asymmetric, "
            "and HMAC with a public key is the algorithm-confusion attack (RFC 8725 §2.1)",
        ),
        (
            "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: {url: 'https://x'}\n    algorithms: [RS257]\n",
            "c.yaml:6: providers.main.algorithms: 'RS257' is not supported; choose from RS256, RS384, RS512, PS256, "
            "PS384, PS512, ES256, ES384, ES512, EdDSA, HS256, HS384, HS512",
        ),
        (
            "providers:\n  main:\n    audiences: [a]\n    jwks: {url: 'https://x'}\n",
            "c.yaml:2: providers.main.issuer: is required: a string or a list of strings",
        ),
        (
            "providers:\n  main:\n    issuer: i\n    audiences: [a]\n",
            "c.yaml:2: providers.main: needs a key source: one of jwks, discovery, jwks_file, pem_file, secret",
        ),
        (
            "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: {url: 'https://x'}\n    jwks_file: k.json\n",
            "c.yaml:6: providers.main.jwks_file: jwks and jwks_file are mutually exclusive: a provider has exactly one key "
            "source (jwks, discovery, jwks_file, pem_file, secret); keep one of them",
        ),
        (
            "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    secret: {env: JWT_SIDECAR_TEST_UNSET}\n",
            "c.yaml:5: providers.main.secret.env: environment variable JWT_SIDECAR_TEST_UNSET is not set",
        ),
        (
            "providers:\n  main:\n    issuer: '${JWT_SIDECAR_TEST_UNSET}'\n    audiences: [a]\n    jwks: {url: 'https://x'}\n",
            "c.yaml:3: providers.main.issuer: environment variable JWT_SIDECAR_TEST_UNSET is not set",
        ),
        (
            "providers:\n  main:\n    issuer: [a, b]\n    audiences: [a]\n    discovery: true\n",
            "c.yaml:5: providers.main.discovery: `discovery: true` needs exactly one issuer; give the discovery URL instead",
        ),
        (
            "providers:\n  main: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}\n"
            "routes:\n  - match: {path_prefix: /}\n    auth: {provider: mian}\n",
            "c.yaml:5: routes[0].auth.provider: unknown provider 'mian'; did you mean main? known providers: main",
        ),
        (
            "providers:\n  main: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}\n"
            "routes:\n  - match: {path_prefix: /}\n    auth:\n      provider: main\n      claims:\n        - {claim: e, matches: '(['}\n",
            "c.yaml:8: routes[0].auth.claims[0].matches: '([' is not a valid regular expression: "
            "unterminated character set at position 1",
        ),
        (
            "providers:\n  main: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}\n"
            "routes:\n  - match: {path_prefix: /}\n    auth:\n      provider: main\n      claims:\n        - {claim: e, equals: 1, one_of: [1]}\n",
            "c.yaml:8: routes[0].auth.claims[0].one_of: equals and one_of are mutually exclusive: a claim rule has exactly "
            "one of equals, one_of, contains, matches, present",
        ),
        (
            "providers:\n  main: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}\n"
            "routes:\n  - match: {path_prefix: admin/}\n    auth: none\n",
            "c.yaml:4: routes[0].match.path_prefix: 'admin/' must start with /",
        ),
        (
            "providers:\n  main: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}\nroutes:\n  - match: {path_prefix: /}\n",
            "c.yaml:4: routes[0].auth: is required: `none`, or a mapping with `provider` (and scopes, claims, optional)",
        ),
        (
            "providers:\n  main: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}\nlisten_port: 8080\n",
            "c.yaml:3: listen_port: unknown key; allowed here: access_log, admin, ",
        ),
        (
            "providers:\n  main: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}\n  main: {}\n",
            "c.yaml:3: invalid YAML: while reading a mapping found duplicate key 'main'",
        ),
        ("providers: [\n", "c.yaml:2: invalid YAML:"),
        ("- just\n- a list\n", "c.yaml:1: the config must be a YAML mapping with a `providers` key"),
        (
            "token_cache: {max_entries: 0}\nproviders: {}\n",
            "c.yaml:1: token_cache.max_entries: 0 is not a whole number ≥ 1",
        ),
    ],
    ids=[
        "bad url",
        "unknown key",
        "bad duration",
        "alg none",
        "HS on asymmetric",
        "unknown alg",
        "missing issuer",
        "no key source",
        "two key sources",
        "secret env unset",
        "env var in string unset",
        "discovery two issuers",
        "unknown provider",
        "bad regex",
        "two operators",
        "relative prefix",
        "route without auth",
        "unknown top key",
        "duplicate key",
        "yaml syntax",
        "not a mapping",
        "bad integer",
    ],
)
def test_each_mistake_is_reported_with_file_line_path_and_expectation(text: str, expected: str) -> None:
    found = issues_of(text)
    assert any(issue.startswith(expected) for issue in found), found


def test_every_mistake_is_reported_at_once() -> None:
    found = issues_of("""\
        providers:
          main:
            issuer: i
            audiences: [a]
            jwks: {url: 'ftp://x'}
            leeway: soon
        routes:
          - match: {path_prefix: /}
            auth: {provider: nope}
        """)
    assert [f.split(": ")[1] for f in found] == [
        "providers.main.jwks.url",
        "providers.main.leeway",
        "routes[0].auth.provider",
    ]


def test_static_key_sources(tmp_path: Path, rsa_key: TestKey, ec_key: TestKey, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks_of(rsa_key, ec_key)))
    (tmp_path / "rsa.pem").write_bytes(rsa_key.public_pem())
    (tmp_path / "ec.pem").write_bytes(ec_key.public_pem())
    (tmp_path / "hs.secret").write_text(base64.urlsafe_b64encode(secrets.token_bytes(64)).decode().rstrip("=") + "\n")
    env_secret = secrets.token_urlsafe(32)
    monkeypatch.setenv("JWT_SIDECAR_TEST_SECRET", env_secret)
    (tmp_path / "c.yaml").write_text(
        textwrap.dedent("""\
        providers:
          file: {issuer: i, audiences: [a], jwks_file: jwks.json}
          rsa: {issuer: i, audiences: [a], pem_file: rsa.pem}
          ec: {issuer: i, audiences: [a], pem_file: ec.pem}
          env: {issuer: i, audiences: [a], secret: {env: JWT_SIDECAR_TEST_SECRET}, algorithms: [HS256]}
          filesecret: {issuer: i, audiences: [a], secret: {file: hs.secret, encoding: base64url}}
        """)
    )
    s = load(tmp_path / "c.yaml")  # relative paths resolve against the config's directory
    assert isinstance(s.providers["file"].keys, StaticKeys)
    assert s.providers["rsa"].algorithms == ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    assert s.providers["ec"].algorithms == ("ES256",)
    assert s.providers["env"].keys.jwks["keys"][0]["kty"] == "oct"
    assert s.providers["filesecret"].algorithms == ("HS256", "HS384", "HS512")
    assert env_secret not in repr(s), "secrets never appear in a repr or a log line"


@pytest.mark.parametrize(
    "provider, expected",
    [
        ("{issuer: i, audiences: [a], jwks_file: missing.json}", "providers.p.jwks_file: cannot read"),
        ("{issuer: i, audiences: [a], jwks_file: garbage.json}", "providers.p.jwks_file:"),
        ("{issuer: i, audiences: [a], jwks_file: enc.json}", "holds no key usable with"),
        ("{issuer: i, audiences: [a], jwks_file: oct.json}", "holds no key usable with RS256"),
        (
            "{issuer: i, audiences: [a], jwks: {url: 'https://x', min_refresh_interval: 0s}}",
            "providers.p.jwks.min_refresh_interval: must be at least 1s",
        ),
        (
            "{issuer: i, audiences: [a], pem_file: private.pem}",
            "is not a PEM public key (it holds a private key; give the public key)",
        ),
        (
            "{issuer: i, audiences: [a], pem_file: ec.pem, algorithms: [RS256]}",
            "RS256 do not fit the PEM key (kty EC, curve P-256)",
        ),
        (
            "{issuer: i, audiences: [a], secret: {file: short.secret}}",
            "providers.p.secret: is 5 bytes; HS256 needs at least 32",
        ),
        (
            "{issuer: i, audiences: [a], secret: {file: short.secret}, algorithms: [RS256]}",
            "RS256 cannot be used with a shared secret",
        ),
    ],
    ids=[
        "missing file",
        "garbage jwks",
        "only enc keys",
        "only an oct key",
        "no flood protection",
        "private pem",
        "alg unfit for pem",
        "short secret",
        "RS on secret",
    ],
)
def test_key_material_mistakes(tmp_path: Path, rsa_key: TestKey, ec_key: TestKey, provider: str, expected: str) -> None:
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "oct.json").write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}))
    (tmp_path / "enc.json").write_text(json.dumps({"keys": [{**rsa_key.public_jwk, "use": "enc"}]}))
    (tmp_path / "private.pem").write_bytes(rsa_key.private_pem())
    (tmp_path / "ec.pem").write_bytes(ec_key.public_pem())
    (tmp_path / "short.secret").write_text("short\n")
    found = issues_of(f"providers:\n  p: {provider}\n", base_dir=tmp_path)
    assert any(expected in issue and issue.startswith("c.yaml:2: ") for issue in found), found


def test_durations_and_defaults() -> None:
    s = parse("providers: {m: {issuer: i, audiences: [a], jwks: {url: 'https://x', cache_ttl: 1h30m, timeout: 250ms}}}")
    keys = s.providers["m"].keys
    assert (keys.cache_ttl, keys.timeout, keys.min_refresh_interval) == (5400.0, 0.25, 30.0)
    assert s.providers["m"].leeway == 30.0 and s.token_cache.enabled


def test_env_expansion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISSUER_HOST", "login.example")
    s = parse("providers: {m: {issuer: 'https://${ISSUER_HOST}/', audiences: [a], discovery: true}}")
    assert s.providers["m"].issuers == ("https://login.example/",)


RANDOM_32 = secrets.token_bytes(32)


@pytest.mark.parametrize(
    "encoding, text",
    [
        ("base64", base64.b64encode(RANDOM_32).decode() + "\n"),  # openssl rand -base64 32
        ("base64url", base64.urlsafe_b64encode(RANDOM_32).decode().rstrip("=")),  # unpadded, 43 chars
    ],
)
def test_base64_secrets_padded_or_not(tmp_path: Path, encoding: str, text: str) -> None:
    (tmp_path / "s").write_text(text)
    s = parse(
        f"providers: {{p: {{issuer: i, audiences: [a], algorithms: [HS256], secret: {{file: s, encoding: {encoding}}}}}}}",
        base_dir=tmp_path,
    )
    k = s.providers["p"].keys.jwks["keys"][0]["k"]
    assert base64.urlsafe_b64decode(k + "=") == RANDOM_32


_LIMITS_BASE = "providers:\n  main: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}\n"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("header_timeout: 0\n", "c.yaml:3: header_timeout: must be more than 0s"),
        ("header_timeout: soon\n", "c.yaml:3: header_timeout: 'soon' is not a duration"),
        ("max_connections: 0\n", "c.yaml:3: max_connections: 0 is not a whole number ≥ 1"),
        ("max_connections: 1.5\n", "c.yaml:3: max_connections: 1.5 is not a whole number ≥ 1"),
        ("upstream: {url: 'http://u', body_timeout: 0}\n", "c.yaml:3: upstream.body_timeout: must be more than 0s"),
        ("websocket: {idle_timeout: -1s}\n", "c.yaml:3: websocket.idle_timeout:"),
        ("websocket: {max_lifetime: forever}\n", "c.yaml:3: websocket.max_lifetime:"),
        ("websocket: {close_on_token_expiry: sometimes}\n", "c.yaml:3: websocket.close_on_token_expiry:"),
        (
            "websocket: {idle: 5m}\n",
            "c.yaml:3: websocket.idle: unknown key; allowed here: close_on_token_expiry, idle_timeout, max_lifetime",
        ),
        (
            "routes:\n  - match: {path_prefix: /}\n    auth: none\n    websocket: {lifetime: 1h}\n",
            "c.yaml:6: routes[0].websocket.lifetime: unknown key",
        ),
    ],
    ids=[
        "header 0",
        "header word",
        "max 0",
        "max float",
        "body 0",
        "idle negative",
        "lifetime word",
        "expiry word",
        "websocket unknown key",
        "route websocket unknown key",
    ],
)
def test_connection_limits_and_timeouts_are_checked_with_their_line(text: str, expected: str) -> None:
    found = issues_of(_LIMITS_BASE + text)
    assert any(issue.startswith(expected) for issue in found), found


def test_connection_limits_and_timeouts_defaults_and_route_websocket_inherits_the_top_level() -> None:
    s = parse(_LIMITS_BASE)
    assert (s.max_connections, s.header_timeout, s.upstream.body_timeout) == (None, 10.0, 60.0)
    assert (s.websocket.idle_timeout, s.websocket.max_lifetime, s.websocket.close_on_token_expiry) == (
        300.0,
        86400.0,
        False,
    )
    s = parse(
        _LIMITS_BASE + "max_connections: 5000\nheader_timeout: 2s\nwebsocket: {idle_timeout: 1m, max_lifetime: 0}\n"
        "routes:\n  - match: {path_prefix: /ws/}\n    auth: none\n    websocket: {close_on_token_expiry: true}\n"
        "  - match: {path_prefix: /}\n    auth: none\n"
    )
    assert (s.max_connections, s.header_timeout) == (5000, 2.0)
    assert s.routes[0].websocket is not None
    assert (
        s.routes[0].websocket.idle_timeout,
        s.routes[0].websocket.max_lifetime,
        s.routes[0].websocket.close_on_token_expiry,
    ) == (60.0, 0.0, True)
    assert s.routes[1].websocket is None and s.websocket.close_on_token_expiry is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("keep_alive_timeout: 0\n", "c.yaml:3: keep_alive_timeout: must be more than 0s"),
        ("keep_alive_timeout: -5s\n", "c.yaml:3: keep_alive_timeout:"),
        ("keep_alive_timeout: later\n", "c.yaml:3: keep_alive_timeout: 'later' is not a duration"),
        # nginx's spelling
        ("keepalive_timeout: 30s\n", "c.yaml:3: keepalive_timeout: unknown key; did you mean keep_alive_timeout?"),
    ],
    ids=["zero", "negative", "word", "nginx-spelling"],
)
def test_keep_alive_timeout_is_checked_with_its_line(text: str, expected: str) -> None:
    found = issues_of(_LIMITS_BASE + text)
    assert any(issue.startswith(expected) for issue in found), found


def test_keep_alive_timeout_is_75s_unless_set() -> None:
    assert parse(_LIMITS_BASE).keep_alive_timeout == 75.0
    assert parse(_LIMITS_BASE + "keep_alive_timeout: 650s\n").keep_alive_timeout == 650.0
    assert parse(_LIMITS_BASE + "keep_alive_timeout: 500ms\n").keep_alive_timeout == 0.5


@pytest.mark.parametrize(
    "scope", ["read admin", "read\\tadmin", "", " admin", "admin\\u00a0", "caf\\u00e9", 'a\\"b', "a\\\\b"]
)
def test_a_scope_that_no_token_could_grant_is_refused_with_its_line(scope: str) -> None:
    # A token's scope string splits on SP alone (RFC 6749 §3.3), so "read admin" in a route
    # would refuse every caller; it is a config mistake (meant: [read, admin]).
    found = issues_of(
        "providers: {main: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}}\n"
        "routes:\n  - match: {path_prefix: /}\n    auth:\n      provider: main\n"
        f'      scopes:\n        any_of: [ok]\n        all_of: [ok, "{scope}"]\n'
    )
    assert any(
        issue.startswith("c.yaml:8: routes[0].auth.scopes.all_of: ") and "is not one scope token" in issue
        for issue in found
    ), found


def test_rfc_6749_scope_tokens_are_accepted() -> None:
    s = parse(
        "providers: {main: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}}\n"
        "routes:\n  - match: {path_prefix: /}\n    auth:\n      provider: main\n"
        "      scopes: {all_of: ['orders:read', 'https://graph.example/User.Read', '!#[]~'], any_of: [a]}\n"
    )
    assert s.routes[0].auth.scopes.all_of == ("orders:read", "https://graph.example/User.Read", "!#[]~")


# -- a kid for `secret` and `pem_file` keys (issue 10 item 9) ------------------------------------
def test_secret_and_pem_file_take_an_optional_kid(
    tmp_path: Path, rsa_key: TestKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    import secrets

    (tmp_path / "rsa.pem").write_bytes(rsa_key.public_pem())
    monkeypatch.setenv("JWT_SIDECAR_TEST_SECRET", secrets.token_urlsafe(48))
    s = parse(
        textwrap.dedent("""\
        providers:
          hs: {issuer: i, audiences: [a], secret: {env: JWT_SIDECAR_TEST_SECRET, kid: hs-2024}}
          hs-any: {issuer: i, audiences: [a], secret: {env: JWT_SIDECAR_TEST_SECRET}}
          pem: {issuer: i, audiences: [a], pem_file: {file: rsa.pem, kid: "2024"}}
          pem-any: {issuer: i, audiences: [a], pem_file: rsa.pem}
        """),
        file="c.yaml",
        base_dir=tmp_path,
    )
    assert s.providers["hs"].keys.jwks["keys"][0]["kid"] == "hs-2024"
    assert "kid" not in s.providers["hs-any"].keys.jwks["keys"][0]
    assert s.providers["pem"].keys.jwks["keys"][0]["kid"] == "2024"
    assert s.providers["pem"].keys.origin.endswith("rsa.pem (kid '2024')")
    assert "kid" not in s.providers["pem-any"].keys.jwks["keys"][0]
    assert s.providers["pem"].algorithms == s.providers["pem-any"].algorithms


@pytest.mark.parametrize(
    "provider, expected",
    [
        (
            "{issuer: i, audiences: [a], secret: {file: s.secret, kid: ''}}",
            "c.yaml:3: providers.p.secret.kid: must not be empty",
        ),
        (
            "{issuer: i, audiences: [a], secret: {file: s.secret, kid: [a, b]}}",
            "c.yaml:3: providers.p.secret.kid: a list is not a string",
        ),
        (
            "{issuer: i, audiences: [a], pem_file: {file: rsa.pem, kid: ''}}",
            "c.yaml:3: providers.p.pem_file.kid: must not be empty",
        ),
        (
            "{issuer: i, audiences: [a], pem_file: {file: rsa.pem, kdi: x}}",
            "c.yaml:3: providers.p.pem_file.kdi: unknown key; did you mean kid? allowed here: file, kid",
        ),
        ("{issuer: i, audiences: [a], pem_file: {kid: x}}", "c.yaml:3: providers.p.pem_file.file: is required"),
        (
            "{issuer: i, audiences: [a], pem_file: {file: missing.pem, kid: x}}",
            "c.yaml:3: providers.p.pem_file.file: cannot read",
        ),
        ("{issuer: i, audiences: [a], pem_file: {file: private.pem}}", "c.yaml:3: providers.p.pem_file.file: "),
        ("{issuer: i, audiences: [a], jwks_file: k.json, kid: x}", "c.yaml:3: providers.p.kid: unknown key"),
    ],
    ids=[
        "empty-secret-kid",
        "list-kid",
        "empty-pem-kid",
        "misspelt-key",
        "no-file",
        "missing-file",
        "private-pem",
        "kid-beside-jwks_file",
    ],
)
def test_kid_mistakes_are_named_with_their_line(tmp_path: Path, rsa_key: TestKey, provider: str, expected: str) -> None:
    import secrets

    (tmp_path / "s.secret").write_text(secrets.token_urlsafe(48))
    (tmp_path / "rsa.pem").write_bytes(rsa_key.public_pem())
    (tmp_path / "private.pem").write_bytes(rsa_key.private_pem())
    (tmp_path / "k.json").write_text(json.dumps(jwks_of(rsa_key)))
    found = issues_of(f"realm: r\nproviders:\n  p: {provider}\n", base_dir=tmp_path)
    assert any(issue.startswith(expected) for issue in found), found


def test_a_secret_variable_that_is_not_utf8_is_read_as_its_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    # os.environ holds undecodable bytes as lone surrogates; encoding them strictly was a traceback.
    raw = secrets.token_bytes(32).replace(b"\0", b"\1").replace(b"=", b"+") + b"\xff\xfe"
    monkeypatch.setitem(os.environ, "JWT_SIDECAR_TEST_RAW_SECRET", os.fsdecode(raw))
    s = parse(
        "providers: {p: {issuer: i, audiences: [a], algorithms: [HS256], secret: {env: JWT_SIDECAR_TEST_RAW_SECRET}}}"
    )
    k = s.providers["p"].keys.jwks["keys"][0]["k"]
    assert base64.urlsafe_b64decode(k + "==") == raw
