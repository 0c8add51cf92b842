"""base/namedfile.py: a named file is read whole only when it is a regular file within the bound."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from proxy.auth.revocationstore import read_rules_file
from proxy.base.errors import ConfigError
from proxy.base.namedfile import NamedFileError, read_named


def test_a_regular_file_is_read_whole_up_to_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_named(path, 100) == b"x" * 100
    with pytest.raises(NamedFileError) as caught:
        read_named(path, 99)
    assert str(caught.value) == "is larger than 99 bytes, more than such a file holds: is it the right file?"
    assert not caught.value.cannot_read


def test_what_is_not_a_regular_file_is_refused_without_reading_or_waiting(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")  # no writer: a plain open would wait for one forever
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        for path, words in [
            ("/dev/zero", "is a device, not a regular file"),
            (tmp_path / "fifo", "is a FIFO, not a regular file"),
            (tmp_path, "is a directory"),
            (tmp_path / "sock", "cannot read"),  # a socket cannot even be opened
        ]:
            with pytest.raises(NamedFileError) as caught:
                read_named(path, 1 << 20)
            assert str(caught.value) == words or (words == "cannot read" and caught.value.cannot_read), path


def test_the_systems_reason_is_its_own_words(tmp_path: Path) -> None:
    with pytest.raises(NamedFileError) as caught:
        read_named(tmp_path / "missing", 10)
    assert (str(caught.value), caught.value.errno) == ("No such file or directory", errno.ENOENT)
    with pytest.raises(NamedFileError) as caught:
        read_named(str(tmp_path / "a\0b"), 10)
    assert str(caught.value) == "holds a NUL character, which no file name has"


def test_a_revocation_file_replaced_by_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    path = tmp_path / "revoked.yaml"
    os.mkfifo(path)
    with pytest.raises(ConfigError) as caught:
        read_rules_file(str(path), 0.0)
    assert [str(issue) for issue in caught.value.issues] == [
        f"{path}: cannot read the revocation file: is a FIFO, not a regular file"
    ]
    assert read_rules_file(str(tmp_path / "missing.yaml"), 0.0) is None  # missing: no list yet, as before
