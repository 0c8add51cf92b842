"""config.yaml → frozen, typed settings, checked once, with every mistake reported at once.

Owns: the meaning of every config key and the checks on its value (the settings themselves,
their defaults and the docstrings the README's reference is written from are settings.py's
dataclasses, re-exported here), cross-checks between keys (route → provider, algorithm → key
type), compiled regexes, and reading the key material a provider names on disk or in the
environment. Does not own: YAML line tracking (yamlsource.py), the route table read as a
whole (routecheck.py, which `parse` runs), fetching remote keys (keys.py), or anything that
runs per request.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ..base import oplog
from ..base.errors import ConfigError, ConfigIssue
from ..base.jwk import public_jwk
from ..base.jwks import (
    ASYMMETRIC_ALGORITHMS,
    FAMILIES,
    SUPPORTED_ALGORITHMS,
    SYMMETRIC_ALGORITHMS,
    KeySet,
    fits,
)
from ..base.jwks import weakness as weakness_of_key
from ..base.namedfile import CONFIG_BYTES, KEY_FILE_BYTES, NamedFileError, read_named
from ..base.secretcheck import weakness
from ..base.secretfile import MIN_HMAC_BYTES, KeyToolError, read_secret
from ..http.causes import shown
from . import routecheck, settings
from .settings import (
    BEARER,
    ORIGIN,
    ClaimHeader,
    ClaimRule,
    CorsSettings,
    HeaderMap,
    Listen,
    Provider,
    RedisStore,
    RemoteJwks,
    RevocationSettings,
    Route,
    RouteAuth,
    RouteMatch,
    ScopeRule,
    Settings,
    StaticKeys,
    StripSettings,
    TokenCacheSettings,
    TokenSource,
    Upstream,
    WebSocketSettings,
)
from .yamlsource import Issues, Section, closest, describe, did_you_mean, list_example, load_yaml

# The settings are re-exported: callers name them as config.X, as before settings.py existed.
__all__ = [*settings.__all__, "load", "parse"]  # noqa: PLE0604 - settings.__all__ is a list of str

CLAIM_OPERATORS = ("equals", "one_of", "contains", "matches", "present")
KEY_SOURCES = ("jwks", "discovery", "jwks_file", "pem_file", "secret")
_MATCH_KEYS = ("path_prefix", "path_exact", "path_regex")
_ES_CURVES = ("secp256r1", "secp384r1", "secp521r1")
"""cryptography's names of the curves ES256, ES384 and ES512 are defined on (P-256, P-384, P-521)."""


def load(path: str | os.PathLike[str]) -> Settings:
    """Read and check a config file; raises `ConfigError` listing every problem."""
    file = os.fspath(path)
    try:
        # Bounded, and only a regular file: `--config /dev/zero` is an error, not a hang.
        text = read_named(file, CONFIG_BYTES).decode("utf-8")
    except NamedFileError as error:
        # "no such file or directory" (not "[Errno 2] ..."), "is a device, not a regular file"
        why = str(error).lower() if error.cannot_read else str(error)
        raise ConfigError([ConfigIssue(file, None, "", f"cannot read the config file: {why}")]) from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            [ConfigIssue(file, None, "", f"cannot read the config file: not UTF-8 text (byte {error.start})")]
        ) from None
    return parse(text, file=file, base_dir=Path(file).resolve().parent)


_YAML_KINDS = ((list, "list"), (str, "string"), (bool, "boolean"), (int, "number"), (float, "number"))


def parse(text: str, *, file: str = "<string>", base_dir: Path | None = None) -> Settings:
    document = load_yaml(text, file)
    issues = Issues(file)
    if not isinstance(document, dict):
        # Say what the file is instead: an empty file, or a list pasted where a mapping belongs.
        what = (
            "it is empty"
            if document is None
            else f"it is a YAML {next((k for t, k in _YAML_KINDS if isinstance(document, t)), 'value')}, not a mapping"
        )
        issues.add(1, "", f"the config must be a YAML mapping with a `providers` key; {what}")
        issues.raise_if_any()
    root = Section(issues, document, "")
    builder = _Builder(issues, base_dir or Path.cwd())
    settings = builder.settings(root, file)
    routes_line = root.line_of("routes") if root.has("routes") else None
    warnings = routecheck.check(settings.routes, builder.route_places, issues, table_line=routes_line)
    issues.raise_if_any()
    return dataclasses.replace(settings, warnings=tuple(warnings)) if warnings else settings


