"""The `jwt-sidecar` command: parse the command line, call the module that owns the work, report.

Owns: the commands, their options and help, reading the files a command names, what is
printed, and the exit status (0 done, 1 failed, 2 usage, 3 not verified). Does not own: any of the work
itself (keygen.py makes keys and tokens) or exiting the process: `main` returns the status,
and `python -m proxy` or the console script hands it to `SystemExit`.

Each command is one `_add_<command>(commands)` function that builds its subparser and sets
`run=` to a handler taking the parsed arguments and returning the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, cast

import yaml

from .. import __version__
from ..auth.keys import key_source_for
from ..auth.revocation import RevocationIndex, Rule, format_time, make_rule, parse_time
from ..auth.revocationstore import StoreError, add_rules, list_rules
from ..base import oplog
from ..base.clock import SystemClock
from ..base.errors import ConfigError, InvalidToken
from ..base.jwks import SUPPORTED_ALGORITHMS
from ..base.namedfile import CONFIG_BYTES, KEY_FILE_BYTES, NamedFileError, read_named
from ..base.safetext import one_line
from ..config import builder as config
from ..config import routecheck
from ..config.yamlsource import closest, did_you_mean, parse_duration
from ..http.causes import shown
from ..http.fetch import Fetcher
from ..ops import server, workers
from ..ops.startup import StartupError
from . import explain as explain_mod
from .keygen import (
    GENERATE_ALGORITHMS,
    SECRET_ENCODINGS,
    KeyToolError,
    generate,
    mint,
    parse_claim,
    secret_for_minting,
    write,
)

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


def _columns() -> int:
    """The terminal's width as `shutil.get_terminal_size().columns` tells it (COLUMNS, then
    stdout's terminal, else 80)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's own, told the width: left to itself it imports `shutil` to ask, at every
    parser made, and `shutil` brings `bz2` and `lzma` into `jwt-sidecar run` (~0.6 MiB of
    every running sidecar: bench/FIGURES.md, "Resident memory, session 10")."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, _columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)  # (subcommands' parsers are made by this class too)
        super().__init__(*args, **kwargs)

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
        args, extras = parser.parse_known_args(argv)
        if extras:  # named by the command they were given to, with its usage, not the top level's
            raise _UsageError(f"unrecognized arguments: {' '.join(extras)}", getattr(args, "parser", parser))
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
    _add_revoke(commands)
    return parser


def _startup_failed(error: str, **fields: Any) -> None:
    """The one `startup_failed` event: a failed start, as a JSON log line (text logs use `_complain`)."""
    oplog.event(logging.getLogger("jwt_sidecar"), logging.ERROR, "startup_failed", "%(error)s", error=error, **fields)


def _complain(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# -- run ----------------------------------------------------------------------------------


def _add_run(commands: Any) -> None:
    p = commands.add_parser(
        "run",
        help="run the proxy",
        description="Serve with the config FILE until SIGTERM/SIGINT, then drain in-flight requests and exit 0. "
        "SIGHUP or a change of FILE reloads it; an invalid new config is refused and the old one keeps serving. "
        "A start the operator must fix (a port in use, a file that cannot be read, a mistake in FILE) is refused "
        "before anything is served: one line on stderr (a startup_failed JSON line with a JSON log), exit 1.",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("JWT_SIDECAR_CONFIG", "config.yaml")),
        metavar="FILE",
        help="the config file (default $JWT_SIDECAR_CONFIG or ./config.yaml)",
    )
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=oplog.LEVELS,
        help="operator log level (default: the config's log_level, else INFO; the access log is separate, on stdout)",
    )
    p.add_argument(
        "--log-format",
        type=str.lower,
        choices=oplog.FORMATS,
        help="operator log on stderr as text, json (one object per line) or auto (json when stderr "
        "is not a terminal); default: the config's log_format, else text",
    )
    p.set_defaults(run=_run, parser=p)


def _run(args: argparse.Namespace) -> int:
    return _starting(lambda: _start_run(args))


