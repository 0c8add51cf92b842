"""`auth: {providers: [A, B]}`: the token's iss chooses one provider, whose keys, checks and
header map alone apply; the route's rules apply whichever it was.

The real proxy on loopback, a real recording upstream, two real JWKS servers (one per
issuer, each with its own real key) and an HS256 secret provider, so that every attack
across providers (a key of one under the iss of another, an algorithm of one under another,
the same token text cached under two) meets the real code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import secrets
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.base.errors import ProxyError, Reason
from proxy.telemetry.accesslog import AccessLog
from tests.conftest import AUDIENCE, TestKey, jwks_of, mint
from tests.integration.conftest import Sidecar
from tests.support.jwks_server import JwksServer, start_jwks_server

USERS = "https://users.test"
SERVICES = "https://services.test"
PARTNER = "https://partner.test"
# (ends in a letter: a secret file's line ending is stripped, so one ending in CR or LF read short)
PARTNER_SECRET = secrets.token_bytes(47) + b"p"

CONFIG = f"""\
realm: api
upstream: {{url: "{{upstream}}", timeout: 2s, connect_timeout: 1s}}
providers:
  users:
    issuer: {USERS}
    audiences: [{AUDIENCE}]
    algorithms: [RS256]
    jwks: {{url: "{{jwks}}", min_refresh_interval: 1s}}
    headers:
      claims: {{sub: X-User-Id, email: X-User-Email}}
      provider: X-Admitted-By
  services:
    issuer: [{SERVICES}, "{SERVICES}/v2"]
    audiences: [{AUDIENCE}]
    algorithms: [ES256, RS256]
    jwks: {{url: "{{services_jwks}}", min_refresh_interval: 1s}}
    headers:
      claims: {{sub: X-Service-Id, client_id: X-Client-Id}}
      provider: X-Admitted-By
  partner:
    issuer: {PARTNER}
    audiences: [{AUDIENCE}]
    algorithms: [HS256]
    secret: {{file: "{{secret}}"}}
    headers:
      provider: X-Admitted-By
routes:
  - name: admin
    match: {{path_prefix: /admin/}}
    auth: {{providers: [users, services], scopes: {{all_of: [admin]}}}}
  - name: maybe
    match: {{path_prefix: /maybe/}}
    auth: {{providers: [users, services], optional: true}}
  - name: users-only
    match: {{path_prefix: /users/}}
    auth: {{provider: users}}
  - name: services-only
    match: {{path_prefix: /services/}}
    auth: {{provider: services}}
  - name: mixed
    match: {{path_prefix: /}}
    auth: {{providers: [users, services, partner]}}
"""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(payload: dict[str, Any], secret: bytes) -> str:
    """HS256 by hand: PyJWT refuses a PEM public key as an HMAC secret, an attacker does not."""
    signing_input = (
        f"{b64url(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64url(json.dumps(payload).encode())}"
    )
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def rs256(payload: dict[str, Any], key: TestKey) -> str:
    """Any payload (PyJWT's `encode` refuses an iss that is not a string; a forger does not)."""
    return jwt.api_jws.encode(json.dumps(payload).encode(), key.private, algorithm="RS256", headers={"kid": key.kid})


def forge(header: dict[str, Any], payload_json: str, signature: bytes = b"") -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(payload_json.encode())}.{b64url(signature)}"


@pytest.fixture
async def two(
    sidecar: Any, aiohttp_server: Any, rsa_key: TestKey, ec_key: TestKey, tmp_path: Any
) -> tuple[Sidecar, JwksServer]:
    services = await start_jwks_server(aiohttp_server, jwks_of(ec_key))
    secret = tmp_path / "partner.secret"
    secret.write_bytes(PARTNER_SECRET)
    s = await sidecar(CONFIG, services_jwks=services.url(), secret=str(secret))
    s.jwks.document = jwks_of(rsa_key)
    return s, services


def user_token(rsa_key: TestKey, **claims: Any) -> str:
    return mint({"iss": USERS, "email": "ada@example.com", **claims}, key=rsa_key)


def service_token(ec_key: TestKey, **claims: Any) -> str:
    return mint({"iss": SERVICES, "sub": "svc-billing", "client_id": "billing", **claims}, key=ec_key)


def bearer(token: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **more}


def challenge(reason: Reason) -> str:
    return f'Bearer realm="api", error="invalid_token", error_description="{ProxyError(reason).description}"'