class _Builder:
    def __init__(self, issues: Issues, base_dir: Path) -> None:
        self.issues = issues
        self.base_dir = base_dir

    def settings(self, root: Section, file: str) -> Settings:
        providers: dict[str, Provider] = {}
        provider_section = root.section(
            "providers", required=True, example="{main: {issuer: URL, audiences: [NAME], jwks: {url: URL}}}"
        )
        # Routes are checked against every provider named, even one with its own mistakes,
        # so a typo in a provider is not reported a second time as an unknown reference.
        # Without a readable `providers` mapping (none, or empty) its own error says so, and
        # the set is empty: no route is then told that its provider is unknown as well.
        self.provider_names = set(map(str, provider_section.data)) if provider_section else set()
        if provider_section is not None:
            for name in list(provider_section.keys()):
                sub = provider_section.section(str(name))
                if sub is not None:
                    provider = self.provider(str(name), sub)
                    if provider is not None:
                        providers[str(name)] = provider
            if not provider_section.data:
                provider_section.error(None, "at least one provider is required")
        # Before the routes: a route's `websocket` keys default to the top-level ones.
        websocket = root.section("websocket", example=_WEBSOCKET_EXAMPLE)
        self.websocket_defaults = self.websocket(websocket, WebSocketSettings())
        # And so do a route's `upstream` keys but `url` (its timeouts and max_body): a route
        # that names its own URL must not quietly get a larger body limit than the config says.
        upstream_section = root.section("upstream", example=_UPSTREAM_EXAMPLE, meant=_url_mapping)
        upstream = self.upstream(upstream_section) if upstream_section is not None else None
        self.upstream_defaults = upstream or Upstream()
        # And a route's `cors`: the top-level policy unless the route sets its own (or false).
        self.cors_default = self.cors_policy(root)
        routes: list[Route] = []
        self.route_places: list[tuple[str, int | None]] = []  # each route's dotted path and line
        for i, item, path, line in root.items("routes", "routes", "- {match: {path_prefix: /}, auth: none}"):
            route = self.route(i, Section(self.issues, item, path, line), item, providers)
            if route is None:
                continue
            self.route_places.append((path, line))
            if route.name == "(none)":
                self.issues.add(line, f"{path}.name", "'(none)' is reserved for requests that match no route")
            elif any(r.name == route.name for r in routes):
                # Names label metrics and logs: two routes sharing one would blur both.
                self.issues.add(
                    line, f"{path}.name", f"{route.name!r} is the name of an earlier route; names must be unique"
                )
            routes.append(route)
        cache = self.token_cache(
            root.section("token_cache", example="{enabled: true, max_entries: 10000, max_ttl: 5m}")
        )
        max_token_bytes = root.integer("max_token_bytes", 8192, minimum=256)
        defaults = Settings(source=file, providers={})
        listen = _listen(root, "listen", defaults.listen)
        admin = _listen(root, "admin", defaults.admin)
        strip = self.strip(root.section("strip_headers", example="{prefixes: [X-User-], names: [X-Internal-Role]}"))
        realm = root.string("realm", defaults.realm)
        drain = root.duration("drain_timeout", defaults.drain_timeout)
        drain_delay = root.duration("drain_delay", defaults.drain_delay)
        access_log = root.boolean("access_log", defaults.access_log)
        workers = root.integer("workers", defaults.workers, minimum=1)
        max_connections = root.integer("max_connections", None, minimum=1)  # type: ignore[arg-type]
        header_timeout = root.duration("header_timeout", defaults.header_timeout)
        if header_timeout <= 0:
            root.error("header_timeout", "must be more than 0s")
        keep_alive_timeout = root.duration("keep_alive_timeout", defaults.keep_alive_timeout)
        if keep_alive_timeout <= 0:
            root.error("keep_alive_timeout", "must be more than 0s")
        log_format = _choice(root, "log_format", defaults.log_format, oplog.FORMATS)
        log_level = _choice(root, "log_level", defaults.log_level, oplog.LEVELS, upper=True)
        revocation = self.revocation(root)
        root.done()
        if listen == admin and listen is not None:
            root.error("admin", f"{admin} is also `listen`; the admin endpoints need their own port")
        elif listen is not None and admin is not None and _overlap(listen, admin):
            # 0.0.0.0:8080 holds 127.0.0.1:8080 too: the second bind would fail at start.
            root.error(
                "admin",
                f"{admin} and `listen` {listen} share port {admin.port} on the same address "
                "(0.0.0.0 and :: are every address); the admin endpoints need their own port",
            )
        return Settings(
            source=file,
            providers=MappingProxyType(providers),
            routes=tuple(routes),
            token_cache=cache,
            max_token_bytes=max_token_bytes,
            listen=listen or defaults.listen,
            admin=admin or defaults.admin,
            upstream=upstream or defaults.upstream,
            realm=realm,
            strip=strip,
            drain_timeout=drain,
            drain_delay=drain_delay,
            access_log=access_log,
            workers=workers,
            max_connections=max_connections,
            header_timeout=header_timeout,
            keep_alive_timeout=keep_alive_timeout,
            websocket=self.websocket_defaults,
            log_format=log_format,
            log_level=log_level,
            cors=self.cors_default,
            revocation=revocation,
        )

    # -- providers ------------------------------------------------------------------------
    def provider(self, name: str, s: Section) -> Provider | None:
        issuers = s.strings("issuer", required=True)
        audiences = s.string_list("audiences", "audiences", "[api://orders]", required=True)
        leeway = s.duration("leeway", 30.0)
        required = s.string_list("required_claims", "claim names", "[exp, sub]", ("exp",))
        max_age = s.duration("max_token_age", None)
        typ = s.string("typ")
        sources = [k for k in s.keys() if k in KEY_SOURCES]  # noqa: SIM118 - a Section, not a dict: no __iter__
        keys: RemoteJwks | StaticKeys | None = None
        if not sources:
            s.missing(KEY_SOURCES, f"needs a key source: one of {', '.join(KEY_SOURCES)}")
        elif len(sources) > 1:
            # They are alternatives, not parts of one source: one error for the choice, and
            # none for each of them (reading neither, they are still known keys here).
            for k in sources:
                s.raw(k)
            named = " and ".join(sorted(sources, key=KEY_SOURCES.index))
            s.error(
                sources[-1],
                f"{named} are mutually exclusive: a provider has exactly one key source "
                f"({', '.join(KEY_SOURCES)}); keep one of them",
            )
        else:
            keys = self.key_source(sources[0], s, issuers)
        default_algs = self._default_algorithms(keys)
        algorithms = self.algorithms(s, default_algs, keys)
        token_sources = self.token_sources(s, "token_sources") or (BEARER,)
        headers = self.header_map(s.section("headers", example=_HEADERS_EXAMPLE)) or HeaderMap()
        revocation = s.boolean("revocation", True)
        s.done()
        if keys is None or not issuers or not audiences:
            return None
        return Provider(
            name=name,
            issuers=issuers,
            audiences=audiences,
            algorithms=algorithms,
            keys=keys,
            leeway=leeway,
            required_claims=required,
            max_token_age=max_age,
            typ=typ,
            token_sources=token_sources,
            headers=headers,
            revocation=revocation,
        )

    def algorithms(self, s: Section, default: tuple[str, ...], keys: RemoteJwks | StaticKeys | None) -> tuple[str, ...]:
        algorithms = s.string_list("algorithms", "algorithms", "[RS256, ES256]", default)
        for alg in algorithms:
            if alg.lower() == "none":
                s.error("algorithms", "'none' is never allowed: unsigned tokens are refused (RFC 8725 §3.1)")
            elif alg not in FAMILIES:
                s.error("algorithms", f"{alg!r} is not supported; choose from {', '.join(SUPPORTED_ALGORITHMS)}")
        if keys is None:
            return algorithms
        if isinstance(keys, StaticKeys) and keys.kind == "secret":
            wrong = [a for a in algorithms if a not in SYMMETRIC_ALGORITHMS]
            if wrong:
                s.error(
                    "algorithms",
                    f"{', '.join(wrong)} cannot be used with a shared secret; "
                    f"a secret verifies only {', '.join(SYMMETRIC_ALGORITHMS)}",
                )
            self._check_secret_length(s, keys, algorithms, chosen=s.has("algorithms"))
        else:
            wrong = [a for a in algorithms if a in SYMMETRIC_ALGORITHMS]
            if wrong:
                s.error(
                    "algorithms",
                    f"{', '.join(wrong)} needs a shared `secret`; this provider's keys are "
                    "asymmetric, and HMAC with a public key is the algorithm-confusion attack (RFC 8725 §2.1)",
                )
        if isinstance(keys, StaticKeys) and keys.kind == "jwks_file":
            # Checked against the final allow-list: a file whose keys fit none of the
            # algorithms would give a provider that is never ready.
            usable = KeySet.from_jwks(keys.jwks, algorithms)
            if not usable.size:
                if usable.skipped:
                    reasons = "; ".join(f"{k.kid or '(no kid)'}: {k.reason}" for k in usable.skipped)
                    s.error("jwks_file", f"holds no key usable with {', '.join(algorithms)} ({reasons})")
                else:
                    s.error("jwks_file", 'holds no keys: its "keys" array is empty')
        if isinstance(keys, StaticKeys) and keys.kind == "pem_file":
            kty, crv = keys.jwks["keys"][0]["kty"], keys.jwks["keys"][0].get("crv")
            unfit = [a for a in algorithms if a in ASYMMETRIC_ALGORITHMS and not fits(a, kty, crv)]
            if unfit:
                s.error(
                    "algorithms",
                    f"{', '.join(unfit)} do not fit the PEM key (kty {kty}" + (f", curve {crv}" if crv else "") + ")",
                )
        return algorithms

    def _check_secret_length(self, s: Section, keys: StaticKeys, algorithms: tuple[str, ...], *, chosen: bool) -> None:
        """One error for a secret too short for some of the algorithms, with the way out.

        A 32-byte secret (the usual `openssl rand`) is right for HS256 but too short for the
        default HS384 and HS512: the fix is `algorithms: [HS256]`, not another error per alg.
        """
        size = len(base64.urlsafe_b64decode(keys.jwks["keys"][0]["k"] + "=="))
        short = [a for a in algorithms if size < MIN_HMAC_BYTES.get(a, 0)]
        if not short:
            return
        fit = [a for a in algorithms if a in MIN_HMAC_BYTES and a not in short]  # an RS256 here has its own error
        needs = ", ".join(f"{a} needs at least {MIN_HMAC_BYTES[a]}" for a in short)
        if not fit:
            fix = "make a longer one with `jwt-sidecar keys generate --alg HS256`"
        elif chosen:
            fix = f"drop {' and '.join(short)} (`algorithms: [{', '.join(fit)}]`) or use a longer secret"
        else:
            fix = (
                f"the default algorithms are {', '.join(algorithms)}: set `algorithms: [{', '.join(fit)}]` "
                "or use a longer secret"
            )
        s.error("secret", f"is {size} bytes; {needs} (RFC 7518 §3.2): {fix}")

    @staticmethod
    def _default_algorithms(keys: RemoteJwks | StaticKeys | None) -> tuple[str, ...]:
        if isinstance(keys, StaticKeys) and keys.kind == "secret":
            return ("HS256", "HS384", "HS512")
        if isinstance(keys, StaticKeys) and keys.kind == "pem_file":
            jwk = keys.jwks["keys"][0]
            return tuple(a for a in ASYMMETRIC_ALGORITHMS if fits(a, jwk["kty"], jwk.get("crv")))
        return ASYMMETRIC_ALGORITHMS

    def key_source(self, kind: str, s: Section, issuers: tuple[str, ...]) -> RemoteJwks | StaticKeys | None:
        if kind == "jwks":
            sub = s.section(
                "jwks", required=True, example="{url: https://login.example.com/jwks.json}", meant=_url_mapping
            )
            return self.remote(sub, discovery=False) if sub is not None else None
        if kind == "discovery":
            return self.discovery(s, issuers)
        if kind == "jwks_file":
            return self.jwks_file(s)
        if kind == "pem_file":
            return self.pem_file(s)
        return self.secret(s)

    def remote(self, sub: Section, *, discovery: bool, derived: str | None = None) -> RemoteJwks | None:
        url = discovery_url = None
        if not discovery:
            url = _url(sub, "url", required=True)
        elif sub.has("url") or derived is None:
            discovery_url = _url(sub, "url", required=True)
        else:
            discovery_url = derived
        defaults = RemoteJwks()
        remote = RemoteJwks(
            url=url,
            discovery_url=discovery_url,
            cache_ttl=sub.duration("cache_ttl", defaults.cache_ttl),
            min_refresh_interval=sub.duration("min_refresh_interval", defaults.min_refresh_interval),
            timeout=sub.duration("timeout", defaults.timeout),
        )
        sub.done()
        if remote.timeout <= 0:
            sub.error("timeout", "must be more than 0s")
        if remote.cache_ttl < 1:
            sub.error("cache_ttl", "must be at least 1s")
        if remote.min_refresh_interval < 1:
            # Zero would let a flood of random kids turn into a flood of fetches.
            sub.error("min_refresh_interval", "must be at least 1s")
        return remote if (url or discovery_url) else None

    def discovery(self, s: Section, issuers: tuple[str, ...]) -> RemoteJwks | None:
        value = s.raw("discovery")
        # OIDC Discovery §4: the document lives under the issuer, so one issuer names it.
        derived = issuers[0].rstrip("/") + "/.well-known/openid-configuration" if len(issuers) == 1 else None
        if isinstance(value, dict):
            return self.remote(
                Section(self.issues, value, s.at("discovery"), s.line_of("discovery")), discovery=True, derived=derived
            )
        if value is True:
            if derived is None:
                if issuers:  # none: the issuer's own error says why (an unset ${VAR}, say)
                    s.error("discovery", "`discovery: true` needs exactly one issuer; give the discovery URL instead")
                return None
            return RemoteJwks(discovery_url=derived)
        if isinstance(value, str):
            url = _url(s, "discovery", required=True)
            return RemoteJwks(discovery_url=url) if url else None
        s.error(
            "discovery", "expected true, a discovery URL, or a mapping with url/cache_ttl/min_refresh_interval/timeout"
        )
        return None

    def _path(self, s: Section, key: str) -> Path | None:
        name = s.string(key, required=True)
        if name is not None and not name.strip():
            # An empty name would read the config's own folder ("Is a directory").
            s.error(key, "must not be empty: the path of a file (relative to the config's folder)")
            return None
        return None if name is None else self._beside_config(name)

    def _beside_config(self, name: str) -> Path:
        """A file named in the config: a relative path is relative to the config's folder."""
        path = Path(name)
        return path if path.is_absolute() else self.base_dir / path

    def _read(self, s: Section, key: str, path: Path) -> bytes | None:
        """A key file's bytes (a regular file of at most `KEY_FILE_BYTES`), or None with the error at its line."""
        try:
            return read_named(path, KEY_FILE_BYTES)
        except NamedFileError as error:
            s.error(key, f"cannot read {path}: {error}" if error.cannot_read else f"{path} {error}")
            return None

    def jwks_file(self, s: Section) -> StaticKeys | None:
        path = self._path(s, "jwks_file")
        data = self._read(s, "jwks_file", path) if path else None
        if data is None:
            return None
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):  # our words, not json's "Expecting value: line 1 column 1"
            what = "empty" if not data.strip() else f"not JSON ({len(data)} bytes)"
            s.error("jwks_file", f'{path} is {what}: a JWK Set is a JSON object with a "keys" array')
            return None
        try:
            KeySet.from_jwks(document, SUPPORTED_ALGORITHMS)
        except ValueError as error:  # its message starts "not a JWK Set: ..."
            s.error("jwks_file", f"{path} is {error}")
            return None
        return StaticKeys(kind="jwks_file", origin=f"jwks_file {path}", jwks=MappingProxyType(document))

    def pem_file(self, s: Section) -> StaticKeys | None:
        # `pem_file: PATH`, or `pem_file: {file: PATH, kid: KID}` to give the key a kid.
        kid = None
        if isinstance(s.raw("pem_file"), dict):
            sub = s.section("pem_file")
            assert sub is not None  # a mapping
            s, key_name = sub, "file"
            path = self._path(s, "file")
            kid = self._kid(s)
            s.done()
        else:
            key_name = "pem_file"
            path = self._path(s, "pem_file")
        data = self._read(s, key_name, path) if path else None
        if data is None:
            return None
        # Here: cryptography's `serialization` package brings its SSH and cipher modules, ~0.5 MiB
        # of every running sidecar (bench/FIGURES.md, "Resident memory, session 10").
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        try:
            key = load_pem_public_key(data)
        except ValueError:
            hint = (
                " (it holds a private key; give the public key)"
                if b"PRIVATE KEY" in data
                # A certificate's key is the issuer's to vouch for, not ours to unwrap silently.
                else f" (it holds a certificate; give its public key: openssl x509 -in {path} -pubkey -noout)"
                if b"-----BEGIN CERTIFICATE-----" in data
                else " (it is empty)"
                if not data.strip()
                else " (no PEM block in it)"
                if b"-----BEGIN" not in data
                else ""
            )
            s.error(key_name, f"{path} is not a PEM public key{hint}")
            return None
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in _ES_CURVES:
            # secp256k1 made a provider with no algorithm at all; P-192 a traceback.
            s.error(
                key_name,
                f"{path} holds an EC key on the curve {key.curve.name}; ES256, ES384 and ES512 use "
                "P-256, P-384 and P-521 (RFC 7518 §3.4)",
            )
            return None
        if isinstance(key, rsa.RSAPublicKey) and (weak := weakness_of_key(key, "RS256")) is not None:
            s.error(key_name, f"{path} holds {weak}")  # left out of a JWK Set, but the only key here
            return None
        if isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
            jwk = public_jwk(key)
        else:
            s.error(key_name, f"{path}: unsupported key type {type(key).__name__}; use RSA, EC or Ed25519")
            return None
        if kid is not None:
            jwk["kid"] = kid
        return StaticKeys(
            kind="pem_file", origin=f"pem_file {path}" + _kid_note(kid), jwks=MappingProxyType({"keys": [jwk]})
        )

    @staticmethod
    def _kid(s: Section) -> str | None:
        """A static key's optional `kid`: then only tokens naming it (or no kid) use the key."""
        kid = s.string("kid")
        if kid == "":
            s.error("kid", "must not be empty; leave it out to try the key for any kid")
            return None
        return kid

    def secret(self, s: Section) -> StaticKeys | None:
        sub = s.section("secret", required=True, example="{env: NAME} or {file: PATH}")
        if sub is None:
            return None
        has_env, has_file = sub.has("env"), sub.has("file")
        # Required once given: `file:` left empty (null) is a mistake, not "no file".
        env_name = sub.string("env", required=has_env)
        file_name = sub.string("file", required=has_file)
        encoding = sub.string("encoding", "utf-8")
        kid = self._kid(sub)
        if not has_env and not has_file:
            sub.missing(("env", "file"), "give exactly one of `env: NAME` or `file: PATH`")
        sub.done()
        if has_env and has_file:
            sub.error("file", "env and file are mutually exclusive: give exactly one of `env: NAME` or `file: PATH`")
            return None
        if not has_env and not has_file:
            return None
        if encoding not in ("utf-8", "base64", "base64url"):
            sub.error("encoding", f"{encoding!r} is not one of utf-8, base64, base64url")
            return None
        if env_name is None and file_name is None:
            return None  # not a name (a list, an unset ${VAR}...): `string` said why
        if env_name is not None and not env_name.strip():
            sub.error("env", "must not be empty: the name of an environment variable that holds the secret")
            return None
        if file_name is not None and not file_name.strip():
            sub.error("file", "must not be empty: the path of a file that holds the secret")
            return None
        if env_name is not None:
            raw = os.environ.get(env_name)
            if raw is None:
                sub.error("env", f"environment variable {env_name} is not set")
                return None
            # The variable's bytes as the process got them (not UTF-8 needs no traceback).
            origin, data = f"secret env {env_name}", os.fsencode(raw)
        else:
            path = self._beside_config(file_name)
            read = self._read(sub, "file", path)
            if read is None:
                return None
            origin, data = f"secret file {path}", read
        try:
            # The same reader as `keys generate` writes for, so the two can never disagree.
            secret = read_secret(data, encoding)
            if (weak := weakness(secret, written=data)) is not None:
                raise KeyToolError(
                    f"refused, this is no random secret ({weak}); make one with "
                    "`jwt-sidecar keys generate --alg HS256 --kid NAME --out DIR`"
                )
        except KeyToolError as error:
            sub.error("env" if env_name is not None else "file", str(error))
            return None
        k = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
        jwk = {"kty": "oct", "k": k, **({"kid": kid} if kid is not None else {})}
        return StaticKeys(kind="secret", origin=origin + _kid_note(kid), jwks=MappingProxyType({"keys": [jwk]}))

    # -- routes ---------------------------------------------------------------------------
    def route(self, index: int, s: Section, raw: Any, providers: Mapping[str, Provider]) -> Route | None:
        if not isinstance(raw, dict):
            s.error(None, "a route must be a mapping with `match` and `auth`")
            return None
        name = s.string("name", f"route{index}")
        match = self.route_match(s.section("match", required=True, example="{path_prefix: /api/}"))
        auth_value = s.raw("auth")
        auth: RouteAuth | None = None
        if auth_value == "none":
            auth = None
        elif isinstance(auth_value, dict):
            auth = self.route_auth(Section(self.issues, auth_value, s.at("auth"), s.line_of("auth")), providers)
        elif auth_value is None:
            s.missing(
                "auth", "is required: `none`, or a mapping with `provider` (and scopes, claims, optional)", at="auth"
            )
        elif isinstance(auth_value, str) and auth_value in self.provider_names:
            s.error("auth", f"{auth_value!r} is a provider: write `auth: {{provider: {auth_value}}}`")
        elif isinstance(auth_value, str) and auth_value.lower() == "none":
            s.error("auth", f"{auth_value!r} is not `none`: write none in lower case")
        else:
            s.error("auth", f"{describe(auth_value)} is not `none` or a mapping like {{provider: NAME}}")
        upstream_section = s.section("upstream", example=_UPSTREAM_EXAMPLE, meant=_url_mapping)
        upstream = self.upstream(upstream_section, self.upstream_defaults) if upstream_section is not None else None
        sources = self.token_sources(s, "token_sources")
        self.route_providers_sources(s, auth, sources, providers)
        headers = self.header_map(s.section("headers", example=_HEADERS_EXAMPLE))
        websocket_section = s.section("websocket", example=_WEBSOCKET_EXAMPLE)
        websocket = self.websocket(websocket_section, self.websocket_defaults) if websocket_section else None
        own_cors = self.cors_policy(s, route=True)  # read even when absent: a known key of a route
        cors = own_cors if s.has("cors") else self.cors_default
        s.done()
        if match is None:
            return None
        return Route(
            name=name,
            match=match,
            auth=auth,
            upstream=upstream,
            token_sources=sources,
            headers=headers,
            websocket=websocket,
            cors=cors,
        )

    def route_match(self, s: Section | None) -> RouteMatch | None:
        if s is None:
            return None
        prefix = s.string("path_prefix")
        exact = s.string("path_exact")
        pattern = s.string("path_regex")
        methods = s.string_list("methods", "methods", "[GET, POST]")
        ignore_case = s.boolean("ignore_case", False)
        if any(m in ("*", "ANY", "ALL") for m in (m.upper() for m in methods)):
            s.error("methods", "a method list has no wildcard: leave `methods` out to match every method")
        given = [k for k in _MATCH_KEYS if s.data.get(k) is not None]
        if not given:
            s.missing(_MATCH_KEYS, f"needs one of {', '.join(_MATCH_KEYS)}")
        s.done()
        if len(given) > 1:
            s.error(
                given[-1],
                f"{' and '.join(given)} are mutually exclusive: a match has exactly one of {', '.join(_MATCH_KEYS)}",
            )
            return None
        if len(given) != 1 or (prefix, exact, pattern) == (None, None, None):
            return None
        for key, value in (("path_prefix", prefix), ("path_exact", exact)):
            if value is not None and not value.startswith("/"):
                s.error(key, f"{value!r} must start with /")
                return None  # not also "can never match" from the route table's check
            if value is not None and "*" in value:
                # `/api/*` would match only a path holding a literal `*`: a guarded route that
                # never guards what it was written for.
                s.error(
                    key,
                    f"{value!r}: a path has no wildcards here; path_prefix matches whole segments "
                    f"({value.split('*')[0].rstrip('/') or '/'} covers everything below it), path_regex takes "
                    "a pattern",
                )
        compiled = (
            _regex(s, "path_regex", pattern, re.IGNORECASE if ignore_case else 0) if pattern is not None else None
        )
        return RouteMatch(
            path_prefix=prefix,
            path_exact=exact,
            path_regex=compiled,
            ignore_case=ignore_case,
            methods=_with_head(frozenset(m.upper() for m in methods)) if methods else None,
        )

    def route_auth(self, s: Section, providers: Mapping[str, Provider]) -> RouteAuth | None:
        several = self.route_providers(s, providers)
        provider = s.string("provider", required=several is None)
        optional = s.boolean("optional", False)
        scopes_section = s.section("scopes", example="{all_of: [admin], any_of: [ops, sre]}", meant=_scopes_mapping)
        scopes = ScopeRule()
        if scopes_section is not None:
            scopes = ScopeRule(
                all_of=scopes_section.string_list("all_of", "scopes", "[admin, ops]"),
                any_of=scopes_section.string_list("any_of", "scopes", "[admin, ops]"),
            )
            scopes_section.done()
            for key, names in (("all_of", scopes.all_of), ("any_of", scopes.any_of)):
                for bad in (n for n in names if not _SCOPE_TOKEN.fullmatch(n)):
                    # A token's scope string splits on SP alone (rules.scopes_of), so such a
                    # scope could never be granted: the route would refuse everyone.
                    scopes_section.error(
                        key,
                        f"{bad!r} is not one scope token (RFC 6749 §3.3: printable "
                        'ASCII but space, " and \\); list several scopes separately',
                    )
        claims = tuple(
            rule
            for _, item, path, line in s.items("claims", "claim rules", "[{claim: email_verified, equals: true}]")
            if (rule := self.claim_rule(Section(self.issues, item, path, line), item)) is not None
        )
        revocation = s.boolean("revocation", True)
        mode = _auth_mode(s)
        s.done()
        unknown = self.unknown_provider(provider) if provider is not None else None
        if unknown is not None:
            s.error("provider", unknown)
        if several is not None:  # `providers:` (its own mistakes reported, and `provider` with it refused)
            if not several:
                return None
            provider = ""
        if provider is None:
            return None
        return RouteAuth(
            provider=provider,
            optional=optional,
            scopes=scopes,
            claims=claims,
            revocation=revocation,
            mode=mode,
            providers=several or (),
        )

    def unknown_provider(self, name: str) -> str | None:
        """The error for a route's reference to a provider the config does not name; None when
        it names it, or when `providers` itself is unreadable (its own error says so)."""
        if name in self.provider_names or not self.provider_names:
            return None
        guess = closest(name, self.provider_names)
        return (
            f"unknown provider {name!r}; {did_you_mean(guess)}known providers: {', '.join(sorted(self.provider_names))}"
        )

    def route_providers(self, s: Section, providers: Mapping[str, Provider]) -> tuple[str, ...] | None:
        """`auth: {providers: [A, B]}`: the names, in order; None without the key, () when it is
        wrong (each mistake reported on its item's line).

        The token's `iss` chooses the provider at run time, so no token may be one that two
        of them accept: their issuers must be disjoint. Issuers are compared as exact strings
        (verify.py, RFC 7519 §4.1.1), so a token can match two providers exactly when their
        issuer lists share a string; two spellings of one URL (`https://a` and `https://a/`)
        are two issuers to the proxy as to any token."""
        if not s.has("providers"):
            return None
        value = s.raw("providers")
        names = s.string_list("providers", "provider names", "[users, services]", required=True)
        if s.has("provider"):
            s.error(
                "providers",
                "`provider` and `providers` are mutually exclusive: name one provider with `provider: NAME`, "
                "or several with `providers: [A, B]` (the token's iss chooses among them)",
            )
            return ()
        if not names or not isinstance(value, list) or len(names) != len(value):
            return ()  # string_list said why (empty, not a list, an item that is no name)
        lines = getattr(value, "lines", [s.line_of("providers")] * len(names))
        path = s.at("providers")
        ok = True
        first: dict[str, int] = {}
        for index, name in enumerate(names):
            if name in first:
                self.issues.add(
                    lines[index],
                    f"{path}[{index}]",
                    f"provider {name!r} is listed twice (items {first[name]} and {index}): name each once",
                )
                ok = False
                continue
            first[name] = index
            unknown = self.unknown_provider(name)
            if unknown is not None:
                self.issues.add(lines[index], f"{path}[{index}]", unknown)
                ok = False
        built = [providers[name] for name in first if name in providers]  # a provider with its own errors: skipped
        for i, one in enumerate(built):
            for other in built[i + 1 :]:
                shared = [iss for iss in one.issuers if iss in other.issuers]
                if shared:
                    s.error(
                        "providers",
                        f"providers {one.name} and {other.name} both accept iss {', '.join(map(repr, shared))}: a "
                        "token naming it could be either's, and the iss is what chooses; give each provider of "
                        "a route its own issuers (or split the route)",
                    )
                    ok = False
        return tuple(names) if ok else ()

    def route_providers_sources(
        self,
        s: Section,
        auth: RouteAuth | None,
        sources: tuple[TokenSource, ...] | None,
        providers: Mapping[str, Provider],
    ) -> None:
        """A `providers:` route looks for its token where its providers do; when they look in
        different places, the route must say where (`token_sources`): a token in one
        provider's place must not be taken for another's, and the union would do that."""
        if auth is None or not auth.providers or sources is not None:
            return
        built = [providers[name] for name in auth.providers if name in providers]
        places = {frozenset(p.token_sources) for p in built}
        if len(places) > 1:
            where = "; ".join(f"{p.name}: {', '.join(_source_words(x) for x in p.token_sources)}" for p in built)
            s.error(
                "auth",
                f"the providers of this route look for tokens in different places ({where}); give the route its "
                "own `token_sources` (e.g. [bearer]): the token is looked for there, whichever provider its iss "
                "names",
            )

    def claim_rule(self, s: Section, raw: Any) -> ClaimRule | None:
        if not isinstance(raw, dict):
            s.error(None, "a claim rule must be a mapping like {claim: email_verified, equals: true}")
            return None
        if "claim" not in raw and not any(op in raw for op in CLAIM_OPERATORS):
            # `{email_verified: true}`: the claim written as the key. One error with the rule it
            # means, not three (claim missing, no operator, unknown key).
            value = next(iter(raw.values()), None)
            shown = describe(value).strip("'") if len(raw) == 1 and isinstance(value, (str, int, float)) else ""
            meant = (
                f"write {{claim: {next(iter(raw))}, equals: {shown}}}"
                if shown
                else ("e.g. {claim: email_verified, equals: true}")
            )
            s.error(None, f"a claim rule names the claim and one of {', '.join(CLAIM_OPERATORS)}: {meant}")
            return None
        claim = s.string("claim", required=True)
        ops = [op for op in CLAIM_OPERATORS if s.has(op)]
        values = {op: s.raw(op) for op in CLAIM_OPERATORS}
        if not ops:
            s.missing(CLAIM_OPERATORS, f"needs one of {', '.join(CLAIM_OPERATORS)}")
        s.done()
        if len(ops) != 1:
            if ops:
                s.error(
                    ops[-1],
                    f"{' and '.join(ops)} are mutually exclusive: a claim rule has exactly one of "
                    f"{', '.join(CLAIM_OPERATORS)}",
                )
            return None
        if claim is None:
            return None
        op, value = ops[0], values[ops[0]]
        if op == "one_of":
            if not isinstance(value, list) or not value:
                s.error(op, f"must be a non-empty list of values, e.g. {list_example(value, '[gold, silver]')}")
                return None
            value = tuple(value)
        elif op == "matches":
            if not isinstance(value, str):
                s.error(op, "must be a regular expression string")
                return None
            value = _regex(s, op, value)
            if value is None:
                return None
        elif op == "present":
            if not isinstance(value, bool):
                s.error(op, "must be true or false")
                return None
        elif isinstance(value, (dict, list)):
            s.error(op, "must be a single value (string, number or boolean)")
            return None
        return ClaimRule(claim=claim, path=tuple(claim.split(".")), op=op, value=value)

    # -- proxying -------------------------------------------------------------------------
    def upstream(self, s: Section, defaults: Upstream | None = None) -> Upstream | None:
        """An `upstream` section; the keys it leaves out are `defaults`' (a route's: the top level's)."""
        defaults = defaults or Upstream()
        url = _url(s, "url", required=True)
        upstream = Upstream(
            url=(url or defaults.url).rstrip("/"),
            connect_timeout=s.duration("connect_timeout", defaults.connect_timeout),
            timeout=s.duration("timeout", defaults.timeout),
            max_body=s.size("max_body", defaults.max_body),
            body_timeout=s.duration("body_timeout", defaults.body_timeout),
        )
        s.done()
        if url is not None and (urlsplit(url).query or urlsplit(url).fragment):
            s.error("url", f"{shown(url)!r}: an upstream URL has no query or fragment")
        for key in ("connect_timeout", "timeout", "body_timeout"):
            if getattr(upstream, key) <= 0:
                s.error(key, "must be more than 0s")
        return upstream if url is not None else None

    def websocket(self, s: Section | None, defaults: WebSocketSettings) -> WebSocketSettings:
        if s is None:
            return defaults
        settings = WebSocketSettings(
            idle_timeout=s.duration("idle_timeout", defaults.idle_timeout),
            max_lifetime=s.duration("max_lifetime", defaults.max_lifetime),
            close_on_token_expiry=s.boolean("close_on_token_expiry", defaults.close_on_token_expiry),
        )
        s.done()
        return settings

    def token_sources(self, s: Section, key: str) -> tuple[TokenSource, ...] | None:
        if not s.has(key):
            s.raw(key)
            return None
        found: list[TokenSource] = []
        if not isinstance(s.data.get(key), list):
            s.items(key, "token sources", "[bearer, {cookie: access_token}]")  # the one error
            return None
        for _, item, path, line in s.items(key):
            if item == "bearer":
                found.append(BEARER)
                continue
            if not isinstance(item, dict) or len(set(item) & {"header", "cookie", "query"}) != 1:
                self.issues.add(
                    line, path, "expected `bearer`, {header: NAME[, prefix: P]}, {cookie: NAME} or {query: NAME}"
                )
                continue
            sub = Section(self.issues, item, path, line)
            kind = next(k for k in ("header", "cookie", "query") if k in item)
            name = sub.string(kind, required=True)
            prefix = sub.string("prefix", "") if kind == "header" else ""
            sub.done()
            if name is None:
                continue
            if kind == "header" and not _HEADER_NAME.fullmatch(name):
                sub.error(kind, f"{name!r} is not a valid header name")
                continue
            found.append(TokenSource(kind=kind, name=name, prefix=prefix))
        if s.data.get(key) == []:  # not when its items had errors of their own: those say why
            s.error(key, "must list at least one token source")
        return tuple(found) or None

    def header_map(self, s: Section | None) -> HeaderMap | None:
        if s is None:
            return None
        defaults = HeaderMap()
        claims_section = s.section("claims", example="{sub: X-User-Id, email: X-User-Email}")
        claims: tuple[ClaimHeader, ...] = defaults.claims
        if claims_section is not None:
            mapped = []
            for claim in list(claims_section.keys()):
                header = claims_section.string(str(claim), required=True)
                if header is None:
                    continue
                if not _HEADER_NAME.fullmatch(header) or header.lower() in _RESERVED_HEADERS:
                    claims_section.error(
                        str(claim), f"{header!r} cannot carry a claim: not a header name, or one the proxy owns"
                    )
                    continue
                mapped.append(ClaimHeader(claim=str(claim), path=tuple(str(claim).split(".")), header=header))
            claims_section.done()
            claims = tuple(mapped)
        payload = s.string("payload")
        if payload is not None and (not _HEADER_NAME.fullmatch(payload) or payload.lower() in _RESERVED_HEADERS):
            s.error("payload", f"{payload!r} is not a header name the proxy may set")
        forward = s.boolean("forward_token", defaults.forward_token)
        provider = self.provider_header(s, claims, payload)
        s.done()
        return HeaderMap(claims=claims, payload=payload, forward_token=forward, provider=provider)

    def provider_header(self, s: Section, claims: tuple[ClaimHeader, ...], payload: str | None) -> str | None:
        """`headers: {provider: X-Auth-Provider}`: the header that names the admitting provider."""
        name = s.string("provider")
        if name is None:
            return None
        if not _HEADER_NAME.fullmatch(name) or name.lower() in _RESERVED_HEADERS:
            s.error("provider", f"{name!r} is not a header name the proxy may set")
            return None
        taken = [c.header for c in claims] + ([payload] if payload else [])
        if any(name.lower() == other.lower() for other in taken):
            s.error("provider", f"{name!r} already carries a claim or the payload: give the provider its own header")
            return None
        return name

    def strip(self, s: Section | None) -> StripSettings:
        defaults = StripSettings()
        if s is None:
            return defaults
        # Names add to the built-in list (never weaken it by accident); prefixes replace theirs;
        # `keep` takes a client-address header off the built-in list, by name, for an ingress
        # in front that writes it (README "Listener, upstream and what the upstream receives").
        names = s.string_list("names", "header names", "[X-Internal-Role]")
        keep = s.string_list("keep", "header names", "[X-Real-IP]")
        prefixes = s.string_list("prefixes", "header name prefixes", "[X-User-, X-Jwt-]", defaults.prefixes)
        s.done()
        keepable = {name.lower(): name for name in StripSettings.KEEPABLE}
        kept: list[str] = []
        for name in keep:
            if name.lower() not in keepable:
                why = (
                    "it is stripped because some frameworks let it change the method or the path after we routed"
                    if any(name.lower() == n.lower() for n in defaults.names)
                    else "it is not on the built-in list"
                )
                s.error(
                    "keep",
                    f"{name!r} cannot be kept ({why}); keep takes only {', '.join(StripSettings.KEEPABLE)}",
                )
            elif any(name.lower() == n.lower() for n in names):
                s.error("keep", f"{name!r} is in both `names` and `keep`; it is either stripped or kept")
            else:
                kept.append(keepable[name.lower()])
        return StripSettings(
            names=tuple(n for n in defaults.names if n not in kept) + names,
            prefixes=prefixes,
            kept=tuple(kept),
        )

    # -- CORS -----------------------------------------------------------------------------
    def cors_policy(self, parent: Section, *, route: bool = False) -> CorsSettings | None:
        """`cors:` at the top level or on a route (where it replaces the top-level one whole,
        and `false` turns CORS off); None when there is none."""
        value = parent.raw("cors")
        if value is None or value is False:
            return None
        if not isinstance(value, dict):
            inherit = " (leave it out to use the top-level one)" if route else ""
            parent.error(
                "cors",
                f"{describe(value)} is not a mapping: write {_CORS_EXAMPLE}, or false for no CORS{inherit}",
            )
            return None
        s = Section(self.issues, value, parent.at("cors"), parent.line_of("cors"))
        defaults = CorsSettings()
        origins = s.string_list("allow_origins", "origins", "[https://app.example.com]", required=True)
        methods = s.string_list("allow_methods", "methods", "[GET, POST, PUT]", defaults.allow_methods)
        headers = s.string_list(
            "allow_headers", "header names", "[Authorization, Content-Type]", defaults.allow_headers
        )
        expose = s.string_list("expose_headers", "header names", "[X-Request-Id]", defaults.expose_headers)
        credentials = s.boolean("allow_credentials", defaults.allow_credentials)
        max_age = s.duration("max_age", defaults.max_age)
        s.done()
        exact, patterns, any_origin = _cors_origins(s, origins, credentials)
        _cors_methods(s, methods, credentials)
        for key, names in (("allow_headers", headers), ("expose_headers", expose)):
            _cors_header_names(s, key, names, credentials)
        if not origins and not s.has("allow_origins"):
            return None  # its own error says so
        return CorsSettings(
            allow_origins=exact,
            any_origin=any_origin,
            origin_patterns=patterns,
            allow_methods=methods,
            allow_headers=headers,
            expose_headers=expose,
            allow_credentials=credentials,
            max_age=max_age,
        )

    # -- revocation -----------------------------------------------------------------------
    def revocation(self, root: Section) -> RevocationSettings | None:
        """The top-level `revocation:` (absent or `false`: no list); the store is `file` or `redis`."""
        if root.data.get("revocation") is False:
            root.raw("revocation")
            return None
        if root.data.get("revocation") is True:
            root.raw("revocation")
            root.error(
                "revocation", f"true does not say where the list is kept: write revocation: {_REVOCATION_EXAMPLE}"
            )
            return None
        s = root.section("revocation", example=_REVOCATION_EXAMPLE, meant=_revocation_mapping)
        if s is None:
            return None
        defaults = RevocationSettings()
        file = self.revocation_file(s)
        redis_section = s.section("redis", example=_REDIS_EXAMPLE, meant=_redis_mapping)
        redis = self.redis_store(redis_section) if redis_section is not None else None
        max_staleness = s.duration("max_staleness", defaults.max_staleness)
        fail = _choice(s, "fail", defaults.fail, ("open", "closed"))
        default_ttl = s.duration("default_ttl", defaults.default_ttl)
        given = [key for key in ("file", "redis") if s.data.get(key) is not None]
        if not given:
            s.missing(("file", "redis"), f"needs a store: file: PATH or redis: {_REDIS_EXAMPLE}")
        s.done()
        if len(given) > 1:
            s.error("redis", "file and redis are mutually exclusive: the list is kept in one store; keep one of them")
        if max_staleness <= 0:
            s.error("max_staleness", "must be more than 0s")
        if default_ttl is not None and default_ttl < 1:
            s.error("default_ttl", "must be at least 1s: a rule that expires at once revokes nothing")
        if len(given) != 1 or (file is None and redis is None):
            return None
        return RevocationSettings(
            file=file, redis=redis, max_staleness=max_staleness, fail=fail, default_ttl=default_ttl
        )

    def revocation_file(self, s: Section) -> str | None:
        """The file's absolute path; it need not exist yet (`jwt-sidecar revoke` creates it), its folder must."""
        value = s.string("file")
        if value is None:
            return None
        if not value.strip():
            s.error("file", "must not be empty: the path of a YAML or JSON file of rules")
            return None
        path = (self.base_dir / value).resolve() if not os.path.isabs(value) else Path(value)
        if path.is_dir():
            s.error("file", f"{value!r} is a directory; name a file in it, e.g. {Path(value) / 'revoked.yaml'}")
            return None
        if path.exists() and not path.is_file():
            # A FIFO or a device would be waited on or read forever at every poll.
            s.error("file", f"{value!r} is not a regular file (a FIFO, a device or a socket); name a YAML or JSON file")
            return None
        if not path.parent.is_dir():
            s.error("file", f"{value!r}: the folder {str(path.parent)!r} does not exist")
            return None
        return str(path)

    def redis_store(self, s: Section) -> RedisStore | None:
        defaults = RedisStore(url="")
        url = _redis_url(s, "url")
        prefix = s.string("key_prefix", defaults.key_prefix)
        timeout = s.duration("timeout", defaults.timeout)
        resync = s.duration("resync_interval", defaults.resync_interval)
        s.done()
        if not prefix or not _KEY_PREFIX.fullmatch(prefix):
            s.error("key_prefix", f"{prefix!r} is not a key prefix: printable characters, no spaces, e.g. jwt-sidecar")
        if timeout <= 0:
            s.error("timeout", "must be more than 0s")
        if resync < 1:
            s.error("resync_interval", "must be at least 1s")
        if url is None:
            return None
        return RedisStore(url=url, key_prefix=prefix, timeout=timeout, resync_interval=resync)

    # -- the rest -------------------------------------------------------------------------
    def token_cache(self, s: Section | None) -> TokenCacheSettings:
        defaults = TokenCacheSettings()
        if s is None:
            return defaults
        cache = TokenCacheSettings(
            enabled=s.boolean("enabled", defaults.enabled),
            max_entries=s.integer("max_entries", defaults.max_entries, minimum=1),
            max_ttl=s.duration("max_ttl", defaults.max_ttl),
        )
        s.done()
        return cache


