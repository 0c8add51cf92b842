"""keygen.py: generated keys sign tokens their published JWKs verify; files are written safely."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.config import builder as config
from proxy.tools.keygen import GeneratedKey, KeyToolError, generate, mint, parse_claim, read_secret, write
from tests.conftest import AUDIENCE, ISSUER, TestKey

NOW = 1_700_000_000.0
ASYMMETRIC = ("RS256", "ES256", "EdDSA")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def oct_jwk(secret: bytes) -> dict[str, Any]:
    return {"kty": "oct", "k": base64.urlsafe_b64encode(secret).rstrip(b"=").decode()}


def decode(token: str, jwk: dict[str, Any], alg: str, **options: Any) -> dict[str, Any]:
    return jwt.decode(
        token, key=jwt.PyJWK(jwk, algorithm=alg), algorithms=[alg], audience=AUDIENCE, issuer=ISSUER, **options
    )


def mint_with(key: GeneratedKey, **overrides: Any) -> str:
    arguments: dict[str, Any] = {
        "private_key_pem": key.private_pem,
        "secret": key.secret,
        "kid": key.kid,
        "iss": ISSUER,
        "aud": [AUDIENCE],
        "sub": "user-42",
        "ttl_seconds": 300,
        "now": NOW,
    }
    arguments.update(overrides)
    return mint(**arguments)


# -- generate -----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ASYMMETRIC)
def test_generated_key_pair_signs_what_its_public_jwk_verifies(alg: str) -> None:
    key = generate(alg, "k-1")
    assert key.public_jwk is not None and key.private_pem is not None and key.secret is None
    assert {"kid": "k-1", "alg": alg, "use": "sig"}.items() <= key.public_jwk.items()
    assert "d" not in key.public_jwk
    assert key.private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    token = mint_with(key)
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": "k-1", "typ": "JWT"}
    assert decode(token, dict(key.public_jwk), alg, options={"verify_exp": False})["sub"] == "user-42"


def test_generated_secret_is_long_enough_for_every_hmac_algorithm() -> None:
    key = generate("HS256", "hs-1")
    assert key.public_jwk is None and key.private_pem is None
    assert key.secret is not None and len(key.secret) == 64
    assert generate("HS256", "hs-1").secret != key.secret
    token = mint_with(key)
    assert decode(token, oct_jwk(key.secret), "HS256", options={"verify_exp": False})["iss"] == ISSUER


def test_rsa_size_follows_bits() -> None:
    key = generate("RS256", "big", bits=3072)
    assert key.private_pem is not None
    private = serialization.load_pem_private_key(key.private_pem, password=None)
    assert private.key_size == 3072  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("alg", "kid", "bits", "message"),
    [
        ("HS512", "k", None, "cannot generate a key for 'HS512'"),
        ("none", "k", None, "cannot generate a key for 'none'"),
        ("ES256", "k", 4096, "a key size only applies to RS256"),
        ("RS256", "k", 1024, "1024 bits is refused"),
        ("RS256", "../escape", None, "cannot be a kid"),
        ("RS256", ".hidden", None, "cannot be a kid"),
        ("RS256", "", None, "cannot be a kid"),
    ],
    ids=["unsupported-alg", "alg-none", "bits-for-ec", "rsa-too-small", "kid-path", "kid-dotfile", "kid-empty"],
)
def test_generate_refuses(alg: str, kid: str, bits: int | None, message: str) -> None:
    with pytest.raises(KeyToolError, match=message.replace("(", r"\(")):
        generate(alg, kid, bits=bits)


# -- write --------------------------------------------------------------------------------


def test_write_creates_private_file_0600_and_a_public_jwks(tmp_path: Path) -> None:
    key = generate("ES256", "ec-1")
    out = tmp_path / "new" / "keys"
    written = write(key, out)
    assert written == [out / "ec-1.pem", out / "jwks.json"]
    assert mode_of(out / "ec-1.pem") == 0o600
    assert (out / "ec-1.pem").read_bytes() == key.private_pem
    document = json.loads((out / "jwks.json").read_text())
    assert document == {"keys": [dict(key.public_jwk or {})]}
    assert [k.key_id for k in jwt.PyJWKSet.from_dict(document).keys] == ["ec-1"]
    assert (out / "jwks.json").read_text().startswith('{\n  "keys": [')  # pretty-printed


def test_written_secret_is_what_a_provider_reads(tmp_path: Path) -> None:
    key = generate("HS256", "hs-1")
    assert write(key, tmp_path) == [tmp_path / "hs-1.secret"]
    assert mode_of(tmp_path / "hs-1.secret") == 0o600
    assert not (tmp_path / "jwks.json").exists()
    data = (tmp_path / "hs-1.secret").read_bytes()
    assert read_secret(data, "base64url") == key.secret
    settings = config.parse(
        "providers:\n  hs:\n    issuer: https://issuer.test\n    audiences: [api]\n"
        "    secret: {file: hs-1.secret, encoding: base64url}\n",
        base_dir=tmp_path,
    )
    keys = settings.providers["hs"].keys
    assert isinstance(keys, config.StaticKeys)
    assert keys.jwks["keys"][0]["k"] == oct_jwk(key.secret or b"")["k"]


def test_written_jwks_is_what_a_provider_reads(tmp_path: Path) -> None:
    write(generate("EdDSA", "ed-1"), tmp_path)
    settings = config.parse(
        "providers:\n  ed:\n    issuer: https://issuer.test\n    audiences: [api]\n    jwks_file: jwks.json\n",
        base_dir=tmp_path,
    )
    keys = settings.providers["ed"].keys
    assert isinstance(keys, config.StaticKeys)
    assert [k["kid"] for k in keys.jwks["keys"]] == ["ed-1"]


def test_rotation_adds_the_new_key_beside_the_old(tmp_path: Path) -> None:
    first, second = generate("RS256", "rsa-1"), generate("EdDSA", "ed-2")
    write(first, tmp_path / "v1")
    jwks = tmp_path / "v1" / "jwks.json"
    document = json.loads(jwks.read_text())
    document["x-note"] = "kept"  # members other than keys survive the rewrite
    jwks.write_text(json.dumps(document))
    jwks.chmod(0o640)
    written = write(second, tmp_path / "v2", jwks_path=jwks)
    assert written == [tmp_path / "v2" / "ed-2.pem", jwks]
    assert not (tmp_path / "v2" / "jwks.json").exists()
    rotated = json.loads(jwks.read_text())
    assert [k["kid"] for k in rotated["keys"]] == ["rsa-1", "ed-2"]
    assert rotated["x-note"] == "kept"
    assert mode_of(jwks) == 0o640
    assert sorted(str(k.key_id) for k in jwt.PyJWKSet.from_dict(rotated).keys) == ["ed-2", "rsa-1"]
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == ["jwks.json", "rsa-1.pem"]  # no temp file left


def test_rotation_in_place_keeps_both_keys_in_one_directory(tmp_path: Path) -> None:
    write(generate("EdDSA", "ed-1"), tmp_path)
    assert write(generate("EdDSA", "ed-2"), tmp_path, jwks_path=tmp_path / "jwks.json") == [
        tmp_path / "ed-2.pem",
        tmp_path / "jwks.json",
    ]
    assert [k["kid"] for k in json.loads((tmp_path / "jwks.json").read_text())["keys"]] == ["ed-1", "ed-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ed-1.pem", "ed-2.pem", "jwks.json"]


def test_rotation_refuses_a_kid_already_in_the_set(tmp_path: Path) -> None:
    write(generate("ES256", "k-1"), tmp_path / "v1")
    jwks = tmp_path / "v1" / "jwks.json"
    before = jwks.read_bytes()
    with pytest.raises(KeyToolError, match="kid 'k-1' is already in"):
        write(generate("ES256", "k-1"), tmp_path / "v2", jwks_path=jwks)
    assert jwks.read_bytes() == before
    assert not (tmp_path / "v2").exists()  # refused before anything was written


def test_an_existing_private_file_is_never_overwritten(tmp_path: Path) -> None:
    first = generate("EdDSA", "ed-1")
    write(first, tmp_path)
    jwks_before = (tmp_path / "jwks.json").read_bytes()
    for jwks_path in (None, tmp_path / "jwks.json"):
        with pytest.raises(KeyToolError, match=r"ed-1\.pem already exists; refusing to overwrite"):
            write(generate("EdDSA", "ed-1"), tmp_path, jwks_path=jwks_path)
    assert (tmp_path / "ed-1.pem").read_bytes() == first.private_pem
    assert (tmp_path / "jwks.json").read_bytes() == jwks_before


def test_an_existing_jwks_is_not_replaced_without_jwks_path(tmp_path: Path) -> None:
    write(generate("EdDSA", "ed-1"), tmp_path)
    with pytest.raises(KeyToolError, match=r"jwks\.json already exists; to add this key to it"):
        write(generate("EdDSA", "ed-2"), tmp_path)
    assert not (tmp_path / "ed-2.pem").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist; to start a new key set, leave out --jwks"),
        ("{not json", "is not valid JSON"),
        ('{"keys": {}}', 'is not a JWK Set: expected a JSON object with a "keys" array'),
        ("[]", "is not a JWK Set"),
    ],
    ids=["missing", "not-json", "keys-not-array", "not-object"],
)
def test_rotation_refuses_a_jwks_path_that_is_not_a_jwk_set(tmp_path: Path, content: str | None, message: str) -> None:
    jwks = tmp_path / "jwks.json"
    if content is not None:
        jwks.write_text(content)
    with pytest.raises(KeyToolError, match=message):
        write(generate("EdDSA", "ed-1"), tmp_path / "out", jwks_path=jwks)
    assert not (tmp_path / "out").exists()


def test_a_secret_is_never_published(tmp_path: Path) -> None:
    write(generate("EdDSA", "ed-1"), tmp_path)
    with pytest.raises(KeyToolError, match="secret is shared, never published"):
        write(generate("HS256", "hs-1"), tmp_path, jwks_path=tmp_path / "jwks.json")
    assert not (tmp_path / "hs-1.secret").exists()


# -- mint ---------------------------------------------------------------------------------


def pem_of(private: Any) -> bytes:
    pem: bytes = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem


@pytest.mark.parametrize(
    ("make", "alg"),
    [
        (lambda k: pem_of(k["rsa"].private), "RS256"),
        (lambda k: pem_of(k["ec"].private), "ES256"),
        (lambda k: pem_of(ec.generate_private_key(ec.SECP384R1())), "ES384"),
        (lambda k: pem_of(ec.generate_private_key(ec.SECP521R1())), "ES512"),
        (lambda k: pem_of(k["ed"].private), "EdDSA"),
    ],
    ids=["rsa", "ec-p256", "ec-p384", "ec-p521", "ed25519"],
)
def test_mint_infers_the_algorithm_from_the_key(
    make: Any, alg: str, rsa_key: TestKey, ec_key: TestKey, ed_key: TestKey
) -> None:
    pem = make({"rsa": rsa_key, "ec": ec_key, "ed": ed_key})
    token = mint(private_key_pem=pem, iss=ISSUER, aud=[AUDIENCE], ttl_seconds=60, now=NOW)
    assert jwt.get_unverified_header(token) == {"alg": alg, "typ": "JWT"}  # no kid unless given
    public: Any = serialization.load_pem_private_key(pem, password=None).public_key()
    jwt.decode(token, public, algorithms=[alg], audience=AUDIENCE, options={"verify_exp": False})


def test_mint_with_a_secret_defaults_to_hs256_and_honours_alg() -> None:
    secret = b"x" * 64
    for alg in (None, "HS256", "HS384", "HS512"):
        token = mint(secret=secret, alg=alg, iss=ISSUER, aud=[AUDIENCE], ttl_seconds=60, now=NOW)
        assert jwt.get_unverified_header(token)["alg"] == (alg or "HS256")


def test_mint_payload() -> None:
    token = mint(
        secret=b"x" * 32,
        kid="hs-1",
        iss=ISSUER,
        aud=[AUDIENCE],
        sub="bob",
        ttl_seconds=300.9,
        claims={"admin": True, "roles": ["a", "b"]},
        now=NOW + 0.7,
    )
    payload = jwt.decode(token, options={"verify_signature": False})
    jti = payload.pop("jti")
    assert isinstance(jti, str) and len(jti) >= 16
    assert payload == {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "bob",
        "iat": int(NOW),
        "exp": int(NOW) + 300,
        "admin": True,
        "roles": ["a", "b"],
    }
    assert jwt.get_unverified_header(token)["kid"] == "hs-1"
    again = mint(secret=b"x" * 32, iss=ISSUER, aud=[AUDIENCE], ttl_seconds=300, now=NOW)
    assert jwt.decode(again, options={"verify_signature": False})["jti"] != jti
    assert "sub" not in jwt.decode(again, options={"verify_signature": False})


def test_mint_audiences_make_a_list_when_more_than_one() -> None:
    token = mint(secret=b"x" * 32, iss=ISSUER, aud=["a", "b"], ttl_seconds=60, now=NOW)
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == ["a", "b"]


def test_mint_claims_may_replace_timestamps_to_make_a_bad_token() -> None:
    token = mint(
        secret=b"x" * 32,
        iss=ISSUER,
        aud=[AUDIENCE],
        ttl_seconds=60,
        now=NOW,
        claims={"exp": 1, "nbf": 2, "jti": "fixed"},
    )
    payload = jwt.decode(token, options={"verify_signature": False})
    assert (payload["exp"], payload["nbf"], payload["jti"]) == (1, 2, "fixed")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"secret": b"x" * 31}, "the secret is 31 bytes; HS256 needs at least 32"),
        ({"secret": b"x" * 32, "alg": "HS384"}, "the secret is 32 bytes; HS384 needs at least 48"),
        ({"secret": b"x" * 32, "alg": "RS256"}, "a secret signs only HS256, HS384, HS512, not RS256"),
        ({"secret": b"x" * 32, "alg": "none"}, "'none' is not a signing algorithm"),
        ({}, "give exactly one of a private key or a secret"),
        ({"secret": b"x" * 32, "private_key_pem": b"pem"}, "give exactly one of"),
        ({"private_key_pem": b"not a pem"}, "the key is not a PEM private key$"),
        ({"secret": b"x" * 32, "aud": []}, "give at least one audience"),
        ({"secret": b"x" * 32, "ttl_seconds": 0.5}, "at least 1s"),
        ({"secret": b"x" * 32, "claims": {"aud": "other"}}, "set aud with --aud, not as a claim"),
        ({"secret": b"x" * 32, "claims": {"iss": "x", "sub": "y"}}, "set iss, sub with --iss, --sub"),
    ],
    ids=[
        "short-hs256",
        "short-hs384",
        "secret-with-rsa-alg",
        "alg-none",
        "no-key",
        "two-keys",
        "not-pem",
        "no-audience",
        "ttl-too-short",
        "claim-aud",
        "claim-iss-sub",
    ],
)
def test_mint_refuses(arguments: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"iss": ISSUER, "aud": [AUDIENCE], "ttl_seconds": 60, "now": NOW}
    with pytest.raises(KeyToolError, match=message):
        mint(**{**base, **arguments})


def test_mint_refuses_an_alg_that_does_not_fit_the_key(ec_key: TestKey, rsa_key: TestKey) -> None:
    with pytest.raises(KeyToolError, match="RS256 cannot sign with this EC P-256 key; it signs ES256"):
        mint(private_key_pem=ec_key.private_pem(), alg="RS256", iss=ISSUER, aud=[AUDIENCE], ttl_seconds=60, now=NOW)
    with pytest.raises(KeyToolError, match="ES256 cannot sign with this RSA key"):
        mint(private_key_pem=rsa_key.private_pem(), alg="ES256", iss=ISSUER, aud=[AUDIENCE], ttl_seconds=60, now=NOW)
    token = mint(
        private_key_pem=rsa_key.private_pem(), alg="PS256", iss=ISSUER, aud=[AUDIENCE], ttl_seconds=60, now=NOW
    )
    assert jwt.get_unverified_header(token)["alg"] == "PS256"


def test_mint_explains_a_public_or_encrypted_key(ed_key: TestKey) -> None:
    with pytest.raises(KeyToolError, match="it holds a public key, and signing needs the private one"):
        mint(private_key_pem=ed_key.public_pem(), iss=ISSUER, aud=[AUDIENCE], ttl_seconds=60, now=NOW)
    encrypted = ed_key.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    with pytest.raises(KeyToolError, match="the private key is encrypted"):
        mint(private_key_pem=encrypted, iss=ISSUER, aud=[AUDIENCE], ttl_seconds=60, now=NOW)


# -- claims and secrets -------------------------------------------------------------------


CLAIMS: list[tuple[str, tuple[str, Any]]] = [
    ("admin=true", ("admin", True)),
    ("n=3", ("n", 3)),
    ("ratio=0.5", ("ratio", 0.5)),
    ("name=bob", ("name", "bob")),
    ('roles=["a","b"]', ("roles", ["a", "b"])),
    ('org={"id": 7}', ("org", {"id": 7})),
    ('zip="01234"', ("zip", "01234")),
    ("empty=", ("empty", "")),
    ("nothing=null", ("nothing", None)),
    ("url=https://x.test/?a=b", ("url", "https://x.test/?a=b")),
    ("org.id=7", ("org.id", 7)),
    ("x=NaN", ("x", "NaN")),
]


@pytest.mark.parametrize(("text", "expected"), CLAIMS, ids=[text for text, _ in CLAIMS])
def test_parse_claim(text: str, expected: tuple[str, Any]) -> None:
    assert parse_claim(text) == expected


@pytest.mark.parametrize("text", ["admin", "=true", ""])
def test_parse_claim_refuses_what_is_not_name_equals_value(text: str) -> None:
    with pytest.raises(KeyToolError, match="is not a claim; write NAME=VALUE"):
        parse_claim(text)


@pytest.mark.parametrize("size", [31, 32, 33, 64])
def test_read_secret_decodes_base64_padded_or_not(size: int) -> None:
    secret = bytes(range(size))
    for encoded in (base64.urlsafe_b64encode(secret), base64.urlsafe_b64encode(secret).rstrip(b"=")):
        assert read_secret(encoded + b"\n", "base64url") == secret
    assert read_secret(base64.b64encode(secret) + b"\r\n", "base64") == secret


def test_read_secret_utf8_is_the_bytes_without_the_trailing_newline() -> None:
    assert read_secret(b"s3cret value\n", "utf-8") == b"s3cret value"


@pytest.mark.parametrize(
    ("data", "encoding", "message"),
    [
        (b"not*base64", "base64url", "not valid base64url"),
        (b"ab-_", "base64", "not valid base64"),
        (b"\n", "utf-8", "the secret is empty"),
        (b"abc", "latin-1", "'latin-1' is not a secret encoding"),
    ],
    ids=["bad-base64url", "urlsafe-as-base64", "empty", "unknown-encoding"],
)
def test_read_secret_refuses(data: bytes, encoding: str, message: str) -> None:
    with pytest.raises(KeyToolError, match=message):
        read_secret(data, encoding)
