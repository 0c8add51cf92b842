"""A changed k8s/config.yaml, applied again, reaches a running sidecar as the kubelet delivers it.

kustomization.yaml keeps the generated ConfigMap's plain name so that `kubectl apply -k k8s/`
with a changed config.yaml updates it in place, and the README says the running sidecars
reload it. The kubelet delivers that update by writing the whole volume anew and swapping the
`..data` symlink (tests.k8s_support.kubelet_write); this runs `jwt-sidecar run` on the Pod's
volume laid out that way and swaps it, once with a good config and once with a broken one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import TestKey, jwks_of
from tests.k8s_support import edit_config, kubelet_write, mounted_volumes, pod_config
from tests.support import process
from tests.support.process import free_port
from tests.support.upstream import start_upstream

RELOADS = 'jwt_sidecar_config_reloads_total{result="%s"}'


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url) as response:
        text = await response.text()
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)


async def until(check: Any, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


async def test_a_reapplied_configmap_is_reloaded_and_a_broken_one_refused(
    aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey, tmp_path: Path
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    issuer = jwks_server.url("").rstrip("/")
    jwks_server.issuer = issuer
    upstream = await start_upstream(aiohttp_server)
    listen, admin = free_port(), free_port()
    config_file = pod_config(tmp_path)
    volume = config_file.parent

    def local(c: dict[str, Any]) -> None:
        c["listen"], c["admin"] = f"127.0.0.1:{listen}", f"127.0.0.1:{admin}"
        c["upstream"]["url"] = upstream.url
        c["providers"]["sso"]["issuer"] = issuer

    edit_config(config_file, local)
    running = config_file.read_text()
    secret_files = {
        path: content for path, content in next(iter(mounted_volumes().values())).items() if path != config_file.name
    }
    assert secret_files, "the Secret is mounted beside the config"

    base, metrics = f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}/metrics"
    async with process.running(tmp_path, config_file, ready=None, stdout=False) as run:
        async with aiohttp.ClientSession() as session:

            async def health() -> int | None:
                try:
                    async with session.get(base + "/health") as response:
                        return response.status
                except aiohttp.ClientConnectionError:
                    assert run.returncode is None, "the sidecar exited"
                    return None

            async def ready() -> bool:
                try:
                    async with session.get(f"http://127.0.0.1:{admin}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    assert run.returncode is None, "the sidecar exited"
                    return False

            await until(ready, "the sidecar never became ready", 60)
            assert await health() == 200, "the health route is public"

            # kubectl apply -k with the health route now behind the internal provider.
            changed = running.replace("auth: none", "auth:\n    provider: internal", 1)
            assert changed != running
            kubelet_write(volume, {config_file.name: changed.encode(), **secret_files})

            async def guarded() -> bool:
                return await health() == 401

            await until(guarded, "the updated ConfigMap was never applied")
            assert await metric(session, metrics, RELOADS % "success") >= 1

            # A broken config applied the same way is refused; the last good one keeps serving.
            kubelet_write(volume, {config_file.name: b"routes: 5\n", **secret_files})

            async def refused() -> bool:
                return await metric(session, metrics, RELOADS % "failure") >= 1

            await until(refused, "the broken ConfigMap was never noticed")
            assert await health() == 401
            assert await ready()