async def refused(s: Sidecar, path: str, token: str, reason: Reason, caplog: Any) -> str:
    """Send `token`; assert a 401 invalid_token with `reason` and nothing upstream; the log's detail."""
    before = len(s.upstream.seen)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="jwt_sidecar"):
        response = await s.get(path, headers=bearer(token))
        await response.read()
    assert response.status == 401, (path, reason)
    assert response.headers["WWW-Authenticate"] == challenge(reason)
    assert len(s.upstream.seen) == before
    details = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert details, [r.getMessage() for r in caplog.records]
    return details[-1]


# -- each issuer, its own provider ---------------------------------------------------------------
async def test_each_issuer_is_admitted_with_its_own_providers_headers(
    two: tuple[Sidecar, JwksServer], rsa_key: TestKey, ec_key: TestKey
) -> None:
    s, _ = two
    # A client's own claim of who admitted it never reaches the upstream (not under X-Auth-/X-User-).
    response = await s.get("/orders", headers=bearer(user_token(rsa_key), **{"X-Admitted-By": "partner"}))
    assert response.status == 200
    seen = s.upstream.last()
    assert seen.headers["x-admitted-by"] == ["users"]
    assert seen.header("X-User-Id") == "user-42" and seen.header("X-User-Email") == "ada@example.com"
    assert seen.header("X-Service-Id") is None and seen.header("X-Client-Id") is None

    response = await s.get("/orders", headers=bearer(service_token(ec_key), **{"X-Admitted-By": "users"}))
    assert response.status == 200
    seen = s.upstream.last()
    assert seen.headers["x-admitted-by"] == ["services"]
    assert seen.header("X-Service-Id") == "svc-billing" and seen.header("X-Client-Id") == "billing"
    assert seen.header("X-User-Id") is None and seen.header("X-User-Email") is None

    # Every issuer of a provider chooses it: services lists two.
    response = await s.get("/orders", headers=bearer(service_token(ec_key, iss=f"{SERVICES}/v2")))
    assert response.status == 200 and s.upstream.last().header("X-Admitted-By") == "services"

    response = await s.get("/orders", headers=bearer(mint({"iss": PARTNER}, secret=PARTNER_SECRET)))
    assert response.status == 200 and s.upstream.last().header("X-Admitted-By") == "partner"
    assert s.upstream.last().header("X-User-Email") is None  # partner's map: the default (sub) only


async def test_route_rules_apply_whichever_provider_admitted(
    two: tuple[Sidecar, JwksServer], rsa_key: TestKey, ec_key: TestKey
) -> None:
    s, _ = two
    for token in (user_token(rsa_key), service_token(ec_key)):
        response = await s.get("/admin/x", headers=bearer(token))
        assert response.status == 403
        assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    for token, who in (
        (user_token(rsa_key, scope="admin"), "users"),
        (service_token(ec_key, scope="admin"), "services"),
    ):
        response = await s.get("/admin/x", headers=bearer(token))
        assert response.status == 200 and s.upstream.last().header("X-Admitted-By") == who
    # partner is not among this route's providers, though the config knows it.
    response = await s.get("/admin/x", headers=bearer(mint({"iss": PARTNER, "scope": "admin"}, secret=PARTNER_SECRET)))
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == challenge(Reason.ISSUER)


async def test_an_optional_route_with_providers(two: tuple[Sidecar, JwksServer], rsa_key: TestKey) -> None:
    s, _ = two
    response = await s.get("/maybe/x")
    assert response.status == 200 and s.upstream.last().header("X-Admitted-By") is None
    response = await s.get("/maybe/x", headers=bearer(user_token(rsa_key)))
    assert response.status == 200 and s.upstream.last().header("X-Admitted-By") == "users"
    response = await s.get("/maybe/x", headers=bearer(user_token(rsa_key, iss="https://other.test")))
    assert response.status == 401  # optional: a token present is a token checked