def _starting(start: Callable[[], int]) -> int:
    """`run` and `demo`: what stops a start that is the operator's to fix is one line, exit 1."""
    try:
        return start()
    except StartupError as error:  # a port in use, a directory that cannot be written, ...
        if oplog.writes_json():  # `log_format: json` was read: a log collector parses this line too
            _startup_failed(str(error))
        else:
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
    try:
        settings = config.load(args.config)
    except ConfigError as error:
        workers.abandon_set()  # worker 0 of a set, whose config broke while `run` re-executed it
        # A log collector that parses stderr as JSON must be able to read why the start
        # failed. The config did not load, so the format is the command line's, else the
        # file's own `log_format:` line when it has a readable one.
        if oplog.resolve_format(args.log_format or _declared_log_format(args.config)) != "json":
            raise  # `_starting` or `main` writes the text line(s)
        server.configure_logging("INFO", "json")
        problems = [str(issue) for issue in error.issues]
        # Several problems: the sentence counts them and `problems` lists each one whole (a
        # field is bounded, safetext.FIELD_LIMIT, so a joined list would lose its end).
        summary = (
            problems[0]
            if len(problems) == 1
            else (f"the config has {len(problems)} problem(s); nothing was started (see problems)")
        )
        _startup_failed(summary, problems=problems)
        return 1
    # The command line wins over the file; `auto` is settled here, once, so the workers of
    # `workers: N` (started with these two options) write exactly what worker 0 does.
    settings = dataclasses.replace(
        settings,
        log_level=args.log_level or settings.log_level,
        log_format=oplog.resolve_format(args.log_format or settings.log_format),
    )
    worker = os.environ.get(workers.WORKER_ENV)
    server.configure_logging(
        settings.log_level, settings.log_format, worker=int(worker) if worker and worker.isdigit() else None
    )
    if not os.environ.get(workers.WORKER_ENV) and not workers.in_set():  # once, not once per worker
        for warning in settings.warnings:
            oplog.event(
                logging.getLogger("jwt_sidecar.config"),
                logging.WARNING,
                "config_warning",
                "%(warning)s",
                warning=routecheck.format_warning(warning),
                line=warning.line,
                key=warning.path,
            )
    # No `_created` samples (they would double the /metrics output and no dashboard here reads
    # them): telemetry/exposition.py writes none, and the multiprocess files have none.
    if os.environ.get(workers.WORKER_ENV):  # started again by worker 0 of `workers: N`
        return server.run_worker(settings, config_path=str(args.config))
    return server.run(settings, config_path=str(args.config))


def _declared_log_format(path: Path) -> str:
    """The `log_format` a config file that did not load says, if it says one plainly; else text."""
    try:
        document = yaml.safe_load(read_named(path, CONFIG_BYTES).decode("utf-8"))
    except (NamedFileError, ValueError, yaml.YAMLError):
        return "text"
    declared = document.get("log_format") if isinstance(document, dict) else None
    return declared.lower() if isinstance(declared, str) and declared.lower() in oplog.FORMATS else "text"


# -- demo ---------------------------------------------------------------------------------


def _add_demo(commands: Any) -> None:
    p = commands.add_parser(
        "demo",
        help="run the sidecar with a local key set and an echo upstream, and print tokens to try",
        description="Start, on loopback, an issuer serving a freshly generated key set, an upstream that echoes "
        "what it receives, and the sidecar with FILE; print valid tokens and curl lines. Ctrl-C stops everything. "
        "A port the config names that is taken is replaced by a free one (the URLs and commands printed use the "
        "ports chosen); a port given as an option is used as given, or the demo does not start.",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="the config (default ./config.yaml, else the example shipped with the package)",
    )
    # Without these each listener takes the config's port, or a free one when that is taken;
    # a port given here is used or the demo does not start.
    p.add_argument(
        "--port", type=_port, metavar="N", help="the sidecar's port (default: the config's listen, 8080, or a free one)"
    )
    p.add_argument(
        "--admin-port",
        type=_port,
        metavar="N",
        help="the admin port (default: the config's admin, 9901, or a free one)",
    )
    p.add_argument(
        "--issuer-port",
        type=_port,
        metavar="N",
        help="the demo issuer's port (default: the config's jwks.url, 8090, or a free one)",
    )
    p.add_argument(
        "--upstream-port",
        type=_port,
        metavar="N",
        help="the echo upstream's port (default: the config's upstream.url, 8000, or a free one)",
    )
    p.set_defaults(run=_demo, parser=p)


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    path = args.config or demo.default_config_path()
    server.configure_logging("WARNING")

    ports = {role: getattr(args, option[2:].replace("-", "_")) for role, option in demo.OPTIONS.items()}
    given = [(demo.OPTIONS[role], port) for role, port in ports.items() if port is not None]
    for i, (option, port) in enumerate(given):
        for other, same in given[i + 1 :]:
            if same == port:
                raise _UsageError(
                    f"{option} and {other} are both {port}; each listener needs its own port", args.parser
                )

    def start() -> int:
        asyncio.run(
            demo.run_demo(
                path,
                announce=lambda text: print(text, flush=True),
                ports={role: port for role, port in ports.items() if port is not None},
            )
        )
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
    p.add_argument(
        "file",
        nargs="?",
        type=Path,
        default=Path("config.yaml"),
        metavar="FILE",
        help="the config file (default ./config.yaml)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when there are warnings too (for CI)")
    p.set_defaults(run=_check_config, parser=p)


