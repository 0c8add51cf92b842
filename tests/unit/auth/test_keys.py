"""keys.py against a real JWKS server on loopback; a FakeClock for rate limits, TTLs and the
background refresh, which sleeps on the injected clock: no test here waits for a refresh in real time.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from proxy.auth.keys import MAX_DOCUMENT_BYTES, KeyRing, KeySource, RemoteKeySource, key_source_for, same_source
from proxy.base.errors import InvalidToken, KeysUnavailable, Reason
from proxy.config.builder import Provider, RemoteJwks, StaticKeys
from proxy.http.fetch import Fetcher
from tests.conftest import AUDIENCE, HS_SECRET, ISSUER, FakeClock, TestKey, jwks_of, refused_port
from tests.support.jwks_server import DISCOVERY_PATH, JWKS_PATH, JwksServer

ASYMMETRIC = ("RS256", "PS256", "ES256", "EdDSA")


def remote_provider(
    url: str | None = None,
    *,
    discovery_url: str | None = None,
    algorithms: tuple[str, ...] = ASYMMETRIC,
    name: str = "corp",
    **options: float,
) -> Provider:
    return Provider(
        name=name,
        issuers=(ISSUER,),
        audiences=(AUDIENCE,),
        algorithms=algorithms,
        keys=RemoteJwks(url=url, discovery_url=discovery_url, **options),
    )


def static_provider(kind: str, jwks: dict[str, Any], algorithms: tuple[str, ...], name: str = "local") -> Provider:
    return Provider(
        name=name,
        issuers=(ISSUER,),
        audiences=(AUDIENCE,),
        algorithms=algorithms,
        keys=StaticKeys(kind=kind, origin=f"{kind} (test)", jwks=jwks),
    )


@pytest.fixture
async def fetcher() -> AsyncIterator[Fetcher]:
    async with Fetcher() as client:
        yield client


Make = Callable[[Provider], RemoteKeySource]


@pytest.fixture
async def make_source(fetcher: Fetcher, clock: FakeClock) -> AsyncIterator[Make]:
    """Remote key sources on the shared fetcher, closed at the end of the test."""
    made: list[KeySource] = []

    def make(provider: Provider) -> RemoteKeySource:
        source = key_source_for(provider, fetcher=fetcher, clock=clock)
        assert isinstance(source, RemoteKeySource)
        made.append(source)
        return source

    yield make
    for source in made:
        await source.close()


@pytest.fixture
async def started(jwks_server: JwksServer, make_source: Make, rsa_key: TestKey) -> RemoteKeySource:
    """A source that has loaded `rsa_key` from the server, with the default intervals."""
    jwks_server.document = jwks_of(rsa_key)
    source = make_source(remote_provider(jwks_server.url()))
    await source.start()
    assert source.ready
    return source


def unknown_kid() -> str:
    return "nope-" + secrets.token_hex(8)


# -- loading ------------------------------------------------------------------------------


async def test_start_fetches_once_and_key_for_returns_the_key_of_a_known_kid(
    jwks_server: JwksServer, make_source: Make, clock: FakeClock, rsa_key: TestKey, ec_key: TestKey
) -> None:
    jwks_server.document = jwks_of(rsa_key, ec_key)
    source = make_source(remote_provider(jwks_server.url()))
    assert not source.ready and source.keyset.size == 0

    await source.start()

    assert jwks_server.requests[JWKS_PATH] == 1
    assert (source.fetches, source.failures) == (1, 0)
    assert source.ready and source.fresh
    assert source.last_success == clock.monotonic()
    (key,) = await source.key_for("rsa-1", "RS256")
    assert key.key_id == "rsa-1" and key.algorithm_name == "RS256"
    (key,) = await source.key_for("ec-1", "ES256")
    assert key.key_id == "ec-1"
    assert jwks_server.requests[JWKS_PATH] == 1


async def test_start_twice_starts_one_background_task(started: RemoteKeySource, jwks_server: JwksServer) -> None:
    await started.start()
    assert jwks_server.requests[JWKS_PATH] == 1


async def test_keys_marked_for_encryption_are_ignored_and_counted(
    jwks_server: JwksServer, make_source: Make, rsa_key: TestKey, rsa_key_2: TestKey
) -> None:
    jwks_server.document = {"keys": [rsa_key.public_jwk, {**rsa_key_2.public_jwk, "use": "enc"}]}
    source = make_source(remote_provider(jwks_server.url()))
    await source.start()

    assert source.keyset.size == 1
    assert source.skipped == 1
    assert [(k.kid, k.reason) for k in source.keyset.skipped] == [("rsa-2", "use is 'enc', not 'sig'")]
    with pytest.raises(InvalidToken) as refused:
        await source.key_for("rsa-2", "RS256")
    assert refused.value.reason is Reason.UNKNOWN_KID


async def test_key_without_kid_is_found_by_alg(jwks_server: JwksServer, make_source: Make, ec_key: TestKey) -> None:
    jwks_server.document = {"keys": [{k: v for k, v in ec_key.public_jwk.items() if k != "kid"}]}
    source = make_source(remote_provider(jwks_server.url()))
    await source.start()

    (key,) = await source.key_for(None, "ES256")
    assert key.key_id is None
    with pytest.raises(InvalidToken):
        await source.key_for(None, "RS256")


async def test_known_kid_with_another_alg_is_refused_without_refetch(
    started: RemoteKeySource, jwks_server: JwksServer
) -> None:
    # rsa_key declares alg RS256, so it is not bound to PS256 even though PS256 is allowed.
    with pytest.raises(InvalidToken) as refused:
        await started.key_for("rsa-1", "PS256")
    assert refused.value.reason is Reason.UNKNOWN_KID
    assert refused.value.detail == "no key with kid 'rsa-1' for alg PS256"
    with pytest.raises(InvalidToken):
        await started.key_for(None, "ES256")
    assert jwks_server.requests[JWKS_PATH] == 1


# -- rotation and the unknown-kid rate limit -------------------------------------------------


async def test_rotated_key_is_found_by_one_refetch_without_restart(
    started: RemoteKeySource, jwks_server: JwksServer, rsa_key: TestKey, rsa_key_2: TestKey
) -> None:
    jwks_server.document = jwks_of(rsa_key, rsa_key_2)

    (key,) = await started.key_for("rsa-2", "RS256")

    assert key.key_id == "rsa-2"
    assert jwks_server.requests[JWKS_PATH] == 2
    assert await started.key_for("rsa-1", "RS256")
    assert await started.key_for("rsa-2", "RS256")
    assert jwks_server.requests[JWKS_PATH] == 2


async def test_unknown_kid_flood_causes_one_refetch_per_interval(
    started: RemoteKeySource, jwks_server: JwksServer, clock: FakeClock
) -> None:
    async def refused(kid: str) -> bool:
        try:
            await started.key_for(kid, "RS256")
        except InvalidToken as error:
            return error.reason is Reason.UNKNOWN_KID
        return False

    concurrent = await asyncio.gather(*(refused(unknown_kid()) for _ in range(200)))
    sequential = [await refused(unknown_kid()) for _ in range(200)]

    assert all(concurrent) and all(sequential)
    assert jwks_server.requests[JWKS_PATH] == 2  # the initial fetch and one refetch

    clock.advance(started.provider.keys.min_refresh_interval - 0.001)
    assert await refused(unknown_kid())
    assert jwks_server.requests[JWKS_PATH] == 2

    clock.advance(0.002)
    assert all(await asyncio.gather(*(refused(unknown_kid()) for _ in range(200))))
    assert jwks_server.requests[JWKS_PATH] == 3
    assert (started.fetches, started.failures) == (3, 0)


async def test_a_caller_that_gives_up_does_not_cancel_the_shared_fetch(
    jwks_server: JwksServer, make_source: Make, rsa_key: TestKey
) -> None:
    jwks_server.mode = "fail"
    source = make_source(remote_provider(jwks_server.url(), timeout=2.0))
    await source.start()
    assert not source.ready
    jwks_server.document = jwks_of(rsa_key)
    jwks_server.mode, jwks_server.delay = "slow", 0.3

    quitter = asyncio.create_task(source.key_for("rsa-1", "RS256"))
    stayer = asyncio.create_task(source.key_for("rsa-1", "RS256"))
    await asyncio.sleep(0.05)
    quitter.cancel()

    (key,) = await stayer
    assert key.key_id == "rsa-1"
    assert quitter.cancelled()
    assert jwks_server.requests[JWKS_PATH] == 2


# -- failures keep the last good keys -------------------------------------------------------

FAILURES: dict[str, Callable[[JwksServer], None]] = {
    "http-500": lambda s: setattr(s, "mode", "fail"),
    "not-json": lambda s: setattr(s, "mode", "garbage"),
    "not-a-jwk-set": lambda s: setattr(s, "mode", "not_a_set"),
    "empty-keys": lambda s: setattr(s, "document", {"keys": []}),
    "only-unusable-keys": lambda s: setattr(s, "document", {"keys": [{"kty": "RSA", "kid": "x", "n": "AQAB"}]}),
    "keys-not-a-list": lambda s: setattr(s, "document", {"keys": {"kid": "x"}}),
    "over-1-mib": lambda s: setattr(s, "document", {**s.document, "pad": "x" * MAX_DOCUMENT_BYTES}),
    "over-1-mib-chunked": lambda s: (
        setattr(s, "document", {**s.document, "pad": "x" * MAX_DOCUMENT_BYTES}),
        setattr(s, "chunked", True),
    ),
}


@pytest.mark.parametrize("break_server", FAILURES.values(), ids=FAILURES.keys())
async def test_failed_refetch_keeps_the_last_good_keys(
    started: RemoteKeySource,
    jwks_server: JwksServer,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    break_server: Callable[[JwksServer], None],
) -> None:
    break_server(jwks_server)
    clock.advance(started.provider.keys.min_refresh_interval + 1)

    with caplog.at_level(logging.WARNING, logger="proxy.keys"), pytest.raises(InvalidToken):
        await started.key_for(unknown_kid(), "RS256")

    assert jwks_server.requests[JWKS_PATH] == 2
    assert (started.fetches, started.failures) == (2, 1)
    assert started.ready
    (key,) = await started.key_for("rsa-1", "RS256")
    assert key.key_id == "rsa-1"
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "keeping 1 key(s)" in record.getMessage()
    # The body is never logged: it comes from the network.
    assert "<html>" not in caplog.text and "foo" not in caplog.text and "xxxx" not in caplog.text


async def test_slow_server_beyond_the_timeout_is_a_failure_not_a_hang(
    jwks_server: JwksServer, make_source: Make, rsa_key: TestKey
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    jwks_server.mode, jwks_server.delay = "slow", 2.0
    source = make_source(remote_provider(jwks_server.url(), timeout=0.3))

    began = time.monotonic()
    await source.start()
    assert time.monotonic() - began < 1.5

    assert (source.fetches, source.failures) == (1, 1)
    assert not source.ready
    jwks_server.delay = 0.0  # let the server's sleeping handler be quick about the next one


async def test_source_that_never_got_keys_raises_keys_unavailable(jwks_server: JwksServer, make_source: Make) -> None:
    jwks_server.mode = "fail"
    source = make_source(remote_provider(jwks_server.url()))
    await source.start()
    assert not source.ready and source.last_success is None

    # One on-demand try (the first load does not count against the rate limit)...
    with pytest.raises(KeysUnavailable) as outage:
        await source.key_for("rsa-1", "RS256")
    assert outage.value.status == 503 and outage.value.reason is Reason.NO_KEYS
    assert jwks_server.requests[JWKS_PATH] == 2
    # ...then none until the interval has passed: an outage must not become a fetch storm.
    for kid in ("rsa-1", None, unknown_kid()):
        with pytest.raises(KeysUnavailable):
            await source.key_for(kid, "RS256")
    assert jwks_server.requests[JWKS_PATH] == 2
    assert (source.fetches, source.failures) == (2, 2)


async def test_unreachable_server_is_counted_not_raised(make_source: Make) -> None:
    source = make_source(remote_provider(f"http://127.0.0.1:{refused_port()}/jwks.json", timeout=1.0))
    await source.start()
    assert (source.fetches, source.failures) == (1, 1)
    assert not source.ready


# -- OIDC discovery ---------------------------------------------------------------------------


async def test_discovery_finds_the_jwks_uri_and_caches_it(
    jwks_server: JwksServer, make_source: Make, clock: FakeClock, rsa_key: TestKey
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    source = make_source(remote_provider(discovery_url=jwks_server.url(DISCOVERY_PATH)))

    await source.start()

    assert source.ready
    assert source.jwks_uri == jwks_server.url(JWKS_PATH)
    assert (source.discovery_fetches, source.fetches) == (1, 1)
    clock.advance(60)
    with pytest.raises(InvalidToken):
        await source.key_for(unknown_kid(), "RS256")
    assert jwks_server.requests == {DISCOVERY_PATH: 1, JWKS_PATH: 2}


async def test_discovery_is_repeated_after_a_failed_jwks_fetch(
    jwks_server: JwksServer, make_source: Make, clock: FakeClock, rsa_key: TestKey
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    source = make_source(remote_provider(discovery_url=jwks_server.url(DISCOVERY_PATH)))
    await source.start()

    jwks_server.mode = "fail"
    clock.advance(60)
    with pytest.raises(InvalidToken):
        await source.key_for(unknown_kid(), "RS256")
    assert jwks_server.requests == {DISCOVERY_PATH: 1, JWKS_PATH: 2}
    assert source.ready  # stale keys kept

    jwks_server.mode = "ok"
    clock.advance(60)
    with pytest.raises(InvalidToken):
        await source.key_for(unknown_kid(), "RS256")
    assert jwks_server.requests == {DISCOVERY_PATH: 2, JWKS_PATH: 3}
    assert (source.discovery_fetches, source.fetches, source.failures) == (2, 3, 1)


@pytest.mark.parametrize(
    "issuer",
    ["https://evil.test", ISSUER + "/", ISSUER.upper(), None],
    ids=["other", "trailing-slash", "case", "missing"],
)
async def test_discovery_with_another_issuer_is_refused(
    jwks_server: JwksServer, make_source: Make, rsa_key: TestKey, issuer: str | None
) -> None:
    # OIDC Discovery 1.0 §4.3: the issuer must be identical, not merely similar.
    jwks_server.document = jwks_of(rsa_key)
    jwks_server.issuer = issuer  # type: ignore[assignment]
    source = make_source(remote_provider(discovery_url=jwks_server.url(DISCOVERY_PATH)))

    await source.start()

    assert not source.ready
    assert source.failures == 1
    assert jwks_server.requests[JWKS_PATH] == 0
    with pytest.raises(KeysUnavailable):
        await source.key_for("rsa-1", "RS256")


@pytest.mark.parametrize("jwks_uri", ["file:///etc/passwd", "/jwks.json", "https://", 42], ids=str)
async def test_discovery_with_a_jwks_uri_that_is_not_http_is_refused(
    jwks_server: JwksServer, make_source: Make, jwks_uri: Any
) -> None:
    jwks_server.jwks_uri = jwks_uri
    source = make_source(remote_provider(discovery_url=jwks_server.url(DISCOVERY_PATH)))
    await source.start()
    assert not source.ready and source.failures == 1
    assert jwks_server.requests[JWKS_PATH] == 0


# -- background refresh (on the FakeClock: the refresh loop sleeps on the injected clock) ----------


async def wait_for(condition: Callable[[], bool], within: float) -> bool:
    """Poll (real time, bounded) for what a background fetch over loopback does next."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def test_background_refresh_fetches_ahead_of_the_ttl_and_close_stops_it(
    jwks_server: JwksServer, make_source: Make, clock: FakeClock, rsa_key: TestKey, rsa_key_2: TestKey
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    source = make_source(remote_provider(jwks_server.url(), cache_ttl=100.0))
    await source.start()
    jwks_server.document = jwks_of(rsa_key_2)

    # No key_for call: the refresh task alone picks up the new set, at 75-85% of the TTL.
    delay = await clock.sleeping()
    assert 75.0 <= delay <= 85.0
    clock.advance(delay - 0.001)
    await asyncio.sleep(0.05)
    assert jwks_server.requests[JWKS_PATH] == 1, "not before its time"
    clock.advance(0.001)
    assert await wait_for(lambda: "rsa-2" in source.keyset.kids, within=5.0)
    assert jwks_server.requests[JWKS_PATH] == 2
    assert source.fresh
    # ...and again, a whole refresh interval later (the loop goes on).
    delay = await clock.sleeping()
    assert 75.0 <= delay <= 85.0
    clock.advance(delay)
    assert await wait_for(lambda: jwks_server.requests[JWKS_PATH] == 3, within=5.0)

    await clock.sleeping()
    await source.close()
    seen = jwks_server.requests[JWKS_PATH]
    clock.advance(3600)
    await asyncio.sleep(0.1)
    assert jwks_server.requests[JWKS_PATH] == seen
    await source.close()  # idempotent


