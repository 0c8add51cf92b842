"""cli.py `keys generate` and `token mint`: in-process through `main`, and once as `python -m proxy`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest

from proxy import __version__
from proxy.tools.cli import main
from tests.conftest import AUDIENCE, ISSUER

REPO = Path(__file__).resolve().parents[3]


def run(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike[str]) -> tuple[int, str, str]:
    status = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def mint_args(*extra: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
    return ["token", "mint", "--iss", ISSUER, "--aud", AUDIENCE, *extra]


def jwks_in(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def verify(token: str, jwk: dict[str, Any], alg: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, key=jwt.PyJWK(jwk), algorithms=[alg], audience=AUDIENCE, issuer=ISSUER)
    return claims


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_generate_then_mint_verifies_with_the_published_jwk(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, alg: str
) -> None:
    status, out, err = run(capsys, "keys", "generate", "--alg", alg, "--kid", "k-1", "--out", tmp_path)
    assert (status, err) == (0, "")
    private, jwks = tmp_path / "k-1.pem", tmp_path / "jwks.json"
    assert f"wrote {private}" in out and f"wrote {jwks}" in out
    assert f"jwks_file: {jwks}" in out and f"algorithms: [{alg}]" in out
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key_set = jwt.PyJWKSet.from_dict(jwks_in(jwks))
    assert [k.key_id for k in key_set.keys] == ["k-1"]

    status, out, err = run(capsys, *mint_args("--key", private, "--kid", "k-1", "--sub", "user-42"))
    assert (status, err) == (0, "")
    token = out.strip()
    assert out == token + "\n"  # the token alone, for $(...)
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": "k-1", "typ": "JWT"}  # alg inferred
    assert verify(token, jwks_in(jwks)["keys"][0], alg)["sub"] == "user-42"
    assert key_set["k-1"].algorithm_name == alg


def test_hs256_secret_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, _ = run(capsys, "keys", "generate", "--alg", "HS256", "--kid", "hs-1", "--out", tmp_path)
    secret_file = tmp_path / "hs-1.secret"
    assert status == 0
    assert f"secret: {{file: {secret_file}, encoding: base64url}}" in out
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert not (tmp_path / "jwks.json").exists()
    status, out, _ = run(capsys, *mint_args("--secret-file", secret_file, "--secret-encoding", "base64url"))
    assert status == 0
    jwk = {"kty": "oct", "k": secret_file.read_text().strip()}
    assert jwt.get_unverified_header(out.strip())["alg"] == "HS256"
    assert verify(out.strip(), jwk, "HS256")["iss"] == ISSUER


def test_rotation(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    jwks = tmp_path / "v1" / "jwks.json"
    assert run(capsys, "keys", "generate", "--alg", "RS256", "--kid", "rsa-1", "--out", tmp_path / "v1")[0] == 0
    status, out, _ = run(
        capsys, "keys", "generate", "--alg", "ES256", "--kid", "ec-2", "--out", tmp_path / "v2", "--jwks", jwks
    )
    assert status == 0
    assert f"added kid ec-2 to {jwks}" in out
    assert [k.key_id for k in jwt.PyJWKSet.from_dict(jwks_in(jwks)).keys] == ["rsa-1", "ec-2"]
    # Tokens signed with either key verify against the rotated set.
    signers = ((tmp_path / "v1" / "rsa-1.pem", "rsa-1", "RS256"), (tmp_path / "v2" / "ec-2.pem", "ec-2", "ES256"))
    for pem, kid, alg in signers:
        _, out, _ = run(capsys, *mint_args("--key", pem, "--kid", kid))
        jwk = next(k for k in jwks_in(jwks)["keys"] if k["kid"] == kid)
        assert verify(out.strip(), jwk, alg)["iss"] == ISSUER

    before = jwks.read_bytes(), (tmp_path / "v2" / "ec-2.pem").read_bytes()
    status, out, err = run(
        capsys, "keys", "generate", "--alg", "EdDSA", "--kid", "rsa-1", "--out", tmp_path / "v3", "--jwks", jwks
    )
    assert (status, out) == (1, "")
    assert (
        err == f"jwt-sidecar: error: kid 'rsa-1' is already in {jwks}; a new key needs a kid of its own, "
        "or verifiers cannot tell the keys apart\n"
    )
    status, _, err = run(capsys, "keys", "generate", "--alg", "ES256", "--kid", "ec-2", "--out", tmp_path / "v2")
    assert status == 1
    assert err.startswith(f"jwt-sidecar: error: {tmp_path / 'v2' / 'ec-2.pem'} already exists; refusing to overwrite")
    assert (jwks.read_bytes(), (tmp_path / "v2" / "ec-2.pem").read_bytes()) == before


def test_mint_ttl_and_claims(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("a-shared-secret-that-is-32-bytes-long\n")
    status, out, _ = run(
        capsys,
        *mint_args(
            "--secret-file",
            secret,
            "--ttl",
            "5m",
            "--sub",
            "bob",
            "--aud",
            "second",
            "--claim",
            "admin=true",
            "--claim",
            "n=3",
            "--claim",
            "name=bob",
            "--claim",
            'roles=["a","b"]',
        ),
    )
    assert status == 0
    claims = jwt.decode(out.strip(), b"a-shared-secret-that-is-32-bytes-long", algorithms=["HS256"], audience="second")
    assert claims["exp"] - claims["iat"] == 300
    assert claims["aud"] == [AUDIENCE, "second"]
    assert (claims["admin"], claims["n"], claims["name"], claims["roles"]) == (True, 3, "bob", ["a", "b"])
    assert claims["sub"] == "bob" and isinstance(claims["jti"], str)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ttl", "5x"], "argument --ttl: '5x' is not a duration; use e.g. 60, 30s, 5m, 1h30m, -5m"),
        (["--ttl", "250ms"], "argument --ttl: '250ms' is too short; use at least 1s"),
        (["--claim", "admin"], "argument --claim: 'admin' is not a claim; write NAME=VALUE"),
        (["--claim", "a=1", "--claim", "a=2"], "--claim a is given twice"),
        (["--alg", "none"], "argument --alg: invalid choice: 'none'"),
    ],
    ids=["bad-ttl", "ttl-too-short", "claim-without-value", "claim-twice", "alg-none"],
)
def test_mint_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x" * 32)
    status, out, err = run(capsys, *mint_args("--secret-file", secret, *argv))
    assert (status, out) == (2, "")
    assert err.startswith("usage: jwt-sidecar token mint")
    assert f"jwt-sidecar: error: {message}" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["keys"], "the following arguments are required: ACTION"),
        (
            ["keys", "generate", "--alg", "ES256", "--kid", "k", "--out", ".", "--bits", "4096"],
            "--bits only applies to --alg RS256",
        ),
        (["keys", "generate", "--alg", "HS512", "--kid", "k", "--out", "."], "argument --alg: invalid choice"),
        (["token", "mint", "--iss", "i", "--aud", "a"], "one of the arguments --key --secret-file is required"),
        (
            ["token", "mint", "--key", "k.pem", "--secret-encoding", "base64url", "--iss", "i", "--aud", "a"],
            "--secret-encoding only applies to --secret-file",
        ),
        (["token", "mint", "--key", "k.pem", "--aud", "a"], "the following arguments are required: --iss"),
    ],
    ids=["no-command", "no-action", "bits-for-ec", "generate-hs512", "mint-no-key", "encoding-with-key", "mint-no-iss"],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert f"jwt-sidecar: error: {message}" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read {path}: No such file or directory"),
        (b"-----BEGIN PUBLIC KEY-----\n", "the key is not a PEM private key; it holds a public key"),
    ],
    ids=["missing", "public-key"],
)
def test_mint_failures_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "key.pem"
    if content is not None:
        path.write_bytes(content)
    status, out, err = run(capsys, *mint_args("--key", path))
    assert (status, out) == (1, "")
    assert err.startswith("jwt-sidecar: error: " + message.format(path=path))
    assert "Traceback" not in err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"jwt-sidecar {__version__}\n", "")
    status, out, _ = run(capsys, "token", "mint", "--help")
    assert status == 0 and out.startswith("usage: jwt-sidecar token mint")


def test_python_dash_m_proxy_is_the_command(tmp_path: Path) -> None:
    def sidecar(*argv: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy", *(os.fspath(a) for a in argv)],
            check=False,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    generated = sidecar("keys", "generate", "--alg", "EdDSA", "--kid", "ed-1", "--out", tmp_path)
    assert generated.returncode == 0, generated.stderr
    minted = sidecar(
        "token",
        "mint",
        "--key",
        tmp_path / "ed-1.pem",
        "--kid",
        "ed-1",
        "--iss",
        ISSUER,
        "--aud",
        AUDIENCE,
        "--sub",
        "user-42",
    )
    assert (minted.returncode, minted.stderr) == (0, "")
    jwk = jwks_in(tmp_path / "jwks.json")["keys"][0]
    assert verify(minted.stdout.strip(), jwk, "EdDSA")["sub"] == "user-42"
    refused = sidecar("token", "mint", "--key", tmp_path / "ed-1.pem", "--iss", "i", "--aud", "a", "--ttl", "soon")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "jwt-sidecar: error: argument --ttl: 'soon' is not a duration" in refused.stderr
