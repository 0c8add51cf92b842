"""cli.py: `check-config` and `token explain`, run as a user runs them."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy.tools.cli import main
from tests.conftest import AUDIENCE, ISSUER, TestKey, jwks_of, mint

REPO = Path(__file__).parents[3]


@pytest.fixture
def config_file(tmp_path: Path, rsa_key: TestKey) -> Path:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks_of(rsa_key)))
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        providers:
          main:
            issuer: {ISSUER}
            audiences: [{AUDIENCE}]
            jwks_file: jwks.json
            max_token_age: 1h
          other:
            issuer: https://other.test
            audiences: [x]
            jwks_file: jwks.json
        routes:
          - {{name: everything, match: {{path_prefix: /}}, auth: {{provider: main, scopes: {{all_of: [read]}}}}}}
        """)
    )
    return path


def test_check_config_prints_a_summary(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert f"{config_file}: OK" in out
    assert f"main: iss {ISSUER}; aud {AUDIENCE}" in out
    assert "everything: prefix / [any method] -> main; scopes all of read" in out


def test_check_config_lists_every_problem_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "providers:\n  main:\n    issuer: i\n    audiences: [a]\n    jwks: {url: 'ftp://x'}\n    leeway: soon\n"
    )
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{bad}:5: providers.main.jwks.url: 'ftp://x' is not an http(s) URL with a host"
    assert err[1].startswith(f"{bad}:6: providers.main.leeway: 'soon' is not a duration")
    assert err[-1] == "jwt-sidecar: error: the config has 2 problem(s)"  # check-config starts nothing


def test_check_config_of_the_repository_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(REPO / "config.yaml")]) == 0


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def steps(out: str) -> dict[str, str]:
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("PASS", "FAIL", "----"):
            found[parts[1] if parts[1] != "max_token_age" else "max_token_age"] = parts[0]
    return found


def test_explain_valid_token(config_file: Path, rsa_key: TestKey, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "explain", mint(key=rsa_key), "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("VALID")
    assert set(steps(out).values()) == {"PASS"}
    assert {"size", "alg", "key", "signature", "payload", "exp", "iss", "aud"} <= set(steps(out))


def test_explain_runs_every_check_past_the_first_failure(
    config_file: Path, rsa_key: TestKey, capsys: pytest.CaptureFixture[str]
) -> None:
    token = mint({"exp": 1_000, "iat": 0, "aud": "api://wrong"}, key=rsa_key)
    assert main(["token", "explain", token, "--config", str(config_file), "--provider", "main"]) == 1
    out = capsys.readouterr().out
    result = steps(out)
    assert (result["signature"], result["exp"], result["aud"], result["iss"]) == ("PASS", "FAIL", "FAIL", "PASS")
    assert "[expired]" in out and "[audience]" in out
    assert out.rstrip().splitlines()[-1] == "INVALID: expired"


def test_explain_checks_no_claim_of_a_token_whose_signature_failed(
    config_file: Path, rsa_key: TestKey, capsys: pytest.CaptureFixture[str]
) -> None:
    header, _payload, sig = mint(key=rsa_key).split(".")
    forged = mint({"sub": "admin", "exp": 1_000}, key=rsa_key).split(".")[1]
    assert main(["token", "explain", f"{header}.{forged}.{sig}", "--config", str(config_file)]) == 1
    out = capsys.readouterr().out
    assert steps(out)["signature"] == "FAIL" and steps(out)["exp"] == "----"
    lines = out.splitlines()
    after = lines[next(i for i, line in enumerate(lines) if line.startswith("  FAIL  signature")) + 1 : -1]
    assert after and all(line.endswith("not checked: signature failed") for line in after), out
    assert "signature (RS256) does not verify: key 'rsa-1' does not match the signature   [bad_signature]" in out
    assert out.rstrip().splitlines()[-1] == "INVALID: bad_signature"


def test_explain_picks_the_provider_by_iss(
    config_file: Path, rsa_key: TestKey, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "token",
                "explain",
                mint({"iss": "https://other.test", "aud": "x"}, key=rsa_key),
                "--config",
                str(config_file),
            ]
        )
        == 0
    )
    assert "provider: other" in capsys.readouterr().out


def test_explain_unknown_issuer_and_unknown_provider(
    config_file: Path, rsa_key: TestKey, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["token", "explain", mint({"iss": "https://evil.test"}, key=rsa_key), "--config", str(config_file)]) == 1
    )
    assert "no provider accepts iss 'https://evil.test'" in capsys.readouterr().out
    assert main(["token", "explain", mint(key=rsa_key), "--config", str(config_file), "--provider", "nope"]) == 2


