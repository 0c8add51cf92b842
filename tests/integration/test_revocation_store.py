"""The revocation stores against real parts: a real redis-server (tests/support/redis.py) and
real files, written by the real `jwt-sidecar revoke` command."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.auth.revocation import RevocationIndex, make_rule, revoked
from proxy.auth.revocationstore import (
    FileRevocations,
    RedisRevocations,
    Revocations,
    StoreError,
    add_rules,
    list_rules,
    open_store,
)
from proxy.config import builder as config
from proxy.config.settings import RedisStore, RevocationSettings
from proxy.tools.cli import main
from tests.support.redis import RedisServer

PROVIDERS = """\
providers:
  main:
    issuer: https://issuer.test
    audiences: [api]
    jwks: {url: 'https://issuer.example/jwks'}
    max_token_age: 1h
routes:
  - {match: {path_prefix: /}, auth: {provider: main}}
"""


def claims(**extra: object) -> dict[str, object]:
    return {"iss": "https://issuer.test", "sub": "alice", "jti": "j-1", "iat": int(time.time()) - 5, **extra}


def redis_settings(url: str, *, timeout: float = 0.5, **extra: object) -> RevocationSettings:
    store = RedisStore(url=url, key_prefix="test", timeout=timeout, resync_interval=300.0)
    return RevocationSettings(redis=store, **extra)  # type: ignore[arg-type]


def config_file(tmp_path: Path, revocation: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(PROVIDERS + f"revocation: {revocation}\n")
    config.load(path)  # the config is valid, as `revoke` reads it
    return path


async def revoke(*argv: str) -> int:
    # `jwt-sidecar revoke` runs its own event loop: in a thread, as a separate command would.
    return await asyncio.to_thread(main, ["revoke", *argv])


async def eventually(check: Callable[[], bool], seconds: float) -> bool:
    """Whether `check` turns true within `seconds` (polled every 10 ms; bounded)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


@pytest.fixture
async def stores() -> AsyncIterator[list[Revocations]]:
    """Stores a test starts; every one closed at its end."""
    started: list[Revocations] = []
    yield started
    for store in started:
        await store.close()


async def follow(stores: list[Revocations], settings: RevocationSettings) -> Revocations:
    store = open_store(settings)
    stores.append(store)
    await store.start()
    return store


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- Redis --------------------------------------------------------------------------------


async def test_the_list_in_redis_is_loaded_at_start(redis: RedisServer, stores: list[Revocations]) -> None:
    settings = redis_settings(redis.url)
    now = time.time()
    await add_rules(settings, [make_rule(jti="j-1", expires=now + 60), make_rule(sub="bob", expires=now + 60)], now=now)
    store = await follow(stores, settings)
    assert isinstance(store, RedisRevocations)
    assert store.size == 2 and store.ready() is None and (store.age() or 0) < 5
    assert revoked(store.index, "main", claims()) is not None
    assert revoked(store.index, "main", claims(jti="j-2", sub="bob")) is not None
    assert revoked(store.index, "main", claims(jti="j-2")) is None


async def test_a_rule_written_by_revoke_reaches_two_sidecars_within_a_second(
    redis: RedisServer, stores: list[Revocations], tmp_path: Path
) -> None:
    path = config_file(tmp_path, f"{{redis: {{url: '{redis.url}', key_prefix: test}}}}")
    settings = config.load(path).revocation
    assert settings is not None
    first, second = await follow(stores, settings), await follow(stores, settings)
    assert first.size == second.size == 0
    assert await revoke("--sub", "alice", "--config", str(path)) == 0
    written = time.monotonic()
    for store in (first, second):
        assert await eventually(
            lambda s=store: revoked(s.index, "main", claims()) is not None, 1.0 - (time.monotonic() - written)
        )
    assert revoked(first.index, "main", claims(sub="bob")) is None
    # And `--list` shows it, from the same store.
    [rule] = await list_rules(settings, now=time.time())
    assert rule.sub == "alice" and rule.expires is not None
    assert rule.expires == pytest.approx(time.time() + 3600 + 30, abs=10)  # max_token_age + leeway