async def test_not_ready_source_recovers_in_the_background_without_traffic(
    jwks_server: JwksServer, make_source: Make, clock: FakeClock, rsa_key: TestKey
) -> None:
    jwks_server.mode = "fail"
    source = make_source(remote_provider(jwks_server.url(), cache_ttl=100.0, min_refresh_interval=0.0))
    await source.start()
    assert not source.ready

    jwks_server.document, jwks_server.mode = jwks_of(rsa_key), "ok"
    # After a failed first load the retry comes at the short interval (1 s floor), not at 80% of the TTL.
    assert await clock.sleeping() == 1.0
    clock.advance(0.999)
    await asyncio.sleep(0.05)
    assert not source.ready and jwks_server.requests[JWKS_PATH] == 1
    clock.advance(0.001)
    assert await wait_for(lambda: source.ready, within=5.0)
    assert source.failures == 1


async def test_refresh_backs_off_while_the_issuer_is_down_and_recovers(
    started: RemoteKeySource, jwks_server: JwksServer, clock: FakeClock, rsa_key_2: TestKey
) -> None:
    # Holding keys, each failure in a row doubles the wait from min_refresh_interval, capped
    # at cache_ttl; one success brings the refresh back to 75-85% of the TTL.
    remote = started.provider.keys
    assert isinstance(remote, RemoteJwks)
    jwks_server.mode = "fail"
    clock.advance(await clock.sleeping())
    expected = [remote.min_refresh_interval * 2**n for n in range(5)]  # 30, 60, 120, 240, 480
    waits = []
    for failed in range(1, len(expected) + 1):
        assert await wait_for(lambda failed=failed: started.failures == failed, within=5.0)
        waits.append(await clock.sleeping())
        clock.advance(waits[-1])
    assert waits == [min(w, remote.cache_ttl) for w in expected]
    assert await wait_for(lambda: started.failures == len(expected) + 1, within=5.0)
    assert started.ready, "the last good keys are kept throughout"

    jwks_server.mode, jwks_server.document = "ok", jwks_of(rsa_key_2)
    clock.advance(await clock.sleeping())
    assert await wait_for(lambda: "rsa-2" in started.keyset.kids, within=5.0)
    assert 0.75 * remote.cache_ttl <= await clock.sleeping() <= 0.85 * remote.cache_ttl