_UPSTREAM_EXAMPLE = "{url: http://127.0.0.1:8000}"
_HEADERS_EXAMPLE = "{claims: {sub: X-User-Id}, forward_token: false}"
_WEBSOCKET_EXAMPLE = "{idle_timeout: 5m, max_lifetime: 24h}"
_REDIS_EXAMPLE = "{url: redis://HOST:6379/0}"
_REVOCATION_EXAMPLE = "{file: revoked.yaml} or {redis: {url: redis://HOST:6379/0}}"
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_KEY_PREFIX = re.compile(r"[!-~]+")


def _revocation_mapping(value: Any) -> str:
    """`revocation: redis://…` or `revocation: revoked.yaml`: the store alone, meant as its mapping."""
    if not isinstance(value, str):
        return ""
    return f"{{redis: {{url: {value}}}}}" if "://" in value else f"{{file: {value}}}"


def _redis_mapping(value: Any) -> str:
    """`redis: redis://…`: the URL alone, meant as `{url: …}`."""
    return f"{{url: {value}}}" if isinstance(value, str) and "://" in value else ""


def _redis_url(s: Section, key: str) -> str | None:
    """`redis://[:PASSWORD@]HOST[:PORT][/DB]`, `rediss://…` (TLS) or `unix:///PATH`."""
    url = s.string(key, required=True)
    if url is None:
        return None
    form = "write redis://HOST:PORT/DB (rediss:// for TLS, unix:///PATH for a socket)"
    shown_url = repr(shown(url))
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number or out of range
    except ValueError:
        s.error(key, f"{shown_url} is not a Redis URL: its port is not a number from 1 to 65535")
        return None
    if "://" not in url:
        s.error(key, f"{shown_url} is not a Redis URL: it has no scheme; write redis://{shown(url)}")
        return None
    if parts.scheme not in _REDIS_SCHEMES:
        s.error(key, f"{shown_url} is not a Redis URL ({parts.scheme}://): {form}")
        return None
    if parts.scheme == "unix":
        if not parts.path:
            s.error(key, f"{shown_url} names no socket: write unix:///PATH/redis.sock")
            return None
        return url
    if not parts.hostname:
        s.error(key, f"{shown_url} has no host: {form}")
        return None
    if port == 0:
        s.error(key, f"{shown_url} is not a Redis URL: its port is not a number from 1 to 65535")
        return None
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        s.error(key, f"{shown_url}: the path is the database number (/0, /1, ...), not {parts.path!r}")
        return None
    return url