async def test_redis_restarted_mid_follow_the_list_is_kept_then_resynced(
    redis: RedisServer, stores: list[Revocations], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jwt_sidecar.revocation")
    settings = redis_settings(redis.url, max_staleness=1.0)
    now = time.time()
    await add_rules(settings, [make_rule(jti="j-1", expires=now + 120)], now=now)
    store = await follow(stores, settings)
    assert store.size == 1
    redis.stop()
    assert await eventually(lambda: store.problem is not None, 10)
    # Down: the last list keeps serving (fail: open), and the log says so.
    assert revoked(store.index, "main", claims()) is not None
    assert store.ready() is None
    assert "connection refused" in (store.problem or "") or "connection" in (store.problem or "")
    assert events(caplog, "revocation_store_unreachable")
    redis.start()
    # A rule written as soon as Redis is back, before the follower has reconnected: the
    # re-sync after the reconnect brings it (pub/sub alone would have missed it).
    now = time.time()
    await add_rules(settings, [make_rule(sub="bob", expires=now + 120)], now=now)
    assert await eventually(lambda: revoked(store.index, "main", claims(jti="x", sub="bob")) is not None, 15)
    assert revoked(store.index, "main", claims()) is not None  # kept across the restart (persisted)
    assert await eventually(lambda: store.problem is None, 5)
    assert [r.getMessage() for r in events(caplog, "revocation_store_connected")][-1].endswith("(reconnected)")


async def test_redis_down_at_start_fail_open_serves_with_an_empty_list(stores: list[Revocations]) -> None:
    settings = redis_settings(f"redis://127.0.0.1:{free_port()}/0", fail="open")
    started = time.monotonic()
    store = await follow(stores, settings)
    assert time.monotonic() - started < 10  # the start waits a bounded time, then serves
    assert store.size == 0 and store.age() is None
    assert store.ready() is None and store.unavailable is None
    assert revoked(store.index, "main", claims()) is None


async def test_redis_down_at_start_fail_closed_is_not_ready_and_says_why(
    redis: RedisServer, stores: list[Revocations]
) -> None:
    port = free_port()
    settings = redis_settings(f"redis://127.0.0.1:{port}/0", fail="closed")
    store = await follow(stores, settings)
    reason = store.ready()
    assert reason is not None and store.unavailable == reason
    assert reason.startswith(f"the revocation list has not loaded from Redis redis://127.0.0.1:{port}/0")
    assert "connection refused" in reason


async def test_fail_closed_turns_unready_past_max_staleness_and_ready_again(
    redis: RedisServer, stores: list[Revocations], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jwt_sidecar.revocation")
    store = await follow(stores, redis_settings(redis.url, fail="closed", max_staleness=1.0))
    assert store.ready() is None
    redis.stop()
    assert await eventually(lambda: store.unavailable is not None, 10)
    reason = store.ready() or ""
    assert "old (max_staleness 1s)" in reason and "Redis unreachable" in reason
    [stale] = events(caplog, "revocation_stale")
    assert stale.levelno == logging.ERROR
    redis.start()
    assert await eventually(lambda: store.unavailable is None and store.ready() is None, 15)
    assert events(caplog, "revocation_fresh")


async def test_expired_rules_are_dropped_in_the_sidecar_and_in_redis(
    redis: RedisServer, stores: list[Revocations]
) -> None:
    settings = redis_settings(redis.url)
    now = time.time()
    await add_rules(
        settings, [make_rule(jti="short", expires=now + 1.5), make_rule(jti="long", expires=now + 60)], now=now
    )
    store = await follow(stores, settings)
    assert store.size == 2
    await asyncio.sleep(2.0)
    assert await eventually(lambda: store.size == 1, 3)  # the store's timer prunes
    assert revoked(store.index, "main", claims(jti="short")) is None
    assert revoked(store.index, "main", claims(jti="long")) is not None
    # The next write deletes the expired rule from Redis; the keys expire with the last rule.
    now = time.time()
    await add_rules(settings, [make_rule(sub="x", expires=now + 60)], now=now)
    client = aioredis.Redis.from_url(redis.url, decode_responses=True)
    try:
        assert await client.hlen("test:revocation:rules") == 2
        assert await client.zcard("test:revocation:expiry") == 2
        assert 0 < await client.ttl("test:revocation:rules") <= 62
    finally:
        await client.aclose()
    # A new follower never loads an expired rule.
    assert (await follow(stores, settings)).size == 2


async def test_an_entry_in_redis_that_is_not_a_rule_is_skipped_and_logged(
    redis: RedisServer, stores: list[Revocations], caplog: pytest.LogCaptureFixture
) -> None:
    settings = redis_settings(redis.url)
    client = aioredis.Redis.from_url(redis.url, decode_responses=True)
    try:
        await client.hset("test:revocation:rules", mapping={"a": "not json", "b": '{"iss": "x"}', "c": '{"jti": [5]}'})
        now = time.time()
        await add_rules(settings, [make_rule(jti="ok", expires=now + 60)], now=now)
        store = await follow(stores, settings)
        assert store.size == 1
        assert len(events(caplog, "revocation_rule_skipped")) == 3
        await client.publish("test:revocation", "[1, 2]")  # a stray message on the channel
        await client.publish("test:revocation", json.dumps({"jti": "late", "expires": now + 60}))
        assert await eventually(lambda: store.size == 2, 2)
    finally:
        await client.aclose()


async def test_100000_rules_load_and_their_memory(
    redis: RedisServer, stores: list[Revocations], capsys: pytest.CaptureFixture[str]
) -> None:
    # 20,000 rules per write: 0.5 s (the other tests' timeout) is too short for that on a loaded
    # machine, and this test is about the load and the memory, not the timeout.
    settings = redis_settings(redis.url, timeout=10.0)
    now = time.time()
    rules = [make_rule(jti=f"{i:08x}-{'0' * 27}", expires=now + 3600) for i in range(80_000)]
    rules += [make_rule(sub=f"user-{i}@example.com", expires=now + 3600) for i in range(20_000)]
    for start in range(0, len(rules), 20_000):
        await add_rules(settings, rules[start : start + 20_000], now=now)
    started = time.monotonic()
    store = await follow(stores, settings)
    loaded = time.monotonic() - started
    assert store.size == 100_000
    assert revoked(store.index, "main", claims(jti=f"{77:08x}-{'0' * 27}")) is not None
    assert revoked(store.index, "main", claims(jti="nope", sub="user-19999@example.com")) is not None
    assert revoked(store.index, "main", claims(jti="nope", sub="user-20000@example.com")) is None
    # The memory a sidecar holds for them: the rules (their strings included) and the index,
    # measured as they are made.
    tracemalloc.start()
    try:
        index = RevocationIndex(
            make_rule(jti=f"{i:08x}-{'0' * 27}", expires=now + 3600)
            if i < 80_000
            else make_rule(sub=f"user-{i}@example.com", expires=now + 3600)
            for i in range(100_000)
        )
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert index.size == 100_000
    with capsys.disabled():
        print(f"\n100,000 rules: loaded from Redis in {loaded:.2f}s; {size / 1e6:.1f} MB in memory")
    assert size < 60e6


# -- the file -------------------------------------------------------------------------------


async def test_the_file_is_reloaded_when_it_changes(tmp_path: Path, stores: list[Revocations]) -> None:
    path = config_file(tmp_path, "{file: revoked.yaml}")
    settings = config.load(path).revocation
    assert settings is not None and settings.file == str(tmp_path / "revoked.yaml")
    store = await follow(stores, settings)
    assert isinstance(store, FileRevocations) and store.size == 0 and store.ready() is None
    assert await revoke("--jti", "j-1", "--config", str(path)) == 0
    written = time.monotonic()
    assert await eventually(
        lambda: revoked(store.index, "main", claims()) is not None, 1.0 - (time.monotonic() - written)
    )
    assert await revoke("--before", "now", "--sub", "bob", "--config", str(path)) == 0
    assert await eventually(lambda: store.size == 2, 1.0)
    assert revoked(store.index, "main", claims(jti="x", sub="bob")) is not None
    # A JSON file is read as well (`revoke` writes JSON to a .json file).
    json_path = tmp_path / "revoked.json"
    json_config = config_file(tmp_path, "{file: revoked.json}")
    assert await revoke("--sub", "carol", "--config", str(json_config)) == 0
    assert json_path.read_text().startswith("{")
    json_store = await follow(stores, dataclasses.replace(settings, file=str(json_path)))
    assert revoked(json_store.index, "main", claims(jti="x", sub="carol")) is not None


async def test_a_bad_file_keeps_the_last_good_list_and_is_logged(
    tmp_path: Path, stores: list[Revocations], caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "revoked.yaml"
    file.write_text("rules:\n  - {jti: j-1}\n")
    store = await follow(stores, RevocationSettings(file=str(file), fail="closed", max_staleness=1.0))
    assert store.size == 1 and store.ready() is None
    file.write_text("rules:\n  - {jti: j-1}\n  - {jti: j-2, expires: soon}\n")
    assert await eventually(lambda: bool(events(caplog, "revocation_refused")), 3)
    [refused] = events(caplog, "revocation_refused")
    assert refused.levelno == logging.ERROR
    assert "line 3" in refused.getMessage() or ":3: rules[1].expires: 'soon' is not a time" in refused.getMessage()
    assert store.size == 1 and revoked(store.index, "main", claims()) is not None
    # A bad file is not current: past max_staleness, fail: closed is not ready, and says why.
    assert await eventually(lambda: store.unavailable is not None, 5)
    assert "the file was refused" in (store.ready() or "")
    # `revoke` refuses to write over it (it would drop what it cannot read).
    path = config_file(tmp_path, "{file: revoked.yaml}")
    assert await revoke("--jti", "j-3", "--config", str(path)) == 1
    file.write_text("rules:\n  - {jti: j-2}\n")
    assert await eventually(lambda: store.ready() is None and store.size == 1, 3)
    assert revoked(store.index, "main", claims(jti="j-2")) is not None
    assert revoked(store.index, "main", claims()) is None


async def test_a_missing_file_is_an_empty_list_said_once(
    tmp_path: Path, stores: list[Revocations], caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "revoked.yaml"
    store = await follow(stores, RevocationSettings(file=str(file)))
    assert store.size == 0 and store.ready() is None
    [missing] = events(caplog, "revocation_file_missing")
    assert missing.levelno == logging.WARNING
    file.write_text("rules:\n  - {sub: alice}\n")
    assert await eventually(lambda: store.size == 1, 2)
    assert len(events(caplog, "revocation_file_missing")) == 1


async def test_revoke_says_when_the_store_cannot_be_written(tmp_path: Path) -> None:
    settings = redis_settings(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreError, match="connection refused"):
        await add_rules(settings, [make_rule(jti="x", expires=time.time() + 60)], now=time.time())


async def test_a_file_that_disappears_keeps_the_last_list(
    tmp_path: Path, stores: list[Revocations], caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "revoked.yaml"
    file.write_text("rules:\n  - {sub: alice}\n")
    store = await follow(stores, RevocationSettings(file=str(file), fail="closed", max_staleness=1.0))
    assert store.size == 1
    file.unlink()
    assert await eventually(lambda: store.problem == "the file is gone", 2)
    assert revoked(store.index, "main", claims()) is not None
    [missing] = events(caplog, "revocation_file_missing")
    assert "the last list keeps serving" in missing.getMessage()
    assert await eventually(lambda: store.ready() is not None, 5)  # fail: closed, past max_staleness
    file.write_text("rules: []\n")  # how a list is emptied
    assert await eventually(lambda: store.size == 0 and store.ready() is None, 3)
