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
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import pytest

from tests.k8s_support import REPO, edit_config, entrypoint, pod_config
from tests.support.process import free_port, running


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
    # The console script the wheel installed, as the image runs it: ready means /readyz 200.
    async with running(tmp_path, config_file, command=argv, env=env, cwd=tmp_path, stdout=False) as run:
        assert jwks_server.requests["/.well-known/openid-configuration"] >= 1
        assert await run.stop(timeout=30) == 0
