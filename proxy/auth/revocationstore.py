"""Where the revocation list is kept, and how each sidecar keeps its in-memory copy current.

Owns: `FileRevocations` (a YAML or JSON file, polled and reloaded when it changes; a bad
file keeps the last good list), `RedisRevocations` (the whole list loaded at start, changes
followed through Redis pub/sub, a full re-sync periodically and after every reconnect; the
last list kept while Redis is unreachable), the list's age, size and readiness (`fail: open |
closed` past `max_staleness`), dropping expired rules, and writing and listing rules
(`add_rules`, `list_rules`: `jwt-sidecar revoke`).

In Redis, under `PREFIX:revocation`: `:rules`, a hash (field: the rule's identity, value: its
JSON), `:expiry`, a sorted set of the same fields by expiry (a writer deletes the expired
ones; both keys expire with their last rule), and the channel `PREFIX:revocation`, on which a
writer publishes each rule it wrote. A rule written twice merges (the later time wins), so a
message that crosses a re-sync changes nothing.

Also owns `check`, the one call a request makes (the pipeline, on a route whose plan has a
store: `revoked()` on the current `index`, or the 503 of `fail: closed`), and `start_store`,
which the process's lifecycle (request/app.py, ops/reload.py) uses to start a follower.
Does not own: the rules and the index (revocation.py), whether a route checks (runtime.py's
`RoutePlan.revocation`), /readyz or the metrics (they read `ready()`, `age()` and `size`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..base.clock import Clock, SystemClock
from ..base.errors import ConfigError, ConfigIssue, InvalidToken, Reason, RevocationUnavailable
from ..base.namedfile import RULES_FILE_BYTES, NamedFileError, read_named
from ..base.oplog import event
from ..config.settings import RedisStore, RevocationSettings
from ..http.causes import shown
from .revocation import RevocationIndex, Rule, parse_rules, render_rules, revoked, rule_from_mapping, rules_problem

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = [
    "FileRevocations",
    "RedisRevocations",
    "Revocations",
    "StoreError",
    "add_rules",
    "list_rules",
    "open_store",
    "start_store",
]

log = logging.getLogger("jwt_sidecar.revocation")

FILE_POLL = 0.5
"""How often the file is checked for a change (a rule is in force within a second)."""
TICK = 1.0
"""How often expired rules are dropped and the list's age is judged."""


class StoreError(Exception):
    """The store cannot be read or written (`jwt-sidecar revoke`)."""


