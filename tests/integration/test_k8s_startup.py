"""The Pod's probes against a real sidecar process whose issuer is down when it starts.

A native sidecar's `startupProbe` is what holds the app container back: the kubelet starts
the app once it passes. So the path the manifest names must fail while no key is held (an
issuer outage at start) and pass once requests can be authorised, while the liveness path
stays 200 throughout (an outage must not get the sidecar killed). The test reads the probes
from the manifests as kustomize builds them and asks the sidecar, run as `jwt-sidecar run`
on the config the Pod mounts, exactly what the kubelet would ask. Only the addresses change:
loopback ports, a local issuer and upstream, and a 1 s retry instead of 30 s so the test
does not wait half a minute for the sidecar's next attempt.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import builder as config
from tests.conftest import TestKey, jwks_of, mint
from tests.k8s_support import K8S, built, edit_config, one, pod_config, sidecar_container
from tests.support.jwks_server import JwksServer
from tests.support.process import free_port, running
from tests.support.upstream import start_upstream

DEPLOYMENTS = ["deployment.yaml", *sorted(str(p.relative_to(K8S)) for p in (K8S / "variants").glob("*.yaml"))]


def probe(container: dict[str, Any], name: str, admin_port: int) -> str:
    """The path of one HTTP probe, checked to be on the admin port (whose number the test moves)."""
    get = container[name]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[get["port"]] == admin_port, f"{name} asks the admin port"
    return get["path"]


async def status(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> int | None:
    """What the kubelet's HTTP probe sees: a status, or None when nothing answers."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5), **kwargs) as response:
            return response.status
    except (TimeoutError, aiohttp.ClientConnectionError):
        return None


def passes(code: int | None) -> bool:
    return code is not None and 200 <= code < 400  # the kubelet's rule for an HTTP probe


@pytest.mark.parametrize("outage", ["refused", "http-500"])
@pytest.mark.parametrize("deployment", DEPLOYMENTS)
async def test_the_startup_probe_passes_only_once_requests_can_be_authorised(
    aiohttp_server: Any, rsa_key: TestKey, tmp_path: Path, deployment: str, outage: str
) -> None:
    docs = built(deployment=deployment)
    config_file = pod_config(tmp_path / "pod", docs)
    deployed = config.load(config_file)
    sidecar = sidecar_container(one("Deployment", docs))
    startup = probe(sidecar, "startupProbe", deployed.admin.port)
    liveness = probe(sidecar, "livenessProbe", deployed.admin.port)

    # The issuer's address is taken (bound) but, for "refused", nothing listens on it yet.
    issuer_socket = socket.socket()
    issuer_socket.bind(("127.0.0.1", 0))
    issuer = f"http://127.0.0.1:{issuer_socket.getsockname()[1]}"
    jwks = JwksServer(jwks_of(rsa_key), issuer=issuer)
    jwks.jwks_uri = issuer + "/jwks.json"
    runner = web.AppRunner(jwks.app())
    await runner.setup()
    if outage == "http-500":
        jwks.mode = "fail"
        await web.SockSite(runner, issuer_socket).start()

    upstream = await start_upstream(aiohttp_server)
    listen, admin = free_port(), free_port()

    def local(c: dict[str, Any]) -> None:
        c["listen"], c["admin"] = f"127.0.0.1:{listen}", f"127.0.0.1:{admin}"
        c["upstream"]["url"] = upstream.url
        c["providers"]["sso"]["issuer"] = issuer
        assert c["providers"]["sso"]["discovery"] is True
        c["providers"]["sso"]["discovery"] = {"min_refresh_interval": "1s"}

    edit_config(config_file, local)
    token = mint({"iss": issuer, "aud": "orders-api"}, key=rsa_key)
    admin_url, api = f"http://127.0.0.1:{admin}", f"http://127.0.0.1:{listen}/api/orders"
    try:
        # How it stops is tests/integration/test_lifecycle.py's subject: killed at the end.
        async with running(tmp_path, config_file, ready=None, stdout=False) as run:
            async with aiohttp.ClientSession() as session:
                deadline = time.monotonic() + 60
                while not passes(await status(session, admin_url + liveness)):
                    assert run.returncode is None, run.stderr()
                    assert time.monotonic() < deadline, "the sidecar's admin port never answered"
                    await asyncio.sleep(0.1)
                # The issuer is down: the process is alive, nothing can be authorised, and the
                # startup probe keeps failing through several of the sidecar's retries.
                for _ in range(6):
                    assert passes(await status(session, admin_url + liveness)), (
                        "an issuer outage must not fail liveness"
                    )
                    assert not passes(await status(session, admin_url + startup)), f"{startup} passed with no keys"
                    assert await status(session, api, headers={"Authorization": f"Bearer {token}"}) == 503
                    await asyncio.sleep(0.5)
                if outage == "http-500":
                    assert jwks.requests["/.well-known/openid-configuration"] >= 2, "the sidecar retried"
                    jwks.mode = "ok"
                else:
                    await web.SockSite(runner, issuer_socket).start()
                # The issuer is back: the probe passes at the sidecar's next retry, and from then
                # on (when the kubelet starts the app) a valid token is admitted.
                deadline = time.monotonic() + 60
                while not passes(await status(session, admin_url + startup)):
                    assert run.returncode is None, run.stderr()
                    assert time.monotonic() < deadline, f"{startup} never passed after the issuer came back"
                    await asyncio.sleep(0.2)
                assert await status(session, api, headers={"Authorization": f"Bearer {token}"}) == 200
                assert upstream.last().headers["x-user-id"] == ["user-42"]
                assert passes(await status(session, admin_url + liveness))
    finally:
        await runner.cleanup()
        issuer_socket.close()
