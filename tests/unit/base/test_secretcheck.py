"""secretcheck.py: placeholders and uniform secrets are refused at config load, naming the rule;
random secrets, in every form an operator writes them, never are."""

from __future__ import annotations

import base64
import json
import random
import secrets
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.base.secretcheck import weakness
from proxy.config.builder import ConfigError, parse
from proxy.tools.keygen import SECRET_ENCODINGS, generate, read_secret, write

ROUNDS = 2000


def test_what_keys_generate_writes_always_passes_in_every_encoding(tmp_path: Path) -> None:
    for i in range(ROUNDS):
        key = generate("HS256", f"k{i}")
        assert key.secret is not None
        text = key.file_bytes()
        written = {
            "base64url": text,  # as written, read as documented
            "utf-8": text,  # the same file without `encoding:`
            "base64": base64.b64encode(key.secret) + b"\n",  # converted to standard base64
        }
        assert set(written) == set(SECRET_ENCODINGS)
        for encoding, data in written.items():
            secret = read_secret(data, encoding)
            assert weakness(secret, written=data) is None, (encoding, data)
    # And through the file it writes and the config that reads it.
    write(generate("HS256", "hs"), tmp_path)
    parse(
        "providers: {p: {issuer: i, audiences: [a], secret: {file: hs.secret, encoding: base64url}}}", base_dir=tmp_path
    )


@pytest.mark.parametrize("form", ["raw", "hex", "base64", "base64url", "base64url-text"])
@pytest.mark.parametrize("size", [32, 64])
def test_random_secrets_pass_in_every_common_form(form: str, size: int) -> None:
    # What operators paste: `openssl rand -hex 32` (hex text, the least varied random form),
    # `openssl rand -base64 32`, or bytes from a secret manager. Drawn from a seeded generator:
    # the rules do refuse a random secret now and then (one whose text holds `XXXXX` or `your-`:
    # about one in 10^6), so fresh draws made this test fail a few runs in a thousand.
    draw = random.Random(f"{form}-{size}")
    for _ in range(ROUNDS):
        raw = draw.randbytes(size)
        if form == "raw":
            secret, written = raw, None
        elif form == "hex":
            secret, written = raw.hex().encode(), None
        elif form == "base64":
            secret, written = raw, base64.b64encode(raw)
        elif form == "base64url":
            secret, written = raw, base64.urlsafe_b64encode(raw).rstrip(b"=")
        else:
            secret, written = base64.urlsafe_b64encode(raw), None
        assert weakness(secret, written=written) is None, (form, secret, written)


@pytest.mark.parametrize(
    "secret, rule",
    [
        (b"REPLACE-ME-REPLACE-ME-REPLACE-ME-REPLACE-ME-00", "placeholder word: it contains 'REPLACE'"),
        (b"changeme-changeme-changeme-changeme", "placeholder word: it contains 'change'"),
        (b"ChangeMe" + secrets.token_hex(16).encode(), "placeholder word: it contains 'Change'"),
        (b"Your_Signing_Key_" + secrets.token_hex(8).encode(), "placeholder word: it contains 'Your_'"),
        (b"YourSecretHere" + secrets.token_hex(10).encode(), "placeholder word: it contains 'Secret'"),
        (b"your-256-bit-" + secrets.token_hex(12).encode(), "placeholder word: it contains 'your-'"),
        (b"my-jwt-s3cr3t-" + secrets.token_hex(12).encode(), "placeholder word: it contains 's3cr3t'"),
        (b"P@ssw0rd!" + secrets.token_hex(14).encode(), "placeholder word: it contains 'P@ssw0rd'"),
        (b"EXAMPLE_KEY_" + secrets.token_hex(12).encode(), "placeholder word: it contains 'EXAMPLE'"),
        (b"xxxxx" + secrets.token_hex(16).encode(), "placeholder word: it contains 'xxxxx'"),
        (b"k" * 64, "repeated pattern: most of it is one 1-byte pattern repeated"),
        (b"0123456789abcdef" * 4, "repeated pattern: most of it is one 16-byte pattern repeated"),
        (b"a1b2c3" * 6 + secrets.token_hex(8).encode(), "repeated pattern: most of it is one 6-byte pattern repeated"),
        (bytes(range(32)), "run: it has 32 identical or consecutive characters"),
        (secrets.token_hex(12).encode() + b"abcdefghij" + secrets.token_hex(6).encode(), "run: it has "),
        (secrets.token_hex(12).encode() + b"98765432" + secrets.token_hex(6).encode(), "run: it has "),
        (secrets.token_hex(12).encode() + b"\0" * 8 + secrets.token_hex(6).encode(), "run: it has "),
        (b"abbaabbbabaaababbbaabbabababbbaaabbbab", "few distinct bytes: it uses only 2 different characters"),
        (b"1221332144123124313342211224131443122341321233441", "few distinct bytes: it uses only 4 different"),
        (b"aaaabaaacaaadaaaeaaafaaagaaahaaaiaaajaaak", "low entropy: "),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_each_rule_refuses_and_is_named(secret: bytes, rule: str) -> None:
    found = weakness(secret)
    assert found is not None and found.startswith(rule), found


def test_key_material_is_no_shared_secret_and_its_secret_parts_are_never_quoted() -> None:
    # An issuer's public key as the HMAC secret: anyone can fetch it and sign (RFC 8725 §2.1).
    key = generate("ES256", "issuer-1")
    assert key.private_pem is not None and key.public_jwk is not None
    public = serialization.load_pem_private_key(key.private_pem, None).public_key()
    forms = {
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ): "'-----BEGIN PUBLIC KEY-----'",
        key.private_pem: "'-----BEGIN PRIVATE KEY-----'",
        public.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ): "'ecdsa-sha2-nistp256'",
        json.dumps(key.public_jwk).encode(): "a JWK",
        json.dumps({"k": "c2VjcmV0LXZhbHVlLWhlcmUtbm90LXRvLXF1b3Rl", "kty": "oct"}).encode(): "a JWK",
    }
    for text, what in forms.items():
        found = weakness(text)
        assert found == (
            f"key material: it holds {what}, a key or certificate, not a shared secret; a public "
            "key is public (give it as `pem_file`), and HMAC with one is forgeable by anyone"
        ), found