async def test_closed_source_fetches_no_more(
    started: RemoteKeySource, jwks_server: JwksServer, clock: FakeClock
) -> None:
    await started.close()
    clock.advance(3600)
    with pytest.raises(InvalidToken):
        await started.key_for(unknown_kid(), "RS256")
    assert await started.key_for("rsa-1", "RS256")
    assert jwks_server.requests[JWKS_PATH] == 1


# -- static sources --------------------------------------------------------------------------------


def _pem_jwks(key: TestKey) -> dict[str, Any]:
    # What config.py makes of a PEM file: one JWK, no kid, no alg.
    return {"keys": [{k: v for k, v in key.public_jwk.items() if k not in ("kid", "alg", "use")}]}


def _secret_jwks() -> dict[str, Any]:
    return {"keys": [{"kty": "oct", "k": base64.urlsafe_b64encode(HS_SECRET).rstrip(b"=").decode()}]}


@pytest.mark.parametrize(
    ("kind", "document", "algorithms", "kid", "alg"),
    [
        pytest.param("pem_file", "pem", ("RS256", "PS256"), None, "PS256", id="pem"),
        pytest.param("jwks_file", "jwks", ("RS256", "ES256", "EdDSA"), "ed-1", "EdDSA", id="jwks-file"),
        pytest.param("secret", "secret", ("HS256", "HS512"), None, "HS512", id="secret"),
    ],
)
async def test_static_source_is_ready_without_network(
    clock: FakeClock,
    rsa_key: TestKey,
    ec_key: TestKey,
    ed_key: TestKey,
    kind: str,
    document: str,
    algorithms: tuple[str, ...],
    kid: str | None,
    alg: str,
) -> None:
    jwks = {"pem": _pem_jwks(rsa_key), "jwks": jwks_of(rsa_key, ec_key, ed_key), "secret": _secret_jwks()}[document]
    source = key_source_for(static_provider(kind, jwks, algorithms), fetcher=None, clock=clock)

    assert source.ready
    await source.start()
    (key,) = await source.key_for(kid, alg)
    assert key.algorithm_name == alg
    if kind == "jwks_file":  # its keys carry kids: another kid names none of them
        with pytest.raises(InvalidToken) as refused:
            await source.key_for(unknown_kid(), alg)
        assert refused.value.reason is Reason.UNKNOWN_KID
    else:  # a key without a kid is tried for any kid (RFC 7515 §4.1.4: a hint)
        assert await source.key_for(unknown_kid(), alg) == (key,)
    await source.close()
    assert source.fetches == 0


