"""`token explain` against the running proxy, token by token (issue 11 item 3).

Every token of the table is sent through the real proxy on loopback (conftest `sidecar`),
whose operator log says `request ID refused: REASON: DETAIL`; then `jwt-sidecar token explain`
runs on the same token with the same config file and the route's provider. The first FAIL
line must carry the proxy's reason and the proxy's own words; nothing says PASS after the
signature failed; no `None`, no exception class and no library message appear anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from proxy.base.errors import InvalidToken, Reason
from proxy.tools.cli import main
from proxy.tools.keygen import generate, write
from tests.conftest import AUDIENCE, ISSUER, TestKey, _rsa, jwks_of, mint

CONFIG = f"""\
realm: api
upstream: {{url: "{{upstream}}", timeout: 2s, connect_timeout: 1s}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    algorithms: [RS256, ES256]
    jwks_file: {{jwks_file}}
    required_claims: [exp, sub]
    max_token_age: 1h
    headers: {{claims: {{sub: X-User-Id}}}}
  hs:
    issuer: https://hs.test
    audiences: [{AUDIENCE}]
    algorithms: [HS256]
    secret: {{file: {{secret_file}}, encoding: base64url}}
  typed:
    issuer: https://typed.test
    audiences: [{AUDIENCE}]
    typ: at+jwt
    jwks_file: {{jwks_file}}
routes:
  - {{name: hs, match: {{path_prefix: /hs/}}, auth: {{provider: hs}}}}
  - {{name: typed, match: {{path_prefix: /typed/}}, auth: {{provider: typed}}}}
  - {{name: main, match: {{path_prefix: /}}, auth: {{provider: main}}}}
"""

# What must never reach an operator: PyJWT's messages, exception class names, Python's None.
LIBRARY_TEXT = (
    "Invalid crypto padding",
    "Signature verification failed",
    "Invalid header padding",
    "Invalid payload padding",
    "Not enough segments",
    "Invalid header string",
    "The HMAC key is",
    "Expecting a PEM",
    "Could not deserialize",
    "Traceback",
    "Invalid token type",
    "is not a supported algorithm",
)
EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]*(?:Error|Exception)\b")
STEP = re.compile(r"^  (PASS|FAIL|----)  (\S+(?: \S+)?)\s+(.*?)(?:   \[([a-z_]+)\])?$")


def b64(raw: bytes | str) -> str:
    return base64.urlsafe_b64encode(raw.encode() if isinstance(raw, str) else raw).rstrip(b"=").decode()


def signed_text(key: TestKey, header: str, payload: str) -> str:
    """An RS256 signature over the JSON texts exactly as given (duplicates, odd headers and all)."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    return f"{signing_input}.{b64(key.private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


def claims(**extra: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + 300, **extra}
    return json.dumps({k: v for k, v in body.items() if v is not _OMIT})


_OMIT = object()


@dataclass(frozen=True)
class Keys:
    rsa: TestKey
    rsa2: TestKey
    ec: TestKey
    stranger: TestKey
    secret: bytes


def with_signature(token: str, signature: str) -> str:
    return token.rsplit(".", 1)[0] + "." + signature


def alter(index: int, char: str) -> Callable[[Keys], str]:
    def make(k: Keys) -> str:
        token = mint(key=k.rsa)
        signature = token.rsplit(".", 1)[1]
        i = index % len(signature)
        changed = signature[:i] + (char if signature[i] != char else ("B" if char == "A" else "A")) + signature[i + 1 :]
        return with_signature(token, changed)

    return make


def now() -> int:
    return int(time.time())


# (id, token maker, route path, provider, the reason the proxy gives, or None for a valid token)
CASES: list[tuple[str, Callable[[Keys], str], str, str, str | None]] = [
    ("valid-rs256", lambda k: mint(key=k.rsa), "/a", "main", None),
    ("valid-es256", lambda k: mint(key=k.ec), "/a", "main", None),
    ("valid-hs256", lambda k: mint({"iss": "https://hs.test"}, secret=k.secret), "/hs/a", "hs", None),
    ("no-kid-several-keys-second-verifies", lambda k: mint(key=k.rsa2, headers={"kid": None}), "/a", "main", None),
    *[(f"signature-last-char-{c}", alter(-1, c), "/a", "main", "bad_signature|malformed") for c in "ABQRgw-_"],
    *[(f"signature-char-{i}", alter(i, "x"), "/a", "main", "bad_signature") for i in (0, 1, 100, -3)],
    ("signature-truncated-1", lambda k: mint(key=k.rsa)[:-1], "/a", "main", "malformed"),
    ("signature-truncated-2", lambda k: mint(key=k.rsa)[:-2], "/a", "main", "bad_signature|malformed"),
    ("signature-truncated-4", lambda k: mint(key=k.rsa)[:-4], "/a", "main", "bad_signature|malformed"),
    ("signature-extra-char", lambda k: mint(key=k.rsa) + "A", "/a", "main", "bad_signature|malformed"),
    ("signature-extra-char-Q", lambda k: mint(key=k.rsa) + "Q", "/a", "main", "bad_signature|malformed"),
    ("signature-padded", lambda k: mint(key=k.rsa) + "==", "/a", "main", "malformed"),
    (
        "signature-base64-alphabet",
        lambda k: with_signature(mint(key=k.rsa), "ab+/" * 85 + "AA"),
        "/a",
        "main",
        "malformed",
    ),
    ("signature-empty", lambda k: with_signature(mint(key=k.rsa), ""), "/a", "main", "bad_signature"),
    (
        "signature-of-another-token",
        lambda k: with_signature(mint(key=k.rsa), mint({"sub": "x"}, key=k.rsa).rsplit(".", 1)[1]),
        "/a",
        "main",
        "bad_signature",
    ),
    (
        "es256-signature-altered",
        lambda k: with_signature(mint(key=k.ec), b64(b"\x01" * 64)),
        "/a",
        "main",
        "bad_signature",
    ),
    (
        "payload-padded",
        lambda k: (lambda h, p, s: f"{h}.{p}=.{s}")(*mint(key=k.rsa).split(".")),
        "/a",
        "main",
        "malformed",
    ),
    (
        "header-padded",
        lambda k: (lambda h, p, s: f"{h}=.{p}.{s}")(*mint(key=k.rsa).split(".")),
        "/a",
        "main",
        "malformed",
    ),
    (
        "alg-swapped-to-es256",
        lambda k: signed_text(k.rsa, '{"alg":"ES256","kid":"rsa-1"}', claims()),
        "/a",
        "main",
        "unknown_kid",
    ),
    ("alg-rs384-not-allowed", lambda k: mint(key=k.rsa, alg="RS384"), "/a", "main", "alg_not_allowed"),
    (
        "alg-confusion-hs256-with-public-key",
        lambda k: (lambda pem: signed_hs(pem, '{"alg":"HS256","kid":"rsa-1"}', claims()))(k.rsa.public_pem()),
        "/a",
        "main",
        "alg_not_allowed",
    ),
    (
        "kid-of-an-ec-key-on-rs256",
        lambda k: signed_text(k.rsa, '{"alg":"RS256","kid":"ec-1"}', claims()),
        "/a",
        "main",
        "unknown_kid",
    ),
    ("alg-none", lambda k: b64('{"alg":"none"}') + "." + b64(claims()) + ".", "/a", "main", "alg_not_allowed"),
    ("alg-None", lambda k: b64('{"alg":"None"}') + "." + b64(claims()) + ".", "/a", "main", "alg_not_allowed"),
    ("alg-missing", lambda k: signed_text(k.rsa, '{"kid":"rsa-1"}', claims()), "/a", "main", "alg_not_allowed"),
    ("alg-null", lambda k: signed_text(k.rsa, '{"alg":null,"kid":"rsa-1"}', claims()), "/a", "main", "alg_not_allowed"),
    ("alg-number", lambda k: signed_text(k.rsa, '{"alg":256}', claims()), "/a", "main", "alg_not_allowed"),
    ("expired", lambda k: mint({"iat": now() - 600, "exp": now() - 120}, key=k.rsa), "/a", "main", "expired"),
    (
        "expired-and-wrong-aud",
        lambda k: mint({"iat": now() - 600, "exp": now() - 120, "aud": "x"}, key=k.rsa),
        "/a",
        "main",
        "expired",
    ),
    (
        "nbf-in-the-future",
        lambda k: mint({"nbf": now() + 600, "exp": now() + 900}, key=k.rsa),
        "/a",
        "main",
        "not_yet_valid",
    ),
    (
        "iat-in-the-future",
        lambda k: mint({"iat": now() + 600, "exp": now() + 900}, key=k.rsa),
        "/a",
        "main",
        "issued_in_future",
    ),
    ("too-old", lambda k: mint({"exp": now() + 7200}, key=k.rsa), "/a", "main", "too_old"),
    ("wrong-aud", lambda k: mint({"aud": "api://other"}, key=k.rsa), "/a", "main", "audience"),
    ("aud-list-without-ours", lambda k: mint({"aud": ["a", "b"]}, key=k.rsa), "/a", "main", "audience"),
    ("aud-number", lambda k: mint({"aud": 5}, key=k.rsa), "/a", "main", "audience"),
    ("aud-missing", lambda k: mint(key=k.rsa, omit=("aud",)), "/a", "main", "missing_claim"),
    ("wrong-iss", lambda k: mint({"iss": "https://evil.test"}, key=k.rsa), "/a", "main", "issuer"),
    ("iss-missing", lambda k: mint(key=k.rsa, omit=("iss",)), "/a", "main", "missing_claim"),
    (
        "iss-null",
        lambda k: signed_text(k.rsa, '{"alg":"RS256","kid":"rsa-1"}', claims(iss=None)),
        "/a",
        "main",
        "missing_claim",
    ),
    (
        "aud-null-iss-missing",
        lambda k: signed_text(k.rsa, '{"alg":"RS256","kid":"rsa-1"}', claims(aud=None, iss=_OMIT)),
        "/a",
        "main",
        "missing_claim",
    ),
    ("sub-missing-but-required", lambda k: mint(key=k.rsa, omit=("sub",)), "/a", "main", "missing_claim"),
    ("sub-number", lambda k: mint({"sub": 5}, key=k.rsa), "/a", "main", "malformed_claim"),
    ("exp-string", lambda k: mint({"exp": "soon"}, key=k.rsa), "/a", "main", "malformed_claim"),
    ("exp-null", lambda k: mint({"exp": None}, key=k.rsa), "/a", "main", "malformed_claim"),
    ("exp-true", lambda k: mint({"exp": True}, key=k.rsa), "/a", "main", "malformed_claim"),
    ("unknown-kid", lambda k: mint(key=k.rsa, headers={"kid": "nope"}), "/a", "main", "unknown_kid"),
    (
        "no-kid-several-keys-none-verifies",
        lambda k: mint(key=k.stranger, headers={"kid": None}),
        "/a",
        "main",
        "bad_signature",
    ),
    ("known-kid-wrong-key", lambda k: mint(key=k.stranger), "/a", "main", "bad_signature"),
    ("kid-number", lambda k: signed_text(k.rsa, '{"alg":"RS256","kid":5}', claims()), "/a", "main", "malformed"),
    ("kid-null", lambda k: signed_text(k.rsa, '{"alg":"RS256","kid":null}', claims()), "/a", "main", None),
    ("crit", lambda k: mint(key=k.rsa, headers={"crit": ["exp"], "exp": 1}), "/a", "main", "crit"),
    (
        "crit-null",
        lambda k: signed_text(k.rsa, '{"alg":"RS256","kid":"rsa-1","crit":null}', claims()),
        "/a",
        "main",
        "crit",
    ),
    (
        "b64-false",
        lambda k: signed_text(k.rsa, '{"alg":"RS256","kid":"rsa-1","b64":false}', claims()),
        "/a",
        "main",
        "crit",
    ),
    (
        "duplicate-in-header",
        lambda k: signed_text(k.rsa, '{"alg":"RS256","kid":"rsa-1","kid":"rsa-1"}', claims()),
        "/a",
        "main",
        "malformed",
    ),
    (
        "duplicate-in-payload",
        lambda k: signed_text(k.rsa, '{"alg":"RS256","kid":"rsa-1"}', claims()[:-1] + ',"sub":"admin"}'),
        "/a",
        "main",
        "malformed",
    ),
    (
        "duplicate-in-payload-forged",
        lambda k: with_signature(
            signed_text(k.rsa, '{"alg":"RS256","kid":"rsa-1"}', claims()[:-1] + ',"sub":"admin"}'), "AAAA"
        ),
        "/a",
        "main",
        "bad_signature",
    ),
    (
        "nan-in-payload",
        lambda k: signed_text(k.rsa, '{"alg":"RS256","kid":"rsa-1"}', claims()[:-1] + ',"n":NaN}'),
        "/a",
        "main",
        "malformed",
    ),
    (
        "payload-array",
        lambda k: signed_text(k.rsa, '{"alg":"RS256","kid":"rsa-1"}', "[1,2]"),
        "/a",
        "main",
        "malformed",
    ),
    (
        "payload-not-json",
        lambda k: signed_text(k.rsa, '{"alg":"RS256","kid":"rsa-1"}', "hello"),
        "/a",
        "main",
        "malformed",
    ),
    ("header-array", lambda k: f"{b64('[1]')}.{b64(claims())}.AAAA", "/a", "main", "malformed"),
    ("header-not-json", lambda k: f"{b64('alg')}.{b64(claims())}.AAAA", "/a", "main", "malformed"),
    ("control-character-in-sub", lambda k: mint({"sub": "user\x01"}, key=k.rsa), "/a", "main", "unsafe_claim"),
    ("too-large", lambda k: mint({"pad": "x" * 9000}, key=k.rsa), "/a", "main", "too_large"),
    (
        "typ-jwt-where-at-jwt-is-required",
        lambda k: mint({"iss": "https://typed.test"}, key=k.rsa),
        "/typed/a",
        "typed",
        "typ",
    ),
    (
        "typ-missing",
        lambda k: signed_text(k.rsa, '{"alg":"RS256","kid":"rsa-1"}', claims(iss="https://typed.test")),
        "/typed/a",
        "typed",
        "typ",
    ),
    (
        "typ-at-jwt",
        lambda k: mint({"iss": "https://typed.test"}, key=k.rsa, headers={"typ": "at+jwt"}),
        "/typed/a",
        "typed",
        None,
    ),
    (
        "hs256-wrong-secret",
        lambda k: mint({"iss": "https://hs.test"}, secret=b"w" * 32 + k.secret),
        "/hs/a",
        "hs",
        "bad_signature",
    ),
    (
        "hs384-not-allowed",
        lambda k: mint({"iss": "https://hs.test"}, secret=k.secret, alg="HS384"),
        "/hs/a",
        "hs",
        "alg_not_allowed",
    ),
    (
        "rs256-on-the-hs-provider",
        lambda k: mint({"iss": "https://hs.test"}, key=k.rsa),
        "/hs/a",
        "hs",
        "alg_not_allowed",
    ),
    # Not a JWT at all: said first, and nothing else.
    ("one-segment", lambda k: "abcdef", "/a", "main", "malformed"),
    ("two-segments", lambda k: ".".join(mint(key=k.rsa).split(".")[:2]), "/a", "main", "malformed"),
    ("four-segments", lambda k: mint(key=k.rsa) + ".AAAA", "/a", "main", "malformed"),
    ("jwe", lambda k: b64('{"alg":"RSA-OAEP","enc":"A256GCM"}') + ".AAAA.AAAA.AAAA.AAAA", "/a", "main", "malformed"),
    ("json-instead-of-a-token", lambda k: '{"sub":"x"}', "/a", "main", "malformed"),
]


def test_the_table_covers_every_reason_the_token_path_can_give() -> None:
    # What verify.py, keys.py and identity.py (the claim headers) can refuse a token for: each
    # is in the table above. (A key outage, KeysUnavailable's no_keys, is
    # tests/unit/tools/test_explain_inputs.py::test_keys_that_cannot_be_loaded_are_not_verified.)
    root = Path(__file__).resolve().parents[2] / "proxy"
    raised = {
        Reason[name].value
        for file in ("auth/verify.py", "auth/keys.py", "request/identity.py")
        for name in re.findall(r"Reason\.([A-Z_]+)", (root / file).read_text())
    }
    covered = {reason for *_, expected in CASES if expected for reason in expected.split("|")}
    assert raised and raised <= covered, raised - covered


def signed_hs(secret: bytes, header: str, payload: str) -> str:
    import hmac

    signing_input = f"{b64(header)}.{b64(payload)}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), 'sha256').digest())}"


@pytest.fixture
def keys(tmp_path: Path, rsa_key: TestKey, rsa_key_2: TestKey, ec_key: TestKey) -> tuple[Keys, Path, Path]:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(
        json.dumps({"keys": jwks_of(rsa_key)["keys"] + jwks_of(rsa_key_2)["keys"] + jwks_of(ec_key)["keys"]})
    )
    secret = generate("HS256", "hs-1")  # as `keys generate` makes and writes it
    secret_file = write(secret, tmp_path / "secrets")[0]
    assert secret.secret is not None
    return Keys(rsa_key, rsa_key_2, ec_key, _STRANGER, secret.secret), jwks_file, secret_file


_STRANGER = _rsa("rsa-1")  # the kid of a published key, another key: what a forger has


async def explain_output(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    status = await asyncio.to_thread(main, ["token", "explain", *argv])  # main runs its own event loop
    return status, capsys.readouterr().out


def assert_operator_text(out: str) -> None:
    assert not re.search(r"""(?<!['"])\bNone\b""", out), out  # Python's None; a token's own "None" is quoted
    assert not EXCEPTION_NAME.search(out), out
    for text in LIBRARY_TEXT:
        assert text not in out, out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_explain_gives_the_proxys_reason_in_the_proxys_words(
    sidecar: Any,
    keys: tuple[Keys, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    case: tuple[str, Callable[[Keys], str], str, str, str | None],
) -> None:
    name, make, path, provider, expected = case
    k, jwks_file, secret_file = keys
    s = await sidecar(CONFIG, jwks_file=str(jwks_file), secret_file=str(secret_file))
    token = make(k)
    caplog.set_level(logging.DEBUG, logger="jwt_sidecar")
    response = await s.get(path, headers={"Authorization": f"Bearer {token}"})
    # The operator log's `request_refused` event (oplog.py) carries reason and detail as fields.
    refusals = [
        (r.fields["reason"], r.fields["detail"])
        for r in caplog.records
        if getattr(r, "event", None) == "request_refused"
    ]
    if refusals and str(refusals[0][0]) == "malformed_request":
        # Refused for the request's form (a token with '=' inside, JSON in a header), before
        # the token is read: ask the running proxy's own verifier for that route instead.
        verifier = s.runtime.snapshot.plans[provider].verifier
        try:
            await verifier.verify(token)
        except InvalidToken as error:
            refusals = [(error.reason, error.detail)]
    if expected is None:
        assert response.status == 200 and not refusals, (name, response.status, refusals)
    else:
        assert len(refusals) == 1, (name, response.status, refusals)
    proxy_reason, proxy_detail = (str(refusals[0][0]), refusals[0][1]) if refusals else (None, None)
    if expected is not None:
        assert proxy_reason in expected.split("|"), (name, proxy_reason, proxy_detail)

    # The file the proxy serves with (conftest `sidecar` writes it there).
    status, out = await explain_output(capsys, token, "--config", str(tmp_path / "config.yaml"), "--provider", provider)
    assert_operator_text(out)
    lines = out.rstrip("\n").splitlines()
    if expected is None:
        assert (status, lines[-1]) == (0, "VALID"), out
        assert {STEP.match(line).group(1) for line in lines if STEP.match(line)} == {"PASS"}, out  # type: ignore[union-attr]
        return
    assert (status, lines[-1]) == (1, f"INVALID: {proxy_reason}"), out
    steps = [m.groups() for m in map(STEP.match, lines) if m]
    if lines[0].startswith("not a JWT"):
        # Said first and alone: nothing is checked on what is no JWT.
        assert steps == [] and len(lines) == 2, out
        return
    assert lines[0].startswith("input: a JWT (JWS compact serialization, 3 segments"), out
    failures = [step for step in steps if step[0] == "FAIL"]
    assert failures, out
    _, _step_name, detail, reason = failures[0]
    seconds = re.compile(r"\b\d+s\b")
    # The proxy's reason, in the words of its log (a count of seconds may have ticked on since).
    assert (reason, seconds.sub("Ns", detail)) == (proxy_reason, seconds.sub("Ns", proxy_detail)), out
    names = [step[1] for step in steps]
    if "signature" in names and steps[names.index("signature")][0] != "PASS":
        after = steps[names.index("signature") + 1 :]
        assert after and all(mark == "----" for mark, *_ in after), out
        if steps[names.index("signature")][0] == "FAIL":
            assert all(detail == "not checked: signature failed" for _, _, detail, _ in after), out
