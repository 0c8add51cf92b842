"""`token explain` on what a person pastes (issue 11 item 3): what is no JWT is said first and
alone; with no config a token is still decoded, marked unverified, with what needs a config;
the exit statuses and flags in README.md are the code's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy.tools.cli import EXPLAIN_EXIT_STATUSES, build_parser, main
from proxy.tools.explain import CONFIG_CHECKS
from tests.conftest import AUDIENCE, ISSUER, TestKey, jwks_of, mint

README = Path(__file__).resolve().parents[3] / "README.md"
ONE_SEGMENT = "1 segment, expected 3 (HEADER.PAYLOAD.SIGNATURE, each base64url)"


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


@pytest.fixture
def config_file(tmp_path: Path, rsa_key: TestKey) -> Path:
    (tmp_path / "jwks.json").write_text(json.dumps(jwks_of(rsa_key)))
    path = tmp_path / "config.yaml"
    path.write_text(
        f"providers:\n  main:\n    issuer: {ISSUER}\n    audiences: ['{AUDIENCE}']\n    jwks_file: jwks.json\n"
    )
    return path


@pytest.fixture
def no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with no config.yaml, and no $JWT_SIDECAR_CONFIG."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.delenv("JWT_SIDECAR_CONFIG", raising=False)
    return empty


@pytest.mark.parametrize(
    "text, first_line",
    [
        ("hello world", f"not a JWT: {ONE_SEGMENT}; it contains whitespace, which no JWT does"),
        ("Bearer hello", f"not a JWT: {ONE_SEGMENT}"),
        ("Authorization: bearer  hello", f"not a JWT: {ONE_SEGMENT}"),
        ('"e30.e30.AAAA"', "not a JWT: it is in quotes; give the token without them"),
        ("", "not a JWT: the input is empty"),
        ("abc", f"not a JWT: {ONE_SEGMENT}"),
        (
            '{"alg":"RS256"}',
            f"not a JWT: {ONE_SEGMENT}; it is JSON text, not a token (a JWT's parts are base64url-encoded)",
        ),
        ("a.b", "not a JWT: 2 segments, expected 3 (HEADER.PAYLOAD.SIGNATURE, each base64url)"),
        ("a.b.c.d", "not a JWT: 4 segments, expected 3 (HEADER.PAYLOAD.SIGNATURE, each base64url)"),
        ("a.b.c.d.e", "not a JWT: 5 segments, expected 3 (HEADER.PAYLOAD.SIGNATURE, each base64url)"),
        (
            b64('{"alg":"RSA-OAEP","enc":"A256GCM"}') + ".AAAA.AAAA.AAAA.AAAA",
            "not a JWT the proxy accepts: 5 segments, an encrypted JWT (JWE, RFC 7516, enc 'A256GCM'); the proxy "
            "accepts only signed JWTs (JWS, 3 segments)",
        ),
        (
            "ab+c.e30.AAAA",
            "not a JWT: the header segment has '+' at character 3 of 4: that is base64, not base64url, "
            "which has '-' instead (RFC 7515 §2)",
        ),
        (
            "e30=.e30.AAAA",
            "not a JWT: the header segment ends in '=' padding; a JWT's segments are unpadded base64url (RFC 7515 §2)",
        ),
        (
            "e31.e30.AAAA",
            "not a JWT: the header segment is not canonical base64url: its last character '1' sets bits no "
            "byte uses (the one spelling ends in '0'; a token has one spelling, RFC 7515 §2)",
        ),
        ("ew.e30.AAAA", "not a JWT: the header is not UTF-8 JSON"),
        (
            "e.e30.AAAA",
            "not a JWT: the header segment is 1 character long, which no base64url text is (a character is "
            "missing or extra)",
        ),
        ("!!!.e30.AAAA", "not a JWT: the header segment has '!' at character 1 of 3, which is not base64url"),
        (
            "e\udcff0.e30.AAAA",
            "not a JWT: the header segment has '\\udcff' at character 2 of 3, which is not base64url",
        ),
        (".e30.AAAA", "not a JWT: the header segment is empty"),
        (f"{b64('[1]')}.e30.AAAA", "not a JWT: the header is a JSON array, not a JSON object"),
        (f"{b64('5')}.e30.AAAA", "not a JWT: the header is a JSON number, not a JSON object"),
        (f"{b64('null')}.e30.AAAA", "not a JWT: the header is JSON null, not a JSON object"),
        (b64('{"a":1,"a":1}') + ".e30.AAAA", "not a JWT: the header is not strict JSON: duplicate member name 'a'"),
    ],
    ids=[
        "hello-world",
        "bearer-word",
        "authorization-line",
        "quoted",
        "empty",
        "one-word",
        "json",
        "two",
        "four",
        "five",
        "jwe",
        "base64-plus",
        "padded",
        "unused-bits",
        "not-json",
        "length-1-mod-4",
        "punctuation",
        "not-utf8",
        "empty-header",
        "array",
        "number",
        "null",
        "duplicate",
    ],
)
@pytest.mark.parametrize("with_config", [True, False], ids=["config", "no-config"])
def test_what_is_no_jwt_is_said_first_and_nothing_else(
    capsys: pytest.CaptureFixture[str],
    config_file: Path,
    no_config: Path,
    text: str,
    first_line: str,
    with_config: bool,
) -> None:
    argv = ["token", "explain", text] + (["--config", str(config_file)] if with_config else [])
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert (out, err) == (f"{first_line}\nINVALID: malformed\n", "")


def test_what_is_no_jwt_and_too_large_names_the_size_reason_the_proxy_gives(
    capsys: pytest.CaptureFixture[str], config_file: Path
) -> None:
    assert main(["token", "explain", "a" * 9000, "--config", str(config_file)]) == 1
    assert capsys.readouterr().out == (
        f"not a JWT: {ONE_SEGMENT}\nit is also 9000 bytes, over the limit of 8192, "
        "which the proxy checks first\nINVALID: too_large\n"
    )


def test_without_a_config_the_token_is_decoded_and_marked_unverified(
    capsys: pytest.CaptureFixture[str], no_config: Path, rsa_key: TestKey
) -> None:
    token = mint({"sub": "alice"}, key=rsa_key, headers={"kid": None})
    assert main(["token", "explain", token]) == 3
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == ""
    assert lines[0] == f"input: a JWT (JWS compact serialization, 3 segments, {len(token)} bytes): alg 'RS256', no kid"
    assert lines[1] == "decoded, UNVERIFIED (nothing here is trusted until the signature verifies):"
    assert lines[2] == '  header:  {"alg": "RS256", "typ": "JWT"}'
    assert lines[3].startswith('  payload: {"aud": "api://orders", "exp": ') and '"sub": "alice"' in lines[3]
    exp = next(line for line in lines if line.startswith("  exp:"))
    assert re.fullmatch(r"  exp:     \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(in (4m 5\ds|5m)\)", exp), exp
    assert "no config: ./config.yaml does not exist and no --config FILE was given" in out
    assert "  PASS  kid             no kid: every key for the alg is tried" in lines
    assert "  ----  signature       needs a config: the provider's keys" in lines
    assert f"a config is needed to check {', '.join(CONFIG_CHECKS)}" in lines
    for needed in ("signature", "iss", "aud", "route's rules"):
        assert needed in lines[-2]
    assert lines[-1] == "NOT VERIFIED: no config"
    assert "None" not in out


@pytest.mark.parametrize(
    "header, reason",
    [
        ({"alg": "none"}, "alg_not_allowed"),
        ({"alg": "HS1"}, "alg_not_allowed"),
        ({}, "alg_not_allowed"),
        ({"alg": "RS256", "crit": ["exp"]}, "crit"),
        ({"alg": "RS256", "kid": 7}, "malformed"),
    ],
)
def test_without_a_config_what_every_config_refuses_is_invalid(
    capsys: pytest.CaptureFixture[str], no_config: Path, header: dict[str, Any], reason: str
) -> None:
    token = f"{b64(json.dumps(header))}.{b64(json.dumps({'iss': ISSUER}))}.AAAA"
    assert main(["token", "explain", token]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-2].startswith("refused whatever the config (")
    assert out.splitlines()[-1] == f"INVALID: {reason}"
    assert f"[{reason}]" in out and "None" not in out


@pytest.mark.parametrize("change", ["last-char", "padding", "base64-char", "one-char-too-many"])
def test_without_a_config_a_signature_the_proxy_cannot_read_is_invalid(
    capsys: pytest.CaptureFixture[str], no_config: Path, rsa_key: TestKey, change: str
) -> None:
    # No key can verify a segment that is not the one base64url spelling: the proxy refuses it
    # as malformed whatever its config, so explain says so without one (not "needs a config").
    token = mint({"sub": "alice"}, key=rsa_key)
    head, _, signature = token.rpartition(".")
    # A 256-byte RS256 signature's last character carries 2 bits and 4 zero bits: one up sets one.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    flipped = alphabet[alphabet.index(signature[-1]) + 1]
    signature = {
        "last-char": signature[:-1] + flipped,
        "padding": signature + "==",
        "base64-char": "+" + signature[1:],
        "one-char-too-many": signature + "AAA",
    }[change]
    assert main(["token", "explain", f"{head}.{signature}"]) == 1
    lines = capsys.readouterr().out.splitlines()
    failed = [line for line in lines if line.startswith("  FAIL")]
    assert len(failed) == 1 and failed[0].startswith("  FAIL  signature       the signature segment ")
    assert "  ----  claims          not checked: signature failed" in lines
    assert lines[-1] == "INVALID: malformed"


def test_a_config_that_does_not_load_still_decodes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, rsa_key: TestKey
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  main:\n    issuer: i\n")
    assert main(["token", "explain", mint(key=rsa_key), "--config", str(bad)]) == 3
    out, err = capsys.readouterr()
    assert err.startswith(f"{bad}")
    assert f"no config: {bad} has " in out and out.splitlines()[-1] == "NOT VERIFIED: no config"
    assert main(["token", "explain", mint(key=rsa_key), "--config", str(tmp_path / "missing.yaml")]) == 3


def test_the_config_comes_from_the_environment_as_for_run(
    capsys: pytest.CaptureFixture[str],
    config_file: Path,
    no_config: Path,
    rsa_key: TestKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JWT_SIDECAR_CONFIG", str(config_file))
    assert main(["token", "explain", mint(key=rsa_key)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "VALID"


def test_provider_without_a_config_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], no_config: Path, rsa_key: TestKey
) -> None:
    assert main(["token", "explain", mint(key=rsa_key), "--provider", "main"]) == 2
    assert "--provider needs a config; no config: ./config.yaml does not exist" in capsys.readouterr().err


def test_a_token_without_iss_among_several_providers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, config_file: Path, rsa_key: TestKey
) -> None:
    config_file.write_text(
        config_file.read_text() + f"  other:\n    issuer: https://other.test\n"
        f"    audiences: ['{AUDIENCE}']\n    jwks_file: jwks.json\n"
    )
    assert main(["token", "explain", mint(key=rsa_key, omit=("iss",)), "--config", str(config_file)]) == 1
    out = capsys.readouterr().out
    assert (
        "provider: none chosen: the token has no iss, so no provider can be chosen by it (issuers: main: "
        f"{ISSUER}; other: https://other.test)"
    ) in out
    assert out.splitlines()[-1] == "INVALID: missing_claim" and "None" not in out


async def test_keys_that_cannot_be_loaded_are_not_verified(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, rsa_key: TestKey, jwks_server: Any
) -> None:
    jwks_server.mode = "fail"
    path = tmp_path / "remote.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        providers:
          main:
            issuer: {ISSUER}
            audiences: ['{AUDIENCE}']
            jwks: {{url: '{jwks_server.url("/jwks.json")}', timeout: 2s}}
        """)
    )
    status = await asyncio.to_thread(main, ["token", "explain", mint(key=rsa_key), "--config", str(path)])
    out = capsys.readouterr().out
    assert status == 3, out
    failures = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert failures[0].startswith("  FAIL  key ") and failures[0].endswith("[no_keys]"), out
    assert out.splitlines()[-1] == "NOT VERIFIED: no_keys"


