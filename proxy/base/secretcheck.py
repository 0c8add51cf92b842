"""Is a shared HMAC secret plausibly random? Refuse placeholders and obviously uniform secrets.

Owns: the rules that judge a `secret:` (after its encoding is decoded) before a provider may
use it, and the operator text that names the rule a secret broke. Does not own: reading the
secret (secretfile.read_secret, for config/builder.py), its minimum length per algorithm (secretfile.py,
RFC 7518 §3.2), or making secrets (tools/keygen.py, which never writes one these rules refuse).

A shipped example such as `REPLACE-ME-…` or `changeme` verifies tokens as well as a real key,
and whoever has read the example can sign tokens for every deployment that kept it. These
rules catch what a person types or copies, not weak randomness: a secret that passes is not
proven strong, but one that fails is certainly not random. Each rule is calibrated so that
random bytes (32 to 128 of them) pass, raw or as hex, base64 or base64url text, with a
probability of a false refusal below about 1e-5 per secret even for the weakest of those
forms (hex text); `keys generate` never writes one that fails (tests/unit/base/test_secretcheck.py).
"""

from __future__ import annotations

import math
import re
from collections import Counter

__all__ = ["weakness"]

# Words found in placeholders and default secrets. Only words of five or more characters:
# random base64 text contains short letter runs by chance (a given 4-letter word turns up in
# about one 86-character secret in 10,000 when case is ignored). A word matches as a person
# writes it: all lower case, all upper case or capitalised (so CamelCase `ChangeMe` and
# `YourSecretHere` match), which random text rarely does; words of six or more also match in
# leetspeak (`p4ssw0rd`, `S3CR3T`). All together they refuse about one random 86-character
# base64 secret in a million, and `keys generate` draws again when they do.
_WORDS_LEET = (
    "change",
    "replace",
    "placeholder",
    "example",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "insecure",
    "default",
    "sample",
    "letmein",
    "qwerty",
    "asdfgh",
    "hunter2",
)
_WORDS_PLAIN = ("dummy", "fixme", "your-", "your_", "xxxxx")
_LEET = {"a": "4@", "e": "3", "i": "1", "l": "1", "o": "0", "s": "5$", "t": "7", "b": "8"}


def _word_pattern(word: str, leet: bool) -> str:
    forms = {word.lower(), word.upper(), word[:1].upper() + word[1:].lower()}
    return "|".join(
        "".join(f"[{re.escape(c + (_LEET.get(c.lower(), '') if leet else ''))}]" for c in form)
        for form in sorted(forms)
    )


_PLACEHOLDER = re.compile(
    "|".join([_word_pattern(w, True) for w in _WORDS_LEET] + [_word_pattern(w, False) for w in _WORDS_PLAIN]).encode()
)

# A PEM block, an OpenSSH public key or a JWK pasted where a shared secret belongs. An
# issuer's public key used as an HMAC secret is the algorithm-confusion attack set up by hand
# (RFC 8725 §2.1): anyone can fetch it and sign.
_KEY_MATERIAL = re.compile(
    rb"-----BEGIN [A-Z0-9 ]+-----|\A\s*(?:ssh-(?:rsa|ed25519|dss)|ecdsa-sha2-nistp\d+) |"
    rb'\A\s*\{.*"kty"\s*:',
    re.DOTALL,
)

_RUN = 8
"""A run of this many identical or consecutive bytes (aaaaaaaa, abcdefgh, 87654321) is refused:
in hex text of 32 random bytes one turns up about once in 10^7 secrets."""
_JUDGED = 512
"""Only the first bytes are judged: enough for every rule, and a huge secret file stays cheap."""
_STATISTICS_FROM = 24
"""Shorter secrets are too short to judge by their statistics (and too short for any HS
algorithm: config/builder.py says so separately)."""


def weakness(secret: bytes, *, written: bytes | None = None) -> str | None:
    """Why `secret` cannot be a random key (naming the rule), or None when no rule refuses it.

    `written` is the text the secret was decoded from (base64 or base64url), judged as well:
    `REPLACE-ME-REPLACE-ME-…` decodes to bytes that look random enough, and the placeholder is
    in the text. The answer never quotes the secret, except for the placeholder word it contains.
    """
    if written is not None and written.rstrip(b"\r\n") != secret:
        found = _weakness(written.rstrip(b"\r\n"))
        if found is not None:
            return f"{found}, in the text as written"
    return _weakness(secret)


