"""Hot reload: build a whole new snapshot from the changed config file, then swap one reference.

Owns: reloading on demand (SIGHUP) and when the file changes (a Kubernetes ConfigMap update
swaps the `..data` symlink, so the resolved target and its mtime are what is watched);
keeping the old snapshot when the new file is invalid (logged with the file's lines, counted);
saying what a reload changed (`changes`: routes, providers and other settings added, removed,
changed) and when the watched file disappears or comes back; reusing key
sources of providers whose key settings did not change (keys.py's `same_source`), letting a
replaced source serve until its successor has keys, and closing those no longer used; the
revocation list's follower likewise: kept, or (when `revocation:` changed) a new one started
before the swap and the old one closed after it.
Does not own: editing the running server (only `Runtime.snapshot` moves).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os

from ..auth.keys import KeyRing
from ..auth.revocationstore import start_store
from ..base.errors import ConfigError, ConfigIssue
from ..base.oplog import event
from ..config import builder as config
from ..config import routecheck
from ..request.runtime import Runtime, build_snapshot

__all__ = ["changes", "file_signature", "reload", "watch"]

log = logging.getLogger("jwt_sidecar.reload")


async def reload(runtime: Runtime) -> bool:
    """Load the config file again; True when the new config now serves, False when the old one stays."""
    path = runtime.config_path
    old = runtime.snapshot
    if path is None or old is None:
        return False
    try:
        # Off the serving loop: the load reads the config, key and secret files.
        settings = await asyncio.to_thread(config.load, path)
        _check_unchangeable(settings, old.settings)
        # The operator log is set up once, at start (where `run --log-*` may override the file).
        settings = dataclasses.replace(settings, log_format=old.settings.log_format, log_level=old.settings.log_level)
    except ConfigError as error:
        runtime.metrics.count_reload(ok=False)
        first = error.issues[0] if error.issues else None
        event(
            log,
            logging.ERROR,
            "reload_refused",
            "config reload refused; the previous config keeps serving: %(problems)s",
            file=path,
            line=first.line if first else None,
            problems="; ".join(str(i) for i in error.issues),
            issues=[{"line": i.line, "key": i.path, "problem": i.message} for i in error.issues],
        )
        return False
    runtime.readiness()  # a sidecar ready before the reload stays ready after it (see Runtime.readiness)
    keyring = KeyRing(settings.providers, fetcher=runtime.fetcher, clock=runtime.clock, reuse=old.keyring)
    await keyring.start()
    # The revocation list's follower is kept unless `revocation:` itself changed; a new one has
    # loaded (or failed to) before the new snapshot serves with it.
    previous = revocation = runtime.revocation
    if settings.revocation != old.settings.revocation:
        revocation = await start_store(settings.revocation, clock=runtime.clock)
    runtime.snapshot = build_snapshot(
        settings, keyring=keyring, clock=runtime.clock, metrics=runtime.metrics, revocation=revocation
    )
    runtime.revocation = revocation
    runtime.settings = settings
    # Requests already running hold the old snapshot and finish with it; its sources that
    # the new ring does not share can go, and so can a follower the new config replaced.
    await old.keyring.close(keep=keyring)
    if previous is not None and previous is not revocation:
        await previous.close()
    runtime.metrics.count_reload(ok=True)
    changed = changes(old.settings, settings)
    summary = "; ".join(f"{what}: {', '.join(names)}" for what, names in changed.items()) or "nothing changed"
    event(
        log,
        logging.INFO,
        "reload_applied",
        "config reloaded from %(file)s: %(summary)s",
        file=path,
        summary=summary,
        **changed,
    )
    for warning in settings.warnings:
        event(
            log,
            logging.WARNING,
            "config_warning",
            "%(warning)s",
            warning=routecheck.format_warning(warning),
            line=warning.line,
            key=warning.path,
        )
    return True


# Read once at start: a reload reports a change of these as needing a restart (and refuses
# one of the listeners, above; the log settings it leaves as they were). The access log is
# opened, and the drain timed (by each process and, with `workers`, by worker 0 for the set), with
# the values the process started with.
_AT_START = ("workers", "access_log", "drain_delay", "drain_timeout")
_NOT_SETTINGS = ("source", "warnings", "providers", "routes")


def changes(old: config.Settings, new: config.Settings) -> dict[str, list[str]]:
    """What a reload changes, by name: `routes_added`, `routes_removed`, `routes_changed`, the
    same for providers, `settings_changed` (top-level keys) and `needs_restart` (keys read
    once at start, which keep their old value until then); only the non-empty ones."""
    out: dict[str, list[str]] = {}
    for kind, before, after in (
        ("routes", {r.name: r for r in old.routes}, {r.name: r for r in new.routes}),
        ("providers", dict(old.providers), dict(new.providers)),
    ):
        out[f"{kind}_added"] = [name for name in after if name not in before]
        out[f"{kind}_removed"] = [name for name in before if name not in after]
        out[f"{kind}_changed"] = [name for name in after if name in before and after[name] != before[name]]
    keys = [f.name for f in dataclasses.fields(new) if f.name not in _NOT_SETTINGS]
    differ = [key for key in keys if getattr(new, key) != getattr(old, key)]
    out["settings_changed"] = [key for key in differ if key not in _AT_START]
    out["needs_restart"] = [key for key in differ if key in _AT_START]
    return {key: names for key, names in out.items() if names}


def _check_unchangeable(new: config.Settings, old: config.Settings) -> None:
    # Listeners are bound once, and the connection limits set on them: a change would
    # silently not take effect.
    for key in ("listen", "admin", "max_connections", "header_timeout", "keep_alive_timeout"):
        if getattr(new, key) != getattr(old, key):
            raise ConfigError(
                [ConfigIssue(new.source, None, key, f"changed from {getattr(old, key)}; a restart is needed for that")]
            )


def file_signature(path: str) -> tuple[float, int, int] | None:
    """What changes when the file (or the symlink chain to it) is replaced or edited."""
    try:
        stat = os.stat(os.path.realpath(path))
    except OSError:
        return None
    return stat.st_mtime, stat.st_ino, stat.st_size


async def watch(
    runtime: Runtime, *, interval: float = 2.0, since: tuple[float, int, int] | bool | None = False
) -> None:
    """Poll the config file and reload when it changes. Polling works on every volume type.
    `since`: the file's `file_signature` from before the process started (server.py takes it
    before the first key fetch, which may take the fetch's timeout): a change made meanwhile is
    reloaded at the first poll, not missed until the next change. False: taken here."""
    path = runtime.config_path
    if path is None:
        return
    seen = file_signature(path) if since is False else since
    missing = False
    while True:
        await asyncio.sleep(interval)
        current = file_signature(path)
        if current is None:
            if not missing:  # said once: the file may stay away for long
                missing = True
                event(
                    log,
                    logging.WARNING,
                    "config_missing",
                    "config file %(file)s is gone or unreadable; the last good config keeps serving",
                    file=path,
                )
            continue
        if missing:
            missing = False
            event(log, logging.INFO, "config_back", "config file %(file)s is there again", file=path)
        if current != seen:
            seen = current
            try:
                await reload(runtime)
            except Exception:  # never let the watcher die: the next change must still reload
                event(
                    log,
                    logging.ERROR,
                    "reload_crashed",
                    "config reload failed unexpectedly; the previous config keeps serving",
                    file=path,
                    exc_info=True,
                )
