"""A file the operator names (the config, a key file, a secret file, the revocation list), read
whole: only a regular file, and never more than a bound.

Owns: `read_named` (the one way such a file is read: opened without blocking, refused unless
it is a regular file, read up to a bound and refused past it), `NamedFileError` (why, in the
operator's words, for a message that names the file and its config line) and the bounds,
each with its reason. Does not own: what a file must hold (config/builder.py, base/secretfile.py,
auth/revocationstore.py read that), or where a relative name points (the config's folder:
config/builder.py).

Why: `Path.read_bytes()` on `/dev/zero` or `/dev/urandom` never ends (memory grows until
the kernel kills the process), on a FIFO it waits for a writer that may never come, and on a
directory it says "Is a directory" with no hint of the mistake (an empty name reads as the
config's own folder). `check-config`, start and reload must end with one error naming the line.
"""

from __future__ import annotations

import os
import stat

__all__ = ["CONFIG_BYTES", "KEY_FILE_BYTES", "RULES_FILE_BYTES", "NamedFileError", "read_named"]

KIB, MIB = 1024, 1024 * 1024

CONFIG_BYTES = 4 * MIB
"""A config file: YAML read whole and parsed into memory. Real ones are a few KiB (a
thousand routes are ~100 KiB), so 4 MiB is far past any real one and bounds what a
wrong name (a log, a core file) costs before the error."""
KEY_FILE_BYTES = 1 * MIB
"""A `jwks_file`, a `pem_file` or a secret file (and `token mint`'s key files): real ones are
a few KiB; the same bound as a fetched JWK Set (auth/keys.py's `MAX_DOCUMENT_BYTES`)."""
RULES_FILE_BYTES = 64 * MIB
"""The revocation file: one rule is ~60-100 bytes of YAML, so ~700,000 rules; a list that
long belongs in Redis (`revocation: {redis: ...}`), which is read in pages."""


class NamedFileError(Exception):
    """A named file that cannot be read as one: the message is the operator's words without
    the path, which the caller puts first. `errno` set: the system refused to open or read
    it, and the message is its reason ("No such file or directory", "Permission denied");
    None: it was read no further than its name, type or size ("is a directory", "is a FIFO,
    not a regular file", "is larger than 1 MiB, ...")."""

    def __init__(self, words: str, errno: int | None = None) -> None:
        super().__init__(words)
        self.errno = errno

    @property
    def cannot_read(self) -> bool:
        return self.errno is not None


def read_named(path: str | os.PathLike[str], limit: int) -> bytes:
    """The whole content of the regular file at `path`, at most `limit` bytes; `NamedFileError` otherwise.

    Opened with O_NONBLOCK, so that a FIFO is refused rather than waited on (a regular file
    ignores the flag); the type is checked on the open descriptor (`fstat`), so it is the
    file read that was checked; one byte more than `limit` is read, never more, because a
    size from `stat` says nothing for /proc files or a file still being written."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise NamedFileError(_why(error), error.errno or 0) from None
    except ValueError:  # "embedded null byte": a name no file has
        raise NamedFileError("holds a NUL character, which no file name has") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise NamedFileError("is a directory")
        if not stat.S_ISREG(mode):
            raise NamedFileError(f"is a {_kind(mode)}, not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, 1 * MIB))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise NamedFileError(f"is larger than {_size(limit)}, more than such a file holds: is it the right file?")
        return b"".join(chunks)
    except OSError as error:
        raise NamedFileError(_why(error), error.errno or 0) from None
    finally:
        os.close(fd)


def _why(error: OSError) -> str:
    """`No such file or directory`, not `[Errno 2] No such file or directory: 'x'`."""
    return error.strerror or str(error)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def _size(limit: int) -> str:
    return (
        f"{limit // MIB} MiB" if limit % MIB == 0 else f"{limit // KIB} KiB" if limit % KIB == 0 else f"{limit} bytes"
    )
