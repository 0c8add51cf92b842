"""The README's operator tools used as a first-time operator does: paste what a command prints.

`keys generate` prints the config lines for the key it wrote and a `token mint` command to
try it with; an operator pastes the lines into a config that lives somewhere else (a config
reads relative paths from its own directory) and runs the command in a shell where the
virtual environment is not activated. Both must work as printed: the token then verifies
through that config (`token explain` says VALID). Everything runs through the real `main`,
in a working directory of its own.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from proxy.tools.cli import main
from tests.conftest import refused_port

ISSUER, AUDIENCE = "https://issuer.example/", "orders-api"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def printed_config_lines(out: str) -> list[str]:
    """The indented YAML lines `keys generate` prints under "configure the provider ... with"."""
    return [line.strip() for line in out.splitlines() if re.match(r"  (secret|jwks_file|algorithms): ", line)]


def printed_mint(out: str) -> list[str]:
    [line] = [line for line in out.splitlines() if " token mint " in line]
    words = shlex.split(line)
    program = words[: words.index("token")]
    # Not the bare name `jwt-sidecar`, which is on PATH only in an activated venv.
    assert program and Path(program[0]).is_absolute() and os.access(program[0], os.X_OK), line
    return words[words.index("token") :]


@pytest.mark.parametrize("alg", ["HS256", "ES256", "RS256", "EdDSA"])
def test_what_keys_generate_prints_works_pasted_into_a_config_elsewhere(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alg: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JWT_SIDECAR_CONFIG", raising=False)
    status, out, err = run(capsys, "keys", "generate", "--alg", alg, "--kid", "k1", "--out", "keys/")
    assert (status, err) == (0, "")
    lines = printed_config_lines(out)
    if alg != "HS256":  # the jwks_file alternative to serving the set, then its algorithms
        lines = [line for line in lines if line.startswith(("jwks_file", "algorithms"))]
    conf = tmp_path / "conf"
    conf.mkdir()
    config = conf / "config.yaml"
    config.write_text(
        f"providers:\n  main:\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n"
        + "".join(f"    {line}\n" for line in lines)
        + "routes:\n  - {match: {path_prefix: /}, auth: {provider: main}}\n"
    )
    status, _out_check, err_check = run(capsys, "check-config", str(config))
    assert status == 0, err_check

    args = [
        a.replace("ISSUER", ISSUER).replace("AUDIENCE", AUDIENCE).replace("SUBJECT", "alice") for a in printed_mint(out)
    ]
    status, token, err = run(capsys, *args)
    assert status == 0, err
    status, explained, _ = run(capsys, "token", "explain", token.strip(), "--config", str(config))
    assert (status, explained.splitlines()[-1]) == (0, "VALID"), explained


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            None,
            "{path} holds no PEM block, so no private key; a shared secret (as `keys generate --alg HS256` writes) "
            "signs with --secret-file {path}",
        ),
        (b"", "{path} is empty; give a PEM private key"),
    ],
    ids=["a-secret-file", "empty"],
)
def test_mint_with_key_naming_a_file_that_is_no_pem_says_which_option_it_is_for(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: bytes | None,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = Path("keys/hs.secret")
    if content is None:
        assert run(capsys, "keys", "generate", "--alg", "HS256", "--kid", "hs", "--out", "keys")[0] == 0
    else:
        path.parent.mkdir()
        path.write_bytes(content)
    status, out, err = run(capsys, "token", "mint", "--key", str(path), "--iss", ISSUER, "--aud", AUDIENCE)
    assert (status, out, err) == (1, "", f"jwt-sidecar: error: {message.format(path=path)}\n")


def test_explain_of_a_token_cut_after_its_last_dot_says_the_signature_is_empty(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A token copied without its signature (or stripped on purpose): no key "does not match" it.
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "keys", "generate", "--alg", "ES256", "--kid", "k1", "--out", "keys")[0] == 0
    config = tmp_path / "config.yaml"
    config.write_text(
        f"providers:\n  main:\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n"
        "    jwks_file: keys/jwks.json\n"
        "routes:\n  - {match: {path_prefix: /}, auth: {provider: main}}\n"
    )
    status, token, _ = run(
        capsys, "token", "mint", "--key", "keys/k1.pem", "--kid", "k1", "--iss", ISSUER, "--aud", AUDIENCE
    )
    assert status == 0
    unsigned = token.strip().rpartition(".")[0] + "."
    status, out, _ = run(capsys, "token", "explain", unsigned, "--config", str(config))
    assert status == 1
    [line] = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert line == (
        "  FAIL  signature       the signature segment is empty: the token is unsigned, and ES256 "
        "needs a signature   [bad_signature]"
    )
    assert out.splitlines()[-1] == "INVALID: bad_signature"


def test_explain_says_why_a_providers_keys_could_not_be_had(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An operator reading only the key line must learn the cause, not only that keys are missing.
    port = refused_port()  # a port nobody listens on: connection refused
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "keys", "generate", "--alg", "RS256", "--kid", "k1", "--out", "keys")[0] == 0
    config = tmp_path / "config.yaml"
    config.write_text(
        f"providers:\n  main:\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n"
        f"    jwks: {{url: 'http://127.0.0.1:{port}/jwks.json', timeout: 2s}}\n"
        "routes:\n  - {match: {path_prefix: /}, auth: {provider: main}}\n"
    )
    status, token, _ = run(
        capsys, "token", "mint", "--key", "keys/k1.pem", "--kid", "k1", "--iss", ISSUER, "--aud", AUDIENCE
    )
    status, out, _ = run(capsys, "token", "explain", token.strip(), "--config", str(config))
    assert status == 3
    [line] = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert line == (
        f"  FAIL  key             provider main: no usable keys from jwks http://127.0.0.1:{port}/jwks.json "
        f"(last fetch: connection refused from 127.0.0.1:{port})   [no_keys]"
    )
    assert out.splitlines()[-1] == "NOT VERIFIED: no_keys"


def test_check_config_strict_says_why_it_fails_after_a_summary_that_says_ok(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "open.yaml"
    config.write_text(
        f"providers:\n  main: {{issuer: {ISSUER}, audiences: [{AUDIENCE}], jwks: {{url: 'https://x/j'}}}}\n"
        "routes:\n  - {match: {path_prefix: /}, auth: none}\n"
    )
    status, out, err = run(capsys, "check-config", str(config))
    assert (status, err) == (0, "") and out.startswith(f"{config}: OK (1 warning(s) below)\n")
    status, out_strict, err = run(capsys, "check-config", "--strict", str(config))
    assert (status, out_strict) == (1, out)
    assert err == "jwt-sidecar: error: 1 warning(s), and --strict fails on any\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--bogus"],
        ["check-config", "a.yaml", "b.yaml"],
        ["token", "explain", "TOKEN", "extra"],
        ["keys", "generate", "--alg", "RS256", "--kid", "k", "--out", "d", "--force"],
    ],
)
def test_an_unknown_argument_shows_the_usage_of_the_command_it_was_given_to(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    status, out, err = run(capsys, *argv)
    command = " ".join(argv[:2] if argv[0] in ("token", "keys") else argv[:1])
    assert (status, out) == (2, "")
    assert err.startswith(f"usage: jwt-sidecar {command} "), err
    assert err.splitlines()[-1].startswith("jwt-sidecar: error: unrecognized arguments: ")


def test_keys_generate_out_naming_a_file_says_it_needs_a_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    existing = tmp_path / "jwks.json"
    existing.write_text('{"keys": []}')
    status, out, err = run(capsys, "keys", "generate", "--alg", "ES256", "--kid", "k1", "--out", str(existing))
    assert (status, out) == (1, "")
    assert err == f"jwt-sidecar: error: {existing} is a file; --out names the directory the key files go into\n"
    assert existing.read_text() == '{"keys": []}'
