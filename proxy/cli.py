"""The `jwt-sidecar` command: parse the command line, call the module that owns the work, report.

Owns: the commands, their options and help, reading the files a command names, what is
printed, and the exit status (0 done, 1 failed, 2 usage). Does not own: any of the work
itself (keygen.py makes keys and tokens) or exiting the process: `main` returns the status,
and `python -m proxy` or the console script hands it to `SystemExit`.

Each command is one `_add_<command>(commands)` function that builds its subparser and sets
`run=` to a handler taking the parsed arguments and returning the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import prometheus_client

from . import __version__, config, routecheck, server, workers
from . import explain as explain_mod
from .clock import SystemClock
from .errors import ConfigError
from .startup import StartupError
from .keys import key_source_for
from .jwks import SUPPORTED_ALGORITHMS
from .keygen import GENERATE_ALGORITHMS, SECRET_ENCODINGS, KeyToolError, generate, mint, parse_claim, read_secret, write
from .yamlsource import parse_duration

__all__ = ["build_parser", "main"]

PROG = "jwt-sidecar"


class _UsageError(Exception):
    """The command line itself is wrong: exit status 2, with the usage of the command at fault."""

    def __init__(self, message: str, parser: argparse.ArgumentParser | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.parser = parser


class _Exit(Exception):
    """argparse finished the command itself (--help, --version)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    # argparse exits the process on a usage error or --help; `main` returns a status instead,
    # so it stays callable in-process (tests, embedding) and sys.exit lives in one place.
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message, self)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


def main(argv: list[str] | None = None) -> int:
    """Run one command line (default: `sys.argv[1:]`) and return its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        status: int = args.run(args)
        return status
    except _Exit as done:
        return done.status
    except _UsageError as error:
        if error.parser is not None:
            error.parser.print_usage(sys.stderr)
        _complain(error.message)
        return 2
    except KeyToolError as error:
        _complain(str(error))
        return 1
    except ConfigError as error:
        for issue in error.issues:
            print(issue, file=sys.stderr)
        _complain(f"the config has {len(error.issues)} problem(s); nothing was started")
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A reverse proxy that verifies bearer JWTs, and its operator tools.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_run(commands)
    _add_demo(commands)
    _add_check_config(commands)
    _add_keys(commands)
    _add_token(commands)
    return parser


def _complain(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# -- run ----------------------------------------------------------------------------------


def _add_run(commands: Any) -> None:
    p = commands.add_parser(
        "run",
        help="run the proxy",
        description="Serve with the config FILE until SIGTERM/SIGINT, then drain in-flight requests and exit 0. "
        "SIGHUP or a change of FILE reloads it; an invalid new config is refused and the old one keeps serving.",
    )
    p.add_argument("--config", type=Path, default=Path(os.environ.get("JWT_SIDECAR_CONFIG", "config.yaml")),
                   metavar="FILE", help="the config file (default $JWT_SIDECAR_CONFIG or ./config.yaml)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="operator log level (the access log is separate, on stdout)")
    p.set_defaults(run=_run, parser=p)


def _run(args: argparse.Namespace) -> int:
    return _starting(lambda: _start_run(args))


def _starting(start: Callable[[], int]) -> int:
    """`run` and `demo`: what stops a start that is the operator's to fix is one line, exit 1."""
    try:
        return start()
    except StartupError as error:  # a port in use, a directory that cannot be written, ...
        _complain(str(error))
        return 1
    except ConfigError as error:
        if len(error.issues) != 1:
            raise  # `main` lists them all, then counts them
        _complain(str(error.issues[0]))  # a config file or key file that cannot be read, ...
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers are in place: a stop, not a crash
        return 130


def _start_run(args: argparse.Namespace) -> int:
    settings = config.load(args.config)
    server.configure_logging(args.log_level)
    if not os.environ.get(workers.WORKER_ENV):  # once, not once per worker
        for warning in settings.warnings:
            logging.getLogger("jwt_sidecar.config").warning("%s", routecheck.format_warning(warning))
    # `_created` samples double the /metrics output and no dashboard here reads them.
    prometheus_client.disable_created_metrics()
    if os.environ.get(workers.WORKER_ENV):  # started by the supervisor of `workers: N`
        return server.run_worker(settings, config_path=str(args.config))
    return server.run(settings, config_path=str(args.config))


# -- demo ---------------------------------------------------------------------------------


