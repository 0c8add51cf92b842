"""A key too weak for its algorithm is left out when its key set is loaded, never held and
refused token by token: an RSA key under 2048 bits (RFC 7518 §3.3, NIST SP 800-131A).

Against a real JWKS server and the real proxy: a set holding a 1024-bit key beside a good one
serves the good one, and a token naming the weak key is `unknown_kid` (the key is not there),
not `bad_signature` (a key that is there, failing); a set holding only weak keys leaves the
provider not ready (503, as for any set with no usable key), with the reason logged. A static
key in the config (pem_file, jwks_file) is a config error naming the line.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from proxy.base.errors import ConfigError
from proxy.config.builder import parse
from tests.conftest import AUDIENCE, ISSUER, TestKey, mint
from tests.integration.conftest import Sidecar
from tests.support.jwks_server import start_jwks_server

# PyJWT warns when it signs with the weak key (our tokens for the test), as it should.
pytestmark = pytest.mark.filterwarnings("ignore:The RSA key is 1024 bits long")

WEAK_PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=1024)
WEAK = TestKey(
    "weak",
    "RS256",
    WEAK_PRIVATE,
    {**RSAAlgorithm.to_jwk(WEAK_PRIVATE.public_key(), as_dict=True), "kid": "weak", "use": "sig", "alg": "RS256"},
)
WHY = "too weak: an RSA key of 1024 bits; at least 2048 are required (RFC 7518 §3.3)"

CONFIG = f"""\
upstream: {{url: "{{upstream}}"}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {{url: "{{weak_jwks}}", min_refresh_interval: 1s}}
routes:
  - {{name: api, match: {{path_prefix: /}}, auth: {{provider: main}}}}
"""


async def test_a_weak_key_beside_a_good_one_is_left_out_and_its_tokens_name_an_unknown_key(
    sidecar: Any, aiohttp_server: Any, rsa_key: TestKey, caplog: pytest.LogCaptureFixture
) -> None:
    jwks = await start_jwks_server(aiohttp_server, {"keys": [rsa_key.public_jwk, WEAK.public_jwk]})
    with caplog.at_level(logging.INFO):
        s: Sidecar = await sidecar(CONFIG, weak_jwks=jwks.url())
    assert any(WHY in record.getMessage() for record in caplog.records), "the reason is logged"
    ok = await s.get("/x", headers={"Authorization": f"Bearer {mint(key=rsa_key)}"})
    assert ok.status == 200
    refused = await s.get("/x", headers={"Authorization": f"Bearer {mint(key=WEAK)}"})
    assert refused.status == 401
    assert (await refused.json())["error_description"] == "The token's signing key is not known"
    assert len(s.upstream.seen) == 1


async def test_a_set_of_weak_keys_only_leaves_the_provider_not_ready(
    sidecar: Any, aiohttp_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    jwks = await start_jwks_server(aiohttp_server, {"keys": [WEAK.public_jwk]})
    with caplog.at_level(logging.WARNING):
        s: Sidecar = await sidecar(CONFIG, weak_jwks=jwks.url())
    assert any(WHY in record.getMessage() for record in caplog.records), "the reason is logged"
    async with s.client.get(s.admin_url + "/readyz") as ready:
        assert ready.status == 503
    refused = await s.get("/x", headers={"Authorization": f"Bearer {mint(key=WEAK)}"})
    assert refused.status == 503
    assert not s.upstream.seen


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize(
    ("private", "words"),
    [
        (WEAK_PRIVATE, "holds an RSA key of 1024 bits; at least 2048 are required (RFC 7518 §3.3)"),
        (
            ec.generate_private_key(ec.SECP256K1()),  # made a provider with no algorithm at all
            "holds an EC key on the curve secp256k1; ES256, ES384 and ES512 use P-256, P-384 and P-521 (RFC 7518 §3.4)",
        ),
        (
            ec.generate_private_key(ec.SECP192R1()),  # was a traceback
            "holds an EC key on the curve secp192r1; ES256, ES384 and ES512 use P-256, P-384 and P-521 (RFC 7518 §3.4)",
        ),
    ],
    ids=["rsa-1024", "secp256k1", "p-192"],
)
def test_a_static_pem_key_too_weak_or_on_another_curve_is_a_config_error_naming_the_line(
    tmp_path: Path, private: Any, words: str
) -> None:
    (tmp_path / "key.pem").write_bytes(public_pem(private))
    text = "providers:\n  p:\n    issuer: i\n    audiences: [a]\n    pem_file: key.pem\n"
    with pytest.raises(ConfigError) as caught:
        parse(text, file="c.yaml", base_dir=tmp_path)
    assert [str(issue) for issue in caught.value.issues] == [
        f"c.yaml:5: providers.p.pem_file: {tmp_path / 'key.pem'} {words}"
    ]


def test_a_jwks_file_of_weak_keys_only_is_a_config_error_naming_the_line(tmp_path: Path) -> None:
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [WEAK.public_jwk]}))
    text = textwrap.dedent(
        """\
        providers:
          p:
            issuer: i
            audiences: [a]
            algorithms: [RS256]
            jwks_file: keys.json
        """
    )
    with pytest.raises(ConfigError) as caught:
        parse(text, file="c.yaml", base_dir=tmp_path)
    assert [str(issue) for issue in caught.value.issues] == [
        f"c.yaml:6: providers.p.jwks_file: holds no key usable with RS256 (weak: {WHY})"
    ]
