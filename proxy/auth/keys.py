"""Key sources per provider: where each provider's verification keys come from, and when.

Owns: fetching a provider's JWK Set over HTTP (a configured JWKS URL, or the `jwks_uri` of
an OpenID Connect discovery document) with the shared client (http/fetch.py's `Fetcher`); how long a fetched
set counts as fresh and refreshing it ahead of expiry (timed, like every interval here, on
the injected clock); single-flight and rate-limited refetches when a token names an unknown
`kid`; keeping the last good keys when a refresh fails; static keys (a JWKS file, a PEM
key, an HS secret) read once by the config; whether a provider is `ready` (holds at least
one usable key); and, across a reload, which
sources carry over: a source is identified by its key-source settings alone (`same_source`),
a source whose algorithms changed is re-indexed from the last good document, and a replaced
source keeps serving through its successor (`fall_back_on`) until the successor has keys.
Does not own: turning a JWK Set into usable keys (jwks.py's `KeySet`), reading key files
(config/builder.py), or anything about requests, routes, tokens or claims.

Only configured URLs are ever fetched. Token header parameters that name keys or key
locations (`jku`, `x5u`, `jwk`, `x5c`, RFC 7515 §4.1.2-6) never reach this module: trusting
them would let a token choose its own verification key (RFC 8725 §3.10).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from cachetools import TTLCache

from ..base.clock import Clock
from ..base.errors import InvalidToken, KeysUnavailable, Reason
from ..base.jwk import Jwk
from ..base.jwks import KeySet
from ..base.oplog import event
from ..config.settings import Provider, RemoteJwks, StaticKeys
from ..http.causes import Worded, cause, peer, shown
from ..http.fetch import Fetcher

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "KeyRing",
    "KeySource",
    "RemoteKeySource",
    "StaticKeySource",
    "key_source_for",
    "same_source",
]

MAX_DOCUMENT_BYTES = 1024 * 1024
"""Largest JWKS or discovery document we read: real ones are a few KiB, and the body is
read into memory, so an issuer (or whoever sits on its path) must not be able to exhaust it."""

# Refresh at about 80% of the TTL, so a good set is replaced before it stops counting as
# fresh; the spread keeps a fleet of sidecars started together from fetching in lockstep.
_REFRESH_AHEAD = (0.75, 0.85)
_MIN_RETRY = 1.0
"""Floor of the retry delay after a failed fetch, whatever min_refresh_interval says."""
_FRESH = "keys"


class _FetchFailed(Exception):
    """One refresh attempt failed: what was fetched, from where, and why in operator words
    (never a response body)."""

    def __init__(self, what: str, url: str, why: str) -> None:
        url = shown(url)
        super().__init__(f"{what}: {why}" if url in why else f"{what} {url}: {why}")
        self.url = url
        self.why = why


class KeySource:
    """One provider's keys, as verification reads them through `key_for`.

    `keyset` is replaced whole (never mutated), so a reader always sees one consistent set.
    """

    provider: Provider
    keyset: KeySet
    fetches: int
    """Refresh attempts, each one GET of the JWKS (preceded by discovery when configured)."""
    failures: int
    """Refresh attempts that did not yield a usable key set (so `failures <= fetches`)."""
    discovery_fetches: int
    """GETs of the OIDC discovery document."""
    skipped: int
    """Keys left out of loaded sets (unusable for verification), summed over every load."""
    last_success: float | None
    """`clock.monotonic()` of the last good load; None until there has been one."""
    last_failure: str | None
    """What the last failed fetch met, in words (`connection refused from host:443`); None if none has."""

    def __init__(self, provider: Provider, *, clock: Clock, logger: logging.Logger | None = None) -> None:
        self.provider = provider
        self.keyset = KeySet.empty()
        self.fetches = 0
        self.failures = 0
        self.discovery_fetches = 0
        self.skipped = 0
        self.last_success = None
        self.last_failure = None
        self._clock = clock
        self._log = logger or logging.getLogger("proxy.keys")  # the name it has always logged under
        self._fallback: KeySource | None = None
        self._releasing: asyncio.Task[None] | None = None
        self._said_unready = False

    @property
    def name(self) -> str:
        return self.provider.name

    @property
    def ready(self) -> bool:
        """True once at least one usable key is held (and for good: stale keys still count),
        here or in the source this one replaced and still serves through (`fall_back_on`)."""
        return self.keyset.size > 0 or (self._fallback is not None and self._fallback.ready)

    @property
    def fallback(self) -> KeySource | None:
        """The source this one replaced, serving until this one has keys of its own."""
        return self._fallback

    def fall_back_on(self, previous: KeySource) -> None:
        """Serve `previous`'s keys until this source loads its own (then close `previous`).

        A reload that changes where a provider's keys come from must not take the provider
        down while the new place is unreachable: the old keys keep verifying its tokens.
        """
        if self.keyset.size == 0 and previous.ready and previous is not self:
            self._fallback = previous
            event(
                self._log,
                logging.WARNING,
                "key_source_fallback",
                "provider %(provider)s: no keys yet from %(source)s; the keys from %(previous_source)s keep "
                "serving until there are",
                provider=self.name,
                source=self.provider.keys.origin,
                previous_source=previous.provider.keys.origin,
            )

    @property
    def fresh(self) -> bool:
        """Whether the held keys are current (static keys always are)."""
        return self.ready

    async def start(self) -> None:
        """Load the first keys. Never raises for an unreachable key source."""

    async def close(self) -> None:
        """Stop background work (and the fallback's); safe to call more than once."""
        fallback, self._fallback = self._fallback, None
        if fallback is not None:
            await fallback.close()

    async def key_for(self, kid: str | None, alg: str) -> tuple[Jwk, ...]:
        """The keys that may verify a token with this `kid` (or none) and an allowed `alg`.

        :raises KeysUnavailable: the provider holds no usable keys at all (our outage: 503).
        :raises InvalidToken: (`Reason.UNKNOWN_KID`) no key fits the kid and alg.
        """
        found = self.keyset.candidates(kid, alg)
        if found and (kid is None or kid in self.keyset.kids):
            return found
        fallback = self._fallback
        if self.keyset.size == 0 and fallback is not None and fallback.ready:
            # Not our own refetch: that would hold every request for a fetch timeout while
            # the new key location is down. The refresh task keeps trying it meanwhile.
            return await fallback.key_for(kid, alg)
        if self.keyset.size == 0:
            await self._refetch()
            found = self.keyset.candidates(kid, alg)
            if found:
                return found
            if self.keyset.size == 0:
                # With the cause: `token explain` prints this as its key line, and an operator
                # reading only that must learn why (DNS, refused, HTTP 404), not only that.
                why = f" (last fetch: {self.last_failure})" if self.last_failure else ""
                raise KeysUnavailable(f"provider {self.name}: no usable keys from {self.provider.keys.origin}{why}")
        elif kid is not None and kid not in self.keyset.kids:
            # A kid we have never seen may be a freshly rotated key (RFC 7517 §5 leaves
            # rotation to the issuer); a kid we know with the wrong alg never will be. Keys
            # without a kid are candidates for it meanwhile (`found`), but the new key, once
            # fetched, comes first. The refetch is rate-limited; a static source has none.
            await self._refetch()
            found = self.keyset.candidates(kid, alg)
        if found:
            return found
        if kid is None:
            raise InvalidToken(Reason.UNKNOWN_KID, f"no key without kid fits alg {alg}")
        raise InvalidToken(Reason.UNKNOWN_KID, f"no key with kid {kid!r} for alg {alg}")

    async def _refetch(self) -> None:
        """Try to get newer keys on demand; a static source has none to get."""

    def _load(
        self, keyset: KeySet, *, url: str | None = None, duration_ms: float | None = None, carried: bool = False
    ) -> None:
        """Adopt a freshly parsed set: say what changed, count and report what it left out.

        `url`, `duration_ms`: where a fetched set came from and how long that took;
        `carried`: the set is the one a reload carried over (nothing new to say at INFO).
        """
        was_ready = self.ready
        previous, self.keyset = self.keyset, keyset
        self.last_success = self._clock.monotonic()
        added, removed = sorted(keyset.kids - previous.kids), sorted(previous.kids - keyset.kids)
        # A refresh that brings the same keys is routine (every few minutes): DEBUG. The
        # first set, a rotation (kids added or removed, keys without a kid counted) is INFO.
        changed = (
            not carried and keyset.size > 0 and (previous.size == 0 or added or removed or previous.size != keyset.size)
        )
        fields: dict[str, object] = {"provider": self.name, "source": self.provider.keys.origin}
        if url is not None:
            fields.update(url=shown(url), peer=peer(url))
        fields.update(keys=keyset.size, kids=sorted(keyset.kids), kids_added=added, kids_removed=removed)
        if duration_ms is not None:
            fields["duration_ms"] = round(duration_ms, 1)
        event(
            self._log,
            logging.INFO if changed else logging.DEBUG,
            "keys_loaded",
            "provider %(provider)s: "
            + ("key set changed" if previous.size and changed else "key set loaded")
            + " from %(source)s: %(keys)d key(s), kids added %(kids_added)s, removed %(kids_removed)s"
            + (" in %(duration_ms)gms" if duration_ms is not None else ""),
            **fields,
        )
        if keyset.skipped:
            self.skipped += len(keyset.skipped)
            # Routine for some issuers (Keycloak publishes an RSA-OAEP `use: enc` key), so
            # not a warning, and said again only when it changes; the count is for dashboards.
            level = logging.DEBUG if keyset.skipped == previous.skipped else logging.INFO
            event(
                self._log,
                level,
                "keys_skipped",
                "provider %(provider)s: %(skipped)d key(s) skipped from %(source)s: %(why)s",
                provider=self.name,
                skipped=len(keyset.skipped),
                source=self.provider.keys.origin,
                why="; ".join(f"{k.kid or '(no kid)'}: {k.reason}" for k in keyset.skipped),
            )
        fallback = self._fallback
        if fallback is not None and keyset.size > 0:
            # Our own keys have arrived: the source we replaced is done.
            self._fallback = None
            event(
                self._log,
                logging.INFO,
                "key_source_replaced",
                "provider %(provider)s: keys loaded from %(source)s; the previous key source "
                "(%(previous_source)s) is closed",
                provider=self.name,
                source=self.provider.keys.origin,
                previous_source=fallback.provider.keys.origin,
            )
            self._releasing = asyncio.get_running_loop().create_task(fallback.close())
        if not was_ready and self.ready and not carried:  # carried: ready before the reload too
            self._said_unready = False
            event(
                self._log,
                logging.INFO,
                "provider_ready",
                "provider %(provider)s is ready: %(keys)d usable key(s) from %(source)s",
                provider=self.name,
                keys=keyset.size,
                source=self.provider.keys.origin,
            )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name} keys={self.keyset.size} "
            f"fetches={self.fetches} failures={self.failures}>"
        )