def _check_config(args: argparse.Namespace) -> int:
    try:
        settings = config.load(args.file)
    except ConfigError as error:
        # As `run` lists them, but this command starts nothing, so it does not say so.
        for issue in error.issues:
            print(issue, file=sys.stderr)
        _complain(f"the config has {len(error.issues)} problem(s)")
        return 1
    print(summary(settings))
    for warning in settings.warnings:
        print(routecheck.format_warning(warning))
    if args.strict and settings.warnings:
        # Say why the status is 1 after a summary that says OK.
        _complain(f"{len(settings.warnings)} warning(s), and --strict fails on any")
        return 1
    return 0


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
        # cast: a route matches by exactly one of prefix, exact or regex (the builder checks).
        where = (
            f"prefix {m.path_prefix}"
            if m.path_prefix is not None
            else f"exact {m.path_exact}"
            if m.path_exact is not None
            else f"regex {cast(re.Pattern[str], m.path_regex).pattern}"
        )
        where += " (any case)" if m.ignore_case else ""
        methods = ",".join(sorted(m.methods)) if m.methods else "any method"
        if r.auth is None:
            rule = "public (no token)"
        else:
            who = (
                f"providers {', '.join(r.auth.providers)} (the token's iss chooses)"
                if r.auth.providers
                else r.auth.provider
            )
            rule = f"{who}{' (optional)' if r.auth.optional else ''}"
            if r.auth.mode == "report":
                rule += " (report mode: refuses nothing)"
            if r.auth.scopes.all_of:
                rule += f"; scopes all of {' '.join(r.auth.scopes.all_of)}"
            if r.auth.scopes.any_of:
                rule += f"; scopes any of {' '.join(r.auth.scopes.any_of)}"
            if r.auth.claims:
                rule += f"; {len(r.auth.claims)} claim rule(s)"
        lines.append(f"  {r.name}: {where} [{methods}] -> {rule}")
    cache = settings.token_cache
    lines.append(
        f"token cache: {'on' if cache.enabled else 'off'}, {cache.max_entries} entries, max ttl {cache.max_ttl:g}s"
    )
    lines.append(_revocation_summary(settings))
    # Each entry is one line: a name or an issuer holding a newline or an escape sequence is shown escaped.
    return "\n".join(one_line(line) for line in lines)


def _revocation_summary(settings: config.Settings) -> str:
    store = settings.revocation
    if store is None:
        return "revocation: off (no `revocation:` section)"
    where = _store_words(store)
    line = f"revocation: {where}; max staleness {store.max_staleness:g}s, fail {store.fail}"
    exempt = [f"provider {p.name}" for p in settings.providers.values() if not p.revocation]
    exempt += [f"route {r.name}" for r in settings.routes if r.auth is not None and not r.auth.revocation]
    return line + (f"; not checked for {', '.join(exempt)}" if exempt else "")


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
        print(f"Configure the provider that checks these tokens with ({_RELATIVE_NOTE}):")
        print(f"  secret: {{file: {_absolute(private)}, encoding: base64url}}")
        print(f"  algorithms: [{key.alg}]")
        print()
        print("Mint a test token:")
        print(f"  {_program()} token mint --secret-file {private} --iss ISSUER --aud AUDIENCE --sub SUBJECT")
        return 0
    jwks = written[1]
    print(f"wrote {private}: the private key (PKCS#8, mode 0600); keep it secret, never commit it")
    if args.jwks is None:
        print(f"wrote {jwks}: the public JWK Set, kid {key.kid}")
        print()
        print(f"Serve {jwks} at your issuer's JWKS URL and configure the provider with")
        print("  jwks: {url: https://ISSUER/.well-known/jwks.json}")
        print(f"or read the file directly with ({_RELATIVE_NOTE})")
        print(f"  jwks_file: {_absolute(jwks)}")
        print(f"  algorithms: [{key.alg}]")
    else:
        print(f"added kid {key.kid} to {jwks}; it now serves the old keys and the new one")
        print()
        print(f"Rotation: publish {jwks} and keep signing with the old key until every verifier has")
        print("fetched the new set (at most the provider's cache_ttl); then sign with the new key, and")
        print("remove the old key from the set once the last token it signed has expired.")
    print()
    print("Mint a test token:")
    print(f"  {_program()} token mint --key {private} --kid {key.kid} --iss ISSUER --aud AUDIENCE --sub SUBJECT")
    return 0


