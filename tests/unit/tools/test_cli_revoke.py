"""`jwt-sidecar revoke` against a file store: what it writes, what it refuses, what it says."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest

from proxy.auth.revocation import RevocationIndex, parse_rules, revoked
from proxy.tools.cli import main

PROVIDERS = """\
providers:
  main: {issuer: https://issuer.test, audiences: [api], jwks: {url: 'https://i.test/jwks'}, max_token_age: 1h}
  partners: {issuer: https://partners.test, audiences: [api], jwks: {url: 'https://p.test/jwks'}}
routes:
  - {match: {path_prefix: /}, auth: {provider: main}}
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(PROVIDERS + "revocation: {file: revoked.yaml}\n")
    return path


def rules_in(config: Path) -> RevocationIndex:
    return RevocationIndex(parse_rules((config.parent / "revoked.yaml").read_text(), file="r", now=time.time()))


def test_each_kind_of_rule_is_written_and_listed(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = ["--config", str(config)]
    assert main(["revoke", "--jti", "j-1", "--provider", "main", *c]) == 0
    assert main(["revoke", "--sub", "alice", "--iss", "https://issuer.test", *c]) == 0
    assert main(["revoke", "--before", "now", "--sub", "bob", "--provider", "main", *c]) == 0
    assert main(["revoke", "--before", "now", "--provider", "main", *c]) == 0
    out = capsys.readouterr().out
    assert "revoked in file " in out and "within a second (401 invalid_token, reason revoked)" in out
    index = rules_in(config)
    assert len(index) == 4
    now = int(time.time())
    token = {"iss": "https://issuer.test", "sub": "carol", "jti": "j-2", "iat": now + 5}
    assert revoked(index, "main", {**token, "jti": "j-1"}) is not None
    assert revoked(index, "partners", {**token, "jti": "j-1"}) is None
    assert revoked(index, "main", {**token, "sub": "alice"}) is not None
    assert revoked(index, "main", {**token, "iat": now - 5}) is not None  # the provider-wide cut-off
    assert revoked(index, "main", token) is None  # issued after it
    assert main(["revoke", "--list", *c]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("4 rule(s) in force in file ")
    assert len(listing) == 5


def test_the_default_life_of_a_rule_is_the_providers_longest_token(config: Path) -> None:
    assert main(["revoke", "--sub", "alice", "--provider", "main", "--config", str(config)]) == 0
    [rule] = list(rules_in(config))
    assert rule.expires == pytest.approx(time.time() + 3600 + 30, abs=5)
    assert main(["revoke", "--jti", "x", "--ttl", "7d", "--config", str(config)]) == 0
    assert max(r.expires or 0 for r in rules_in(config)) == pytest.approx(time.time() + 7 * 86400, abs=5)


def test_a_provider_without_max_token_age_needs_a_ttl(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["revoke", "--sub", "alice", "--config", str(config)]) == 1
    assert "provider partners has no max_token_age" in capsys.readouterr().err
    assert not (config.parent / "revoked.yaml").exists()
    config.write_text(PROVIDERS + "revocation: {file: revoked.yaml, default_ttl: 2h}\n")
    assert main(["revoke", "--sub", "alice", "--config", str(config)]) == 0
    [rule] = list(rules_in(config))
    assert rule.expires == pytest.approx(time.time() + 7200, abs=5)


def test_a_provider_that_opted_out_of_revocation_does_not_set_the_rules_life(config: Path) -> None:
    # `partners` has no max_token_age but never reads the list: the rule lasts main's tokens' life.
    config.write_text(
        PROVIDERS.replace(
            "jwks: {url: 'https://p.test/jwks'}}", "jwks: {url: 'https://p.test/jwks'}, revocation: false}"
        )
        + "revocation: {file: revoked.yaml}\n"
    )
    assert "revocation: false}" in config.read_text()
    assert main(["revoke", "--sub", "alice", "--config", str(config)]) == 0
    [rule] = list(rules_in(config))
    assert rule.expires == pytest.approx(time.time() + 3600 + 30, abs=5)


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        ([], "say what to revoke: --jti ID, --sub SUB or --before TIME"),
        (["--jti", "a", "--sub", "b"], "--jti revokes one token"),
        (["--jti", "a", "--before", "now"], "not allowed with argument"),
        (["--jti", "a", "--iss", "https://issuer.test"], "--iss narrows --sub or --before, not --jti"),
        (["--list", "--sub", "a"], "--list takes no other option but --config"),
        (["--sub", " "], "--sub must not be empty"),
        (["--sub", "a", "--provider", "mian"], "unknown provider 'mian'; known providers: main, partners"),
        (["--sub", "a", "--iss", "https://nope.test"], "no provider trusts issuer 'https://nope.test'"),
        (["--sub", "a", "--iss", "https://partners.test", "--provider", "main"], "no provider main trusts issuer"),
        (["--before", "tomorrow"], "'tomorrow' is not a time like 2026-12-03T12:00:00Z; or now"),
        (["--before", "2026-12-03T12:00:00"], "has no time zone; add one"),
        (["--sub", "a", "--ttl", "0s"], "a rule lasts at least 1s"),
        (["--sub", "a", "--ttl", "forever"], "'forever' is not a duration"),
    ],
)
def test_usage_errors_say_what_is_wrong(
    config: Path, capsys: pytest.CaptureFixture[str], argv: list[str], problem: str
) -> None:
    assert main(["revoke", *argv, "--config", str(config)]) == 2
    assert problem in capsys.readouterr().err
    assert not (config.parent / "revoked.yaml").exists()


def test_a_config_without_revocation_is_told_how_to_add_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(PROVIDERS)
    assert main(["revoke", "--sub", "a", "--ttl", "1h", "--config", str(path)]) == 1
    assert "has no `revocation:` section" in capsys.readouterr().err


def test_a_rule_for_tokens_long_expired_is_not_written(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["revoke", "--before", "2020-01-01T00:00:00Z", "--provider", "main", "--config", str(config)]) == 1
    assert "already past: every token it names has expired" in capsys.readouterr().err


def test_writing_the_same_rule_again_keeps_the_later_time(config: Path) -> None:
    c = ["--config", str(config), "--provider", "main"]
    assert main(["revoke", "--sub", "bob", "--before", "2026-12-03T12:00:00Z", "--ttl", "1h", *c]) == 0
    assert main(["revoke", "--sub", "bob", "--before", "2026-12-03T11:00:00Z", "--ttl", "1h", *c]) == 0
    [rule] = list(rules_in(config))
    assert rule.before == datetime.datetime(2026, 12, 3, 12, tzinfo=datetime.UTC).timestamp()
