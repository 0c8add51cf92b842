"""`auth: {providers: [...]}` in the config: every mistake refused with its line, what loads,
what `check-config` shows and how `token explain --route` chooses (the proxy's own choice)."""

from __future__ import annotations

import base64
import json
import secrets
import textwrap
from pathlib import Path

import jwt
import pytest

from proxy.base.errors import ConfigError
from proxy.config.builder import parse
from proxy.config.routecheck import format_warning
from proxy.tools.cli import main

PROVIDERS = """\
providers:
  users:
    issuer: https://users.test
    audiences: [api]
    jwks: {url: "https://users.test/jwks"}
  services:
    issuer: [https://services.test, https://services.test/v2]
    audiences: [api]
    jwks: {url: "https://services.test/jwks"}
  partner:
    issuer: [https://partner.test, https://services.test/v2]
    audiences: [api]
    jwks: {url: "https://partner.test/jwks"}
  cookies:
    issuer: https://cookies.test
    audiences: [api]
    jwks: {url: "https://cookies.test/jwks"}
    token_sources: [{cookie: session}]
routes:
"""
ROUTE_LINE = PROVIDERS.count("\n") + 3  # the `auth:` line of the one route below


def config(auth: str, extra: str = "") -> str:
    return PROVIDERS + f"  - name: api\n    match: {{path_prefix: /}}\n    auth: {auth}\n" + extra


def issues_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(textwrap.dedent(text), file="c.yaml")
    return [str(issue) for issue in caught.value.issues]


def test_a_route_of_several_providers_loads() -> None:
    settings = parse(config("{providers: [users, services], optional: true}"))
    auth = settings.routes[0].auth
    assert auth is not None
    assert auth.providers == ("users", "services") and auth.names == ("users", "services")
    assert auth.optional and auth.provider == ""


@pytest.mark.parametrize(
    "auth, expected",
    [
        pytest.param(
            "{providers: [users, services, partner]}",
            f"c.yaml:{ROUTE_LINE}: routes[0].auth.providers: providers services and partner both accept iss "
            "'https://services.test/v2': a token naming it could be either's, and the iss is what chooses; give each "
            "provider of a route its own issuers (or split the route)",
            id="issuer-lists-overlap",
        ),
        pytest.param(
            "{provider: users, providers: [users, services]}",
            f"c.yaml:{ROUTE_LINE}: routes[0].auth.providers: `provider` and `providers` are mutually exclusive: name "
            "one provider with `provider: NAME`, or several with `providers: [A, B]` (the token's iss chooses among "
            "them)",
            id="both-keys",
        ),
        pytest.param(
            "{providers: []}",
            f"c.yaml:{ROUTE_LINE}: routes[0].auth.providers: must not be empty: a list of provider names, e.g. "
            "[users, services]",
            id="empty",
        ),
        pytest.param(
            "{providers: [users, servces]}",
            f"c.yaml:{ROUTE_LINE}: routes[0].auth.providers[1]: unknown provider 'servces'; did you mean services? "
            "known providers: cookies, partner, services, users",
            id="unknown",
        ),
        pytest.param(
            "{providers: [users, services, users]}",
            f"c.yaml:{ROUTE_LINE}: routes[0].auth.providers[2]: provider 'users' is listed twice (items 0 and 2): "
            "name each once",
            id="twice",
        ),
        pytest.param(
            "{providers: [users, cookies]}",
            f"c.yaml:{ROUTE_LINE}: routes[0].auth: the providers of this route look for tokens in different places "
            "(users: bearer; cookies: cookie session); give the route its own `token_sources` (e.g. [bearer]): the "
            "token is looked for there, whichever provider its iss names",
            id="token-sources-differ",
        ),
    ],
)
def test_an_ambiguous_or_wrong_list_is_refused_with_its_line(auth: str, expected: str) -> None:
    assert issues_of(config(auth)) == [expected]


