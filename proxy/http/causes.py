"""A network failure in words: what an operator reads after "cannot fetch ..." or "cannot connect to ...".

Owns: `cause(error)`, the one phrase for why a connection or an HTTP exchange with a peer
failed ("connection refused", "timed out after 5s", "TLS: certificate verify failed:
self-signed certificate", "DNS: name not found"), for OSError errnos, timeouts,
ssl errors, socket.gaierror, and our own clients' errors (upstream.py's, fetch.py's); and
`peer(url)`, the `host:port` a URL connects to; `shown(url)`, a URL as logs may show it (a
password in it, `https://user:secret@host/`, or a query value, `?api_key=…`, is never
written). Never just an exception class: a failure it does not know is "unexpected error
(ClassName: message)".
Does not own: deciding what a failure means for a request (forward.py) or a key source
(keys.py), or logging it.
"""

from __future__ import annotations

import errno
import socket
import ssl
from urllib.parse import urlsplit

__all__ = ["Worded", "cause", "peer", "shown"]

# The errnos a connection meets, in the words `strerror` uses minus its capitals and jargon.
_ERRNOS: dict[int, str] = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by the peer",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed by the peer while sending",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EHOSTDOWN: "host down",
    errno.ENETDOWN: "network down",
    errno.EADDRNOTAVAIL: "address not available",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted (a firewall?)",
    errno.EMFILE: "too many open files in this process",
    errno.ENFILE: "too many open files on this host",
    errno.ENOBUFS: "no buffer space",
}

_DNS: dict[int, str] = {
    socket.EAI_NONAME: "DNS: name not found",
    socket.EAI_AGAIN: "DNS: temporary failure (try again)",
    socket.EAI_FAIL: "DNS: the name server failed",
}
for _name in ("EAI_NODATA", "EAI_ADDRFAMILY"):  # glibc only
    if hasattr(socket, _name):
        _DNS[getattr(socket, _name)] = "DNS: the name has no address"


def cause(error: BaseException, *, timeout: float | None = None) -> str:
    """Why `error` happened, in words; `timeout` (seconds) completes "timed out after ...".

    Follows an OSError's `__cause__` to the most telling one.
    """
    # Builtin TimeoutError is an OSError: first.
    if isinstance(error, TimeoutError):
        return f"timed out after {timeout:g}s" if timeout is not None else "timed out"
    if isinstance(error, ssl.SSLCertVerificationError):
        detail = error.verify_message or error.reason
        return "TLS: certificate verify failed" + (f": {detail}" if detail else "")
    if isinstance(error, ssl.SSLError):
        reason = (error.reason or "").replace("_", " ").lower()
        return "TLS: " + (f"handshake failed ({reason})" if reason else "handshake failed")
    if isinstance(error, socket.gaierror):
        return _DNS.get(error.errno or 0, f"DNS: {_lower(error.strerror) or 'lookup failed'}")
    if isinstance(error, OSError):
        if error.errno in _ERRNOS:
            return _ERRNOS[error.errno]
        if error.strerror:
            return _lower(error.strerror)
        if error.__cause__ is not None:
            return cause(error.__cause__, timeout=timeout)
    if isinstance(error, Worded) and str(error):
        return str(error)  # our own client's errors are written as operator text
    text = str(error)
    return (
        f"unexpected error ({type(error).__name__}: {text})" if text else f"unexpected error ({type(error).__name__})"
    )


class Worded(Exception):
    """An error of ours whose text is already the operator's words (upstream.py's errors derive
    from it), so `cause` repeats it instead of naming its class; the client's modules import
    this one, never the other way round."""


def peer(url: str) -> str:
    """`host:port` of an http(s) URL (the scheme's port when none is given); the URL when it has no host."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return url
    if not parts.hostname:
        return url
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}" if port else host


def shown(url: str) -> str:
    """`url` as logs may show it: no credentials (`https://user:secret@host/x` is
    `https://***@host/x`), no query values (some issuers put an API key in a JWKS URL:
    `?api_key=***`; a parameter's name is kept, an item without `=` is `***`) and no fragment.
    A URL without a scheme (a config mistake an error repeats) is read the same way."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, tail = _authority(rest)
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    elif "@" in tail and not _host_and_port(authority):
        # No userinfo holds '/', '?' or '#' (RFC 3986 §3.2.1), but a password in a config may
        # (a base64 one): the authority then seems to end inside it, and what is left of it is
        # no host[:port] (`u:Ab`, `:Ab`). Everything before the last '@' is hidden.
        authority, tail = _authority(tail[tail.rindex("@") + 1 :])
        authority = "***@" + authority
    tail, hashed, fragment = tail.partition("#")
    path, asked, query = tail.partition("?")
    if query:
        path += "?" + "&".join(_hidden(item) for item in query.split("&"))
    elif asked:
        path += "?"
    return f"{scheme}{sep}{authority}{path}{hashed}{'***' if fragment else ''}"


def _authority(rest: str) -> tuple[str, str]:
    """`rest` (a URL after its `scheme://`) cut where its authority ends: at the first '/', '?' or '#'."""
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    return rest[:end], rest[end:]


def _host_and_port(authority: str) -> bool:
    """Whether `authority` (with no '@') is a host, and a port of digits if any; or none at all
    (`unix:///path`)."""
    if not authority:
        return True
    host, _, port = (
        authority.rpartition("]")[2].partition(":") if authority.startswith("[") else authority.partition(":")
    )
    return bool(authority.startswith("[") or host) and (not port or (port.isascii() and port.isdigit()))


def _hidden(item: str) -> str:
    name, equals, value = item.partition("=")
    if not equals:
        return "***" if item else item
    return f"{name}=***" if value else item


def _lower(text: str | None) -> str:
    """`strerror` starts with a capital ("Connection refused"); a phrase inside a line does not."""
    if not text:
        return ""
    return text[0].lower() + text[1:] if not text[:2].isupper() else text