# The snippets are pasted into a config that may live elsewhere, and a config reads a relative
# path from its own directory, not from where this command ran: so they name the file absolutely.
_RELATIVE_NOTE = "the path is absolute: a config reads a relative path from its own directory"


def _program() -> str:
    """This `jwt-sidecar` by a path that works without activating its venv, as the demo prints it."""
    from .demo import command

    return command()


def _absolute(path: Path) -> Path:
    return path if path.is_absolute() else Path.cwd() / path


# -- token --------------------------------------------------------------------------------


def _add_token(commands: Any) -> None:
    token = commands.add_parser("token", help="mint tokens for testing, explain why a token is refused")
    actions = token.add_subparsers(title="actions", metavar="ACTION", required=True)
    _add_token_mint(actions)
    _add_token_explain(actions)


def _add_token_mint(actions: Any) -> None:
    p: argparse.ArgumentParser = actions.add_parser(
        "mint",
        help="sign a token with a private key or shared secret",
        description="Print a signed token, alone, on stdout: TOKEN=$(jwt-sidecar token mint ...). "
        "It carries iss, aud, sub, iat, exp, nbf with --not-before, a random jti, then every --claim. "
        "Exit 0 printed, 1 the key, secret or claims cannot make a token, 2 usage error.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--key", type=Path, metavar="PEM", help="PEM private key (RSA, EC or Ed25519)")
    source.add_argument(
        "--secret-file",
        type=Path,
        metavar="FILE",
        help="file holding an HMAC secret; one written by `keys generate` needs no --secret-encoding",
    )
    p.add_argument(
        "--secret-encoding",
        choices=SECRET_ENCODINGS,
        help="how --secret-file is written, as in the provider's `secret: encoding:`; needed only when "
        "the file could be read more than one way (default: the one way it reads)",
    )
    p.add_argument("--alg", choices=SUPPORTED_ALGORITHMS, help="signing algorithm (default: implied by the key)")
    p.add_argument("--kid", help="key id for the token header")
    p.add_argument("--iss", required=True, help="issuer")
    p.add_argument("--aud", required=True, action="append", metavar="AUD", help="audience (repeatable)")
    p.add_argument("--sub", help="subject")
    p.add_argument(
        "--ttl",
        type=_ttl,
        default=300.0,
        metavar="DURATION",
        help="exp from now: 60 (seconds), 30s, 5m, 1h30m (default 5m); negative for a token that "
        "expired that long ago: --ttl=-5m",
    )
    p.add_argument(
        "--not-before",
        type=_not_before,
        metavar="WHEN",
        help="set nbf: an offset from now (5m, 90, --not-before=-1m) or a time with its zone "
        "(2026-12-03T10:00:00Z); after now makes a token that is not valid yet",
    )
    p.add_argument(
        "--claim",
        type=_claim,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help='extra claim; VALUE is JSON when it parses (true, 3, ["a"]), else a string (repeatable)',
    )
    p.set_defaults(run=_token_mint, parser=p)
    usage_error = p.error

    def error(message: str) -> NoReturn:
        # argparse reads `--ttl -5m` as two options; say how to give a negative value.
        if message in ("argument --ttl: expected one argument", "argument --not-before: expected one argument"):
            option = message.split(":")[0].removeprefix("argument ")
            message += f" (write a negative value with '=': {option}={'-5m' if option == '--ttl' else '-1m'})"
        usage_error(message)

    p.error = error  # type: ignore[method-assign]  # argparse has no hook for this message but its method


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
        if b"-----BEGIN" not in private_key_pem:
            # As --secret-file names --key for a PEM file: say which option this file is for.
            if not private_key_pem.strip():
                raise KeyToolError(f"{args.key} is empty; give a PEM private key")
            raise KeyToolError(
                f"{args.key} holds no PEM block, so no private key; a shared secret (as `keys "
                f"generate --alg HS256` writes) signs with --secret-file {args.key}"
            )
    else:
        secret, encoding = secret_for_minting(
            _read(args.secret_file), args.secret_encoding, source=str(args.secret_file), alg=args.alg
        )
        private_key_pem = None
        if args.secret_encoding is None and encoding != "utf-8":
            # Not silent: the provider that checks these tokens must read the file the same way.
            print(
                f"{PROG}: note: read {args.secret_file} as {encoding} text, the form `keys generate` writes; "
                f"the provider needs `secret: {{file: ..., encoding: {encoding}}}`",
                file=sys.stderr,
            )
    now = time.time()
    kind, when = args.not_before if args.not_before is not None else (None, 0.0)
    token = mint(
        private_key_pem=private_key_pem,
        secret=secret,
        alg=args.alg,
        kid=args.kid,
        iss=args.iss,
        aud=args.aud,
        sub=args.sub,
        ttl_seconds=args.ttl,
        claims=claims,
        now=now,
        not_before=None if kind is None else now + when if kind == "offset" else when,
    )
    print(token)
    return 0