# -- the iss chooses, and only the iss ----------------------------------------------------------
async def test_a_users_key_under_the_services_iss_meets_the_services_keys_only(
    two: tuple[Sidecar, JwksServer], rsa_key: TestKey, ec_key: TestKey, caplog: Any
) -> None:
    s, services = two
    users_fetches = s.jwks.requests.copy()
    # Signed by users' key, with its kid (services takes RS256 too): services' key set has no
    # such kid, and users' set, which has, is not asked.
    token = mint({"iss": SERVICES}, key=rsa_key)
    detail = await refused(s, "/orders", token, Reason.UNKNOWN_KID, caplog)
    assert "'rsa-1'" in detail
    # The same with services' kid: services' key is bound to ES256, so nothing verifies.
    forged = mint({"iss": SERVICES}, key=rsa_key, headers={"kid": ec_key.kid})
    detail = await refused(s, "/orders", forged, Reason.UNKNOWN_KID, caplog)
    assert "no key with kid 'ec-1' for alg RS256" in detail
    # An ES256 token signed by another EC key under services' kid: services' key checks it, and says no.
    other = TestKey(ec_key.kid, "ES256", ec.generate_private_key(ec.SECP256R1()), ec_key.public_jwk)
    detail = await refused(s, "/orders", mint({"iss": SERVICES}, key=other), Reason.BAD_SIGNATURE, caplog)
    assert "'ec-1' does not match the signature" in detail
    # The users' key set was never fetched again for any of them, though each names its kid or alg.
    assert s.jwks.requests == users_fetches
    assert services.requests  # services' was


async def test_a_services_token_under_the_users_iss_is_checked_with_the_users_keys(
    two: tuple[Sidecar, JwksServer], rsa_key: TestKey, ec_key: TestKey, caplog: Any
) -> None:
    s, _ = two
    token = mint({"iss": USERS}, key=ec_key)  # services' key, users' iss
    detail = await refused(s, "/orders", token, Reason.ALG_NOT_ALLOWED, caplog)
    assert "ES256" in detail and "['RS256']" in detail


async def test_an_iss_no_provider_of_the_route_accepts(
    two: tuple[Sidecar, JwksServer], rsa_key: TestKey, caplog: Any
) -> None:
    s, _ = two
    hostile = "https://evil.test/\n\x1b[31mFAKE request ok"
    detail = await refused(s, "/orders", user_token(rsa_key, iss=hostile), Reason.ISSUER, caplog)
    assert "\n" not in detail and "\x1b" not in detail
    assert "https://evil.test/" in detail
    for name in ("users", "services", "partner", USERS, SERVICES, PARTNER):
        assert name in detail
    # Exact strings: a trailing slash or another case is another issuer.
    for iss in (USERS + "/", USERS.upper(), " " + USERS, SERVICES + "/v3"):
        await refused(s, "/orders", user_token(rsa_key, iss=iss), Reason.ISSUER, caplog)
    # Not a string: no lookup can match it.
    for iss in ([USERS], {"iss": USERS}, 5, True):
        claims = {"iss": iss, "aud": AUDIENCE, "sub": "x", "exp": 9999999999}
        await refused(s, "/orders", rs256(claims, rsa_key), Reason.ISSUER, caplog)


async def test_a_token_without_iss(two: tuple[Sidecar, JwksServer], rsa_key: TestKey, caplog: Any) -> None:
    s, _ = two
    detail = await refused(s, "/orders", mint({}, key=rsa_key, omit=("iss",)), Reason.MISSING_CLAIM, caplog)
    assert "iss" in detail and "users" in detail
    claims = {"iss": None, "aud": AUDIENCE, "sub": "x", "exp": 9999999999}
    await refused(s, "/orders", rs256(claims, rsa_key), Reason.MISSING_CLAIM, caplog)