def _url_mapping(value: Any) -> str:
    """`jwks: https://…` or `upstream: http://…`: the URL alone was meant as `{url: …}`."""
    return f"{{url: {value}}}" if isinstance(value, str) and "://" in value else ""


def _scopes_mapping(value: Any) -> str:
    """`scopes: [admin]` or `scopes: admin`: meant as every one of them, `{all_of: [admin]}`."""
    listed = list_example(value, "")
    return f"{{all_of: {listed}}} (each needed) or {{any_of: {listed}}} (one of them)" if listed else ""


def _kid_note(kid: str | None) -> str:
    return "" if kid is None else f" (kid {kid!r})"


# RFC 9110 §5.1: a field name is a token.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3 scope-token: 1*NQCHAR


# Headers whose meaning belongs to HTTP or to this proxy: never a claim's carrier.
def _source_words(source: TokenSource) -> str:
    return "bearer" if source.kind == "bearer" else f"{source.kind} {source.name}"


_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-authenticate",
        "authorization",
        "cookie",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "forwarded",
    }
)


def _with_head(methods: frozenset[str]) -> frozenset[str]:
    # RFC 9110 §9.3.2: HEAD is GET without the body, and most frameworks answer HEAD with
    # the GET handler, so a route that judges GET must judge HEAD too.
    return methods | {"HEAD"} if "GET" in methods else methods


