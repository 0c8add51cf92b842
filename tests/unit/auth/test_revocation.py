"""The revocation rules and the index a request is checked against (auth/revocation.py)."""

from __future__ import annotations

import pytest

from proxy.auth.revocation import RevocationIndex, make_rule, parse_rules, render_rules, revoked
from proxy.base.errors import ConfigError

T = 1_800_000_000.0  # a fixed "now"
LATER = T + 3600


def claims(**extra: object) -> dict[str, object]:
    return {
        "iss": "https://issuer.test",
        "sub": "alice",
        "jti": "j-1",
        "iat": int(T) - 60,
        "exp": int(T) + 600,
        **extra,
    }


def test_an_empty_index_revokes_nothing() -> None:
    assert revoked(RevocationIndex(), "main", claims()) is None


def test_a_jti_rule_revokes_that_token_only() -> None:
    index = RevocationIndex([make_rule(jti="j-1", expires=LATER)])
    assert revoked(index, "main", claims()) == "the token is revoked (its jti)"
    assert revoked(index, "main", claims(jti="j-2")) is None
    assert revoked(index, "main", {k: v for k, v in claims().items() if k != "jti"}) is None


def test_a_numeric_jti_or_sub_matches_its_decimal_text() -> None:
    # `revoke --jti 123` must revoke a token whose issuer wrote {"jti": 123}.
    index = RevocationIndex([make_rule(jti="123", expires=LATER), make_rule(sub="42", expires=LATER)])
    assert revoked(index, "main", claims(jti=123)) is not None
    assert revoked(index, "main", claims(jti="x", sub=42)) is not None
    assert revoked(index, "main", claims(jti=True, sub=None)) is None  # a boolean is no id
    assert revoked(index, "main", claims(jti=["123"], sub={"42": 1})) is None  # nor a list or an object


def test_a_sub_rule_revokes_every_token_of_the_subject_and_its_issuer_narrows_it() -> None:
    index = RevocationIndex([make_rule(sub="alice", expires=LATER)])
    assert revoked(index, "main", claims(jti="any")) is not None
    assert revoked(index, "main", claims(sub="bob")) is None
    narrowed = RevocationIndex([make_rule(sub="alice", iss="https://other.test", expires=LATER)])
    assert revoked(narrowed, "main", claims()) is None
    assert revoked(narrowed, "main", claims(iss="https://other.test")) is not None


def test_a_provider_scope_only_applies_to_that_provider() -> None:
    index = RevocationIndex([make_rule(jti="j-1", provider="partners", expires=LATER)])
    assert revoked(index, "main", claims()) is None
    assert revoked(index, "partners", claims()) is not None


def test_issued_before_a_subject_logout_everywhere() -> None:
    index = RevocationIndex([make_rule(sub="alice", before=T, expires=LATER)])
    assert revoked(index, "main", claims(iat=int(T) - 1)) is not None
    assert revoked(index, "main", claims(iat=int(T) + 1)) is None  # logged in again afterwards
    assert revoked(index, "main", claims(sub="bob", iat=int(T) - 1)) is None


def test_the_second_of_the_instant_counts_as_before() -> None:
    # iat is whole seconds: a token with iat 12:00:00 may have been issued at 12:00:00.4,
    # before a revocation at 12:00:00.5.
    index = RevocationIndex([make_rule(sub="alice", before=T + 0.5, expires=LATER)])
    assert revoked(index, "main", claims(iat=int(T))) is not None
    assert revoked(index, "main", claims(iat=int(T) + 1)) is None


def test_issued_before_for_a_whole_provider_or_every_provider() -> None:
    index = RevocationIndex([make_rule(provider="main", before=T, expires=LATER)])
    assert "every token of provider main is revoked" in (revoked(index, "main", claims(sub="bob")) or "")
    assert revoked(index, "partners", claims()) is None
    assert revoked(index, "main", claims(iat=int(T))) is None
    everyone = RevocationIndex([make_rule(before=T, expires=LATER)])
    assert revoked(everyone, "partners", claims()) is not None


@pytest.mark.parametrize("iat", [None, "1700000000", True, [1]])
def test_a_token_without_a_numeric_iat_is_revoked_by_an_issued_before_rule(iat: object) -> None:
    index = RevocationIndex([make_rule(provider="main", before=T, expires=LATER)])
    token = claims(iat=iat)
    if iat is None:
        del token["iat"]
    assert revoked(index, "main", token) is not None


