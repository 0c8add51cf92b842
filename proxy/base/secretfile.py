"""A shared HMAC secret as a file holds it: how it is read, and how long it must be.

Owns: `SECRET_ENCODINGS` (how a provider's `secret: {file:, encoding:}` may be written),
`read_secret` (the one way such a file is read, by the proxy's config and by `token mint`),
`MIN_HMAC_BYTES` (RFC 7518 §3.2: an HMAC key at least as long as its hash's output), and
`KeyToolError`, the error whose message is the operator's words as it stands.
Does not own: whether a secret is plausibly random (secretcheck.py), making secrets or
minting tokens (tools/keygen.py), or what a provider does with its secret (config/builder.py).

Key material sits at the base so the config builder and the operator's key tool share these
without the builder importing the tool.
"""

from __future__ import annotations

import base64
import binascii

__all__ = ["MIN_HMAC_BYTES", "SECRET_ENCODINGS", "KeyToolError", "read_secret"]

SECRET_ENCODINGS: tuple[str, ...] = ("utf-8", "base64", "base64url")
"""The encodings a provider's `secret:` accepts (config/builder.py), so a secret file means one thing."""

MIN_HMAC_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 §3.2


class KeyToolError(Exception):
    """A key or token operation that cannot be done; the message is shown to the operator."""


def read_secret(data: bytes, encoding: str) -> bytes:
    """The HMAC secret a secret file holds, read as a provider's `secret: {file:, encoding:}` reads it."""
    if encoding not in SECRET_ENCODINGS:
        raise KeyToolError(f"{encoding!r} is not a secret encoding; choose one of {', '.join(SECRET_ENCODINGS)}")
    # A trailing newline from `echo > file` or a Kubernetes Secret is not part of the secret.
    data = data.rstrip(b"\r\n")
    if encoding != "utf-8":
        text = data.rstrip(b"=")
        try:
            data = base64.b64decode(
                text + b"=" * (-len(text) % 4), altchars=b"-_" if encoding == "base64url" else None, validate=True
            )
        except (binascii.Error, ValueError):
            raise KeyToolError(f"the secret is not valid {encoding}") from None
    if not data:
        raise KeyToolError("the secret is empty")
    return data