def _listen(s: Section, key: str, default: Listen) -> Listen | None:
    """`host:port`, `:port` (all interfaces) or `[v6]:port`."""
    value = s.string(key)
    if value is None:
        return default
    host, sep, port = value.rpartition(":")
    host = host.strip("[]") if host else "0.0.0.0"
    if not sep and value.isdigit():
        s.error(key, f"{value!r} has no host: write :{value} (every interface) or 127.0.0.1:{value}")
        return None
    if sep and port.isdigit() and not 0 < int(port) < 65536:
        s.error(key, f"{value!r}: port {int(port)} is out of range; a port is 1 to 65535")
        return None
    if not sep or not port.isdigit():
        s.error(key, f"{value!r} is not host:port (e.g. 0.0.0.0:8080, 127.0.0.1:9901, [::]:8080)")
        return None
    return Listen(host=host, port=int(port))


def _choice(s: Section, key: str, default: str, choices: tuple[str, ...], *, upper: bool = False) -> str:
    """One of `choices`, in any case (`JSON` is json; log levels are written both ways)."""
    value = s.string(key)
    if value is None:
        return default
    chosen = value.upper() if upper else value.lower()
    if chosen not in choices:
        s.error(key, f"{value!r} is not one of {', '.join(choices)}")
        return default
    return chosen


