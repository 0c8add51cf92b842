"""`revocation:` in the config: what it loads to, and one clear message per mistake, naming its line.

`check-config` runs the same builder, so what is refused here is refused there (tested at the end).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.base.errors import ConfigError
from proxy.config.builder import parse
from proxy.config.settings import RedisStore, RevocationSettings
from proxy.tools.cli import main
from tests.unit.config.test_config_messages import _places, assert_odd_values_are_refused_by_line

BASE = """\
providers:
  main: {issuer: https://i.test, audiences: [api], jwks: {url: 'https://i.test/jwks'}}
routes:
  - {name: api, match: {path_prefix: /}, auth: {provider: main}}
"""


def issues_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text, file="c.yaml", base_dir=Path("/tmp"))
    return [str(issue) for issue in caught.value.issues]


def test_no_revocation_section_is_no_list() -> None:
    assert parse(BASE, file="c.yaml").revocation is None
    assert parse("revocation: false\n" + BASE, file="c.yaml").revocation is None


def test_a_file_store_is_an_absolute_path_next_to_the_config(tmp_path: Path) -> None:
    settings = parse("revocation: {file: revoked.yaml}\n" + BASE, file="c.yaml", base_dir=tmp_path)
    assert settings.revocation == RevocationSettings(file=str(tmp_path / "revoked.yaml"))
    assert settings.revocation.store == "file"


def test_a_redis_store_with_every_setting() -> None:
    text = (
        "revocation:\n  redis: {url: 'redis://:pw@cache.internal:6380/2', key_prefix: orders, timeout: 1s, "
        "resync_interval: 1m}\n  max_staleness: 10s\n  fail: closed\n  default_ttl: 12h\n" + BASE
    )
    assert parse(text, file="c.yaml").revocation == RevocationSettings(
        redis=RedisStore(
            url="redis://:pw@cache.internal:6380/2", key_prefix="orders", timeout=1.0, resync_interval=60.0
        ),
        max_staleness=10.0,
        fail="closed",
        default_ttl=43200.0,
    )


@pytest.mark.parametrize("url", ["redis://127.0.0.1", "rediss://h:6379/0", "unix:///run/redis.sock", "redis://h/15"])
def test_redis_urls_that_are_accepted(url: str) -> None:
    settings = parse(f"revocation: {{redis: {{url: '{url}'}}}}\n" + BASE, file="c.yaml")
    assert settings.revocation is not None and settings.revocation.redis is not None


def test_revocation_false_on_a_provider_and_on_a_route() -> None:
    text = (
        "revocation: {file: r.yaml}\nproviders:\n  main: {issuer: i, audiences: [a], jwks: {url: 'https://i/j'}, "
        "revocation: false}\nroutes:\n  - {name: a, match: {path_prefix: /a}, auth: {provider: main, revocation: false}}\n"
        "  - {name: b, match: {path_prefix: /b}, auth: {provider: main}}\n"
    )
    settings = parse(text, file="c.yaml", base_dir=Path("/tmp"))
    assert settings.providers["main"].revocation is False
    assert [r.auth.revocation for r in settings.routes if r.auth is not None] == [False, True]
    assert parse(BASE, file="c.yaml").providers["main"].revocation is True


MISTAKES = [
    ("revocation: true\n", "c.yaml:1: revocation: true does not say where the list is kept: write revocation: {file:"),
    (
        "revocation: revoked.yaml\n",
        "c.yaml:1: revocation: 'revoked.yaml' is not a mapping: write revocation: {file: revoked.yaml}",
    ),
    (
        "revocation: redis://h:6379/0\n",
        "c.yaml:1: revocation: 'redis://h:6379/0' is not a mapping: write revocation: {redis: {url: redis://h:6379/0}}",
    ),
    ("revocation: {}\n", "c.yaml:1: revocation: needs a store: file: PATH or redis: {url: redis://HOST:6379/0}"),
    (
        "revocation:\n  fil: r.yaml\n",
        "c.yaml:2: revocation.fil: unknown key; did you mean file? allowed here: default_ttl",
    ),
    (
        "revocation:\n  file: r.yaml\n  redis: {url: 'redis://h'}\n",
        "c.yaml:3: revocation.redis: file and redis are mutually exclusive",
    ),
    ("revocation:\n  file: r.yaml\n  fail: shut\n", "c.yaml:3: revocation.fail: 'shut' is not one of open, closed"),
    (
        "revocation:\n  file: r.yaml\n  max_staleness: 30 seconds\n",
        "revocation.max_staleness: '30 seconds' is not a duration like 30s, 5m, 1h or 250ms; write 30s",
    ),
    ("revocation:\n  file: r.yaml\n  max_staleness: 0s\n", "c.yaml:3: revocation.max_staleness: must be more than 0s"),
    (
        "revocation:\n  file: r.yaml\n  max_stalenes: 5s\n",
        "c.yaml:3: revocation.max_stalenes: unknown key; did you mean max_staleness?",
    ),
    ("revocation:\n  file: r.yaml\n  default_ttl: 0s\n", "c.yaml:3: revocation.default_ttl: must be at least 1s"),
    (
        "revocation:\n  file: /no/such/folder/r.yaml\n",
        "c.yaml:2: revocation.file: '/no/such/folder/r.yaml': the folder '/no/such/folder' does not exist",
    ),
    ("revocation:\n  file: /tmp\n", "c.yaml:2: revocation.file: '/tmp' is a directory"),
    ("revocation:\n  file: ''\n", "c.yaml:2: revocation.file: must not be empty"),
    ("revocation:\n  redis: {}\n", "c.yaml:2: revocation.redis.url: is required: a string"),
    (
        "revocation:\n  redis: redis://h\n",
        "c.yaml:2: revocation.redis: 'redis://h' is not a mapping: write redis: {url: redis://h}",
    ),
    (
        "revocation:\n  redis: {url: 'http://h:6379'}\n",
        "c.yaml:2: revocation.redis.url: 'http://h:6379' is not a Redis URL (http://)",
    ),
    (
        "revocation:\n  redis: {url: 'h:6379'}\n",
        "c.yaml:2: revocation.redis.url: 'h:6379' is not a Redis URL: it has no scheme; write redis://h:6379",
    ),
    ("revocation:\n  redis: {url: 'redis://h:99999'}\n", "its port is not a number from 1 to 65535"),
    (
        "revocation:\n  redis: {url: 'redis://:secret@h:0'}\n",
        "c.yaml:2: revocation.redis.url: 'redis://***@h:0' is not a Redis URL",
    ),
    (
        "revocation:\n  redis: {url: 'redis://h/orders'}\n",
        "the path is the database number (/0, /1, ...), not '/orders'",
    ),
    ("revocation:\n  redis: {url: 'redis://'}\n", "c.yaml:2: revocation.redis.url: 'redis://' has no host"),
    ("revocation:\n  redis: {url: 'unix://'}\n", "names no socket: write unix:///PATH/redis.sock"),
    (
        "revocation:\n  redis: {url: 'redis://h', key_prefix: 'a b'}\n",
        "revocation.redis.key_prefix: 'a b' is not a key prefix",
    ),
    ("revocation:\n  redis: {url: 'redis://h', timeout: 0s}\n", "revocation.redis.timeout: must be more than 0s"),
    (
        "revocation:\n  redis: {url: 'redis://h', resync_interval: 100ms}\n",
        "revocation.redis.resync_interval: must be at least 1s",
    ),
    (
        "revocation:\n  redis: {url: 'redis://h', urll: x}\n",
        "c.yaml:2: revocation.redis.urll: unknown key; did you mean url?",
    ),
]


@pytest.mark.parametrize(("text", "expected"), MISTAKES, ids=[m[1][:50] for m in MISTAKES])
def test_a_mistake_is_one_message_naming_its_line(text: str, expected: str) -> None:
    issues = issues_of(text + BASE)
    assert len(issues) == 1, issues
    assert expected in issues[0]


def test_a_password_in_the_redis_url_is_never_shown() -> None:
    for url in ("http://user:hunter2@h", "redis://:hunter2@h/x", "redis://:hunter2@h:70000"):
        [issue] = issues_of(f"revocation: {{redis: {{url: '{url}'}}}}\n" + BASE)
        assert "hunter2" not in issue and "***@h" in issue


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("    revocation: disabled\n", "c.yaml:3: providers.main.revocation: 'disabled' is not true or false"),
        ("    revocation: 'false'\n", "(it is in quotes, so it is text: write it without quotes)"),
    ],
)
def test_revocation_on_a_provider_is_true_or_false(text: str, expected: str) -> None:
    config = "providers:\n  main:\n" + text + "    issuer: i\n    audiences: [a]\n    jwks: {url: 'https://i/j'}\n"
    [issue] = issues_of(config)
    assert expected in issue


def test_any_odd_value_in_the_revocation_section_is_an_error_naming_its_line_never_a_crash() -> None:
    good = yaml.safe_load(BASE)
    good["revocation"] = {
        "redis": {"url": "redis://h:6379/0", "key_prefix": "p", "timeout": "1s", "resync_interval": "1m"},
        "max_staleness": "30s",
        "fail": "open",
        "default_ttl": "1h",
    }
    good["providers"]["main"]["revocation"] = False
    good["routes"][0]["auth"]["revocation"] = False
    places = [p for p in _places(good) if "revocation" in p]
    assert len(places) >= 9
    assert_odd_values_are_refused_by_line(good, places)


def test_check_config_validates_and_summarises_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "revocation:\n  redis: {url: 'http://h'}\n  fail: maybe\n")
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:6: revocation.redis.url: 'http://h' is not a Redis URL" in err
    assert f"{bad}:7: revocation.fail: 'maybe' is not one of open, closed" in err
    good = tmp_path / "good.yaml"
    good.write_text(
        BASE.replace("auth: {provider: main}", "auth: {provider: main, revocation: false}")
        + "revocation: {redis: {url: 'redis://:pw@h:6379/0'}, fail: closed}\n"
    )
    assert main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "revocation: Redis redis://***@h:6379/0; max staleness 30s, fail closed; not checked for route api" in out


@pytest.mark.parametrize(
    "url",
    [
        "redis://:Ab/hunter2@h:6379/0",  # a password with '/': the port seems to be `Ab`
        "redis://:Ab?hunter2@h:6379/0",
        ":hunter2@h:6379/0",  # no scheme: the hint repeats it
    ],
)
def test_a_password_in_a_redis_url_is_never_shown_even_when_the_url_is_wrong(url: str) -> None:
    [issue] = issues_of(f"revocation: {{redis: {{url: '{url}'}}}}\n" + BASE)
    assert "hunter2" not in issue
