"""More start-up failures an operator meets, each one line and exit 1, in text and in JSON.

tests/integration/test_startup.py covers ports, permissions and files that cannot be read at
all; this file covers files that can be read but hold the wrong thing: a config that is empty,
a list or a scalar, a config with a byte-order mark, a JWKS file that is empty, not JSON or not
a JWK Set, a PEM file holding a certificate or nothing, an empty secret file. Each message is
our own phrase naming the file (and the config line), never a library's ("Expecting value:
line 1 column 1"). With a JSON operator log (`--log-format json`, or `log_format: json` in a
config that then fails to load) the one line is a `startup_failed` JSON object, so a log
collector can read why the sidecar did not start.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.test_startup import assert_one_line, jwt_sidecar, write_config


def certificate_pem() -> bytes:
    """A self-signed certificate, as an operator might copy from an issuer's TLS set-up."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# Each case: (the config's key lines, what the key file holds, the message after "FILE:LINE: PATH: ").
KEY_FILES: dict[str, tuple[str, Callable[[], bytes], str]] = {
    "jwks-not-json": (
        "    jwks_file: {key}",
        lambda: b"not json\n",
        'providers.main.jwks_file: {key} is not JSON (9 bytes): a JWK Set is a JSON object with a "keys" array',
    ),
    "jwks-empty-file": (
        "    jwks_file: {key}",
        lambda: b"",
        'providers.main.jwks_file: {key} is empty: a JWK Set is a JSON object with a "keys" array',
    ),
    "jwks-a-list": (
        "    jwks_file: {key}",
        lambda: b"[1, 2]",
        'providers.main.jwks_file: {key} is not a JWK Set: expected a JSON object with a "keys" array',
    ),
    "jwks-no-keys": (
        "    jwks_file: {key}",
        lambda: b'{"keys": []}',
        'providers.main.jwks_file: holds no keys: its "keys" array is empty',
    ),
    "pem-certificate": (
        "    pem_file: {key}",
        certificate_pem,
        "providers.main.pem_file: {key} is not a PEM public key (it holds a certificate; give its "
        "public key: openssl x509 -in {key} -pubkey -noout)",
    ),
    "pem-empty": (
        "    pem_file: {key}",
        lambda: b"\n",
        "providers.main.pem_file: {key} is not a PEM public key (it is empty)",
    ),
    "pem-not-pem": (
        "    pem_file: {key}",
        lambda: b'{"kty": "RSA"}',
        "providers.main.pem_file: {key} is not a PEM public key (no PEM block in it)",
    ),
    "secret-empty": (
        "    algorithms: [HS256]\n    secret: {{file: {key}}}",
        lambda: b"",
        "providers.main.secret.file: the secret is empty",
    ),
}


def key_file_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    keys, content, message = KEY_FILES[case]
    key = tmp_path / "key-file"
    key.write_bytes(content())
    path = write_config(tmp_path, keys=keys.format(key=key))
    line = 9 if case.startswith("secret") else 8
    return path, f"{path}:{line}: {message.format(key=key)}"


@pytest.mark.parametrize("case", list(KEY_FILES))
def test_a_key_file_holding_the_wrong_thing_is_one_line_in_our_words(tmp_path: Path, case: str) -> None:
    path, line = key_file_case(tmp_path, case)
    assert_one_line(jwt_sidecar("run", "--config", str(path)), line)
    # check-config says the same, with the count after it.
    result = jwt_sidecar("check-config", str(path))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines()[0] == line


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("", "it is empty"),
        ("# only a comment\n", "it is empty"),
        ("- listen: 127.0.0.1:8080\n- providers: {}\n", "it is a YAML list, not a mapping"),
        ("config.yaml\n", "it is a YAML string, not a mapping"),
        ("8080\n", "it is a YAML number, not a mapping"),
    ],
    ids=["empty", "comment-only", "list", "string", "number"],
)
def test_a_config_that_is_not_a_mapping_says_what_it_is(tmp_path: Path, text: str, what: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert_one_line(
        jwt_sidecar("run", "--config", str(path)),
        f"{path}:1: the config must be a YAML mapping with a `providers` key; {what}",
    )


def test_a_config_with_a_byte_order_mark_loads_and_counts_lines_as_written(tmp_path: Path) -> None:
    # Editors on Windows write one; the lines named must still be the editor's lines.
    key = tmp_path / "key-file"
    key.write_bytes(b"not json\n")
    path = write_config(tmp_path, keys=f"    jwks_file: {key}")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert_one_line(
        jwt_sidecar("run", "--config", str(path)),
        f"{path}:8: providers.main.jwks_file: {key} is not JSON (9 bytes): a JWK Set is a JSON object "
        'with a "keys" array',
    )


def json_line(stderr: str) -> dict[str, object]:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    line = json.loads(lines[0])
    assert (line["event"], line["level"], line["logger"]) == ("startup_failed", "ERROR", "jwt_sidecar")
    return line


@pytest.mark.parametrize("how", ["option", "config", "config-auto"])
@pytest.mark.parametrize("case", ["jwks-not-json", "pem-certificate", "secret-empty"])
def test_with_json_logs_a_config_that_does_not_load_is_one_json_line(tmp_path: Path, case: str, how: str) -> None:
    path, line = key_file_case(tmp_path, case)
    if how != "option":  # the file that failed to load still says how its log is read
        path.write_text(path.read_text() + ("log_format: json\n" if how == "config" else "log_format: auto\n"))
    result = jwt_sidecar("run", "--config", str(path), *(("--log-format", "json") if how == "option" else ()))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    record = json_line(result.stderr)  # stderr is a pipe here, so `auto` is json
    assert record["message"] == record["error"] == line
    assert record["problems"] == [line]


def test_with_json_logs_a_config_with_several_problems_is_one_json_line_listing_them(tmp_path: Path) -> None:
    path, line = key_file_case(tmp_path, "pem-certificate")
    path.write_text(path.read_text() + "log_format: json\nlog_level: LOUD\n")
    result = jwt_sidecar("run", "--config", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    record = json_line(result.stderr)
    level = f"{path}:12: log_level: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR"
    assert record["problems"] == [line, level]
    assert record["error"] == record["message"] == "the config has 2 problem(s); nothing was started (see problems)"


def test_the_command_line_text_format_wins_over_the_files_json(tmp_path: Path) -> None:
    path, line = key_file_case(tmp_path, "secret-empty")
    path.write_text(path.read_text() + "log_format: json\n")
    assert_one_line(jwt_sidecar("run", "--config", str(path), "--log-format", "text"), line)


def test_with_json_logs_a_missing_config_file_is_one_json_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = jwt_sidecar("run", "--config", str(missing), "--log-format", "json")
    assert result.returncode == 1
    assert json_line(result.stderr)["error"] == f"{missing}: cannot read the config file: no such file or directory"
