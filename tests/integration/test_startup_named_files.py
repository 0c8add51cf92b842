"""A file the config names that is no file to read (a device, a FIFO, a directory, an empty
name, something far too large) is one config error naming its line, from `check-config` and
from `run`: never a hang, a traceback or a read of the config's own folder.

`file: /dev/zero` used to make `check-config` read until the memory ran out, a FIFO waited for
a writer, and `file: ''` read the config's folder ("Is a directory"). Every place the config
reads a file is here: `jwks_file`, `pem_file` (both spellings), a secret's `file` (and its
`env`), the revocation file, and the config file itself. Each run has a bounded address
space (`RLIMIT_AS`), so that the old behaviour ends in an error rather than eating the machine.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.test_startup import assert_one_line, jwt_sidecar, write_config

# (the config's key lines, the line the key file is named on, the config path of that key)
SOURCES = {
    "jwks_file": ("    jwks_file: {key}", 8, "providers.main.jwks_file"),
    "pem_file": ("    pem_file: {key}", 8, "providers.main.pem_file"),
    "pem_file-with-kid": ("    pem_file: {{file: {key}, kid: k1}}", 8, "providers.main.pem_file.file"),
    "secret-file": ("    algorithms: [HS256]\n    secret: {{file: {key}}}", 9, "providers.main.secret.file"),
}


def bounded() -> None:
    """In the child: at most 2 GiB of address space (the interpreter needs a few hundred MiB)."""
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "a-fifo"
    os.mkfifo(path)
    return path


def too_large(tmp_path: Path) -> Path:
    path = tmp_path / "too-large"
    path.write_bytes(b"{" + b" " * (1024 * 1024))  # 1 MiB + 1 byte
    return path


# (what the key is, the path as it goes in the config, the words after it)
NOT_FILES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "dev-zero": lambda tmp: ("/dev/zero", "/dev/zero is a device, not a regular file"),
    "fifo": lambda tmp: (str(fifo(tmp)), f"{tmp / 'a-fifo'} is a FIFO, not a regular file"),
    "directory": lambda tmp: (str(tmp), f"{tmp} is a directory"),
    "too-large": lambda tmp: (
        str(too_large(tmp)),
        f"{tmp / 'too-large'} is larger than 1 MiB, more than such a file holds: is it the right file?",
    ),
}


def check_config(path: Path) -> str:
    """check-config's first stderr line, once it has ended with 1 (in seconds, not at the timeout)."""
    result = jwt_sidecar("check-config", str(path), preexec=bounded, timeout=30)
    assert "Traceback" not in result.stderr and (result.returncode, result.stdout) == (1, ""), result.stderr
    return result.stderr.splitlines()[0]


@pytest.mark.parametrize("what", list(NOT_FILES))
@pytest.mark.parametrize("source", list(SOURCES))
def test_a_key_file_that_is_no_file_to_read_is_one_error_naming_the_line(
    tmp_path: Path, source: str, what: str
) -> None:
    keys, line, where = SOURCES[source]
    key, words = NOT_FILES[what](tmp_path)
    path = write_config(tmp_path, keys=keys.format(key=key))
    assert check_config(path) == f"{path}:{line}: {where}: {words}"


@pytest.mark.parametrize("source", list(SOURCES))
def test_an_empty_file_name_is_refused_not_read_as_the_config_folder(tmp_path: Path, source: str) -> None:
    keys, line, where = SOURCES[source]
    path = write_config(tmp_path, keys=keys.format(key="''"))
    what = "a file that holds the secret" if source == "secret-file" else "a file (relative to the config's folder)"
    expected = f"{path}:{line}: {where}: must not be empty: the path of {what}"
    assert check_config(path) == expected
    assert_one_line(jwt_sidecar("run", "--config", str(path), preexec=bounded, timeout=30), expected)


def test_an_empty_secret_variable_name_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, keys="    algorithms: [HS256]\n    secret: {env: ''}")
    assert check_config(path) == (
        f"{path}:9: providers.main.secret.env: must not be empty: the name of an environment variable that "
        "holds the secret"
    )


def test_run_refuses_a_device_as_a_key_file_as_check_config_does(tmp_path: Path) -> None:
    path = write_config(tmp_path, keys="    pem_file: /dev/zero")
    assert_one_line(
        jwt_sidecar("run", "--config", str(path), preexec=bounded, timeout=30),
        f"{path}:8: providers.main.pem_file: /dev/zero is a device, not a regular file",
    )


@pytest.mark.parametrize("what", ["dev-zero", "fifo"])
def test_a_revocation_file_that_is_no_file_to_read_is_one_error_naming_the_line(tmp_path: Path, what: str) -> None:
    key, _ = NOT_FILES[what](tmp_path)
    path = write_config(tmp_path, extra=f"revocation: {{file: {key}}}\n")
    assert check_config(path) == (
        f"{path}:11: revocation.file: {key!r} is not a regular file (a FIFO, a device or a socket); "
        "name a YAML or JSON file"
    )


@pytest.mark.parametrize("what", ["dev-zero", "fifo", "directory"])
def test_a_config_file_that_is_no_file_to_read_is_one_line(tmp_path: Path, what: str) -> None:
    config, words = NOT_FILES[what](tmp_path)
    assert_one_line(
        jwt_sidecar("run", "--config", config, preexec=bounded, timeout=30),
        f"{config}: cannot read the config file: {words.removeprefix(config + ' ')}",
    )


def test_a_config_file_larger_than_4_mib_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(b"#" * (4 * 1024 * 1024 + 1))
    assert_one_line(
        jwt_sidecar("run", "--config", str(config), preexec=bounded, timeout=30),
        f"{config}: cannot read the config file: is larger than 4 MiB, more than such a file holds: is it the "
        "right file?",
    )
