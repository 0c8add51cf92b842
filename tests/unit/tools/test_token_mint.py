"""`token mint` (issue 11 item 5): --ttl as the config writes durations, expired and not-yet-valid
tokens on purpose, and a --secret-file read the one way it can be read, checked by the proxy's
own verification (`token explain --config`, the same code as the running proxy).
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from proxy.tools.cli import main
from proxy.tools.keygen import SECRET_ENCODINGS

ISS, AUD = "https://hs.test", "api://hs"


def run(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike[str]) -> tuple[int, str, str]:
    status = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def generated_secret(capsys: pytest.CaptureFixture[str], out_dir: Path) -> Path:
    """A secret exactly as `jwt-sidecar keys generate --alg HS256` writes it."""
    status, _, _ = run(capsys, "keys", "generate", "--alg", "HS256", "--kid", "hs-1", "--out", out_dir)
    assert status == 0
    return out_dir / "hs-1.secret"


def provider_config(tmp_path: Path, secret_file: Path, encoding: str | None) -> Path:
    path = tmp_path / f"config-{encoding}.yaml"
    declared = f", encoding: {encoding}" if encoding is not None else ""
    path.write_text(
        f"providers:\n  hs:\n    issuer: {ISS}\n    audiences: ['{AUD}']\n    algorithms: [HS256]\n"
        f"    secret: {{file: {secret_file}{declared}}}\n"
    )
    return path


def mint_args(*extra: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
    return ["token", "mint", "--iss", ISS, "--aud", AUD, "--sub", "alice", *extra]


def explain(capsys: pytest.CaptureFixture[str], token: str, config: Path) -> tuple[int, str]:
    status, out, _ = run(capsys, "token", "explain", token, "--config", config)
    return status, out.rstrip().splitlines()[-1]


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


# -- --secret-file ---------------------------------------------------------------------------
def test_a_generated_secret_mints_without_flags_and_the_provider_verifies(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    secret_file = generated_secret(capsys, tmp_path / "keys")
    status, out, err = run(capsys, *mint_args("--secret-file", secret_file))
    assert status == 0, err
    token = out.strip()
    # Not silent: it says how it read the file, and what the provider must say.
    assert err == (
        f"jwt-sidecar: note: read {secret_file} as base64url text, the form `keys generate` writes; "
        "the provider needs `secret: {file: ..., encoding: base64url}`\n"
    )
    assert explain(capsys, token, provider_config(tmp_path, secret_file, "base64url")) == (0, "VALID")


@pytest.mark.parametrize("encoding", SECRET_ENCODINGS)
def test_a_generated_secret_in_every_encoding_verifies_against_a_provider_reading_it_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, encoding: str
) -> None:
    generated = generated_secret(capsys, tmp_path / "keys")
    raw = base64.urlsafe_b64decode(generated.read_bytes().strip() + b"==")
    secret_file = tmp_path / f"secret.{encoding}"
    if encoding == "base64url":
        secret_file = generated  # as written
    elif encoding == "base64":
        secret_file.write_bytes(base64.b64encode(raw) + b"\n")  # standard alphabet, padded: also utf-8 text
    else:
        # A text secret (a passphrase a person wrote down): '.' and ' ' make it no base64 text.
        secret_file.write_bytes(f"{secrets.token_urlsafe(30)}. {secrets.token_urlsafe(30)}\n".encode())
    config = provider_config(tmp_path, secret_file, encoding)

    status, out, err = run(capsys, *mint_args("--secret-file", secret_file))
    if encoding == "base64":
        # 88 bytes as utf-8 text, 64 as base64: a guess could sign with the wrong bytes, so no guess.
        assert (status, out) == (1, "")
        assert re.fullmatch(
            rf"jwt-sidecar: error: {re.escape(str(secret_file))} can be read more than one way \(as utf-8 text: 88 "
            r"bytes; as base64( or base64url)? text: 64 bytes\), and a token signed with the wrong bytes verifies "
            r"nowhere; give --secret-encoding as the provider's `secret: encoding:` says \(utf-8 when it says none\)\n",
            err,
        ), err
        status, out, err = run(capsys, *mint_args("--secret-file", secret_file, "--secret-encoding", encoding))
    assert status == 0, err
    assert explain(capsys, out.strip(), config) == (0, "VALID")
    # And the same file with the encoding said outright.
    status, out, err = run(capsys, *mint_args("--secret-file", secret_file, "--secret-encoding", encoding))
    assert (status, err) == (0, "")
    assert explain(capsys, out.strip(), config) == (0, "VALID")


def test_a_generated_secret_with_windows_line_ends_still_reads_as_written(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    secret_file = generated_secret(capsys, tmp_path / "keys")
    copied = tmp_path / "copied.secret"
    copied.write_bytes(secret_file.read_bytes().replace(b"\n", b"\r\n"))
    status, out, err = run(capsys, *mint_args("--secret-file", copied))
    assert status == 0, err
    assert explain(capsys, out.strip(), provider_config(tmp_path, secret_file, "base64url")) == (0, "VALID")


def test_a_generated_secret_read_as_text_by_its_provider_needs_the_encoding_said(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # A provider with no `encoding:` reads the file's text as the secret (utf-8, the default).
    secret_file = generated_secret(capsys, tmp_path / "keys")
    config = provider_config(tmp_path, secret_file, None)
    status, out, err = run(capsys, *mint_args("--secret-file", secret_file, "--secret-encoding", "utf-8"))
    assert (status, err) == (0, "")
    assert explain(capsys, out.strip(), config) == (0, "VALID")
    # Without it the file is read as keys generate wrote it, and stderr says so: that token
    # is refused by this provider, for the reason the proxy gives.
    status, out, err = run(capsys, *mint_args("--secret-file", secret_file))
    assert status == 0 and "as base64url text" in err
    assert explain(capsys, out.strip(), config) == (1, "INVALID: bad_signature")


@pytest.mark.parametrize(
    "content, encoding, message",
    [
        (
            b"a sentence of forty bytes, with spaces\n",
            "base64url",
            "{path} is not base64url text; it reads as utf-8; "
            "give the --secret-encoding that the provider's "
            "`secret: encoding:` names",
        ),
        (
            b"ab-_" * 11 + b"\n",
            "base64",
            "{path} is not base64 text; it reads as utf-8 or base64url; give the "
            "--secret-encoding that the provider's `secret: encoding:` names",
        ),
        (
            b"not base64 at all, a sentence of 40 bytes\n",
            "base64",
            "{path} is not base64 text; it reads as utf-8; give the --secret-encoding",
        ),
        (b"\n", "utf-8", "{path} is empty"),
        (b"\n", None, "the secret is empty"),
        (b"a-shared-text-secret-31-bytes!!\n", None, "the secret is 31 bytes; HS256 needs at least 32"),
        (b"YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY3ODkw\n", None, "can be read more than one way"),
        (
            b"-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n",
            "utf-8",
            "{path} holds a PEM key, not a shared secret; sign with --key {path}",
        ),
    ],
    ids=[
        "text-as-base64url",
        "base64url-as-base64",
        "text-as-base64",
        "empty-utf8",
        "empty",
        "too-short",
        "ambiguous",
        "pem",
    ],
)
def test_a_secret_file_that_does_not_read_as_said_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes, encoding: str | None, message: str
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    flags = ["--secret-encoding", encoding] if encoding else []
    status, out, err = run(capsys, *mint_args("--secret-file", path, *flags))
    assert (status, out) == (1, "")
    assert err.startswith("jwt-sidecar: error: ") and message.format(path=path) in err, err
    assert "Traceback" not in err


# -- --ttl and --not-before ------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, lifetime",
    [
        (["--ttl", "60"], 60),
        (["--ttl=60"], 60),
        (["--ttl", "90.5"], 90),
        (["--ttl", "5m"], 300),
        (["--ttl", "1h30m"], 5400),
        (["--ttl", "+2m"], 120),
        ([], 300),
        (["--ttl=-5m"], -300),
        (["--ttl", "-300"], -300),
        (["--ttl=-1s"], -1),
    ],
    ids=lambda v: (" ".join(v) or "default") if isinstance(v, list) else str(v),
)
def test_ttl_forms_round_trip(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], lifetime: int
) -> None:
    secret_file = generated_secret(capsys, tmp_path / "keys")
    before = int(time.time())
    status, out, err = run(capsys, *mint_args("--secret-file", secret_file, *argv))
    assert status == 0, err
    claims = claims_of(out.strip())
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] - claims["iat"] == lifetime and "nbf" not in claims
    verdict = explain(capsys, out.strip(), provider_config(tmp_path, secret_file, "base64url"))
    # An expired token is refused as expired once past the provider's leeway (30s by default).
    assert verdict == ((0, "VALID") if lifetime > -30 else (1, "INVALID: expired"))


@pytest.mark.parametrize(
    "argv, offset, verdict",
    [
        (["--not-before", "5m"], 300, (1, "INVALID: not_yet_valid")),
        (["--not-before", "90"], 90, (1, "INVALID: not_yet_valid")),
        (["--not-before=-1m"], -60, (0, "VALID")),
        (["--not-before", "0"], 0, (0, "VALID")),
    ],
    ids=["5m", "90", "-1m", "0"],
)
def test_not_before_offsets(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], offset: int, verdict: tuple[int, str]
) -> None:
    secret_file = generated_secret(capsys, tmp_path / "keys")
    status, out, err = run(capsys, *mint_args("--secret-file", secret_file, "--ttl", "1h", *argv))
    assert status == 0, err
    claims = claims_of(out.strip())
    assert claims["nbf"] - claims["iat"] in (offset, offset + 1)  # now is read once, rounded down for iat
    assert explain(capsys, out.strip(), provider_config(tmp_path, secret_file, "base64url")) == verdict


def test_not_before_an_absolute_time(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    secret_file = generated_secret(capsys, tmp_path / "keys")
    for text in ("2030-01-01T00:00:00Z", "2030-01-01T01:00:00+01:00"):
        status, out, err = run(capsys, *mint_args("--secret-file", secret_file, "--ttl", "3650d", "--not-before", text))
        assert status == 0, err
        assert claims_of(out.strip())["nbf"] == 1893456000


@pytest.mark.parametrize(
    "argv, status, message",
    [
        (["--ttl", "0"], 2, "argument --ttl: '0' is too short; use at least 1s (or -1s for an expired token)"),
        (["--ttl", "-0.5"], 2, "argument --ttl: '-0.5' is too short"),
        (["--ttl", "-5m"], 2, "argument --ttl: expected one argument (write a negative value with '=': --ttl=-5m)"),
        (["--ttl", "5 m"], 2, "argument --ttl: '5 m' is not a duration"),
        (
            ["--not-before", "-1m"],
            2,
            "argument --not-before: expected one argument (write a negative value with '=': --not-before=-1m)",
        ),
        (
            ["--not-before", "tomorrow"],
            2,
            "argument --not-before: 'tomorrow' is neither an offset (5m, -1m, 90) nor a time (2026-12-03T10:00:00Z)",
        ),
        (
            ["--not-before", "2030-01-01T00:00:00"],
            2,
            "argument --not-before: '2030-01-01T00:00:00' has no time zone; add one, e.g. 2030-01-01T00:00:00Z for UTC",
        ),
        (
            ["--not-before", "5m"],
            1,
            "the token would never be valid: its nbf (+300s from now) is not before its exp "
            "(+300s); give a longer ttl or an earlier not-before",
        ),
        (["--ttl=-5m", "--not-before=-10m"], 0, ""),
        (["--not-before", "1m", "--claim", "nbf=5"], 1, "nbf is given twice"),
    ],
    ids=[
        "ttl-0",
        "ttl-half-second",
        "ttl-negative-without-equals",
        "ttl-space",
        "not-before-negative-without-equals",
        "not-before-word",
        "not-before-no-zone",
        "never-valid",
        "expired-after-nbf",
        "nbf-twice",
    ],
)
def test_ttl_and_not_before_mistakes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], status: int, message: str
) -> None:
    secret_file = generated_secret(capsys, tmp_path / "keys")
    got, out, err = run(capsys, *mint_args("--secret-file", secret_file, *argv))
    assert got == status, err
    if status:
        assert out == "" and f"jwt-sidecar: error: {message}" in err, err
    else:
        assert out.count(".") == 2