async def test_a_payload_that_reads_two_ways_never_chooses(
    two: tuple[Sidecar, JwksServer], rsa_key: TestKey, caplog: Any
) -> None:
    s, _ = two
    # Two iss members: a parser keeping the first would choose partner, one keeping the last
    # users. Refused as malformed before any choice (verification reads the payload so too).
    payload = f'{{"iss":"{PARTNER}","aud":"{AUDIENCE}","sub":"x","exp":9999999999,"iss":"{USERS}"}}'
    head = b64url(json.dumps({"alg": "HS256"}).encode())
    body = b64url(payload.encode())
    sig = hmac.new(PARTNER_SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest()
    await refused(s, "/orders", f"{head}.{body}.{b64url(sig)}", Reason.MALFORMED, caplog)
    # A payload segment in base64 (not base64url), not an object, or a token of four segments.
    for bad in (f"{head}.{body[:-1]}+.{b64url(sig)}", f"{head}.{b64url(b'[1]')}.{b64url(sig)}", f"{head}.e30.x.y"):
        await refused(s, "/orders", bad, Reason.MALFORMED, caplog)


# -- algorithms across providers ----------------------------------------------------------------
async def test_algorithm_confusion_across_providers(
    two: tuple[Sidecar, JwksServer], rsa_key: TestKey, ec_key: TestKey, caplog: Any
) -> None:
    s, _ = two
    users_public = rsa_key.public_pem()
    claims = {"aud": AUDIENCE, "sub": "mallory", "exp": 9999999999}
    # users' public key as an HMAC secret, under users' iss: users takes RS256 only.
    await refused(s, "/orders", hs256({**claims, "iss": USERS}, users_public), Reason.ALG_NOT_ALLOWED, caplog)
    # ... and under partner's iss: partner takes HS256, with its own secret, which this is not.
    await refused(s, "/orders", hs256({**claims, "iss": PARTNER}, users_public), Reason.BAD_SIGNATURE, caplog)
    # partner's secret under users' or services' iss: neither takes HS256.
    for iss in (USERS, SERVICES):
        await refused(s, "/orders", mint({**claims, "iss": iss}, secret=PARTNER_SECRET), Reason.ALG_NOT_ALLOWED, caplog)
    # users' RSA key under partner's iss: partner takes HS256 only.
    await refused(s, "/orders", mint({**claims, "iss": PARTNER}, key=rsa_key), Reason.ALG_NOT_ALLOWED, caplog)
    # Unsigned, under each iss.
    for iss in (USERS, SERVICES, PARTNER):
        token = forge({"alg": "none"}, json.dumps({**claims, "iss": iss}))
        await refused(s, "/orders", token, Reason.ALG_NOT_ALLOWED, caplog)
    # services' EC public key as an HMAC secret under partner's iss.
    ec_public = ec_key.public_pem()
    await refused(s, "/orders", hs256({**claims, "iss": PARTNER}, ec_public), Reason.BAD_SIGNATURE, caplog)


# -- the verified-token cache ---------------------------------------------------------------------
async def test_one_token_text_under_two_providers_never_shares_a_cache_entry(
    two: tuple[Sidecar, JwksServer], rsa_key: TestKey, caplog: Any
) -> None:
    s, _ = two
    cache = s.runtime.snapshot.cache  # type: ignore[union-attr]
    assert cache is not None
    token = user_token(rsa_key)
    assert (await s.get("/orders", headers=bearer(token))).status == 200  # verified by users, cached
    hits = cache.hits
    # The same text on a route of services alone: services' checks, not users' entry.
    detail = await refused(s, "/services/x", token, Reason.UNKNOWN_KID, caplog)
    assert "'rsa-1'" in detail
    assert cache.hits == hits
    # On a route of users alone: the same provider, so the entry serves (the same checks passed).
    assert (await s.get("/users/x", headers=bearer(token))).status == 200
    assert cache.hits == hits + 1 and s.upstream.last().header("X-Admitted-By") == "users"
    # Back on the route of several: users' entry, users' headers.
    assert (await s.get("/orders", headers=bearer(token))).status == 200
    assert cache.hits == hits + 2 and s.upstream.last().header("X-User-Email") == "ada@example.com"
    # Refused first under services, then admitted under users: refusals are never cached.
    fresh = user_token(rsa_key, jti="fresh")
    await refused(s, "/services/x", fresh, Reason.UNKNOWN_KID, caplog)
    assert (await s.get("/orders", headers=bearer(fresh))).status == 200


# -- what the operator sees ------------------------------------------------------------------------
async def test_the_access_log_and_metrics_name_the_provider(
    two: tuple[Sidecar, JwksServer], rsa_key: TestKey, ec_key: TestKey
) -> None:
    s, _ = two
    sink = io.BytesIO()
    s.runtime.access_log = AccessLog(sink)
    assert (await s.get("/orders", headers=bearer(user_token(rsa_key)))).status == 200
    assert (await s.get("/orders", headers=bearer(service_token(ec_key)))).status == 200
    assert (await s.get("/orders", headers=bearer(service_token(ec_key, aud="other")))).status == 401
    assert (await s.get("/orders", headers=bearer(user_token(rsa_key, iss="https://x.test")))).status == 401
    assert (await s.get("/users/x", headers=bearer(user_token(rsa_key)))).status == 200
    s.runtime.access_log.flush()
    lines = [json.loads(line) for line in sink.getvalue().decode().splitlines()]
    assert [(line["route"], line["provider"], line["reason"]) for line in lines] == [
        ("mixed", "users", ""),
        ("mixed", "services", ""),
        ("mixed", "services", "audience"),
        ("mixed", None, "issuer"),  # no provider of the route was chosen
        ("users-only", "users", ""),
    ]
    async with s.client.get(s.admin_url + "/metrics") as response:
        text = await response.text()
    series = [line for line in text.splitlines() if line.startswith("jwt_sidecar_provider_requests_total{")]
    family = "jwt_sidecar_provider_requests_total"
    assert f'{family}{{decision="allowed",provider="users",reason="",route="mixed"}} 1.0' in series
    assert f'{family}{{decision="allowed",provider="services",reason="",route="mixed"}} 1.0' in series
    assert f'{family}{{decision="denied",provider="services",reason="audience",route="mixed"}} 1.0' in series
    assert len(series) == 3, series  # the unchosen refusal and the single-provider route: requests_total only
    routes = [line for line in text.splitlines() if line.startswith("jwt_sidecar_requests_total{") and "mixed" in line]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in routes) == 4