async def test_static_source_with_no_key_for_its_algorithms_is_unavailable(clock: FakeClock, rsa_key: TestKey) -> None:
    source = key_source_for(static_provider("jwks_file", jwks_of(rsa_key), ("ES256",)), fetcher=None, clock=clock)
    assert not source.ready
    with pytest.raises(KeysUnavailable):
        await source.key_for("rsa-1", "ES256")


def test_remote_source_needs_a_session(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="needs a client session"):
        key_source_for(remote_provider("https://issuer.test/jwks"), fetcher=None, clock=clock)


# -- the ring of all providers ---------------------------------------------------------------------


async def test_key_ring_starts_every_provider_and_reports_readiness_by_name(
    jwks_server: JwksServer, fetcher: Fetcher, clock: FakeClock, rsa_key: TestKey
) -> None:
    jwks_server.mode = "fail"
    providers = {
        "remote": remote_provider(jwks_server.url(), name="remote"),
        "local": static_provider("secret", _secret_jwks(), ("HS256",)),
    }
    ring = KeyRing(providers, fetcher=fetcher, clock=clock)
    try:
        await ring.start()
        assert set(ring.sources) == {"remote", "local"}
        assert ring["local"].ready and not ring["remote"].ready
        assert ring.ready(["local"]) and not ring.ready() and not ring.ready(["remote", "local"])
        assert ring.ready([])

        jwks_server.document, jwks_server.mode = jwks_of(rsa_key), "ok"
        assert await ring["remote"].key_for("rsa-1", "RS256")
        assert ring.ready()
    finally:
        await ring.close()