def _add_demo(commands: Any) -> None:
    p = commands.add_parser(
        "demo",
        help="run the sidecar with a local key set and an echo upstream, and print tokens to try",
        description="Start, on loopback, an issuer serving a freshly generated key set, an upstream that echoes "
        "what it receives, and the sidecar with FILE; print valid tokens and curl lines. Ctrl-C stops everything.",
    )
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="the config (default ./config.yaml, else the example shipped with the package)")
    # Without these each listener takes the config's port, or a free one when that is taken;
    # a port given here is used or the demo does not start.
    p.add_argument("--port", type=_port, metavar="N", help="the sidecar's port (default: the config's listen, 8080)")
    p.add_argument("--admin-port", type=_port, metavar="N", help="the admin port (default: the config's admin, 9901)")
    p.add_argument("--issuer-port", type=_port, metavar="N",
                   help="the demo issuer's port (default: the config's jwks.url, 8090)")
    p.add_argument("--upstream-port", type=_port, metavar="N",
                   help="the echo upstream's port (default: the config's upstream.url, 8000)")
    p.set_defaults(run=_demo, parser=p)


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    path = args.config or demo.default_config_path()
    server.configure_logging("WARNING")

    ports = {role: getattr(args, option[2:].replace("-", "_")) for role, option in demo.OPTIONS.items()}
    given = [(demo.OPTIONS[role], port) for role, port in ports.items() if port is not None]
    for i, (option, port) in enumerate(given):
        for other, same in given[i + 1:]:
            if same == port:
                raise _UsageError(f"{option} and {other} are both {port}; each listener needs its own port",
                                  args.parser)

    def start() -> int:
        asyncio.run(demo.run_demo(path, announce=lambda text: print(text, flush=True),
                                  ports={role: port for role, port in ports.items() if port is not None}))
        return 0

    return _starting(start)


# -- check-config -------------------------------------------------------------------------


def _add_check_config(commands: Any) -> None:
    p = commands.add_parser(
        "check-config",
        help="validate a config file and summarise it",
        description="Report every mistake in FILE as file:line: path: problem (exit 1), or print a summary "
        "of providers, key sources and routes, then any warnings as file:line: warning: path: problem "
        "(exit 0). Nothing is fetched.",
    )
    p.add_argument("file", nargs="?", type=Path, default=Path("config.yaml"), metavar="FILE",
                   help="the config file (default ./config.yaml)")
    p.add_argument("--strict", action="store_true", help="exit 1 when there are warnings too (for CI)")
    p.set_defaults(run=_check_config, parser=p)


def _check_config(args: argparse.Namespace) -> int:
    settings = config.load(args.file)
    print(summary(settings))
    for warning in settings.warnings:
        print(routecheck.format_warning(warning))
    return 1 if args.strict and settings.warnings else 0


def summary(settings: config.Settings) -> str:
    """One screen: what this config trusts and protects."""
    warned = f" ({len(settings.warnings)} warning(s) below)" if settings.warnings else ""
    lines = [f"{settings.source}: OK{warned}"]
    lines.append(f"providers ({len(settings.providers)}):")
    for p in settings.providers.values():
        lines.append(f"  {p.name}: iss {', '.join(p.issuers)}; aud {', '.join(p.audiences)}")
        lines.append(f"    keys: {p.keys.origin}")
        extras = [f"leeway {p.leeway:g}s", f"required {', '.join(p.required_claims) or '-'}"]
        if p.max_token_age is not None:
            extras.append(f"max age {p.max_token_age:g}s")
        if p.typ:
            extras.append(f"typ {p.typ}")
        lines.append(f"    algorithms: {', '.join(p.algorithms)}; " + "; ".join(extras))
    lines.append(f"routes ({len(settings.routes)}, first match wins):")
    for r in settings.routes:
        m = r.match
        where = (f"prefix {m.path_prefix}" if m.path_prefix is not None else
                 f"exact {m.path_exact}" if m.path_exact is not None else f"regex {m.path_regex.pattern}")  # type: ignore[union-attr]
        where += " (any case)" if m.ignore_case else ""
        methods = ",".join(sorted(m.methods)) if m.methods else "any method"
        if r.auth is None:
            rule = "public (no token)"
        else:
            rule = f"{r.auth.provider}{' (optional)' if r.auth.optional else ''}"
            if r.auth.scopes.all_of:
                rule += f"; scopes all of {' '.join(r.auth.scopes.all_of)}"
            if r.auth.scopes.any_of:
                rule += f"; scopes any of {' '.join(r.auth.scopes.any_of)}"
            if r.auth.claims:
                rule += f"; {len(r.auth.claims)} claim rule(s)"
        lines.append(f"  {r.name}: {where} [{methods}] -> {rule}")
    cache = settings.token_cache
    lines.append(f"token cache: {'on' if cache.enabled else 'off'}, {cache.max_entries} entries, max ttl {cache.max_ttl:g}s")
    return "\n".join(lines)