def test_the_same_rule_written_twice_is_one_rule_with_the_later_times() -> None:
    index = RevocationIndex()
    index.add(make_rule(sub="alice", before=T, expires=LATER + 100))
    index.add(make_rule(sub="alice", before=T + 50, expires=LATER))
    assert len(index) == 1
    [rule] = list(index)
    assert rule.before == T + 50 and rule.expires == LATER + 100
    index.add(make_rule(sub="alice", expires=LATER))  # untimed: another rule
    assert len(index) == 2


def test_expired_rules_are_dropped() -> None:
    index = RevocationIndex(
        [make_rule(jti="a", expires=T + 10), make_rule(sub="b", expires=T + 20), make_rule(before=T, expires=T + 30)]
    )
    assert index.prune(T) == 0
    assert index.prune(T + 10) == 1
    assert revoked(index, "main", claims(jti="a", sub="x", iat=int(T) + 5)) is None
    assert index.prune(T + 25) == 1 and len(index) == 1
    assert index.prune(T + 31) == 1 and len(index) == 0
    assert not index.by_jti and not index.by_sub and not index.wide


def test_the_file_form_reads_back() -> None:
    rules = [
        make_rule(jti="j-1", expires=LATER),
        make_rule(sub="alice", iss="https://issuer.test", expires=LATER),
        make_rule(sub="bob", before=T, expires=LATER),
        make_rule(provider="main", before=T),
    ]
    for json_form in (False, True):
        text = render_rules(rules, json_form=json_form)
        back = parse_rules(text, file="r", now=T)
        assert back == rules
        assert [(r.before, r.expires) for r in back] == [(r.before, r.expires) for r in rules]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- {sub: a}\n", "r:1: a revocation file is a mapping with a `rules` list"),
        ("rules: {sub: a}\n", "r:1: rules: must be a list of rules"),
        ("rules:\n  - {sub: a, expires: tomorrow}\n", "r:2: rules[0].expires: 'tomorrow' is not a time"),
        ("rules:\n  - {sub: a, before: '2026-12-03T10:00:00'}\n", "has no time zone"),
        ("rules:\n  - {subject: a}\n", "r:2: rules[0].subject: unknown key"),
        ("rules:\n  - {iss: x}\n", "r:2: rules[0]: a rule names a jti, a sub, or a time"),
        ("rules:\n  - {jti: a, sub: b}\n", "a jti rule revokes one token"),
        ("rules:\n  - {sub: ''}\n", "sub must not be empty"),
        ("rules:\n  - alice\n", "r:2: rules[0]: a rule is a mapping"),
        ("rules: [\n", "r:2: invalid YAML"),
    ],
)
def test_a_bad_file_names_its_line(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_rules(text, file="r", now=T)
    assert problem in str(caught.value)


def test_an_empty_file_has_no_rules_and_expired_rules_are_left_out() -> None:
    assert parse_rules("", file="r", now=T) == []
    assert parse_rules("rules: []\n", file="r", now=T) == []
    assert parse_rules("rules:\n  - {sub: a, expires: 2020-01-01T00:00:00Z}\n", file="r", now=T) == []


@pytest.mark.parametrize(
    "sub", ["${HOME}", "yes", "123", "null", "- a", "a: b", "#x", "'\"", "line\nbreak", "\u202eevil", "ı", " x ", "{x}"]
)
def test_any_subject_survives_the_file_form_as_written(sub: str) -> None:
    # A subject is data: `${HOME}` is not expanded, `yes` is not a boolean, `123` stays text,
    # and nothing a user chose as a name can break the file for everyone else's rules.
    rules = [make_rule(sub=sub, expires=LATER), make_rule(jti="after", expires=LATER)]
    for json_form in (False, True):
        assert parse_rules(render_rules(rules, json_form=json_form), file="r", now=T) == rules


def test_a_hand_written_file_without_lines_to_spare_still_names_them() -> None:
    # The fast reader and the careful one agree: a mistake found by the careful one has its line.
    with pytest.raises(ConfigError, match=r"r:3: rules\[1\]: a jti rule revokes one token"):
        parse_rules("rules:\n  - {jti: a}\n  - {jti: b, before: 2026-01-01T00:00:00Z}\n", file="r", now=T)
    with pytest.raises(ConfigError, match=r"r:2: .*duplicate key 'sub'"):
        parse_rules("rules:\n  - {sub: a, sub: b}\n", file="r", now=T)
    with pytest.raises(ConfigError, match="duplicate key"):
        parse_rules('{"rules": [{"sub": "a", "sub": "b"}]}', file="r", now=T)
    assert parse_rules("rules:\n  - {jti: 42, note: from the ticket}\n", file="r", now=T)[0].jti == "42"