# -- kid is a hint: keys without one (issue 10 item 9) ----------------------------------------------
def _without_kid(key: TestKey) -> dict[str, Any]:
    return {k: v for k, v in key.public_jwk.items() if k != "kid"}


async def test_a_key_without_kid_is_tried_for_any_kid_after_the_keys_that_carry_it(
    clock: FakeClock, rsa_key: TestKey, rsa_key_2: TestKey, ec_key: TestKey
) -> None:
    # rsa_key carries kid rsa-1; rsa_key_2 and ec_key are published without one.
    jwks = {"keys": [rsa_key.public_jwk, _without_kid(rsa_key_2), _without_kid(ec_key)]}
    source = key_source_for(static_provider("jwks_file", jwks, ASYMMETRIC), fetcher=None, clock=clock)
    named = await source.key_for("rsa-1", "RS256")
    assert [k.key_id for k in named] == ["rsa-1", None], "the kid's own key first, then the kid-less one"
    for kid in ("anything", "rsa-2", "", None):
        found = await source.key_for(kid, "RS256")
        assert {k.key_id for k in found} <= {None, "rsa-1"} and None in {k.key_id for k in found}, kid
    assert [k.key_id for k in await source.key_for("other", "RS256")] == [None], "never a key of another kid"
    assert [k.key_id for k in await source.key_for("other", "ES256")] == [None]
    with pytest.raises(InvalidToken) as refused:
        await source.key_for("other", "EdDSA")  # allowed, but no key of that family at all
    assert refused.value.reason is Reason.UNKNOWN_KID


