"""The image's command against the shipped ConfigMap: built as a wheel, installed in a fresh venv, run.

No Docker engine runs here, so this does what the image does: install the wheel into a clean
Python, then run exactly the Dockerfile's ENTRYPOINT with the Pod's environment. The only
things changed are where the mounted files live (a temp dir instead of /etc/...), the issuer
(a local one) and the two ports (free loopback ones: the Pod's fixed 8080 and 9901 may be
taken on a machine that runs other tests, and a probe would then ask someone else's sidecar).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.test_lifecycle import free_port
from tests.k8s_support import REPO, edit_config, entrypoint, pod_config


def build_and_install(tmp: Path) -> Path:
    wheels = tmp / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)], check=True, timeout=300
    )
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    wheel = next(wheels.glob("jwt_sidecar-*.whl"))
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=600)
    return env_dir / "bin"


@pytest.mark.package
async def test_the_image_entrypoint_serves_the_configmap_config_and_becomes_ready(
    tmp_path: Path, jwks_server: Any, rsa_key: Any
) -> None:
    from tests.conftest import jwks_of

    bin_dir = await asyncio.to_thread(build_and_install, tmp_path)
    config_file = pod_config(tmp_path / "pod")  # the files the Pod mounts, the secret included
    argv = entrypoint()
    argv[argv.index("--config") + 1] = str(config_file)
    argv[0] = str(bin_dir / argv[0])  # the console script the wheel installed

    issuer = jwks_server.url("").rstrip("/")
    jwks_server.issuer = issuer
    jwks_server.document = jwks_of(rsa_key)
    listen, admin = free_port(), free_port()

    def local(c: dict[str, Any]) -> None:
        c["providers"]["sso"]["issuer"] = issuer
        c["listen"], c["admin"] = f"127.0.0.1:{listen}", f"127.0.0.1:{admin}"

    edit_config(config_file, local)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=tmp_path, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        ready = False
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                assert proc.returncode is None, (await proc.stderr.read()).decode()
                try:
                    async with session.get(f"http://127.0.0.1:{admin}/readyz") as response:
                        if response.status == 200:
                            ready = True
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        assert ready, "the sidecar never answered /readyz with 200"
        assert jwks_server.requests["/.well-known/openid-configuration"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