EXPLAIN_EXIT_STATUSES: dict[int, str] = {
    0: "VALID: every check the proxy runs passed",
    1: "INVALID: the proxy refuses this token, or the input is not a JWT; the last line names the reason",
    2: "usage error (an unknown option, --provider or --route, either without a config, both at once, or --route "
    "naming a public route)",
    3: "NOT VERIFIED: decoded only: no config, a config with problems, or the provider's keys (or the revocation "
    "list) could not be loaded",
}
"""`token explain`'s exit statuses, as its help and README.md list them."""


def _add_token_explain(actions: Any) -> None:
    p = actions.add_parser(
        "explain",
        help="say what a token is and run every check on it, saying which pass and which fail",
        description='Say what TOKEN is ("not a JWT: ..." stops there), decode it WITHOUT trusting it, then run '
        "every check the proxy runs, in its order, printing each with PASS/FAIL/---- and the reason the proxy "
        "would log. With no config, only decode and run the checks no config changes. Remote keys are fetched as "
        "the proxy fetches them: at start, and once more when that brought none or the token's kid is not held.",
        epilog="exit status: " + "; ".join(f"{code} {text}" for code, text in EXPLAIN_EXIT_STATUSES.items()),
    )
    p.add_argument("token", metavar="TOKEN", help="the token ('-' reads it from stdin; a leading 'Bearer ' is ignored)")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="the config file (default $JWT_SIDECAR_CONFIG, else ./config.yaml if it exists, else none)",
    )
    p.add_argument(
        "--provider",
        metavar="NAME",
        help="the provider to check against (default: the one whose issuer is the token's iss, else "
        "the config's only provider)",
    )
    p.add_argument(
        "--route",
        metavar="NAME",
        help="check as a request on this route would be: its provider, or with `providers:` the one its "
        "token's iss names among them (and its header map)",
    )
    p.set_defaults(run=_token_explain, parser=p)


def _token_explain(args: argparse.Namespace) -> int:
    token = (sys.stdin.readline() if args.token == "-" else args.token).strip()
    # Accept a pasted "Bearer xyz" or a whole "Authorization: Bearer xyz" line too: neither
    # the header name nor the scheme is part of the token.
    token = _PASTED_PREFIX.sub("", token, count=1).strip()
    settings, no_config = _explain_settings(args.config)
    if settings is None and args.provider is not None:
        raise _UsageError(f"--provider needs a config; {no_config}", args.parser)
    if settings is not None and args.provider is not None and args.provider not in settings.providers:
        raise _UsageError(
            f"unknown provider {args.provider!r}; known: {', '.join(settings.providers) or '(none)'}", args.parser
        )
    route = _explain_route(args, settings, no_config)
    form = explain_mod.inspect(token)
    if form.problem is not None:
        # What the input is comes first, and nothing else is said about something that is no JWT.
        print(form.problem)
        limit = settings.max_token_bytes if settings is not None else explain_mod.DEFAULT_MAX_TOKEN_BYTES
        if len(token) > limit:
            print(f"it is also {len(token)} bytes, over the limit of {limit}, which the proxy checks first")
            print(f"INVALID: {explain_mod.Reason.TOO_LARGE}")
        else:
            print(f"INVALID: {explain_mod.Reason.MALFORMED}")
        return 1
    now = time.time()
    print(_render_form(form, now))
    if settings is None:
        report = explain_mod.explain_without_config(form)
        print(f"{no_config}; only the checks every config makes the same were run:")
        print(_render_steps(report))
        print("a config is needed to check " + ", ".join(explain_mod.CONFIG_CHECKS))
        failure = report.first_failure
        if failure is not None:
            print(f"refused whatever the config ({failure.name}: {failure.detail})")
            print(f"INVALID: {failure.reason}")
            return 1
        print("NOT VERIFIED: no config")
        return 3
    if route is not None:
        return _explain_on_route(token, route, settings)
    provider = explain_mod.choose_provider(settings, form.payload, args.provider)
    if provider is None:
        problem, reason = explain_mod.provider_problem(settings, form.payload)
        print(one_line(f"provider: none chosen: {problem}"))
        print("give --provider NAME to run every check against one of them")
        print(f"INVALID: {reason}")
        return 1
    report = asyncio.run(_explain(token, provider, settings))
    return _explained(report, provider, args.provider is not None, form)