async def test_an_unknown_kid_still_refetches_before_falling_back_to_kid_less_keys(
    jwks_server: JwksServer, make_source: Make, clock: FakeClock, rsa_key: TestKey, rsa_key_2: TestKey
) -> None:
    # A rotation in a set that also holds a kid-less key: the new kid's key is fetched and
    # tried first, not only the kid-less one that cannot verify its tokens.
    jwks_server.document = {"keys": [_without_kid(rsa_key)]}
    source = make_source(remote_provider(jwks_server.url(), min_refresh_interval=30.0))
    await source.start()
    assert [k.key_id for k in await source.key_for("rsa-2", "RS256")] == [None]
    assert jwks_server.requests[JWKS_PATH] == 2, "the unknown kid asked for a refetch"
    jwks_server.document = {"keys": [_without_kid(rsa_key), rsa_key_2.public_jwk]}
    clock.advance(31)
    assert [k.key_id for k in await source.key_for("rsa-2", "RS256")] == ["rsa-2", None]
    assert jwks_server.requests[JWKS_PATH] == 3
    await source.key_for("rsa-2", "RS256")
    assert jwks_server.requests[JWKS_PATH] == 3, "a known kid fetches nothing"


# -- which reloads keep a provider's key source (issue 10, item 14) ------------------------

