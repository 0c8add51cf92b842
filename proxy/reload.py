"""Hot reload: build a whole new snapshot from the changed config file, then swap one reference.

Owns: reloading on demand (SIGHUP) and when the file changes (a Kubernetes ConfigMap update
swaps the `..data` symlink, so the resolved target and its mtime are what is watched);
keeping the old snapshot when the new file is invalid (logged, counted); reusing key
sources of providers whose key settings did not change (keys.py's `same_source`), letting a
replaced source serve until its successor has keys, and closing those no longer used.
Does not own: editing the running server (only `Runtime.snapshot` moves).
"""

from __future__ import annotations

import asyncio
import logging
import os

from . import config, routecheck
from .errors import ConfigError, ConfigIssue
from .keys import KeyRing
from .runtime import Runtime, build_snapshot

__all__ = ["file_signature", "reload", "watch"]

log = logging.getLogger("jwt_sidecar.reload")


async def reload(runtime: Runtime) -> bool:
    """Load the config file again; True when the new config now serves, False when the old one stays."""
    path = runtime.config_path
    old = runtime.snapshot
    if path is None or old is None:
        return False
    try:
        settings = config.load(path)
        _check_unchangeable(settings, old.settings)
    except ConfigError as error:
        runtime.metrics.count_reload(ok=False)
        log.error("config reload refused; the previous config keeps serving:\n%s", error)
        return False
    runtime.readiness()  # a sidecar ready before the reload stays ready after it (see Runtime.readiness)
    keyring = KeyRing(settings.providers, session=runtime.session, clock=runtime.clock, reuse=old.keyring)
    await keyring.start()
    runtime.snapshot = build_snapshot(settings, keyring=keyring, clock=runtime.clock, metrics=runtime.metrics)
    runtime.settings = settings
    # Requests already running hold the old snapshot and finish with it; its sources that
    # the new ring does not share can go.
    await old.keyring.close(keep=keyring)
    runtime.metrics.count_reload(ok=True)
    log.info("config reloaded from %s", path)
    for warning in settings.warnings:
        log.warning("%s", routecheck.format_warning(warning))
    return True


def _check_unchangeable(new: config.Settings, old: config.Settings) -> None:
    # Listeners are bound once, and the connection limits set on them: a change would
    # silently not take effect.
    for key in ("listen", "admin", "max_connections", "header_timeout"):
        if getattr(new, key) != getattr(old, key):
            raise ConfigError([ConfigIssue(new.source, None, key,
                                                  f"changed from {getattr(old, key)}; a restart is needed for that")])


def file_signature(path: str) -> tuple[float, int, int] | None:
    """What changes when the file (or the symlink chain to it) is replaced or edited."""
    try:
        stat = os.stat(os.path.realpath(path))
    except OSError:
        return None
    return stat.st_mtime, stat.st_ino, stat.st_size


async def watch(runtime: Runtime, *, interval: float = 2.0) -> None:
    """Poll the config file and reload when it changes. Polling works on every volume type."""
    path = runtime.config_path
    if path is None:
        return
    seen = file_signature(path)
    while True:
        await asyncio.sleep(interval)
        current = file_signature(path)
        if current is not None and current != seen:
            seen = current
            try:
                await reload(runtime)
            except Exception:  # never let the watcher die: the next change must still reload
                log.exception("config reload failed unexpectedly; the previous config keeps serving")