def test_each_item_of_a_block_list_is_named_on_its_own_line() -> None:
    text = PROVIDERS + "  - match: {path_prefix: /}\n    auth:\n      providers:\n        - users\n        - usrs\n"
    assert issues_of(text) == [
        f"c.yaml:{ROUTE_LINE + 2}: routes[0].auth.providers[1]: unknown provider 'usrs'; did you mean users? "
        "known providers: cookies, partner, services, users"
    ]


def test_a_route_that_says_where_to_look_may_combine_different_sources() -> None:
    settings = parse(config("{providers: [users, cookies]}", "    token_sources: [bearer, {cookie: session}]\n"))
    assert [s.kind for s in settings.routes[0].token_sources or ()] == ["bearer", "cookie"]


def test_the_provider_header_is_checked_like_the_others() -> None:
    base = PROVIDERS.replace(
        '    jwks: {url: "https://users.test/jwks"}\n',
        '    jwks: {url: "https://users.test/jwks"}\n    headers: {claims: {sub: X-User-Id}, provider: %s}\n',
    )
    text = base + "  - match: {path_prefix: /}\n    auth: {provider: users}\n"
    assert parse(text % "X-Auth-Provider").providers["users"].headers.provider == "X-Auth-Provider"
    assert issues_of(text % "X-User-Id") == [
        "c.yaml:6: providers.users.headers.provider: 'X-User-Id' already carries a claim or the payload: give the "
        "provider its own header"
    ]
    for bad in ("Host", "'X Auth'", "Content-Length"):
        assert issues_of(text % bad)[0].startswith("c.yaml:6: providers.users.headers.provider: ")


def test_a_client_cannot_send_the_provider_header() -> None:
    from proxy.request.identity import StripPlan

    text = PROVIDERS + "  - match: {path_prefix: /}\n    auth: {providers: [users, services]}\n"
    text += "    headers: {claims: {sub: X-Caller}, provider: Admitted-By}\n"
    plan = StripPlan.build(parse(text))
    assert "admitted-by" in plan.names


def test_a_route_table_check_sees_every_provider_of_a_route() -> None:
    # /a/ of users alone, shadowed for POST by a route of users and services: weaker.
    text = PROVIDERS + (
        "  - name: strict\n    match: {path_prefix: /a/, methods: [GET]}\n    auth: {provider: users}\n"
        "  - name: loose\n    match: {path_prefix: /}\n    auth: {providers: [users, services]}\n"
    )
    warnings = [format_warning(w) for w in parse(text, file="c.yaml").warnings]
    assert any("another provider (services, not users)" in w for w in warnings), warnings


# -- the operator's commands ------------------------------------------------------------------------
# Not ending in CR or LF: a secret file's line ending is stripped (base/secretfile.py), so a
# random secret that ended in one (2 in 256) was read one byte short and the tests failed.
SECRET_A = secrets.token_bytes(47) + b"a"
SECRET_B = secrets.token_bytes(47) + b"b"


