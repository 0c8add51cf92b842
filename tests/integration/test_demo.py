"""The demo: what the README's first command runs, checked request by request."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.demo import run_demo

REPO = Path(__file__).parents[2]


def test_the_packaged_default_config_is_the_repository_config() -> None:
    assert (REPO / "proxy" / "default_config.yaml").read_text() == (REPO / "config.yaml").read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def demo_config(tmp_path: Path) -> Path:
    """The repository config.yaml with free ports, so the test never collides with a running demo."""
    ports = {port: str(free_port()) for port in ("8080", "9901", "8000", "8090")}
    text = (REPO / "config.yaml").read_text()
    for old, new in ports.items():
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


async def test_demo_prints_tokens_and_curl_lines_that_do_what_they_say(demo_config: Path) -> None:
    stop = asyncio.Event()
    printed: list[str] = []
    task = asyncio.create_task(run_demo(demo_config, stop=stop, announce=printed.append))
    for _ in range(100):
        if printed or task.done():
            break
        await asyncio.sleep(0.05)
    assert printed, "the demo announced nothing"
    text = printed[0]
    token = re.search(r"TOKEN=(\S+)", text).group(1)
    admin = re.search(r"ADMIN=(\S+)", text).group(1)
    base = re.search(r"(http://127\.0\.0\.1:\d+)/api/hello", text).group(1)
    async with aiohttp.ClientSession() as client:
        async with client.get(base + "/api/hello", headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200
            echoed = await response.json()
            assert echoed["identity"]["X-User-Id"] == "alice"
            assert echoed["identity"]["X-User-Email"] == "alice@example.com"
        async with client.get(base + "/api/hello") as response:
            assert response.status == 401
        async with client.get(base + "/admin/users", headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 403
        async with client.get(base + "/admin/users", headers={"Authorization": f"Bearer {admin}"}) as response:
            assert response.status == 200
        async with client.get(base + "/public/info", headers={"X-User-Id": "root"}) as response:
            assert "X-User-Id" not in (await response.json())["identity"]
    stop.set()
    await asyncio.wait_for(task, 30)


async def test_jwt_sidecar_demo_command_runs_and_stops_on_ctrl_c(demo_config: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", "--config", str(demo_config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        seen = b""
        while b"Ctrl-C stops everything." not in seen:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, (seen, await proc.stderr.read())
            seen += line
        assert b"curl -s -H \"Authorization: Bearer $TOKEN\"" in seen
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