class StaticKeySource(KeySource):
    """Keys the config read once (jwks_file, pem_file, secret): ready from construction, never fetched."""

    def __init__(self, provider: Provider, *, clock: Clock, logger: logging.Logger | None = None) -> None:
        super().__init__(provider, clock=clock, logger=logger)
        keys = provider.keys
        if not isinstance(keys, StaticKeys):
            raise TypeError(f"provider {provider.name}: {type(keys).__name__} keys are not static")
        self._load(KeySet.from_jwks(keys.jwks, provider.algorithms))
        if not self.ready:
            event(
                self._log,
                logging.ERROR,
                "no_usable_key",
                "provider %(provider)s: %(source)s holds no key usable with %(algorithms)s",
                provider=self.name,
                source=keys.origin,
                algorithms=", ".join(provider.algorithms),
            )


class RemoteKeySource(KeySource):
    """Keys fetched over HTTP, kept fresh by a background task, kept when a refresh fails."""

    def __init__(
        self,
        provider: Provider,
        *,
        fetcher: Fetcher,
        clock: Clock,
        logger: logging.Logger | None = None,
        seed: KeySource | None = None,
    ) -> None:
        super().__init__(provider, clock=clock, logger=logger)
        remote = provider.keys
        if not isinstance(remote, RemoteJwks):
            raise TypeError(f"provider {provider.name}: {type(remote).__name__} keys are not remote")
        if remote.url is None and remote.discovery_url is None:
            raise ValueError(f"provider {provider.name}: a remote key source needs a url or a discovery_url")
        self._remote = remote
        self._fetcher = fetcher
        # Holds the last good set for cache_ttl after its load: present means fresh. The
        # set itself outlives it in `keyset`, because stale keys beat no keys (503 for all).
        self._fresh: TTLCache[str, KeySet] = TTLCache(maxsize=1, ttl=remote.cache_ttl, timer=clock.monotonic)
        self._jwks_uri: str | None = remote.url
        self._inflight: asyncio.Task[bool] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._last_refetch: float | None = None
        self._closed = False
        self._document: Any = None
        """The last good JWK Set as fetched, kept to re-index it when only algorithms change."""
        self._seeded = False
        if (
            isinstance(seed, RemoteKeySource)
            and seed._remote == remote
            and seed._document is not None
            # A jwks_uri found by discovery was vouched for by the old issuers only.
            and (remote.discovery_url is None or seed.provider.issuers == provider.issuers)
        ):
            self._seed(seed)

    def _seed(self, seed: RemoteKeySource) -> None:
        """Start from `seed`'s last good document, indexed for this provider's algorithms.

        Same fetch settings, other algorithms (a reload): the keys are the same keys, only
        which algorithms they may verify changed, so nothing needs fetching to serve.
        """
        try:
            keyset = KeySet.from_jwks(seed._document, self.provider.algorithms)
        except ValueError:
            return
        self._jwks_uri = seed._jwks_uri
        self._last_refetch = seed._last_refetch
        if keyset.size > 0:
            self._document = seed._document
            self._load(keyset, carried=True)
            self.last_success = seed.last_success
            self._seeded = True

    @property
    def fresh(self) -> bool:
        """Whether the held set was loaded less than cache_ttl ago."""
        return _FRESH in self._fresh

    @property
    def jwks_uri(self) -> str | None:
        """The JWKS URL in use: configured, or found by discovery (None until found)."""
        return self._jwks_uri

    async def start(self) -> None:
        if self._refresher is not None or self._closed:
            return
        if not self._seeded:
            await _wait(self._fetch_shared())
        # A seeded source serves at once and refreshes in the background right away: its
        # keys were loaded by the source it replaces, so they may be near the end of their TTL.
        self._refresher = asyncio.create_task(
            self._refresh_loop(first_delay=0.0 if self._seeded else None), name=f"jwks-refresh:{self.name}"
        )

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._refresher, self._inflight) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        # return_exceptions: the tasks end cancelled, and close() must not raise for that.
        await asyncio.gather(*tasks, return_exceptions=True)
        await super().close()

    async def _refetch(self) -> None:
        task = self._inflight
        if task is None or task.done():
            if self._closed:
                return
            now = self._clock.monotonic()
            # A flood of tokens with made-up kids must cost the issuer one fetch per
            # interval, not one per token. Joining a fetch already in flight costs nothing.
            if self._last_refetch is not None and now - self._last_refetch < self._remote.min_refresh_interval:
                return
            self._last_refetch = now
            task = self._fetch_shared()
        await _wait(task)

    def _fetch_shared(self) -> asyncio.Task[bool]:
        """The fetch in flight, or a new one: at most one per source, shared by every caller."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._fetch(), name=f"jwks-fetch:{self.name}")
        return self._inflight

    async def _refresh_loop(self, first_delay: float | None = None) -> None:
        # Started right after the first load: a failed one is the first failure in a row.
        # Only keys of our own count here: a source serving through its fallback must keep
        # trying its own location at the steady interval.
        failed_in_row = 0 if self.keyset.size > 0 else 1
        while True:
            if first_delay is not None:
                delay, first_delay = first_delay, None
            elif failed_in_row == 0:
                delay = self._remote.cache_ttl * random.uniform(*_REFRESH_AHEAD)
            else:
                # Back off while the issuer is down, but keep trying at the steady interval
                # when we hold no keys at all: a not-ready pod gets no traffic, so nothing
                # else would ever fetch for it.
                base = max(self._remote.min_refresh_interval, _MIN_RETRY)
                cap = self._remote.cache_ttl if self.keyset.size > 0 else base
                delay = min(base * 2 ** min(failed_in_row - 1, 16), cap, self._remote.cache_ttl)
            # On the injected clock, like the TTL and the rate limit it serves: a test clock
            # moves the refresh on at once (the system clock sleeps in real time).
            await self._clock.sleep(delay)
            try:
                task = self._fetch_shared()
                await _wait(task)
                ok = not task.cancelled() and task.result()
            except Exception:  # noqa: BLE001 - the loop must outlive any surprise
                event(
                    self._log,
                    logging.ERROR,
                    "key_refresh_crashed",
                    "provider %(provider)s: key refresh failed unexpectedly",
                    provider=self.name,
                    exc_info=True,
                )
                ok = False
            failed_in_row = 0 if ok else failed_in_row + 1

    async def _fetch(self) -> bool:
        """One refresh attempt: True when a usable set was loaded. Never raises (but cancels)."""
        self.fetches += 1
        jwks_uri = self._jwks_uri
        started = time.monotonic()
        try:
            if jwks_uri is None:
                jwks_uri = self._jwks_uri = await self._discover()
            document = await self._get_json(jwks_uri, "JWKS")
            try:
                keyset = KeySet.from_jwks(document, self.provider.algorithms)
            except ValueError as error:
                raise _FetchFailed("JWKS", jwks_uri, str(error)) from None
            if keyset.size == 0:
                reasons = "; ".join(f"{k.kid or '(no kid)'}: {k.reason}" for k in keyset.skipped) or "empty"
                raise _FetchFailed("JWKS", jwks_uri, f"no usable key ({reasons})")
        except _FetchFailed as error:
            self._failed(error, jwks_uri, started)
            return False
        except Exception as error:  # noqa: BLE001 - a refresh must never take the process down
            url = jwks_uri or self._remote.discovery_url or ""
            self._failed(
                _FetchFailed("JWKS" if jwks_uri else "discovery document", url, cause(error)), jwks_uri, started
            )
            return False
        self._document = document
        self._load(keyset, url=jwks_uri, duration_ms=(time.monotonic() - started) * 1000)
        self._fresh[_FRESH] = keyset
        return True

    def _failed(self, error: _FetchFailed, jwks_uri: str | None, started: float) -> None:
        self.failures += 1
        self.last_failure = f"{error.why} from {peer(error.url)}"  # as provider_unready words it
        if self._remote.discovery_url is not None and jwks_uri is not None:
            # The issuer may have moved its jwks_uri: look it up again next time.
            self._jwks_uri = None
        held = (
            f"keeping {self.keyset.size} key(s) from the last good fetch"
            if self.keyset.size > 0
            else f"the keys from {self._fallback.provider.keys.origin} keep serving"
            if self._fallback is not None and self.ready
            else "no keys held: requests for this provider get 503"
        )
        event(
            self._log,
            logging.WARNING,
            "key_fetch_failed",
            "provider %(provider)s: key fetch failed: %(what)s; %(serving)s",
            provider=self.name,
            url=error.url,
            peer=peer(error.url),
            cause=error.why,
            what=str(error),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            keys_held=self.keyset.size,
            serving=held,
        )
        if not self.ready and not self._said_unready:
            # Said once until it is ready: the failures above repeat at every retry.
            self._said_unready = True
            event(
                self._log,
                logging.WARNING,
                "provider_unready",
                "provider %(provider)s is not ready: no usable keys (%(cause)s from %(peer)s); requests "
                "for its routes get 503 until a fetch succeeds",
                provider=self.name,
                url=error.url,
                peer=peer(error.url),
                cause=error.why,
            )

    async def _discover(self) -> str:
        """The `jwks_uri` of the OIDC discovery document (OpenID Connect Discovery 1.0 §4)."""
        url = self._remote.discovery_url
        assert url is not None  # only called when no JWKS URL is configured or cached
        self.discovery_fetches += 1
        document = await self._get_json(url, "discovery document")
        if not isinstance(document, Mapping):
            raise _FetchFailed("discovery document", url, "not a JSON object")
        issuer = document.get("issuer")
        # §4.3: the issuer must be identical to the one the document was found for, or a
        # document could vouch for keys of an issuer it does not speak for.
        if not isinstance(issuer, str) or issuer not in self.provider.issuers:
            raise _FetchFailed(
                "discovery document", url, f"issuer {_short(issuer)} is not one of {', '.join(self.provider.issuers)}"
            )
        jwks_uri = document.get("jwks_uri")
        if (
            not isinstance(jwks_uri, str)
            or (parts := urlsplit(jwks_uri)).scheme not in ("http", "https")
            or not parts.hostname
        ):
            raise _FetchFailed("discovery document", url, f"jwks_uri {_short(jwks_uri)} is not an http(s) URL")
        return jwks_uri

    async def _get_json(self, url: str, what: str) -> Any:
        try:
            fetched = await self._fetcher.get(
                url, timeout=self._remote.timeout, limit=MAX_DOCUMENT_BYTES, headers=(("Accept", "application/json"),)
            )
        # Builtin TimeoutError is an OSError too: caught first, to say "timed out".
        except TimeoutError:
            raise _FetchFailed(what, url, f"timed out after {self._remote.timeout:g}s") from None
        except (Worded, OSError) as error:  # the fetcher's errors are operator words (causes.py)
            raise _FetchFailed(what, url, cause(error, timeout=self._remote.timeout)) from None
        if fetched.status != 200:
            raise _FetchFailed(what, url, f"HTTP {fetched.status} from {shown(url)}")
        body = fetched.body
        if body is None:
            raise _FetchFailed(what, url, f"larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            # ValueError covers bad JSON and bad UTF-8; RecursionError, absurd nesting.
            raise _FetchFailed(what, url, f"not JSON ({len(body)} bytes)") from None


async def _wait(task: asyncio.Task[bool]) -> None:
    # Not `await task`: a caller that gives up (its client went away) must not cancel the
    # fetch the other callers share, and a fetch cancelled by close() must not raise
    # CancelledError into a caller that was not itself cancelled.
    await asyncio.wait((task,))


def _short(value: Any) -> str:
    """A document value for a log line, bounded (it comes from the network)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def key_source_for(
    provider: Provider,
    *,
    fetcher: Fetcher | None,
    clock: Clock,
    logger: logging.Logger | None = None,
    seed: KeySource | None = None,
) -> KeySource:
    """The key source a provider's config asks for; remote ones need the shared `fetcher`.

    `seed`: the source this one replaces; a remote source with the same fetch settings
    starts from its last good document (see `RemoteKeySource._seed`).
    """
    if isinstance(provider.keys, StaticKeys):
        return StaticKeySource(provider, clock=clock, logger=logger)
    if fetcher is None:
        raise ValueError(f"provider {provider.name}: fetching {provider.keys.origin} needs a client session")
    return RemoteKeySource(provider, fetcher=fetcher, clock=clock, logger=logger, seed=seed)