# -- keys ---------------------------------------------------------------------------------


def _add_keys(commands: Any) -> None:
    keys = commands.add_parser("keys", help="make signing keys and publish their public halves")
    actions = keys.add_subparsers(title="actions", metavar="ACTION", required=True)
    _add_keys_generate(actions)


def _add_keys_generate(actions: Any) -> None:
    p = actions.add_parser(
        "generate",
        help="generate a signing key and its public JWK Set",
        description="Write a new private key (mode 0600) as OUT/KID.pem and its public JWK to OUT/jwks.json, "
        "or, with --jwks, add it to an existing JWK Set so old and new keys are served together during a "
        "rotation. HS256 writes a shared secret, OUT/KID.secret, as base64url text instead.",
    )
    p.add_argument("--alg", required=True, choices=GENERATE_ALGORITHMS, help="the signing algorithm")
    p.add_argument("--kid", required=True, help="the key id; also names the private file")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory for the new files")
    p.add_argument("--jwks", type=Path, metavar="FILE", help="existing JWK Set to add the public key to (rotation)")
    p.add_argument("--bits", type=int, metavar="N", help="RSA key size (default 2048)")
    p.set_defaults(run=_keys_generate, parser=p)


def _keys_generate(args: argparse.Namespace) -> int:
    if args.bits is not None and args.alg != "RS256":
        raise _UsageError("--bits only applies to --alg RS256", args.parser)
    key = generate(args.alg, args.kid, bits=args.bits)
    written = write(key, args.out, jwks_path=args.jwks)
    private = written[0]
    if key.secret is not None:
        print(f"wrote {private}: the shared secret (base64url, mode 0600); keep it secret, never commit it")
        print()
        print("Configure the provider that checks these tokens with:")
        print(f"  secret: {{file: {private}, encoding: base64url}}")
        print(f"  algorithms: [{key.alg}]")
        print()
        print("Mint a test token:")
        print(f"  {PROG} token mint --secret-file {private} --secret-encoding base64url "
              "--iss ISSUER --aud AUDIENCE --sub SUBJECT")
        return 0
    jwks = written[1]
    print(f"wrote {private}: the private key (PKCS#8, mode 0600); keep it secret, never commit it")
    if args.jwks is None:
        print(f"wrote {jwks}: the public JWK Set, kid {key.kid}")
        print()
        print(f"Serve {jwks} at your issuer's JWKS URL and configure the provider with")
        print("  jwks: {url: https://ISSUER/.well-known/jwks.json}")
        print("or read the file directly with")
        print(f"  jwks_file: {jwks}")
        print(f"  algorithms: [{key.alg}]")
    else:
        print(f"added kid {key.kid} to {jwks}; it now serves the old keys and the new one")
        print()
        print(f"Rotation: publish {jwks} and keep signing with the old key until every verifier has")
        print("fetched the new set (at most the provider's cache_ttl); then sign with the new key, and")
        print("remove the old key from the set once the last token it signed has expired.")
    print()
    print("Mint a test token:")
    print(f"  {PROG} token mint --key {private} --kid {key.kid} --iss ISSUER --aud AUDIENCE --sub SUBJECT")
    return 0


# -- token --------------------------------------------------------------------------------


def _add_token(commands: Any) -> None:
    token = commands.add_parser("token", help="mint tokens for testing, explain why a token is refused")
    actions = token.add_subparsers(title="actions", metavar="ACTION", required=True)
    _add_token_mint(actions)
    _add_token_explain(actions)


def _add_token_mint(actions: Any) -> None:
    p = actions.add_parser(
        "mint",
        help="sign a token with a private key or shared secret",
        description="Print a signed token, alone, on stdout: TOKEN=$(jwt-sidecar token mint ...). "
        "It carries iss, aud, sub, iat, exp and a random jti, then every --claim.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--key", type=Path, metavar="PEM", help="PEM private key (RSA, EC or Ed25519)")
    source.add_argument("--secret-file", type=Path, metavar="FILE", help="file holding an HMAC secret")
    p.add_argument("--secret-encoding", choices=SECRET_ENCODINGS,
                   help="how --secret-file is written, as in the provider's `secret:` (default utf-8)")
    p.add_argument("--alg", choices=SUPPORTED_ALGORITHMS, help="signing algorithm (default: implied by the key)")
    p.add_argument("--kid", help="key id for the token header")
    p.add_argument("--iss", required=True, help="issuer")
    p.add_argument("--aud", required=True, action="append", metavar="AUD", help="audience (repeatable)")
    p.add_argument("--sub", help="subject")
    p.add_argument("--ttl", type=_duration, default=300.0, metavar="DURATION",
                   help="lifetime, e.g. 30s, 5m, 1h (default 5m)")
    p.add_argument("--claim", type=_claim, action="append", default=[], metavar="NAME=VALUE",
                   help="extra claim; VALUE is JSON when it parses (true, 3, [\"a\"]), else a string (repeatable)")
    p.set_defaults(run=_token_mint, parser=p)