def _overlap(a: Listen, b: Listen) -> bool:
    """Whether binding both would collide: one port, one address family, one side every address."""
    return (
        a.port == b.port
        and (":" in a.host) == (":" in b.host)
        and (a.host in ("0.0.0.0", "::") or b.host in ("0.0.0.0", "::"))
    )


def _url(s: Section, key: str, *, required: bool = False) -> str | None:
    url = s.string(key, required=required)
    if url is None:
        return None
    shown_url = repr(shown(url))  # as logs show it: no password, no query value
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError:
        s.error(key, f"{shown_url} is not an http(s) URL with a host: its port is not a number from 1 to 65535")
        return None
    if not parts.scheme and not url.startswith("/") and "." in url.split("/")[0]:
        s.error(key, f"{shown_url} is not an http(s) URL with a host: it has no scheme; write https://{shown(url)}")
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        s.error(key, f"{shown_url} is not an http(s) URL with a host")
        return None
    return url


def _regex(s: Section, key: str, pattern: str, flags: int = 0) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern, flags)
    except re.error as error:
        s.error(key, f"{pattern!r} is not a valid regular expression: {error}")
        return None


# -- CORS (the Fetch standard's CORS protocol; request/cors.py compiles the settings) --------
_CORS_EXAMPLE = "{allow_origins: [https://app.example.com]}"
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
# Fetch "normalize a method": browsers upper-case these six, and send every other as written.
_NORMALISED_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT")
# Fetch "forbidden method": a page cannot send these at all.
_FORBIDDEN_METHODS = ("CONNECT", "TRACE", "TRACK")