def same_source(old: Provider, new: Provider) -> bool:
    """Whether a reload may keep `old`'s key source for `new`: same keys, same algorithms.

    Only what decides which keys a source holds counts: the key settings (JWKS URL and its
    timeouts and cache settings, discovery URL, static key material) and the algorithms the
    keys are indexed for. Leeway, audiences, headers, claims and the rest are checked by the
    verifier with whatever keys the source holds, so changing them keeps the keys. With a
    discovery URL the accepted issuers count too: the discovery document is checked against
    them (OpenID Connect Discovery §4.3), so new issuers mean a new look-up.
    """
    if old.keys != new.keys or old.algorithms != new.algorithms:
        return False
    return not (isinstance(new.keys, RemoteJwks) and new.keys.discovery_url is not None and old.issuers != new.issuers)


class KeyRing:
    """The key sources of every provider in one Settings, started and closed together."""

    sources: Mapping[str, KeySource]

    def __init__(
        self,
        providers: Mapping[str, Provider],
        *,
        fetcher: Fetcher | None,
        clock: Clock,
        logger: logging.Logger | None = None,
        reuse: KeyRing | None = None,
    ) -> None:
        sources: dict[str, KeySource] = {}
        for name, provider in providers.items():
            # On reload, a provider whose key settings did not change keeps its source: its
            # keys, its refresh task and its rate limit carry over, and nothing is refetched.
            old = reuse.sources.get(name) if reuse is not None else None
            if old is not None and same_source(old.provider, provider):
                sources[name] = old
                continue
            source = key_source_for(provider, fetcher=fetcher, clock=clock, logger=logger, seed=old)
            if old is not None:
                # Until the new source has keys of its own, the old keys keep serving: a
                # reload during an issuer outage must not turn every request into a 503.
                source.fall_back_on(old)
            sources[name] = source
        self.sources = MappingProxyType(sources)

    def __getitem__(self, name: str) -> KeySource:
        return self.sources[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    async def start(self) -> None:
        """First loads of every provider at once, so one slow issuer does not delay the rest."""
        await asyncio.gather(*(source.start() for source in self.sources.values()))

    async def close(self, *, keep: KeyRing | None = None) -> None:
        """Close every source, except those `keep` (the ring that replaced this one) still uses."""
        kept: set[int] = set()
        for source in keep.sources.values() if keep is not None else ():
            chain: KeySource | None = source
            while chain is not None:  # a source and the ones it still falls back on
                kept.add(id(chain))
                chain = chain.fallback
        await asyncio.gather(*(s.close() for s in self.sources.values() if id(s) not in kept))

    def ready(self, names: Iterable[str] | None = None) -> bool:
        """Whether every named provider (default: all) holds usable keys."""
        chosen = self.sources if names is None else names
        return all(self.sources[name].ready for name in chosen)