def _token_mint(args: argparse.Namespace) -> int:
    if args.secret_encoding is not None and args.secret_file is None:
        raise _UsageError("--secret-encoding only applies to --secret-file", args.parser)
    claims: dict[str, Any] = {}
    for name, value in args.claim:
        if name in claims:
            raise _UsageError(f"--claim {name} is given twice", args.parser)
        claims[name] = value
    if args.key is not None:
        private_key_pem, secret = _read(args.key), None
    else:
        private_key_pem, secret = None, read_secret(_read(args.secret_file), args.secret_encoding or "utf-8")
    token = mint(
        private_key_pem=private_key_pem, secret=secret, alg=args.alg, kid=args.kid,
        iss=args.iss, aud=args.aud, sub=args.sub, ttl_seconds=args.ttl, claims=claims, now=time.time(),
    )
    print(token)
    return 0


def _add_token_explain(actions: Any) -> None:
    p = actions.add_parser(
        "explain",
        help="run every check on a token and say which pass and which fail",
        description="Decode TOKEN without trusting it, then run every check the proxy runs, printing each "
        "with PASS/FAIL and the reason. Exit 0 only if the token is valid. Remote keys are fetched once.",
    )
    p.add_argument("token", metavar="TOKEN", help="the token ('-' reads it from stdin)")
    p.add_argument("--config", type=Path, default=Path("config.yaml"), metavar="FILE",
                   help="the config file (default ./config.yaml)")
    p.add_argument("--provider", metavar="NAME", help="the provider to check against (default: by the token's iss)")
    p.set_defaults(run=_token_explain, parser=p)


def _token_explain(args: argparse.Namespace) -> int:
    token = (sys.stdin.readline() if args.token == "-" else args.token).strip()
    # Accept a pasted "Bearer xyz" too: the scheme is not part of the token.
    if token[:7].lower() == "bearer ":
        token = token[7:].strip()
    settings = config.load(args.config)
    header, payload = explain_mod.unverified_parts(token)
    provider = explain_mod.choose_provider(settings, payload, args.provider)
    if provider is None:
        if args.provider is not None:
            raise _UsageError(f"unknown provider {args.provider!r}; known: {', '.join(settings.providers)}", args.parser)
        iss = payload.get("iss") if payload else None
        print(f"no provider accepts iss {iss!r}; known issuers: "
              + "; ".join(f"{p.name}: {', '.join(p.issuers)}" for p in settings.providers.values()))
        print("give --provider NAME to check against one anyway")
        return 1
    report = asyncio.run(_explain(token, provider, settings))
    print(_render(report, provider))
    return 0 if report.valid else 1


async def _explain(token: str, provider: config.Provider, settings: config.Settings) -> explain_mod.Report:
    clock = SystemClock()
    async with aiohttp.ClientSession() as session:
        source = key_source_for(provider, session=session, clock=clock)
        await source.start()
        try:
            return await explain_mod.explain(token, provider, source, now=clock.time(),
                                             max_token_bytes=settings.max_token_bytes)
        finally:
            await source.close()


def _render(report: explain_mod.Report, provider: config.Provider) -> str:
    lines = ["token (decoded WITHOUT verification):"]
    lines.append(f"  header:  {json.dumps(report.header, sort_keys=True) if report.header is not None else '(does not decode)'}")
    lines.append(f"  payload: {json.dumps(report.payload, sort_keys=True) if report.payload is not None else '(does not decode)'}")
    lines.append(f"provider: {provider.name} ({provider.keys.origin})")
    marks = {True: "PASS", False: "FAIL", None: "----"}
    for step in report.steps:
        reason = f"   [{step.reason}]" if step.reason is not None else ""
        lines.append(f"  {marks[step.ok]}  {step.name:<16}{step.detail}{reason}".rstrip())
    failure = report.first_failure
    lines.append("VALID" if report.valid else f"INVALID: {failure.reason if failure else 'not every check could run'}")
    return "\n".join(lines)


# -- argument types -----------------------------------------------------------------------


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use e.g. 30s, 5m, 1h30m") from None
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is too short; use at least 1s")
    return seconds


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to 65535)")
    return int(text)


def _claim(text: str) -> tuple[str, Any]:
    try:
        return parse_claim(text)
    except KeyToolError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise KeyToolError(f"cannot read {path}: {error.strerror or error}") from None