def _explained(
    report: explain_mod.Report, provider: config.Provider, named: bool, form: explain_mod.Form | None, chosen: str = ""
) -> int:
    """Print the provider line and the steps; the exit status."""
    chosen = chosen or (
        "as named"
        if named
        else (
            "by the token's iss"
            if form is not None and form.payload is not None and form.payload.get("iss") in provider.issuers
            else "the config's only provider"
        )
    )
    print(one_line(f"provider: {provider.name} ({provider.keys.origin}), {chosen}"))  # a name may hold anything
    print(_render_steps(report))
    if report.valid:
        print("VALID")
        return 0
    failure = report.first_failure
    if failure is None or failure.reason is explain_mod.Reason.NO_KEYS:
        print(f"NOT VERIFIED: {failure.reason if failure else 'not every check could run'}")
        return 3
    print(f"INVALID: {failure.reason}")
    return 1


def _explain_route(args: argparse.Namespace, settings: config.Settings | None, no_config: str) -> config.Route | None:
    """`--route NAME`: the route, after the mistakes an operator can make naming it."""
    if args.route is None:
        return None
    if settings is None:
        raise _UsageError(f"--route needs a config; {no_config}", args.parser)
    if args.provider is not None:
        raise _UsageError("--route and --provider are exclusive: the route says which provider(s)", args.parser)
    routes = {r.name: r for r in settings.routes}
    route = routes.get(args.route)
    if route is None:
        mean = did_you_mean(closest(args.route, routes))
        raise _UsageError(f"unknown route {args.route!r}; {mean}known: {', '.join(routes) or '(none)'}", args.parser)
    if route.auth is None:
        raise _UsageError(f"route {args.route!r} is public (auth: none): no token is checked there", args.parser)
    return route


def _explain_on_route(token: str, route: config.Route, settings: config.Settings) -> int:
    assert route.auth is not None
    try:
        provider = explain_mod.route_provider(settings, route, token)
    except InvalidToken as error:
        print(one_line(f"provider: none of route {route.name}'s chosen: {error.detail}"))
        print(f"INVALID: {error.reason}")
        return 1
    if route.auth.providers:
        chosen = f"chosen by the token's iss among route {route.name}'s providers ({', '.join(route.auth.providers)})"
    else:
        chosen = f"route {route.name}'s provider"
    report = asyncio.run(_explain(token, provider, settings, route.headers))
    return _explained(report, provider, False, None, chosen)


_PASTED_PREFIX = re.compile(r"\A(?:authorization:[ \t]*)?bearer[ \t]+", re.IGNORECASE)


def _explain_settings(path: Path | None) -> tuple[config.Settings | None, str]:
    """The config `token explain` checks against, or None and why there is none."""
    if path is None:
        named = os.environ.get("JWT_SIDECAR_CONFIG")
        if named:
            path = Path(named)
        else:
            path = Path("config.yaml")
            if not path.exists():
                return None, "no config: ./config.yaml does not exist and no --config FILE was given"
    try:
        return config.load(path), ""
    except ConfigError as error:
        for issue in error.issues:
            print(issue, file=sys.stderr)
        return None, f"no config: {path} has {len(error.issues)} problem(s), listed on stderr"


async def _explain(
    token: str, provider: config.Provider, settings: config.Settings, headers: config.HeaderMap | None = None
) -> explain_mod.Report:
    clock = SystemClock()
    revocation = await _revocation_list(settings.revocation, clock.time()) if provider.revocation else None
    if settings.revocation is not None and revocation is None:  # the provider opts out: no read
        revocation = explain_mod.RevocationList(_store_words(settings.revocation), None)
    async with Fetcher() as fetcher:
        source = key_source_for(provider, fetcher=fetcher, clock=clock)
        await source.start()
        try:
            return await explain_mod.explain(
                token,
                provider,
                source,
                now=clock.time(),
                max_token_bytes=settings.max_token_bytes,
                revocation=revocation,
                headers=headers,
            )
        finally:
            await source.close()


def _store_words(store: config.RevocationSettings) -> str:
    return f"Redis {shown(store.redis.url)}" if store.redis is not None else f"file {store.file}"


async def _revocation_list(store: config.RevocationSettings | None, now: float) -> explain_mod.RevocationList | None:
    """The configured revocation list, read once (as a sidecar loads it at start), or why it could not be."""
    if store is None:
        return None
    try:
        rules = await list_rules(store, now=now)
    except StoreError as error:
        return explain_mod.RevocationList(_store_words(store), None, str(error))
    return explain_mod.RevocationList(_store_words(store), RevocationIndex(rules))