@pytest.fixture
def secret_config(tmp_path: Path) -> Path:
    for name, secret in (("a", SECRET_A), ("b", SECRET_B)):
        (tmp_path / f"{name}.key").write_bytes(secret)
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        providers:
          users:
            issuer: https://users.test
            audiences: [api]
            algorithms: [HS256]
            secret: {{file: "{tmp_path / "a.key"}"}}
            headers: {{claims: {{sub: X-User-Id}}, provider: X-Auth-Provider}}
          services:
            issuer: https://services.test
            audiences: [api]
            algorithms: [HS256]
            secret: {{file: "{tmp_path / "b.key"}"}}
        routes:
          - name: open
            match: {{path_prefix: /public/}}
            auth: none
          - name: api
            match: {{path_prefix: /}}
            auth: {{providers: [users, services]}}
        """)
    )
    return path


def token(iss: str | None, secret: bytes) -> str:
    payload = {"aud": "api", "sub": "ada", "exp": 4102444800, **({"iss": iss} if iss is not None else {})}
    return jwt.encode(payload, secret, algorithm="HS256")


def test_check_config_shows_a_routes_providers(secret_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(secret_config)]) == 0
    assert (
        "api: prefix / [any method] -> providers users, services (the token's iss chooses)" in capsys.readouterr().out
    )


def test_token_explain_on_a_route_chooses_as_the_proxy_does(
    secret_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "token",
                "explain",
                token("https://services.test", SECRET_B),
                "--config",
                str(secret_config),
                "--route",
                "api",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "provider: services (" in out
    assert "chosen by the token's iss among route api's providers (users, services)" in out
    assert out.rstrip().endswith("VALID")

    assert (
        main(
            [
                "token",
                "explain",
                token("https://users.test", SECRET_A),
                "--config",
                str(secret_config),
                "--route",
                "api",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "provider: users (" in out and "forwarded as X-User-Id, X-Auth-Provider" in out

    # services' secret under users' iss: users' secret checks it.
    assert (
        main(
            [
                "token",
                "explain",
                token("https://users.test", SECRET_B),
                "--config",
                str(secret_config),
                "--route",
                "api",
            ]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "provider: users (" in out and out.rstrip().endswith("INVALID: bad_signature")

    assert (
        main(
            [
                "token",
                "explain",
                token("https://x.test/\x1b[2J", SECRET_A),
                "--config",
                str(secret_config),
                "--route",
                "api",
            ]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "provider: none of route api's chosen: iss 'https://x.test/\\x1b[2J' is none of this route's" in out
    assert out.rstrip().endswith("INVALID: issuer")

    assert main(["token", "explain", token(None, SECRET_A), "--config", str(secret_config), "--route", "api"]) == 1
    assert capsys.readouterr().out.rstrip().endswith("INVALID: missing_claim")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--route", "apii"], "unknown route 'apii'; did you mean api? known: open, api"),
        (["--route", "open"], "route 'open' is public (auth: none): no token is checked there"),
        (["--route", "api", "--provider", "users"], "--route and --provider are exclusive"),
    ],
)
def test_token_explain_route_mistakes_are_usage_errors(
    secret_config: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["token", "explain", token("https://users.test", SECRET_A), "--config", str(secret_config), *args]) == 2
    assert message in capsys.readouterr().err


def test_token_explain_route_needs_a_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JWT_SIDECAR_CONFIG", raising=False)
    assert main(["token", "explain", token("https://users.test", SECRET_A), "--route", "api"]) == 2
    assert "--route needs a config" in capsys.readouterr().err


def test_by_issuer_reads_the_payload_as_verification_does() -> None:
    from proxy.auth.verify import by_issuer
    from proxy.base.errors import InvalidToken, Reason

    table = {"https://a": "A", "https://b": "B"}

    def segment(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def choose(payload: bytes, head: str = "e30", sig: str = "c2ln") -> object:
        return by_issuer(f"{head}.{segment(payload)}.{sig}", table, "A: 'https://a'; B: 'https://b'", max_bytes=4096)

    assert choose(json.dumps({"iss": "https://b"}).encode()) == "B"
    for payload, reason in (
        (b'{"iss":"https://a","iss":"https://b"}', Reason.MALFORMED),  # two readings: refused
        (b'{"iss":"https://a"', Reason.MALFORMED),
        (b'["https://a"]', Reason.MALFORMED),
        (b'{"iss":NaN}', Reason.MALFORMED),
        (b'{"sub":"x"}', Reason.MISSING_CLAIM),
        (b'{"iss":null}', Reason.MISSING_CLAIM),
        (b'{"iss":["https://a"]}', Reason.ISSUER),
        (b'{"iss":"https://a/"}', Reason.ISSUER),
        (b'{"iss":"HTTPS://A"}', Reason.ISSUER),
        (b'{"iss":"https://\\u0061"}', None),  # a JSON escape is the same string: https://a
    ):
        if reason is None:
            assert choose(payload) == "A"
            continue
        with pytest.raises(InvalidToken) as refused:
            choose(payload)
        assert refused.value.reason is reason, payload
    with pytest.raises(InvalidToken) as refused:
        by_issuer("a.b", table, "", max_bytes=4096)
    assert refused.value.reason is Reason.MALFORMED
    with pytest.raises(InvalidToken) as refused:
        by_issuer("a." * 3000, table, "", max_bytes=4096)
    assert refused.value.reason is Reason.TOO_LARGE