def _weakness(secret: bytes) -> str | None:
    sample = secret[:_JUDGED]
    n = len(sample)
    key = _KEY_MATERIAL.search(sample)
    if key:
        # The PEM label or the OpenSSH key type, never more: a JWK's other members may be secret.
        what = repr(key.group().strip().decode()) if not key.group().lstrip().startswith(b"{") else "a JWK"
        return (
            f"key material: it holds {what}, a key or certificate, not a shared secret; a public key "
            "is public (give it as `pem_file`), and HMAC with one is forgeable by anyone"
        )
    found = _PLACEHOLDER.search(sample)
    if found:
        return f"placeholder word: it contains {found.group().decode()!r}, as example and default secrets do"
    unit = _repeated_unit(sample)
    if unit:
        return f"repeated pattern: most of it is one {unit}-byte pattern repeated"
    run = _longest_run(sample)
    if run >= _RUN:
        return f"run: it has {run} identical or consecutive characters in a row (like aaaa… or abcd…)"
    if n < _STATISTICS_FROM:
        return None
    counts = Counter(sample)
    # Hex text (16 symbols) is the least varied form a random secret takes: 32 random hex
    # characters use 7 or fewer distinct symbols about once in 3*10^7 secrets, 5 or fewer about
    # once in 3*10^12; 48 of them use 7 or fewer about once in 10^13.
    need = 8 if n >= 48 else 6
    if len(counts) < need:
        return f"few distinct bytes: it uses only {len(counts)} different characters (a random one uses {need} or more)"
    bits = -sum(c / n * math.log2(c / n) for c in counts.values())
    floor = _entropy_floor(n)
    if bits < floor:
        return (
            f"low entropy: {bits:.2f} bits per character by character frequency, below the "
            f"{floor:.2f} that even random hex text of this length reaches"
        )
    return None


def _entropy_floor(n: int) -> float:
    # Random hex text has an empirical Shannon entropy of 3.61 ± 0.13 bits per character at 32
    # characters, 3.72 ± 0.10 at 43 and 3.82 ± 0.07 at 64 (the mean rises towards 4 with
    # length): the floor sits more than 8 standard deviations below it. Base64 text and raw
    # bytes sit well above hex.
    return min(3.0, 2.5 + (n - 32) / 32)


def _repeated_unit(s: bytes) -> int:
    """The length of a unit repeated back to back over at least half of `s` (0 when none).

    Two copies at least. By chance, in random text over an alphabet of A symbols, this needs
    about n/4 bytes to repeat exactly (A**-(n/4): 16**-8 for 32 hex characters).
    """
    n = len(s)
    half = (n + 1) // 2
    whole = int.from_bytes(s, "big")
    for p in range(1, n // 2 + 1):
        # Positions where s[i] == s[i + p]: a stretch of r of them is a repeat covering r + p
        # bytes. As integers, s[:-p] is `whole` shifted right by p bytes, s[p:] its low bytes.
        need = max(p, half - p)
        diff = ((whole >> (8 * p)) ^ (whole & ((1 << (8 * (n - p))) - 1))).to_bytes(n - p, "big")
        if b"\0" * need in diff:
            return p
    return 0


def _longest_run(s: bytes) -> int:
    """The longest run of bytes that step by 0, +1 or -1 from one to the next."""
    if len(s) < 2:
        return len(s)
    best = 1
    for step in _STEPS:
        # Where s[i + 1] == s[i] + step the XOR is a zero byte: a run of k zeros is k + 1 bytes.
        diff = (int.from_bytes(s[1:], "big") ^ int.from_bytes(s[:-1].translate(step), "big")).to_bytes(
            len(s) - 1, "big"
        )
        best = max(best, 1 + max(map(len, _ZEROS.findall(diff)), default=0))
    return best


_STEPS = (bytes(range(256)), bytes((b + 1) & 0xFF for b in range(256)), bytes((b - 1) & 0xFF for b in range(256)))
_ZEROS = re.compile(b"\0+")