def _render_form(form: explain_mod.Form, now: float) -> str:
    lines = [f"input: {form.summary}", "decoded, UNVERIFIED (nothing here is trusted until the signature verifies):"]
    lines.append(f"  header:  {json.dumps(form.header, sort_keys=True)}")
    if form.payload is None:
        lines.append(f"  payload: does not decode: {(form.payload_problem or '').removeprefix('payload: ')}")
    else:
        lines.append(f"  payload: {json.dumps(form.payload, sort_keys=True)}")
        for name in ("iat", "nbf", "exp"):
            if name in form.payload:
                lines.append(f"  {name}:     {explain_mod.when(form.payload[name], now)}")
    return "\n".join(lines)


def _render_steps(report: explain_mod.Report) -> str:
    marks = {True: "PASS", False: "FAIL", None: "----"}
    lines = []
    for step in report.steps:
        reason = f"   [{step.reason}]" if step.reason is not None else ""
        lines.append(one_line(f"  {marks[step.ok]}  {step.name:<16}{step.detail}{reason}".rstrip()))
    return "\n".join(lines)


# -- revoke -------------------------------------------------------------------------------


def _add_revoke(commands: Any) -> None:
    p = commands.add_parser(
        "revoke",
        help="revoke tokens in the configured store (file or Redis), or list the rules in force",
        description="Write a revocation rule to the store the config's `revocation:` names; every sidecar "
        "reading it refuses the tokens it matches within a second (401 invalid_token, reason revoked). "
        "--jti ID: one token. --sub SUB [--iss ISS]: every token of a subject. --before TIME [--sub SUB]: "
        "every token issued before TIME, of one subject or (without --sub) of every subject. --provider NAME "
        "narrows any of them to one provider's tokens. A rule lasts --ttl, else revocation.default_ttl, else "
        "the providers' longest token lifetime (max_token_age plus leeway), counted from TIME for --before. "
        "--list prints the rules in force. Nothing on the proxy port can revoke.",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--jti", metavar="ID", help="revoke the one token whose jti claim is ID")
    what.add_argument(
        "--before",
        metavar="TIME",
        type=_instant,
        help="revoke the tokens issued (iat) before TIME: now, 2026-12-03T12:00:00Z, or Unix seconds; "
        "a token without iat counts as issued before",
    )
    what.add_argument("--list", action="store_true", help="print the rules in force and exit")
    # Not in the group: --sub alone revokes a subject, with --before only its older tokens.
    p.add_argument("--sub", metavar="SUB", help="revoke the tokens of this subject (with --before: only older ones)")
    p.add_argument("--iss", metavar="ISS", help="with --sub or --before: only tokens of this issuer")
    p.add_argument("--provider", metavar="NAME", help="only tokens this provider admits (default: every provider's)")
    p.add_argument("--ttl", metavar="D", type=_rule_ttl, help="how long the rule lasts: 30m, 24h, 7d (at least 1s)")
    p.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("JWT_SIDECAR_CONFIG", "config.yaml")),
        metavar="FILE",
        help="the config file naming the store (default $JWT_SIDECAR_CONFIG or ./config.yaml)",
    )
    p.set_defaults(run=_revoke, parser=p)