def test_explain_garbage(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "explain", "not-a-token", "--config", str(config_file), "--provider", "main"]) == 1
    out = capsys.readouterr().out
    assert out == "not a JWT: 1 segment, expected 3 (HEADER.PAYLOAD.SIGNATURE, each base64url)\nINVALID: malformed\n"


async def test_explain_against_a_remote_jwks_as_a_subprocess(
    tmp_path: Path, rsa_key: TestKey, jwks_server: Any
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    path = tmp_path / "c.yaml"
    path.write_text(
        f"providers:\n  main: {{issuer: '{ISSUER}', audiences: ['{AUDIENCE}'], "
        f"jwks: {{url: '{jwks_server.url('/jwks.json')}'}}}}\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "token",
        "explain",
        "-",
        "--config",
        str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(proc.communicate(f"Bearer {mint(key=rsa_key)}\n".encode()), timeout=30)
    assert proc.returncode == 0, (out, err)
    assert out.decode().rstrip().endswith("VALID")


# -- explain and the proxy agree on what a token is (issue 10 items 2, 3, 4) --------------------
def _b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def signed_text(key: TestKey, header: str, payload: str) -> str:
    """A token signed (RS256) over JSON texts as given: duplicate names and all."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signing_input = f"{_b64(header.encode())}.{_b64(payload.encode())}"
    return f"{signing_input}.{_b64(key.private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


def _claims_text(key: TestKey, extra: str = "") -> str:
    import time

    now = int(time.time())
    return f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"user-1","iat":{now},"exp":{now + 300}{extra}}}'


@pytest.mark.parametrize(
    "make, failing, reason",
    [
        (lambda k: mint(key=k) + "==", "signature", "malformed"),  # 2048-bit RSA: 342 characters, so == pads it
        (
            lambda k: signed_text(k, f'{{"alg":"RS256","kid":"{k.kid}"}}', _claims_text(k, ',"sub":"admin"')),
            "payload",
            "malformed",
        ),
        (
            lambda k: signed_text(k, f'{{"alg":"RS256","kid":"{k.kid}"}}', _claims_text(k, ',"o":{"r":1,"r":2}')),
            "payload",
            "malformed",
        ),
        (
            lambda k: signed_text(k, f'{{"alg":"RS256","kid":"{k.kid}","kid":"{k.kid}"}}', _claims_text(k)),
            None,
            "malformed",
        ),
        (
            lambda k: signed_text(k, f'{{"alg":"RS256","kid":"{k.kid}"}}', _claims_text(k, ',"n":NaN')),
            "payload",
            "malformed",
        ),
        (lambda k: mint({"sub": "user-\ud800"}, key=k), "headers", "unsafe_claim"),
    ],
    ids=["padded-signature", "duplicate-sub", "nested-duplicate", "duplicate-in-header", "NaN", "lone-surrogate-sub"],
)
def test_explain_refuses_for_the_reason_the_proxy_does(
    config_file: Path, rsa_key: TestKey, make: Any, failing: str | None, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "explain", make(rsa_key), "--config", str(config_file), "--provider", "main"]) == 1
    out = capsys.readouterr().out
    if failing is None:  # not a JWT: said first, and nothing is checked
        assert out.startswith("not a JWT: the header is not strict JSON: duplicate member name 'kid'\n"), out
    else:
        assert steps(out)[failing] == "FAIL", out
    assert out.rstrip().splitlines()[-1] == f"INVALID: {reason}", out


async def test_explain_prints_any_token_content_to_a_strict_utf8_stdout(config_file: Path, rsa_key: TestKey) -> None:
    # A real process whose stdout refuses what is not UTF-8: a lone surrogate in a claim, a
    # header nested past the JSON parser's depth, a command-line token that is not UTF-8.
    deep = "[" * 2500 + "]" * 2500  # under max_token_bytes once encoded
    cases = [
        (mint({"sub": "\ud800", "o": {"\udc80": ["\ud83d"]}}, key=rsa_key).encode(), "INVALID: unsafe_claim"),
        (f"{_b64(deep.encode())}.{_b64(b'{}')}.AA".encode(), "INVALID: malformed"),
        (mint(key=rsa_key).encode()[:-3] + b"\xff\xfe", "INVALID: malformed"),
    ]
    for token, verdict in cases:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "token",
            "explain",
            token,
            "--config",
            str(config_file),
            "--provider",
            "main",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
            env={"PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8:strict", "PYTHONPATH": str(REPO)},
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 1, (token[:40], out, err)
        assert b"Traceback" not in err and out.decode("utf-8").rstrip().endswith(verdict), (out, err)
