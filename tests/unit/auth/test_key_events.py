"""What keys.py and reload.py say happened: the events, their levels and their fields.

keys.py against a real JWKS server on loopback (a FakeClock for its rate limit); reload.py's
`changes` on configs parsed from YAML. The records are read as the JSON formatter reads
them: `record.event` and `record.fields`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.auth.keys import RemoteKeySource, key_source_for
from proxy.base.errors import InvalidToken, KeysUnavailable
from proxy.config import builder as config
from proxy.config.builder import Provider, RemoteJwks
from proxy.http.fetch import Fetcher
from proxy.ops.reload import changes
from tests.conftest import AUDIENCE, ISSUER, FakeClock, TestKey, jwks_of
from tests.support.jwks_server import JwksServer


def provider(url: str) -> Provider:
    return Provider(
        name="corp",
        issuers=(ISSUER,),
        audiences=(AUDIENCE,),
        algorithms=("RS256",),
        keys=RemoteJwks(url=url, min_refresh_interval=1.0),
    )


@pytest.fixture
async def source(jwks_server: JwksServer, clock: FakeClock) -> AsyncIterator[RemoteKeySource]:
    async with Fetcher() as fetcher:
        made = key_source_for(provider(jwks_server.url()), fetcher=fetcher, clock=clock)
        assert isinstance(made, RemoteKeySource)
        yield made
        await made.close()


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[int, dict[str, Any]]]:
    return [(r.levelno, r.fields) for r in caplog.records if getattr(r, "event", None) == name]  # type: ignore[attr-defined]


async def test_a_set_loaded_then_rotated_is_info_and_the_same_set_again_is_debug(
    source: RemoteKeySource,
    jwks_server: JwksServer,
    clock: FakeClock,
    rsa_key: TestKey,
    rsa_key_2: TestKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    with caplog.at_level(logging.DEBUG, logger="proxy.keys"):
        await source.start()
        clock.advance(2)
        with pytest.raises(InvalidToken):  # an unknown kid fetches again: the same set
            await source.key_for("not-published", "RS256")
        jwks_server.document = jwks_of(rsa_key_2)
        clock.advance(2)
        assert await source.key_for(rsa_key_2.kid, "RS256")  # the issuer rotated
    loads = events(caplog, "keys_loaded")
    assert [level for level, _ in loads] == [logging.INFO, logging.DEBUG, logging.INFO]
    first, same, rotated = (fields for _, fields in loads)
    assert first["kids_added"] == [rsa_key.kid] and first["kids_removed"] == [] and first["keys"] == 1
    assert first["url"] == jwks_server.url() and first["peer"] == f"127.0.0.1:{jwks_server.server.port}"  # type: ignore[union-attr]
    assert first["duration_ms"] >= 0
    assert same["kids_added"] == [] and same["kids_removed"] == []
    assert rotated["kids_added"] == [rsa_key_2.kid] and rotated["kids_removed"] == [rsa_key.kid]
    # Ready once: the rotation does not make it ready again.
    assert [fields["provider"] for _, fields in events(caplog, "provider_ready")] == ["corp"]


async def test_an_issuer_down_at_start_is_unready_once_then_ready_when_it_answers(
    source: RemoteKeySource,
    jwks_server: JwksServer,
    clock: FakeClock,
    rsa_key: TestKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    jwks_server.mode = "fail"
    with caplog.at_level(logging.DEBUG, logger="proxy.keys"):
        await source.start()
        clock.advance(2)
        with pytest.raises(KeysUnavailable):  # a request meanwhile fetches again, in vain
            await source.key_for(rsa_key.kid, "RS256")
        jwks_server.mode = "ok"
        clock.advance(2)
        assert await source.key_for(rsa_key.kid, "RS256")
    failures = events(caplog, "key_fetch_failed")
    assert len(failures) == 2
    for level, fields in failures:
        assert level == logging.WARNING
        assert fields["cause"] == f"HTTP 500 from {jwks_server.url()}" and fields["keys_held"] == 0
        assert fields["peer"] == f"127.0.0.1:{jwks_server.server.port}"  # type: ignore[union-attr]
    [(level, unready)] = events(caplog, "provider_unready")
    assert level == logging.WARNING and unready["cause"] == f"HTTP 500 from {jwks_server.url()}"
    assert [fields["provider"] for _, fields in events(caplog, "provider_ready")] == ["corp"]


BASE = """
providers:
  main: {issuer: https://issuer.test, audiences: [api], jwks: {url: https://issuer.test/jwks.json}}
  other: {issuer: https://other.test, audiences: [api], jwks: {url: https://other.test/jwks.json}}
routes:
  - {name: a, match: {path_prefix: /a/}, auth: {provider: main}}
  - {name: b, match: {path_prefix: /b/}, auth: {provider: other}}
"""


def test_changes_name_what_a_reload_adds_removes_and_changes() -> None:
    old = config.parse(BASE)
    assert changes(old, config.parse(BASE)) == {}
    new = config.parse(
        BASE.replace("/b/", "/bee/")
        .replace("audiences: [api], jwks: {url: https://issuer", "audiences: [api, x], jwks: {url: https://issuer")
        .replace("  - {name: a,", "  - {name: c, match: {path_prefix: /c/}, auth: none}\n  - {name: a,")
        + "realm: new\nworkers: 2\n"
    )
    assert changes(old, new) == {
        "routes_added": ["c"],
        "routes_changed": ["b"],
        "providers_changed": ["main"],
        "settings_changed": ["realm"],
        "needs_restart": ["workers"],
    }
    fewer = config.parse(
        BASE.replace("  - {name: b, match: {path_prefix: /b/}, auth: {provider: other}}\n", "").replace(
            "  other: {issuer: https://other.test, audiences: [api], jwks: {url: https://other.test/jwks.json}}\n", ""
        )
    )
    assert changes(old, fewer) == {"routes_removed": ["b"], "providers_removed": ["other"]}


@pytest.mark.parametrize("change", ["drain_timeout: 60s\n", "drain_delay: 5s\n", "access_log: false\n", "workers: 2\n"])
def test_a_change_to_what_is_read_once_at_start_is_reported_as_needing_a_restart(change: str) -> None:
    # The drain is timed and the access log opened with the values the process started with
    # (ops/server.py, and the supervisor of `workers`): a reload must not say they changed.
    old = config.parse(BASE)
    key = change.partition(":")[0]
    assert changes(old, config.parse(BASE + change)) == {"needs_restart": [key]}


async def test_a_password_in_the_jwks_url_is_never_logged(
    jwks_server: JwksServer, clock: FakeClock, rsa_key: TestKey, caplog: pytest.LogCaptureFixture
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    url = jwks_server.url().replace("http://", "http://reader:s3cret@")
    async with Fetcher() as fetcher:
        made = key_source_for(provider(url), fetcher=fetcher, clock=clock)
        with caplog.at_level(logging.DEBUG, logger="proxy.keys"):
            await made.start()
            jwks_server.mode = "fail"
            clock.advance(2)
            with pytest.raises(InvalidToken):
                await made.key_for("not-published", "RS256")
        await made.close()
    assert events(caplog, "keys_loaded") and events(caplog, "key_fetch_failed")
    for record in caplog.records:
        assert "s3cret" not in record.getMessage() and "s3cret" not in repr(getattr(record, "fields", {}))