def _revoke(args: argparse.Namespace) -> int:
    parser = args.parser
    if args.jti is None and args.sub is None and args.before is None and not args.list:
        raise _UsageError(
            "say what to revoke: --jti ID, --sub SUB or --before TIME (or --list what is in force)", parser
        )
    if args.list and any(v is not None for v in (args.sub, args.iss, args.provider, args.ttl)):
        raise _UsageError("--list takes no other option but --config", parser)
    if args.jti is not None and args.sub is not None:
        raise _UsageError("--jti revokes one token; --sub all of a subject's: give one of them", parser)
    if args.iss is not None and args.jti is not None:
        raise _UsageError("--iss narrows --sub or --before, not --jti", parser)
    for name in ("jti", "sub", "iss", "provider"):
        value = getattr(args, name)
        if value is not None and not value.strip():
            raise _UsageError(f"--{name} must not be empty", parser)
    settings = config.load(args.config)
    store = settings.revocation
    if store is None:
        _complain(
            f"{args.config} has no `revocation:` section, so no sidecar reads a revocation list; add one, "
            "e.g. revocation: {file: revoked.yaml} or revocation: {redis: {url: redis://HOST:6379/0}}"
        )
        return 1
    where = _store_words(store)
    now = time.time()
    if args.list:
        try:
            rules = asyncio.run(list_rules(store, now=now))
        except StoreError as error:
            _complain(str(error))
            return 1
        print(one_line(f"{len(rules)} rule(s) in force in {where}"))
        for rule in rules:
            print(_rule_line(rule))
        return 0
    if args.provider is not None and args.provider not in settings.providers:
        known = ", ".join(settings.providers)
        raise _UsageError(f"unknown provider {args.provider!r}; known providers: {known}", parser)
    chosen = [settings.providers[args.provider]] if args.provider else list(settings.providers.values())
    if args.iss is not None:
        chosen = [p for p in chosen if args.iss in p.issuers]
        if not chosen:
            known = ", ".join(sorted({i for p in settings.providers.values() for i in p.issuers}))
            raise _UsageError(
                f"no provider{' ' + args.provider if args.provider else ''} trusts issuer "
                f"{args.iss!r}; issuers: {known}",
                parser,
            )
    if args.ttl is not None:
        expires = now + args.ttl
    else:
        ttl = store.default_ttl
        if ttl is None:
            # A provider with `revocation: false` never reads the list: its tokens' life is no
            # bound on the rule's (when every one opted out, the rule serves none: as before).
            chosen = [p for p in chosen if p.revocation] or chosen
            unbounded = [p.name for p in chosen if p.max_token_age is None]
            if unbounded:
                _complain(
                    f"provider {', '.join(unbounded)} has no max_token_age, so how long its tokens live is not "
                    "known: give --ttl (longer than they live, e.g. --ttl 24h), or set revocation.default_ttl"
                )
                return 1
            ttl = max((p.max_token_age or 0) + p.leeway for p in chosen)
        # Tokens issued before TIME are all expired by TIME plus their lifetime.
        expires = (args.before if args.before is not None else now) + ttl
    if expires <= now:
        _complain(
            f"the rule would expire at {format_time(expires)}, already past: every token it names has expired "
            "(give --ttl to keep it anyway)"
        )
        return 1
    rule = make_rule(
        jti=args.jti, sub=args.sub, iss=args.iss, provider=args.provider, before=args.before, expires=expires
    )
    try:
        [written] = asyncio.run(add_rules(store, [rule], now=now))
    except StoreError as error:
        _complain(str(error))
        return 1
    print(one_line(f"revoked in {where}: {_rule_words(written)}"))
    print("every sidecar reading this store refuses these tokens within a second (401 invalid_token, reason revoked)")
    return 0


def _rule_words(rule: Rule) -> str:
    if rule.jti is not None:
        what = f"the token with jti {rule.jti!r}"
    elif rule.sub is not None:
        what = f"every token of sub {rule.sub!r}"
    else:
        what = "every token"
    if rule.iss is not None:
        what += f" of issuer {rule.iss!r}"
    what += f" of provider {rule.provider}" if rule.provider is not None else " of every provider"
    if rule.before is not None:
        what += f" issued before {format_time(rule.before)}"
    return what + (f", until {format_time(rule.expires)}" if rule.expires is not None else ", with no expiry")


def _rule_line(rule: Rule) -> str:
    return one_line(f"  {rule.kind:<6} {_rule_words(rule)}")


# -- argument types -----------------------------------------------------------------------


def _offset(text: str) -> float:
    """Seconds from a signed duration: 60, -300, 30s, -5m, +1h30m (a plain number is seconds, as in the config)."""
    body = text.strip()
    sign = -1.0 if body.startswith("-") else 1.0
    body = body[1:] if body[:1] in "+-" else body
    try:
        return sign * float(body) if _PLAIN_SECONDS.fullmatch(body) else sign * parse_duration(body)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use e.g. 60, 30s, 5m, 1h30m, -5m") from None


_PLAIN_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def _ttl(text: str) -> float:
    seconds = _offset(text)
    if abs(seconds) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is too short; use at least 1s (or -1s for an expired token)")
    return seconds


def _not_before(text: str) -> tuple[str, float]:
    """("offset", seconds from now) or ("at", a Unix time)."""
    try:
        return "offset", _offset(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an offset (5m, -1m, 90) nor a time (2026-12-03T10:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone; add one, e.g. {text.strip()}Z for UTC")
    return "at", moment.timestamp()


def _instant(text: str) -> float:
    if text.strip().lower() == "now":
        return time.time()
    try:
        return parse_time(float(text) if _PLAIN_SECONDS.fullmatch(text.strip()) else text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error}; or now") from None


def _rule_ttl(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use e.g. 30m, 24h, 7d") from None
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is too short; a rule lasts at least 1s")
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
        return read_named(path, KEY_FILE_BYTES)  # a regular file, bounded: `--key /dev/zero` is an error
    except NamedFileError as error:
        raise KeyToolError(f"cannot read {path}: {error}" if error.cannot_read else f"{path} {error}") from None