def test_a_placeholder_written_in_base64_is_refused_for_its_text() -> None:
    # Decoded, it is 34 bytes that look random enough; the text is what gives it away.
    text = b"REPLACE-ME-REPLACE-ME-REPLACE-ME-REPLACE-ME-00\n"
    secret = read_secret(text, "base64url")
    assert weakness(secret) is None
    assert weakness(secret, written=text) == (
        "placeholder word: it contains 'REPLACE', as example and default secrets do, in the text as written"
    )


def test_never_quotes_the_secret_beyond_the_word() -> None:
    for secret in (b"Q7" * 20, bytes(range(40)), b"ab" * 3 + b"z" * 30):
        found = weakness(secret)
        assert found is not None and secret.decode("latin-1")[:6] not in found


@pytest.mark.parametrize(
    "encoding, text, expected",
    [
        (
            "utf-8",
            "changeme-changeme-changeme-changeme",
            "c.yaml:4: providers.p.secret.file: refused, this is no random secret (placeholder word: it contains 'change'",
        ),
        (
            "base64url",
            "REPLACE-ME-REPLACE-ME-REPLACE-ME-REPLACE-ME-00",
            "c.yaml:4: providers.p.secret.file: refused, this is no random secret (placeholder word: it contains 'REPLACE'",
        ),
        (
            "base64",
            base64.b64encode(b"\x07" * 48).decode(),
            "c.yaml:4: providers.p.secret.file: refused, this is no random secret (repeated pattern:",
        ),
    ],
)
def test_config_load_refuses_a_weak_secret_file_naming_the_line_and_rule(
    tmp_path: Path, encoding: str, text: str, expected: str
) -> None:
    (tmp_path / "s.secret").write_text(text + "\n")
    with pytest.raises(ConfigError) as refused:
        parse(
            textwrap.dedent(f"""\
            providers:
              p:
                issuer: i
                secret: {{file: s.secret, encoding: {encoding}}}
                audiences: [a]
            """),
            file="c.yaml",
            base_dir=tmp_path,
        )
    issues = [str(issue) for issue in refused.value.issues]
    assert any(issue.startswith(expected) for issue in issues), issues
    assert any("make one with `jwt-sidecar keys generate --alg HS256" in issue for issue in issues)


def test_config_load_refuses_a_public_key_given_as_the_secret(tmp_path: Path) -> None:
    key = generate("RS256", "issuer-1")
    assert key.private_pem is not None
    public = serialization.load_pem_private_key(key.private_pem, None).public_key()
    (tmp_path / "issuer.pem").write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError) as refused:
        parse(
            "providers:\n  p:\n    issuer: i\n    audiences: [a]\n    secret: {file: issuer.pem}\n",
            file="c.yaml",
            base_dir=tmp_path,
        )
    assert [str(i).split(" (")[0] for i in refused.value.issues] == [
        "c.yaml:5: providers.p.secret.file: refused, this is no random secret"
    ]
    assert "key material: it holds '-----BEGIN PUBLIC KEY-----'" in str(refused.value)


def test_config_load_refuses_a_weak_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SIDECAR_TEST_WEAK", "x" * 40)
    with pytest.raises(ConfigError) as refused:
        parse(
            "providers:\n  p:\n    issuer: i\n    audiences: [a]\n    secret: {env: JWT_SIDECAR_TEST_WEAK}\n",
            file="c.yaml",
        )
    assert [str(i) for i in refused.value.issues] == [
        "c.yaml:5: providers.p.secret.env: refused, this is no random secret (placeholder word: it contains "
        "'xxxxx', as example and default secrets do); make one with `jwt-sidecar keys generate --alg HS256 "
        "--kid NAME --out DIR`"
    ]