# -- README.md says what the code does -------------------------------------------------------
def readme_section(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start:end]


def subcommand(*names: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def test_readme_lists_explains_exit_statuses() -> None:
    section = readme_section("### `jwt-sidecar token explain")
    rows = dict(re.findall(r"^\| (\d) \| (.+?) \|$", section, re.MULTILINE))
    assert {int(code): text for code, text in rows.items()} == EXPLAIN_EXIT_STATUSES
    assert options(subcommand("token", "explain")) == {"--config", "--provider", "--route"}
    assert "`jwt-sidecar token explain TOKEN [--config FILE] [--provider NAME | --route NAME]`" in section


def test_readme_lists_every_mint_flag() -> None:
    section = readme_section("### `jwt-sidecar token mint`")
    documented = set(re.findall(r"^\| `(--[a-z-]+)", section, re.MULTILINE))
    assert documented == options(subcommand("token", "mint"))


# -- mutated tokens: explain never crashes and agrees with the proxy's verifier ----------------
def proxy_verdict(config_path: Path, token: str) -> tuple[str | None, str]:
    """What the proxy's own Verifier (the code `run` uses) says: (reason, detail) or (None, "")."""
    from proxy.auth.keys import key_source_for
    from proxy.auth.verify import Verifier
    from proxy.base.clock import SystemClock
    from proxy.base.errors import InvalidToken
    from proxy.config import builder as config

    settings = config.load(config_path)
    provider = settings.providers["main"]

    async def verify() -> tuple[str | None, str]:
        source = key_source_for(provider, fetcher=None, clock=SystemClock())  # type: ignore[arg-type]
        await source.start()
        try:
            await Verifier(provider, source, clock=SystemClock(), max_token_bytes=settings.max_token_bytes).verify(
                token
            )
        except InvalidToken as error:
            return str(error.reason), error.detail
        finally:
            await source.close()
        return None, ""

    return asyncio.run(verify())


def test_mutated_tokens(capsys: pytest.CaptureFixture[str], config_file: Path, rsa_key: TestKey) -> None:
    import random

    rng = random.Random(11)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/. \t{}\"'\x00é\udcff"
    base = mint(key=rsa_key)
    for _ in range(300):
        token = list(base)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(token))
            what = rng.random()
            if what < 0.5:
                token[at] = rng.choice(alphabet)
            elif what < 0.75:
                del token[at]
            else:
                token.insert(at, rng.choice(alphabet))
        text = "".join(token)
        status = main(["token", "explain", text, "--config", str(config_file), "--provider", "main"])
        out, err = capsys.readouterr()
        assert "Traceback" not in err and not re.search(r"""(?<!['"])\bNone\b""", out), (text, out, err)
        reason, detail = proxy_verdict(config_file, text.strip())
        last = out.rstrip("\n").splitlines()[-1]
        assert (status, last) == ((0, "VALID") if reason is None else (1, f"INVALID: {reason}")), (text, out)
        failures = [line for line in out.splitlines() if line.startswith("  FAIL")]
        if failures:
            assert failures[0].endswith(f"{detail}   [{reason}]"), (text, out, detail)


def test_an_unknown_provider_is_a_usage_error_before_anything_is_printed(
    capsys: pytest.CaptureFixture[str], config_file: Path, rsa_key: TestKey
) -> None:
    assert main(["token", "explain", mint(key=rsa_key), "--config", str(config_file), "--provider", "nope"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "jwt-sidecar: error: unknown provider 'nope'; known: main" in err