def _cors_origins(
    s: Section, origins: tuple[str, ...], credentials: bool
) -> tuple[tuple[str, ...], tuple[re.Pattern[str], ...], bool]:
    """`allow_origins` → (exact origins, compiled `regex:` patterns, whether `*`), each mistake
    reported on its item's line."""
    lines = getattr(s.data.get("allow_origins"), "lines", [s.line_of("allow_origins")] * len(origins))
    exact: list[str] = []
    patterns: list[re.Pattern[str]] = []
    any_origin = False
    for i, entry in enumerate(origins):
        at = f"{s.at('allow_origins')}[{i}]"

        def error(message: str, line: int | None = lines[i], at: str = at) -> None:
            s.issues.add(line, at, message)

        if entry == "*":
            any_origin = True
            if credentials:
                error(
                    "`*` cannot be used with allow_credentials: true: the Fetch standard forbids a browser to "
                    "pass a credentialed answer that says `Access-Control-Allow-Origin: *`, and echoing every "
                    "origin instead would let any site act as the user; list the origins (or a regex:)"
                )
            elif len(origins) > 1:
                error("`*` already allows every origin: list either `*` alone or the origins")
        elif entry.lower() == "null":
            error(
                "the origin `null` cannot be allowed: any site can send `Origin: null` (a sandboxed iframe, "
                "a data: URL, a redirect), so allowing it allows every site; use `*` (without credentials) "
                "if every site may call this"
            )
        elif entry.startswith("regex:"):
            pattern = _cors_pattern(entry[len("regex:") :], error)
            if pattern is not None:
                patterns.append(pattern)
        else:
            problem = _origin_problem(entry)
            if problem is not None:
                error(problem)
            elif entry in exact:
                error(f"{entry!r} is listed twice")
            else:
                exact.append(entry)
    return tuple(exact), tuple(patterns), any_origin


def _origin_problem(entry: str) -> str | None:
    """Why `entry` is not an origin a browser could send, with the spelling it would send; None if it is."""
    if ORIGIN.fullmatch(entry):
        scheme, _, port = ORIGIN.fullmatch(entry).groups()  # type: ignore[union-attr]
        if port is not None and (port == _DEFAULT_PORTS.get(scheme) or not 0 < int(port) < 65536):
            if not 0 < int(port) < 65536:
                return f"{entry!r}: port {int(port)} is out of range; a port is 1 to 65535"
            return f"{entry!r}: browsers leave out the default port; write {entry.rsplit(':', 1)[0]}"
        return None
    if "*" in entry:
        return (
            f"{entry!r}: an exact origin has no wildcards; for every subdomain write "
            r"regex:https://[a-z0-9-]+\.example\.com (with your domain, the dots escaped)"
        )
    scheme, sep, rest = entry.partition("://")
    if not sep:
        return f"{entry!r} is not an origin: it has no scheme; write https://{entry.rstrip('/')}"
    host_port, slash, path = rest.partition("/")
    if slash:
        shown = f"{scheme}://{host_port}"
        what = "a trailing slash" if not path else "a path"
        return (
            f"{entry!r}: an origin has no path, and browsers send it without {what}; write {shown} "
            "(the route's match decides the paths)"
        )
    if any(c in rest for c in "?#@"):
        return f"{entry!r} is not an origin: an origin is scheme://host[:port], nothing else"
    if entry != entry.lower() and ORIGIN.fullmatch(entry.lower()):
        return f"{entry!r}: browsers send the scheme and host in lower case; write {entry.lower()}"
    if not entry.isascii():
        host, colon, port = host_port.partition(":") if not host_port.startswith("[") else (host_port, "", "")
        try:
            puny = host.lower().encode("idna").decode("ascii")
        except UnicodeError:
            return f"{entry!r}: the host is not a valid international domain name"
        return f"{entry!r}: browsers send an international domain name in punycode; write {scheme.lower()}://{puny}{colon}{port}"
    return f"{entry!r} is not an origin like https://app.example.com or http://localhost:3000 (scheme://host[:port])"