BASE_REMOTE = remote_provider("https://issuer.test/jwks", algorithms=("RS256",))
BASE_DISCOVERY = remote_provider(
    discovery_url="https://issuer.test/.well-known/openid-configuration", algorithms=("RS256",)
)


@pytest.mark.parametrize(
    "change",
    [
        {"leeway": 5.0},
        {"audiences": ("other",)},
        {"required_claims": ("exp", "iat")},
        {"max_token_age": 60.0},
        {"typ": "at+jwt"},
        {"issuers": (ISSUER, "https://other.test")},
        {"name": "renamed"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_a_change_that_does_not_touch_the_keys_keeps_the_source(change: dict[str, Any]) -> None:
    assert same_source(BASE_REMOTE, dataclasses.replace(BASE_REMOTE, **change))


@pytest.mark.parametrize(
    ("base", "changed"),
    [
        (BASE_REMOTE, dataclasses.replace(BASE_REMOTE, keys=RemoteJwks(url="https://issuer.test/other"))),
        (BASE_REMOTE, dataclasses.replace(BASE_REMOTE, keys=RemoteJwks(url="https://issuer.test/jwks", cache_ttl=60))),
        (
            BASE_REMOTE,
            dataclasses.replace(BASE_REMOTE, keys=RemoteJwks(url="https://issuer.test/jwks", min_refresh_interval=5)),
        ),
        (BASE_REMOTE, dataclasses.replace(BASE_REMOTE, keys=RemoteJwks(url="https://issuer.test/jwks", timeout=1))),
        (BASE_REMOTE, BASE_DISCOVERY),
        (BASE_REMOTE, dataclasses.replace(BASE_REMOTE, algorithms=("RS256", "ES256"))),
        (BASE_DISCOVERY, dataclasses.replace(BASE_DISCOVERY, issuers=(ISSUER, "https://other.test"))),
        (BASE_REMOTE, static_provider("secret", {"keys": []}, ("HS256",), name="corp")),
    ],
    ids=[
        "url",
        "cache_ttl",
        "min_refresh_interval",
        "timeout",
        "discovery",
        "algorithms",
        "discovery-issuers",
        "static",
    ],
)
def test_a_change_of_where_or_how_keys_come_from_is_a_new_source(base: Provider, changed: Provider) -> None:
    assert not same_source(base, changed)


def test_static_key_material_is_compared_by_content(rsa_key: TestKey, rsa_key_2: TestKey) -> None:
    one = static_provider("jwks_file", jwks_of(rsa_key), ("RS256",))
    assert same_source(one, static_provider("jwks_file", jwks_of(rsa_key), ("RS256",)))
    assert not same_source(one, static_provider("jwks_file", jwks_of(rsa_key_2), ("RS256",)))


async def test_a_replaced_source_serves_until_closed_with_its_successor(
    jwks_server: JwksServer, fetcher: Fetcher, clock: FakeClock, rsa_key: TestKey
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    old = KeyRing({"corp": remote_provider(jwks_server.url())}, fetcher=fetcher, clock=clock)
    await old.start()
    dead = remote_provider(f"http://127.0.0.1:{refused_port()}/jwks.json", timeout=0.5)
    new = KeyRing({"corp": dead}, fetcher=fetcher, clock=clock, reuse=old)
    await new.start()
    source = new["corp"]
    assert source.fallback is old["corp"] and source.ready and source.keyset.size == 0
    assert await source.key_for(rsa_key.kid, "RS256")
    await old.close(keep=new)  # the reload is done: the old ring goes, its source stays in use
    assert not old["corp"]._closed
    await new.close()  # e.g. the provider is removed by the next reload: both close
    assert old["corp"]._closed and source._closed