async def test_readiness_waits_for_every_provider_of_a_route(
    sidecar: Any, aiohttp_server: Any, rsa_key: TestKey, tmp_path: Any
) -> None:
    services = await start_jwks_server(aiohttp_server)
    services.mode = "fail"
    secret = tmp_path / "partner.secret"
    secret.write_bytes(PARTNER_SECRET)
    s = await sidecar(CONFIG, services_jwks=services.url(), secret=str(secret))
    ready, why = s.runtime.readiness()
    assert not ready and "services" in why


ROLLOUT = f"""\
realm: api
upstream: {{url: "{{upstream}}", timeout: 2s, connect_timeout: 1s}}
providers:
  users:
    issuer: {USERS}
    audiences: [{AUDIENCE}]
    algorithms: [RS256]
    jwks: {{url: "{{jwks}}", min_refresh_interval: 1s}}
    headers:
      claims: {{sub: X-User-Id}}
      provider: X-Admitted-By
  services:
    issuer: {SERVICES}
    audiences: [{AUDIENCE}]
    algorithms: [ES256]
    jwks: {{url: "{{services_jwks}}", min_refresh_interval: 1s}}
    revocation: false
    headers:
      claims: {{sub: X-User-Id}}
      provider: X-Admitted-By
routes:
  - name: rollout
    match: {{path_prefix: /rollout/}}
    auth: {{providers: [users, services], mode: report}}
  - name: api
    match: {{path_prefix: /}}
    auth: {{providers: [users, services]}}
revocation: {{file: revoked.yaml}}
"""


async def test_a_providers_route_takes_report_mode_and_each_providers_revocation_opt_out(
    sidecar: Any, aiohttp_server: Any, rsa_key: TestKey, ec_key: TestKey, tmp_path: Any
) -> None:
    # The two features meet on a `providers:` route: its per-provider plans keep the route's
    # mode, and each provider's own `revocation: false`, as a `provider:` route of it would.
    (tmp_path / "revoked.yaml").write_text("rules: [{sub: gone}]\n")  # beside the fixture's config.yaml
    services = await start_jwks_server(aiohttp_server, jwks_of(ec_key))
    s = await sidecar(ROLLOUT, services_jwks=services.url())
    s.jwks.document = jwks_of(rsa_key)

    # users checks the list: refused on the enforcing route, a would_deny on the report route.
    response = await s.get("/orders", headers=bearer(user_token(rsa_key, sub="gone")))
    assert response.status == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert "revoked" in response.headers["WWW-Authenticate"]
    response = await s.get("/rollout/orders", headers=bearer(user_token(rsa_key, sub="gone")))
    assert response.status == 200
    seen = s.upstream.last()
    assert seen.header("X-User-Id") is None and seen.header("X-Admitted-By") is None
    assert seen.header("Authorization") is None

    # services opts out: the same subject is admitted by it, on both routes.
    for path in ("/orders", "/rollout/orders"):
        response = await s.get(path, headers=bearer(service_token(ec_key, sub="gone")))
        assert response.status == 200, path
        seen = s.upstream.last()
        assert seen.header("X-User-Id") == "gone" and seen.header("X-Admitted-By") == "services", path

    # An iss no provider of the route accepts: refused when enforcing, anonymous in report mode.
    stranger = mint({"iss": "https://stranger.test"}, key=rsa_key)
    response = await s.get("/orders", headers=bearer(stranger))
    assert response.status == 401
    response = await s.get("/rollout/orders", headers=bearer(stranger))
    assert response.status == 200 and s.upstream.last().header("X-User-Id") is None
