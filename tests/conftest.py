"""Shared fixtures: real keys made with cryptography, a token minter, and a settable clock.

Keys are generated once per session (RSA generation is slow) and never written into the
repository; tokens are minted per test, never pasted.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.support.raw import Handler, RawServer

ISSUER = "https://issuer.test"
AUDIENCE = "api://orders"
HS_SECRET = b"0123456789abcdef" * 4  # 64 bytes: long enough for HS512 (RFC 7518 §3.2)


@dataclass(frozen=True)
class TestKey:
    """A private key, its public JWK (with kid and alg), and the alg it signs with."""

    __test__ = False  # not a test class, despite the name
    kid: str
    alg: str
    private: Any
    public_jwk: dict[str, Any] = field(repr=False)

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _rsa(kid: str, alg: str = "RS256") -> TestKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return TestKey(kid, alg, private, {**jwk, "kid": kid, "use": "sig", "alg": alg})


def _ec(kid: str) -> TestKey:
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return TestKey(kid, "ES256", private, {**jwk, "kid": kid, "use": "sig", "alg": "ES256"})


def _ed(kid: str) -> TestKey:
    private = ed25519.Ed25519PrivateKey.generate()
    jwk = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return TestKey(kid, "EdDSA", private, {**jwk, "kid": kid, "use": "sig", "alg": "EdDSA"})


@pytest.fixture(scope="session")
def rsa_key() -> TestKey:
    return _rsa("rsa-1")


@pytest.fixture(scope="session")
def rsa_key_2() -> TestKey:
    """A second RSA key, for rotation: published later than `rsa_key`."""
    return _rsa("rsa-2")


@pytest.fixture(scope="session")
def ec_key() -> TestKey:
    return _ec("ec-1")


@pytest.fixture(scope="session")
def ed_key() -> TestKey:
    return _ed("ed-1")


def jwks_of(*keys: TestKey) -> dict[str, Any]:
    return {"keys": [k.public_jwk for k in keys]}


def mint(
    claims: dict[str, Any] | None = None,
    *,
    key: TestKey | None = None,
    secret: bytes | None = None,
    alg: str | None = None,
    headers: dict[str, Any] | None = None,
    now: float | None = None,
    omit: tuple[str, ...] = (),
) -> str:
    """A signed token with sensible valid defaults (iss, aud, sub, iat, exp) overridable by `claims`."""
    issued = int(now if now is not None else time.time())
    payload: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-42", "iat": issued, "exp": issued + 300}
    payload.update(claims or {})
    for name in omit:
        payload.pop(name, None)
    header: dict[str, Any] = {}
    if key is not None:
        header["kid"] = key.kid
        signing_key: Any = key.private
        algorithm = alg or key.alg
    else:
        signing_key = secret if secret is not None else HS_SECRET
        algorithm = alg or "HS256"
    header.update(headers or {})
    if "kid" in header and header["kid"] is None:
        del header["kid"]
    return jwt.encode(payload, signing_key, algorithm=algorithm, headers=header)


class FakeClock:
    """A clock the test sets: `time()` is wall-clock seconds, `monotonic()` moves with it.

    `sleep()` returns only when `advance` has moved the clock past its end, so a background
    timer (the key refresh) runs exactly when the test says, without real waiting.
    """

    def __init__(self, start: float | None = None) -> None:
        self.now = start if start is not None else time.time()
        self._mono = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self._mono += seconds
        for deadline, waiter in self._sleepers:
            if deadline <= self._mono and not waiter.done():
                waiter.set_result(None)
        self._sleepers = [(d, w) for d, w in self._sleepers if not w.done()]

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._mono + seconds, waiter))
        try:
            await waiter
        finally:
            self._sleepers = [(d, w) for d, w in self._sleepers if w is not waiter]

    async def sleeping(self, within: float = 5.0) -> float:
        """Seconds until the first pending `sleep()` ends, once something sleeps on this clock.

        Waits (in real time, at most `within`) for a sleeper: a background task started a
        moment ago may not have reached its `sleep()` yet, and advancing before it has
        would not wake it.
        """
        deadline = time.monotonic() + within
        while not any(not w.done() for _, w in self._sleepers):
            assert time.monotonic() < deadline, f"nothing slept on the clock within {within}s"
            await asyncio.sleep(0.005)
        return min(d for d, w in self._sleepers if not w.done()) - self._mono


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


_REFUSING: list[socket.socket] = []


def refused_port(which: int = 0) -> int:
    """A loopback port that refuses connections for the whole test run, whatever else runs
    (`which`: another one, for a test that needs two different dead addresses).

    Bound by this process and never listening: a connection to it is refused, and no other
    process can listen on it meanwhile. (Port 1 or 9, or a port bound and closed again, is
    refused only while nothing else happens to listen there.)
    """
    while len(_REFUSING) <= which:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        _REFUSING.append(sock)
    return int(_REFUSING[which].getsockname()[1])


def pytest_unconfigure(config: pytest.Config) -> None:
    """The refused ports are held until the run ends, then given back."""
    while _REFUSING:
        _REFUSING.pop().close()


# Appended with keys.py; imported here, not at the top, to leave the fixtures above untouched.
from tests.support.jwks_server import JwksServer, start_jwks_server  # noqa: E402


@pytest.fixture
async def jwks_server(aiohttp_server: Any) -> JwksServer:
    """A JWKS server on loopback (tests/support/jwks_server.py), serving an empty set until told."""
    return await start_jwks_server(aiohttp_server)


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    """Starts hand-written loopback servers (tests/support/raw.py); all are stopped after the test."""
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = await RawServer(handler).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


# The revocation store's tests: one real redis-server for the whole run (tests/support/redis.py).
from tests.support.redis import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real `redis-server` on a free loopback port, started once per run and stopped at its end."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start_on_a_free_port()
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """The session's Redis, running and empty (a test that stopped it gets it back up)."""
    if redis_server.process is not None and redis_server.process.poll() is not None:
        redis_server.process = None  # it died (not stopped by a test): started again, as after a stop
    if redis_server.process is None:
        redis_server.start()
    redis_server.flush()
    return redis_server
