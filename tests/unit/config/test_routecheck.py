"""routecheck.py: warnings for requests that fall through to weaker auth, errors for routes that never match."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.base.errors import ConfigError
from proxy.config import builder as config
from proxy.config.routecheck import format_warning

REPO = Path(__file__).parents[3]

PROVIDERS = """\
providers:
  main: {issuer: https://i.test, audiences: [a], jwks: {url: "https://i.test/jwks"}}
  other: {issuer: https://o.test, audiences: [a], jwks: {url: "https://o.test/jwks"}}
routes:
"""
ADMIN = "auth: {provider: main, scopes: {all_of: [admin]}, claims: [{claim: email_verified, equals: true}]}"


def warnings(routes: str) -> list[str]:
    settings = config.parse(PROVIDERS + textwrap.indent(textwrap.dedent(routes), "  "), file="c.yaml")
    return [format_warning(w) for w in settings.warnings]


def errors(routes: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.parse(PROVIDERS + textwrap.indent(textwrap.dedent(routes), "  "), file="c.yaml")
    return [str(issue) for issue in caught.value.issues]


@pytest.mark.parametrize("path", [REPO / "config.yaml", REPO / "proxy" / "default_config.yaml"])
def test_the_shipped_config_has_no_warnings(path: Path) -> None:
    assert config.load(path).warnings == ()


def test_the_old_shipped_admin_route_is_warned_about() -> None:
    # config.yaml once let any valid token DELETE /admin/x: admin listed GET and POST only.
    found = warnings(f"""\
        - {{name: public, match: {{path_prefix: /public/}}, auth: none}}
        - {{name: admin, match: {{path_prefix: /admin/, methods: [GET, POST]}}, {ADMIN}}}
        - {{name: api, match: {{path_prefix: /}}, auth: {{provider: main}}}}
        """)
    assert found == [
        "c.yaml:6: warning: routes[1]: route 'admin' guards /admin and below for GET, HEAD, POST only: "
        "every method but GET, HEAD, POST there fall through to route 'api' (line 7), whose auth is weaker: "
        "scope admin is not required; claim rule email_verified equals is not applied. List every method on "
        "'admin', or add a route as strict for the others before 'api'"
    ]


@pytest.mark.parametrize(
    "later, reason",
    [
        ("auth: none", "no token is needed (auth: none)"),
        ("auth: {provider: main, optional: true, scopes: {all_of: [admin]}}", "a token is optional"),
        ("auth: {provider: other, scopes: {all_of: [admin]}}", "another provider (other, not main)"),
        ("auth: {provider: main, scopes: {all_of: [read]}}", "scope admin is not required"),
        (
            "auth: {provider: main, scopes: {all_of: [admin]}, claims: [{claim: email_verified, present: true}]}",
            "claim rule email_verified equals is not applied",
        ),
    ],
    ids=["public", "optional", "another-provider", "fewer-scopes", "fewer-claim-rules"],
)
def test_each_kind_of_weaker_auth_is_named(later: str, reason: str) -> None:
    found = warnings(f"""\
        - {{name: admin, match: {{path_prefix: /admin, methods: [POST]}}, {ADMIN}}}
        - {{name: rest, match: {{path_prefix: /}}, {later}}}
        """)
    assert len(found) == 1
    assert (
        "route 'admin' guards /admin and below for POST only: every method but POST there fall through "
        "to route 'rest' (line 6)" in found[0]
    )
    assert reason in found[0]


def test_any_of_scopes() -> None:
    guard = "{name: g, match: {path_prefix: /g, methods: [GET]}, auth: {provider: main, scopes: {any_of: [ops, sre]}}}"
    assert warnings(f"- {guard}\n- {{name: r, match: {{path_prefix: /}}, auth: {{provider: main}}}}\n")[0].endswith(
        "whose auth is weaker: none of the scopes ops, sre is required. List every method on 'g', or add a route "
        "as strict for the others before 'r'"
    )
    for strict in ("{any_of: [sre]}", "{all_of: [ops]}", "{any_of: [ops, sre], all_of: [x]}"):
        assert (
            warnings(
                f"- {guard}\n- {{name: r, match: {{path_prefix: /}}, auth: {{provider: main, scopes: {strict}}}}}\n"
            )
            == []
        )


@pytest.mark.parametrize(
    "routes",
    [
        # A later route as strict (or stricter) takes the other methods.
        f"""\
    - {{name: admin-read, match: {{path_prefix: /admin, methods: [GET]}}, {ADMIN}}}
    - {{name: admin, match: {{path_prefix: /admin/}}, auth: {{provider: main, scopes: {{all_of: [admin, write]}},
        claims: [{{claim: email_verified, equals: true}}, {{claim: org, present: true}}]}}}}
    - {{name: api, match: {{path_prefix: /}}, auth: none}}
    """,
        # The rest of the methods are taken by a strict route before the weak one.
        f"""\
    - {{name: a, match: {{path_prefix: /admin, methods: [GET]}}, {ADMIN}}}
    - {{name: b, match: {{path_prefix: /admin, methods: [POST, PUT]}}, {ADMIN}}}
    - {{name: c, match: {{path_prefix: /admin}}, {ADMIN}}}
    - {{name: d, match: {{path_prefix: /}}, auth: none}}
    """,
        # Later weak routes that share no path with the guarded one.
        f"""\
    - {{name: admin, match: {{path_prefix: /admin, methods: [GET]}}, {ADMIN}}}
    - {{name: administrator, match: {{path_prefix: /administrator}}, auth: none}}
    - {{name: versioned, match: {{path_regex: '^/v[0-9]+/'}}, auth: none}}
    - {{name: exact, match: {{path_exact: /admins}}, auth: none}}
    """,
        # A weak route for methods the guarded route lists already.
        f"""\
    - {{name: admin, match: {{path_prefix: /admin, methods: [GET, POST]}}, {ADMIN}}}
    - {{name: reads, match: {{path_prefix: /, methods: [GET]}}, auth: none}}
    """,
        # Public routes guard nothing.
        """\
    - {name: assets, match: {path_prefix: /assets, methods: [GET]}, auth: none}
    - {name: api, match: {path_prefix: /}, auth: {provider: main}}
    """,
    ],
    ids=["strict-successor", "strict-in-between", "no-shared-path", "same-methods-only", "public-guard"],
)
def test_no_warning_where_nothing_reaches_weaker_auth(routes: str) -> None:
    assert warnings(routes) == []


@pytest.mark.parametrize(
    "later",
    [
        "{path_prefix: /admin/public}",  # part of the guarded paths
        "{path_exact: /admin}",
        "{path_regex: '^/adm'}",  # may match /admin/...
        "{path_regex: 'secret'}",  # unanchored: may match anywhere
        "{path_regex: '^/admin/(a|b)'}",
        "{path_prefix: /ADMIN, ignore_case: true}",
        "{path_prefix: /, methods: [DELETE]}",
    ],
)
def test_a_weaker_route_on_part_of_the_guarded_paths_is_warned_about(later: str) -> None:
    found = warnings(f"""\
        - {{name: admin, match: {{path_prefix: /admin, methods: [GET]}}, {ADMIN}}}
        - {{name: leak, match: {later}, auth: none}}
        """)
    assert len(found) == 1 and "through to route 'leak' (line 6)" in found[0], found
    assert "no token is needed" in found[0]


def test_the_warning_names_the_methods_that_reach_each_weaker_route() -> None:
    found = warnings(f"""\
        - {{name: admin, match: {{path_prefix: /admin, methods: [GET]}}, {ADMIN}}}
        - {{name: deletes, match: {{path_prefix: /, methods: [DELETE]}}, auth: none}}
        - {{name: rest, match: {{path_prefix: /}}, auth: {{provider: main}}}}
        """)
    assert len(found) == 2
    assert "for GET, HEAD only: DELETE there falls through to route 'deletes' (line 6)" in found[0]
    assert "every method but DELETE, GET, HEAD there fall through to route 'rest' (line 7)" in found[1]


def test_an_exact_path_leaves_its_trailing_slash_spelling_to_a_weaker_route() -> None:
    found = warnings(f"""\
        - {{name: admin, match: {{path_exact: /admin}}, {ADMIN}}}
        - {{name: rest, match: {{path_prefix: /}}, auth: none}}
        """)
    assert found == [
        "c.yaml:5: warning: routes[0]: path_exact /admin does not cover /admin/, which most upstreams serve alike: "
        "route 'rest' (line 6) judges it, and its auth is weaker: no token is needed (auth: none). "
        "Use path_prefix /admin, or add /admin/ to a route as strict"
    ]
    assert warnings(f"""\
        - {{name: admin, match: {{path_exact: /admin/}}, {ADMIN}}}
        - {{name: rest, match: {{path_prefix: /}}, auth: none}}
        """)[0].startswith("c.yaml:5: warning: routes[0]: path_exact /admin/ does not cover /admin,")
    assert (
        warnings(f"""\
        - {{name: admin, match: {{path_exact: /admin}}, {ADMIN}}}
        - {{name: admin2, match: {{path_exact: /admin/}}, {ADMIN}}}
        - {{name: rest, match: {{path_prefix: /}}, auth: none}}
        """)
        == []
    )


@pytest.mark.parametrize(
    "routes, error",
    [
        (
            """\
     - {name: all, match: {path_prefix: /}, auth: none}
     - {name: admin, match: {path_prefix: /admin/}, auth: {provider: main}}
     """,
            "c.yaml:6: routes[1].match: route 'admin' can never match: every request it matches is taken first by "
            "'all' (line 5); remove it, or move it before them",
        ),
        (
            """\
     - {name: a, match: {path_prefix: /admin, methods: [GET]}, auth: {provider: main}}
     - {name: b, match: {path_prefix: /, methods: [POST, PUT]}, auth: {provider: main}}
     - {name: c, match: {path_exact: /admin/x, methods: [GET, PUT]}, auth: none}
     """,
            "c.yaml:7: routes[2].match: route 'c' can never match: every request it matches is taken first by "
            "'a' (line 5), 'b' (line 6); remove it, or move it before them",
        ),
        (
            """\
     - {name: a, match: {path_prefix: /Admin, ignore_case: true}, auth: {provider: main}}
     - {name: b, match: {path_regex: '^/ADMIN/[0-9]+$'}, auth: none}
     """,
            "c.yaml:6: routes[1].match: route 'b' can never match: every request it matches is taken first by "
            "'a' (line 5); remove it, or move it before them",
        ),
        (
            """\
     - {name: a, match: {path_regex: '^/v[0-9]+/'}, auth: {provider: main}}
     - {name: b, match: {path_regex: '^/v[0-9]+/'}, auth: none}
     """,
            "c.yaml:6: routes[1].match: route 'b' can never match: every request it matches is taken first by "
            "'a' (line 5); remove it, or move it before them",
        ),
        (
            """\
     - {name: a, match: {path_regex: '^/v[0-9]+/'}, auth: {provider: main}}
     - {name: b, match: {path_exact: /v2/x}, auth: none}
     """,
            "c.yaml:6: routes[1].match: route 'b' can never match: every request it matches is taken first by "
            "'a' (line 5); remove it, or move it before them",
        ),
        (
            """\
     - {name: a, match: {path_prefix: /a//b}, auth: none}
     """,
            "c.yaml:5: routes[0].match: route 'a' can never match: path_prefix '/a//b': request paths are "
            "normalised before matching, so write it as '/a/b'",
        ),
        (
            """\
     - {name: a, match: {path_exact: '/%7Euser'}, auth: none}
     """,
            "c.yaml:5: routes[0].match: route 'a' can never match: path_exact '/%7Euser': request paths are "
            "normalised before matching, so write it as '/~user'",
        ),
        (
            """\
     - {name: a, match: {path_prefix: '/a/../b'}, auth: none}
     """,
            "c.yaml:5: routes[0].match: route 'a' can never match: path_prefix '/a/../b': request paths are "
            "normalised before matching, so write it as '/b'",
        ),
        (
            """\
     - {name: a, match: {path_prefix: '/files%2Fx'}, auth: none}
     """,
            "c.yaml:5: routes[0].match: route 'a' can never match: path_prefix '/files%2Fx': a request path like it "
            "is refused with 400 (the path holds %2F (an encoded /))",
        ),
        (
            """\
     - {name: a, match: {path_prefix: '/a;b'}, auth: none}
     """,
            "c.yaml:5: routes[0].match: route 'a' can never match: path_prefix '/a;b': a request path like it "
            "is refused with 400 (a path segment holds ; (path parameters are refused))",
        ),
        (
            """\
     - {name: a, match: {path_prefix: '/café'}, auth: none}
     """,
            "c.yaml:5: routes[0].match: route 'a' can never match: path_prefix '/café': request paths are ASCII, "
            "so write it as '/caf%C3%A9'",
        ),
    ],
    ids=[
        "prefix-after-catch-all",
        "methods-shared-out",
        "ignore-case-prefix-covers-regex",
        "same-regex",
        "regex-covers-exact",
        "double-slash",
        "escaped-unreserved",
        "dot-segment",
        "encoded-slash",
        "path-parameter",
        "non-ascii",
    ],
)
def test_a_route_that_can_never_match_is_an_error_naming_its_line(routes: str, error: str) -> None:
    assert errors(routes) == [error]


@pytest.mark.parametrize(
    "routes",
    [
        """\
    - {name: a, match: {path_prefix: /admin, methods: [GET]}, auth: {provider: main}}
    - {name: b, match: {path_prefix: /admin}, auth: {provider: main}}
    """,
        """\
    - {name: a, match: {path_prefix: /admin}, auth: {provider: main}}
    - {name: b, match: {path_prefix: /ADMIN, ignore_case: true}, auth: {provider: main}}
    """,
        """\
    - {name: a, match: {path_regex: '^/admin'}, auth: {provider: main}}
    - {name: b, match: {path_prefix: /admin}, auth: {provider: main}}
    """,
        """\
    - {name: a, match: {path_prefix: /admin}, auth: {provider: main}}
    - {name: b, match: {path_regex: '^/admin'}, auth: {provider: main}}
    """,
        """\
    - {name: a, match: {path_prefix: /admin/}, auth: {provider: main}}
    - {name: b, match: {path_prefix: /administrator}, auth: {provider: main}}
    """,
        """\
    - {name: a, match: {path_prefix: /}, auth: {provider: main}}
    """,
    ],
    ids=[
        "other-methods-left",
        "other-casings-left",
        "regex-does-not-certainly-cover",
        "regex-reaches-beyond",
        "segment-prefix",
        "root-alone",
    ],
)
def test_a_route_that_can_match_is_not_an_error(routes: str) -> None:
    config.parse(PROVIDERS + textwrap.indent(textwrap.dedent(routes), "  "))


def test_the_kubernetes_example_config_has_no_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.k8s_support import pod_config

    assert config.load(pod_config(tmp_path)).warnings == ()


def test_check_config_prints_the_warnings_and_strict_fails_on_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.tools.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(
        PROVIDERS
        + textwrap.indent(
            textwrap.dedent(f"""\
        - {{name: docs, match: {{path_prefix: /Docs/, ignore_case: true}}, auth: none}}
        - {{name: admin, match: {{path_prefix: /admin/, methods: [GET, POST]}}, {ADMIN}}}
        - {{name: api, match: {{path_prefix: /}}, auth: {{provider: main}}}}
        """),
            "  ",
        )
    )
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: OK (1 warning(s) below)"
    assert "  docs: prefix /Docs/ (any case) [any method] -> public (no token)" in out
    assert out[-1].startswith(
        f"{path}:6: warning: routes[1]: route 'admin' guards /admin and below for GET, HEAD, "
        "POST only: every method but GET, HEAD, POST there fall through to route 'api' (line 7)"
    )
    assert main(["check-config", "--strict", str(path)]) == 1
    assert main(["check-config", "--strict", str(REPO / "config.yaml")]) == 0