def _cors_pattern(text: str, error: Any) -> re.Pattern[str] | None:
    """A `regex:` origin: compiled once, matched against the whole origin, and refused when it
    lets a site that anyone can register through (its dots unescaped, its end or the start of
    its domain open)."""
    try:
        pattern = re.compile(text)
    except re.error as invalid:
        error(f"{text!r} is not a valid regular expression: {invalid}")
        return None
    problem = _pattern_problem(pattern)
    if problem is not None:
        error(f"regex:{text}: {problem}")
        return None
    return pattern


def _pattern_problem(pattern: re.Pattern[str]) -> str | None:
    """What a pattern lets through that its author cannot have meant, found by trying it on
    origins built from the ones it describes; None when none of those get through."""
    samples = _samples(pattern)
    if samples is None:
        return None  # lookarounds, back-references: nothing to build from; the operator's own
    for sample, loose in samples:
        found = ORIGIN.fullmatch(sample) if pattern.fullmatch(sample) else None
        if found is None:
            if pattern.fullmatch(sample):
                return (
                    f"it matches {sample!r}, which is not an origin: a pattern describes whole origins "
                    "like https://app.example.com (scheme://host[:port], no path), matched from start to end"
                )
            continue
        scheme, host, port = found.groups()
        tail = f":{port}" if port else ""
        if loose != sample and pattern.fullmatch(loose) and ORIGIN.fullmatch(loose):
            return (
                f"a `.` matches any character, so it also matches {loose!r}, a name anyone can register; "
                r"write `\.` for a dot"
            )
        extended = f"{scheme}://{host}.attacker.example{tail}"
        if pattern.fullmatch(extended):
            return (
                f"it is open at the end: it also matches {extended!r}; end it with the host "
                r"(and `(:[0-9]+)?` for any port)"
            )
        labels = host.split(".")
        if len(labels) >= 2 and not host.startswith("["):
            bought = f"{scheme}://attacker{'.'.join(labels[-2:])}{tail}"
            if pattern.fullmatch(bought):
                return (
                    f"the start of its domain is open: it also matches {bought!r}, a domain anyone can "
                    r"register; put `\.` before the domain, e.g. https://([a-z0-9-]+\.)*example\.com"
                )
    return None


def _samples(pattern: re.Pattern[str]) -> list[tuple[str, str]] | None:
    """Shortest strings the pattern matches, one per alternative (at most 16): (with each
    unrepeated `.` written as a dot, with it written as `x`). None for what it cannot build."""
    # The stdlib's own regex parser (private, untyped: its stubs are those of the deprecated
    # sre_parse), loaded only when a config has a regex origin.
    sre: Any = importlib.import_module("re._parser")
    constants: Any = importlib.import_module("re._constants")

    def build(items: Any, repeated: bool = False) -> list[tuple[str, str]] | None:
        out = [("", "")]
        for op, arg in items:
            step: list[tuple[str, str]] | None
            if op is constants.LITERAL:
                step = [(chr(arg), chr(arg))]
            elif op is constants.NOT_LITERAL:
                step = [("b", "b")] if arg == ord("a") else [("a", "a")]
            elif op is constants.ANY:
                # A lone `.` between letters is a dot meant literally (x: what else it lets in);
                # one repeated (`.*`, `.+`) is a wildcard, written as a letter.
                step = [("a", "a")] if repeated else [(".", "x")]
            elif op is constants.IN:
                char = _class_char(arg, constants)
                step = None if char is None else [(char, char)]
            elif op in (constants.MAX_REPEAT, constants.MIN_REPEAT, getattr(constants, "POSSESSIVE_REPEAT", None)):
                low, _, sub = arg
                inner = build(sub, repeated=True) if low else [("", "")]
                step = None if inner is None else [(a * low, b * low) for a, b in inner]
            elif op in (constants.SUBPATTERN, getattr(constants, "ATOMIC_GROUP", None)):
                step = build(arg[-1] if op is constants.SUBPATTERN else arg, repeated)
            elif op is constants.BRANCH:
                step = []
                for alternative in arg[1]:
                    inner = build(alternative, repeated)
                    if inner is None:
                        return None
                    step += inner
            elif op is constants.AT:
                step = [("", "")]
            else:
                return None
            if step is None:
                return None
            out = [(a + c, b + d) for a, b in out for c, d in step][:16]
        return out

    try:
        return build(sre.parse(pattern.pattern, pattern.flags))
    except (RecursionError, ValueError, TypeError, re.error):
        return None


def _class_char(items: Any, constants: Any) -> str | None:
    """A character a `[...]` class admits, preferring those of a host name."""
    for char in "a0-.":
        code = ord(char)
        inside = False
        negate = False
        for op, arg in items:
            if op is constants.NEGATE:
                negate = True
            elif (op is constants.LITERAL and arg == code) or (op is constants.RANGE and arg[0] <= code <= arg[1]):
                inside = True
            elif op is constants.CATEGORY:
                name = str(arg)
                if ("DIGIT" in name and char.isdigit() and "NOT" not in name) or (
                    "WORD" in name and char.isalnum() and "NOT" not in name
                ):
                    inside = True
        if inside != negate:
            return char
    return None


def _cors_methods(s: Section, methods: tuple[str, ...], credentials: bool) -> None:
    for method in methods:
        if method == "*":
            if credentials:
                s.error(
                    "allow_methods",
                    "`*` is no wildcard with allow_credentials: true (the Fetch standard reads it as a method "
                    "named `*`); list the methods",
                )
        elif not _HEADER_NAME.fullmatch(method):
            s.error("allow_methods", f"{method!r} is not a method name (an HTTP token: no spaces or commas)")
        elif method.upper() in _FORBIDDEN_METHODS:
            s.error("allow_methods", f"{method!r}: a browser never sends it (a forbidden method in the Fetch standard)")
        elif method != method.upper() and method.upper() in _NORMALISED_METHODS:
            s.error("allow_methods", f"{method!r}: browsers send it upper-cased, as {method.upper()}; write that")
        elif method != method.upper() and method.upper() == "PATCH":
            s.error(
                "allow_methods",
                f"{method!r}: methods are compared as sent, and a page that writes patch sends `patch`, "
                "which servers do not take for PATCH; write PATCH",
            )


def _cors_header_names(s: Section, key: str, names: tuple[str, ...], credentials: bool) -> None:
    for name in names:
        if name == "*":
            if credentials:
                s.error(
                    key,
                    "`*` is no wildcard with allow_credentials: true (the Fetch standard reads it as a header "
                    "named `*`); list the header names",
                )
        elif not _HEADER_NAME.fullmatch(name):
            s.error(key, f"{name!r} is not a header name (an HTTP token: no spaces, colons or commas)")


AUTH_MODES = ("enforce", "report")
# What other tools call these modes (Istio's and Gatekeeper's dry-run, Envoy's shadow rules,
# Kyverno's Audit, SELinux's permissive, CSP's report-only, ModSecurity's DetectionOnly), read
# with `-` for `_` and spaces: a word that is no misspelling still gets its "did you mean".
_MODE_WORDS = {
    **dict.fromkeys(
        (
            "dry-run",
            "dryrun",
            "shadow",
            "audit",
            "monitor",
            "monitoring",
            "observe",
            "log",
            "log-only",
            "logonly",
            "warn",
            "permissive",
            "passive",
            "report-only",
            "reportonly",
            "detect",
            "detection-only",
            "detectiononly",
            "test",
        ),
        "report",
    ),
    **dict.fromkeys(
        ("enforcing", "enforced", "enforcement", "deny", "block", "strict", "active", "require", "required"),
        "enforce",
    ),
}


def _auth_mode(s: Section) -> str:
    """A route's `auth.mode`: `enforce` (the default) or `report`, in any case."""
    value = s.raw("mode")
    if value is None:
        return "enforce"
    choices = "write enforce (the default: refuse what fails a check) or report (refuse nothing: log and count it)"
    if isinstance(value, bool):
        # YAML 1.1 reads on/off/yes/no/true/false unquoted as a boolean: `mode: off` is no mode.
        s.error("mode", f"{describe(value)} is a boolean (YAML reads on, off, yes and no so), not a mode; {choices}")
        return "enforce"
    if not isinstance(value, str):
        s.error("mode", f"{describe(value)} is not a mode; {choices}")
        return "enforce"
    text = s.string("mode")  # `${VAR}` read as everywhere else
    if text is None:
        return "enforce"  # an unset variable, reported
    chosen = text.strip().lower()
    if chosen in AUTH_MODES:
        return chosen
    folded = re.sub(r"[\s_]+", "-", chosen)
    guess = _MODE_WORDS.get(folded) or closest(folded, AUTH_MODES)
    s.error("mode", f"{text!r} is not a mode; {did_you_mean(guess)}{choices}")
    return "enforce"