class Revocations:
    """The list in force (`index`), where it comes from, and how current it is."""

    store = ""

    def __init__(self, settings: RevocationSettings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.index = RevocationIndex()
        self.fresh_at: float | None = None
        """Monotonic time the list was last known current (None: never loaded)."""
        self.problem: str | None = None
        """Why the list may not be current (the store unreachable, the file refused), or None."""
        self.unavailable: str | None = None
        """With `fail: closed`, why the list is too old to serve with (set every TICK), else None."""
        self._stale = False
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def origin(self) -> str:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return self.index.size

    def age(self) -> float | None:
        """Seconds since the list was last known current; None when it never loaded."""
        return None if self.fresh_at is None else max(0.0, self.clock.monotonic() - self.fresh_at)

    def ready(self) -> str | None:
        """None when requests may be served; with `fail: closed`, why not (for /readyz)."""
        if self.settings.fail != "closed":
            return None
        return self._too_old()

    def check(self, provider: str, claims: Mapping[str, Any]) -> None:
        """The request's check, on a verified token of `provider` (its payload `claims`), cached
        or not: `RevocationUnavailable` (503) while `fail: closed` applies, `InvalidToken`
        (401, reason `revoked`) when a rule names it. Reads `index` afresh: a re-sync replaces it."""
        if self.unavailable is not None:
            # Judged again (only on this path): the list may be current again since the last
            # tick, and /readyz, which judges it live, must not say ready while this says 503.
            # A number compared per request; the words are the tick's (at most a second old),
            # not formatted again for every refused request of an outage.
            age = self.age()
            if age is not None and age <= self.settings.max_staleness:
                self.unavailable = None
            else:
                raise RevocationUnavailable(self.unavailable)
        why = revoked(self.index, provider, claims)
        if why is not None:
            raise InvalidToken(Reason.REVOKED, why)

    def _too_old(self) -> str | None:
        age = self.age()
        if age is not None and age <= self.settings.max_staleness:
            return None
        why = f": {self.problem}" if self.problem else ""
        if age is None:
            return f"the revocation list has not loaded from {self.origin}{why}"
        return (
            f"the revocation list is {age:.0f}s old (max_staleness {self.settings.max_staleness:g}s), "
            f"from {self.origin}{why}"
        )

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Stop following; bounded: a client library that turned the cancellation into an
        error of its own cannot keep the process from stopping (the loop also sees `_closing`)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        self._tasks.clear()

    def _spawn(self, coroutine: Any) -> None:
        self._tasks.append(asyncio.create_task(coroutine))

    async def _maintain(self) -> None:
        """Drop expired rules; say when the list turns too old, and when it is current again."""
        while True:
            await asyncio.sleep(TICK)
            self.tick()

    def tick(self) -> None:
        self.index.prune(self.clock.time())
        too_old = self._too_old()
        self.unavailable = too_old if self.settings.fail == "closed" else None
        if too_old is not None and not self._stale:
            self._stale = True
            closed = self.settings.fail == "closed"
            event(
                log,
                logging.ERROR if closed else logging.WARNING,
                "revocation_stale",
                "%(why)s; %(serving)s",
                why=too_old,
                store=self.store,
                rules=self.size,
                serving="fail: closed: not ready, revocation-checked routes answer 503"
                if closed
                else "fail: open: the last list keeps serving",
            )
        elif too_old is None and self._stale:
            self._stale = False
            event(
                log,
                logging.INFO,
                "revocation_fresh",
                "the revocation list from %(origin)s is current again (%(rules)s rules)",
                origin=self.origin,
                store=self.store,
                rules=self.size,
            )


# -- the file --------------------------------------------------------------------------------


def _signature(path: str) -> tuple[float, int, int] | None:
    try:
        stat = os.stat(os.path.realpath(path))
    except OSError:
        return None
    return stat.st_mtime, stat.st_ino, stat.st_size


def read_rules_file(path: str, now: float) -> list[Rule] | None:
    """The file's rules (None: there is no file); raises `ConfigError` for a bad one."""
    try:
        # Bounded, and only a regular file: a FIFO or a device there is refused, not waited on.
        data = read_named(path, RULES_FILE_BYTES)
    except NamedFileError as error:
        if error.errno == errno.ENOENT:
            return None
        why = str(error).lower() if error.cannot_read else str(error)
        raise ConfigError([ConfigIssue(path, None, "", f"cannot read the revocation file: {why}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError([ConfigIssue(path, None, "", f"not UTF-8 text (byte {error.start})")]) from None
    return parse_rules(text, file=path, now=now)


class FileRevocations(Revocations):
    """The list in a YAML or JSON file, reloaded when the file changes (polled: works on every volume)."""

    store = "file"

    @property
    def path(self) -> str:
        assert self.settings.file is not None
        return self.settings.file

    @property
    def origin(self) -> str:
        return f"file {self.path}"

    async def start(self) -> None:
        self._seen = _signature(self.path)
        self._missing = False
        self._had_file = False
        await self.load()
        self._spawn(self._watch())
        self._spawn(self._maintain())

    async def load(self) -> bool:
        """Read the file again; False (the last good list kept, logged) when it is refused."""
        now = self.clock.time()
        try:
            # In a thread: a large list takes a while to parse, and requests go on meanwhile.
            rules = await asyncio.to_thread(read_rules_file, self.path, now)
        except ConfigError as error:
            self.problem = f"the file was refused: {rules_problem(error)}"
            first = error.issues[0] if error.issues else None
            event(
                log,
                logging.ERROR,
                "revocation_refused",
                "revocation file refused; the last good list (%(rules)s rules) keeps serving: %(problems)s",
                file=self.path,
                line=first.line if first else None,
                rules=self.size,
                problems=rules_problem(error),
            )
            return False
        if rules is None:
            if not self._missing:  # said once: the file may stay away for long
                self._missing = True
                event(
                    log,
                    logging.WARNING,
                    "revocation_file_missing",
                    "revocation file %(file)s does not exist: %(serving)s",
                    file=self.path,
                    serving="the last list keeps serving"
                    if self._had_file
                    else "no rules in force until it does (`jwt-sidecar revoke` creates it)",
                )
            if self._had_file:
                # Gone after it was read (a mistaken delete, a volume unmounted): as with the
                # config, the last good list keeps serving; `rules: []` is how a list is emptied.
                self.problem = "the file is gone"
                return False
            rules = []
        else:
            self._missing = False
            self._had_file = True
        self.index = RevocationIndex(rules)
        self.fresh_at = self.clock.monotonic()
        self.problem = None
        event(
            log,
            logging.INFO,
            "revocation_loaded",
            "revocation list loaded from %(origin)s: %(rules)s rules",
            origin=self.origin,
            store=self.store,
            rules=self.size,
        )
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(FILE_POLL)
            current = _signature(self.path)
            if current != self._seen:
                self._seen = current
                await self.load()
            elif self.problem is None:
                self.fresh_at = self.clock.monotonic()  # the file is as read: the list is current


def write_rules_file(path: str, rules: Iterable[Rule], now: float) -> list[Rule]:
    """Merge `rules` into the file (expired ones dropped) and replace it atomically; what is in force."""
    folder = os.path.dirname(path) or "."
    # Two `revoke` at once: the second merges into the first's file. The lock is on the folder
    # (a lock on the file would be lost to the rename that replaces it; no lock file is left).
    try:
        lock = os.open(folder, os.O_RDONLY)
    except OSError as error:
        raise StoreError(f"cannot write {path}: {(error.strerror or str(error)).lower()}") from None
    try:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        try:
            existing = read_rules_file(path, now) or []
        except ConfigError as error:
            raise StoreError(
                f"the revocation file has mistakes; fix them first (nothing was written): {rules_problem(error)}"
            ) from None
        index = RevocationIndex(existing)
        written = [index.add(rule) for rule in rules]
        index.prune(now)
        text = render_rules(sorted(index, key=_order), json_form=path.endswith(".json"))
        import tempfile  # (here: it brings `shutil`, `bz2` and `lzma`, ~0.6 MiB of a running sidecar's memory)

        temporary = None
        try:
            handle, temporary = tempfile.mkstemp(dir=folder, prefix=".revoked-", suffix=".tmp")
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
            if os.path.exists(path):
                os.chmod(temporary, os.stat(path).st_mode & 0o777)
            else:
                os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except OSError as error:
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
            raise StoreError(f"cannot write {path}: {(error.strerror or str(error)).lower()}") from None
    finally:
        os.close(lock)
    return written


def _order(rule: Rule) -> tuple[float, str]:
    return (rule.expires if rule.expires is not None else math.inf, rule.identity())


# -- Redis -----------------------------------------------------------------------------------


class _Keys:
    def __init__(self, prefix: str) -> None:
        self.rules = f"{prefix}:revocation:rules"
        self.expiry = f"{prefix}:revocation:expiry"
        self.channel = f"{prefix}:revocation"


def _redis_error() -> type[Exception]:
    """redis-py's root error. The package is imported only where Redis is used: a sidecar with
    a file store, or with none, does not load it (about 3.6 MB of every process's memory)."""
    from redis.exceptions import RedisError

    return RedisError


def _client(store: RedisStore) -> aioredis.Redis:
    import redis.asyncio as aioredis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries of our own inside a call: the follower reconnects on its own schedule, and
    # `revoke` says at once that Redis cannot be reached.
    return aioredis.Redis.from_url(
        store.url,
        socket_timeout=store.timeout,
        socket_connect_timeout=store.timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def rule_from_json(text: str) -> Rule:
    """A rule as Redis holds it; raises ValueError when it is not one."""
    return rule_from_mapping(json.loads(text))


def _cause(error: BaseException) -> str:
    """The failure in words: `connection refused`, `timed out`, else Redis's own message."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, TimeoutError) or "timeout" in seen.__class__.__name__.lower():
            return "timed out"
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno).lower()  # asyncio's strerror is "Connect call failed (...)"
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
        seen = seen.__cause__ or seen.__context__
    text = str(error) or error.__class__.__name__
    return text[:1].lower() + text[1:]


class RedisRevocations(Revocations):
    """The list in Redis, followed: every sidecar holds all of it, the request path never waits on Redis."""

    store = "redis"

    def __init__(self, settings: RevocationSettings, *, clock: Clock | None = None) -> None:
        super().__init__(settings, clock=clock)
        assert settings.redis is not None
        self.redis = settings.redis
        self.keys = _Keys(settings.redis.key_prefix)
        self._synced = asyncio.Event()
        self._attempted = asyncio.Event()
        """Set once the first connection has loaded the list, or failed."""
        self._down = False
        # How often the connection is proved alive while no change arrives.
        self.heartbeat = max(0.2, min(5.0, settings.max_staleness / 4))

    @property
    def origin(self) -> str:
        return f"Redis {shown(self.redis.url)}"

    async def start(self) -> None:
        """Load the list, then follow it. Returns once the first load is done or has failed (each
        Redis answer is bounded by `timeout`; a long list is read in chunks, each one answer)."""
        self._spawn(self._follow())
        self._spawn(self._maintain())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), self.redis.timeout * 4 + 60)
        self.tick()

    async def _follow(self) -> None:
        backoff = 0.2
        while not self._closing:
            client = _client(self.redis)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                # Subscribed before the full read: a rule written meanwhile arrives as a message.
                await pubsub.subscribe(self.keys.channel)
                await self.resync(client)
                if self._down or not self._synced.is_set():
                    event(
                        log,
                        logging.INFO,
                        "revocation_store_connected",
                        "%(origin)s: %(rules)s rules loaded, following changes%(again)s",
                        origin=self.origin,
                        rules=self.size,
                        again=" (reconnected)" if self._down else "",
                    )
                self._down = False
                self._synced.set()
                self._attempted.set()
                backoff = 0.2
                await self._listen(client, pubsub)
            except asyncio.CancelledError:
                raise
            except (_redis_error(), OSError, TimeoutError) as error:
                self.problem = f"Redis unreachable: {_cause(error)}"
                if not self._down:
                    self._down = True
                    event(
                        log,
                        logging.WARNING,
                        "revocation_store_unreachable",
                        "%(origin)s unreachable (%(cause)s); the last list (%(rules)s rules) keeps serving",
                        origin=self.origin,
                        cause=_cause(error),
                        rules=self.size,
                    )
            except Exception:  # never let the follower die: the list would silently stop changing
                self._down = True
                self.problem = "the follower of Redis hit a bug (see revocation_follow_crashed)"
                event(
                    log,
                    logging.ERROR,
                    "revocation_follow_crashed",
                    "following %(origin)s failed unexpectedly; retrying",
                    origin=self.origin,
                    exc_info=True,
                )
            finally:
                self._attempted.set()
                # Bounded: closing must never hang on a connection in a bad state.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), self.redis.timeout)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.aclose(), self.redis.timeout)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _listen(self, client: aioredis.Redis, pubsub: Any) -> None:
        next_beat = self.clock.monotonic() + self.heartbeat
        next_sync = self.clock.monotonic() + self.redis.resync_interval
        while not self._closing:
            message = await pubsub.get_message(timeout=self.heartbeat)
            if message is not None and message.get("type") == "message":
                self._apply(message["data"])
            now = self.clock.monotonic()
            if now >= next_sync:
                await self.resync(client)
                next_sync = now + self.redis.resync_interval
            elif now >= next_beat:
                await client.ping()
                # A PING on the subscription too: a dead subscriber connection fails here.
                await pubsub.ping()
                self.fresh_at = self.clock.monotonic()
                next_beat = now + self.heartbeat

    def _apply(self, text: str) -> None:
        try:
            rule = rule_from_json(text)
        except ValueError as error:
            self._skipped(error)
            return
        if rule.expires is None or rule.expires > self.clock.time():
            self.index.add(rule)

    def _skipped(self, error: Exception) -> None:
        event(
            log,
            logging.WARNING,
            "revocation_rule_skipped",
            "%(origin)s holds an entry that is not a rule (%(problem)s); skipped",
            origin=self.origin,
            problem=str(error),
        )

    async def resync(self, client: aioredis.Redis) -> None:
        """Read the whole list and swap it in (in chunks: Redis is never blocked on 100,000 rules)."""
        now = self.clock.time()
        index = RevocationIndex()
        async for _, text in client.hscan_iter(self.keys.rules, count=1000):
            try:
                rule = rule_from_json(text)
            except ValueError as error:
                self._skipped(error)
                continue
            if rule.expires is None or rule.expires > now:
                index.add(rule)
        before = self.size
        self.index = index
        self.fresh_at = self.clock.monotonic()
        self.problem = None
        event(
            log,
            logging.INFO if index.size != before or not self._synced.is_set() else logging.DEBUG,
            "revocation_loaded",
            "revocation list loaded from %(origin)s: %(rules)s rules",
            origin=self.origin,
            store=self.store,
            rules=index.size,
        )


async def _redis_add(store: RedisStore, rules: list[Rule], now: float) -> list[Rule]:
    keys = _Keys(store.key_prefix)
    client = _client(store)
    try:
        written: list[Rule] = []

        async def write(pipe: Any) -> None:
            written.clear()
            fields = [rule.identity() for rule in rules]
            old = await pipe.hmget(keys.rules, fields)
            expired = await pipe.zrangebyscore(keys.expiry, "-inf", now)
            last = await pipe.zrange(keys.expiry, -1, -1, withscores=True)
            for rule, text in zip(rules, old, strict=True):
                if text is not None:
                    with contextlib.suppress(ValueError):
                        rule = rule_from_json(text).merged(rule)
                written.append(rule)
            pipe.multi()
            if expired:
                pipe.hdel(keys.rules, *expired)
                pipe.zrem(keys.expiry, *expired)
            for rule in written:
                assert rule.expires is not None
                body = json.dumps(rule.to_json(), separators=(",", ":"))
                pipe.hset(keys.rules, rule.identity(), body)
                pipe.zadd(keys.expiry, {rule.identity(): rule.expires})
            # Both keys go when their last rule expires: a list nobody writes to empties itself.
            until = max([*(r.expires or 0 for r in written), *(score for _, score in last)])
            pipe.expireat(keys.rules, math.ceil(until) + 1)
            pipe.expireat(keys.expiry, math.ceil(until) + 1)
            for rule in written:
                pipe.publish(keys.channel, json.dumps(rule.to_json(), separators=(",", ":")))

        await client.transaction(write, keys.rules, keys.expiry)
        return written
    except (_redis_error(), OSError) as error:
        raise StoreError(f"Redis {shown(store.url)}: {_cause(error)}") from None
    finally:
        await client.aclose()


async def _redis_list(store: RedisStore, now: float) -> list[Rule]:
    keys = _Keys(store.key_prefix)
    client = _client(store)
    try:
        found = []
        async for _, text in client.hscan_iter(keys.rules, count=5000):
            with contextlib.suppress(ValueError):
                rule = rule_from_json(text)
                if rule.expires is None or rule.expires > now:
                    found.append(rule)
        return found
    except (_redis_error(), OSError) as error:
        raise StoreError(f"Redis {shown(store.url)}: {_cause(error)}") from None
    finally:
        await client.aclose()


async def add_rules(settings: RevocationSettings, rules: Iterable[Rule], *, now: float) -> list[Rule]:
    """Write `rules` to the store (merged with the same rules already there); what is now in force."""
    rules = list(rules)
    if settings.redis is not None:
        if any(rule.expires is None for rule in rules):
            raise StoreError("a rule in Redis needs an expiry")
        return await _redis_add(settings.redis, rules, now)
    assert settings.file is not None
    return await asyncio.to_thread(write_rules_file, settings.file, rules, now)


async def list_rules(settings: RevocationSettings, *, now: float) -> list[Rule]:
    """The rules in force at `now`, soonest to expire first."""
    if settings.redis is not None:
        found = await _redis_list(settings.redis, now)
    else:
        assert settings.file is not None
        try:
            found = read_rules_file(settings.file, now) or []
        except ConfigError as error:
            raise StoreError(f"the revocation file has mistakes: {rules_problem(error)}") from None
    return sorted(RevocationIndex(found), key=_order)


def open_store(settings: RevocationSettings, *, clock: Clock | None = None) -> Revocations:
    """The follower of the configured store (call `start()` in the event loop, `close()` at the end)."""
    if settings.redis is not None:
        return RedisRevocations(settings, clock=clock)
    return FileRevocations(settings, clock=clock)


async def start_store(settings: RevocationSettings | None, *, clock: Clock | None = None) -> Revocations | None:
    """The configured store's follower, started (its first load done or failed) and judged
    once (`unavailable` is set from the start, not a tick later); None without `revocation:`.
    The process's lifecycle calls this at start and on a reload that changes `revocation:`."""
    if settings is None:
        return None
    store = open_store(settings, clock=clock)
    try:
        await store.start()
    except BaseException:
        await store.close()
        raise
    store.tick()
    return store
