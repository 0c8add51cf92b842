"""The demo: what the README's first command runs, checked request by request."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.tools.cli import build_parser
from proxy.tools.demo import ROLES, run_demo

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
        sys.executable,
        "-m",
        "proxy",
        "demo",
        "--config",
        str(demo_config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        seen = b""
        while b"Ctrl-C stops everything." not in seen:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, (seen, await proc.stderr.read())
            seen += line
        assert b'curl -s -H "Authorization: Bearer $TOKEN"' in seen
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- ports: the defaults give way, a port asked for does not --------------------------------


@contextlib.contextmanager
def holding(*ports: int, within: float = 60.0) -> Iterator[None]:
    """Listen on each port, so it stays taken for as long as the test needs it to be.

    A port another process holds is taken too, but only for as long as that process keeps
    it: a run of this same test from another checkout frees it seconds later, and the demo
    would then find it free and the test fail at random. So wait (bounded) until the port is
    ours; a holder that keeps it longer than `within` is a long-lived listener (an
    operator's running demo or service): the port stays taken, which is what the demo must
    cope with, and the test goes on with it.
    """
    with contextlib.ExitStack() as stack:
        deadline = time.monotonic() + within
        for port in ports:
            sock = stack.enter_context(socket.socket())
            while True:
                try:
                    sock.bind(("127.0.0.1", port))
                    sock.listen()
                    break
                except OSError as error:
                    assert error.errno == errno.EADDRINUSE, error
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
        yield


async def read_instructions(proc: asyncio.subprocess.Process) -> str:
    seen = b""
    while b"Ctrl-C stops everything." not in seen:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, (seen, await proc.stderr.read())
        seen += line
    return seen.decode()


def shell(*lines: str) -> subprocess.CompletedProcess[str]:
    """The printed lines, pasted into a shell that has not activated any virtual environment."""
    return subprocess.run(
        ["bash", "-c", "set -e\n" + "\n".join(lines)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")},
    )


def _shape(line: str) -> str:
    # Which ports were taken depends on the machine (the test checks 8080's and 8000's itself).
    line = re.sub(r"; \d+ was taken\)", ")", line.strip())
    line = re.sub(r"\s*\(\d+ was taken\)", "", line)
    line = re.sub(r"eyJ[\w.-]+", "TOKEN", line)
    line = re.sub(r"a copy of \S+", "a copy of FILE", line)
    line = re.sub(r"(/[\w.+-]+)+/?", "/PATH", line)
    return re.sub(r"\d+", "N", line)


def assert_the_readme_example_has_this_shape(printed: str) -> None:
    """Every line of the README's "What the demo prints" block is a line the demo prints, up to
    ports, tokens and paths (its `...` stands for lines left out)."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("What the demo prints") :]
    block = block[block.index("```\n") + 4 :]
    block = block[: block.index("```")]
    shapes = {_shape(line) for line in printed.splitlines()}
    missing = [line for line in block.splitlines() if line.strip() != "..." and _shape(line) not in shapes]
    assert not missing, (missing, printed)


async def test_with_8080_and_8000_taken_the_demo_moves_and_its_printed_commands_work(tmp_path: Path) -> None:
    with holding(8080, 8000):
        # From a directory without a config.yaml: the example shipped in the package, real defaults.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "demo",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            text = await read_instructions(proc)
            lines = [line.strip() for line in text.splitlines()]
            sidecar = re.search(r"^\s*sidecar\s+http://127\.0\.0\.1:(\d+)\s+\(8080 was taken\)$", text, re.M)
            upstream = re.search(
                r"^\s*upstream\s+http://127\.0\.0\.1:(\d+)\s+\(echoes what it receives; "
                r"8000 was taken\)$",
                text,
                re.M,
            )
            admin = re.search(r"^\s*admin\s+(http://127\.0\.0\.1:\d+/readyz)", text, re.M)
            copy = re.search(
                r"^\s*config\s+(\S+)\s+\(a copy of \S+default_config\.yaml with these ports\)$", text, re.M
            )
            assert sidecar and upstream and admin and copy, text
            assert sidecar.group(1) not in ("8080", "8000") and upstream.group(1) not in ("8080", "8000")
            assert_the_readme_example_has_this_shape(text)
            tokens = [line for line in lines if line.startswith(("TOKEN=", "ADMIN="))]
            assert len(tokens) == 2
            allowed = next(line for line in lines if line.startswith('curl -s -H "Authorization: Bearer $TOKEN"'))
            assert f"http://127.0.0.1:{sidecar.group(1)}/api/hello" in allowed

            answer = shell(*tokens, allowed + " -w '\\n%{http_code}'")
            body, status = answer.stdout.rsplit("\n", 1)
            assert status == "200", answer
            echoed = json.loads(body)
            assert echoed["upstream"] == "jwt-sidecar demo echo"  # the demo's upstream, not whoever holds 8000
            assert echoed["identity"]["X-User-Id"] == "alice"
            refused = next(line for line in lines if line.startswith("curl -si http"))
            assert shell(refused).stdout.startswith("HTTP/1.1 401 ")
            assert shell(f"curl -s -o /dev/null -w '%{{http_code}}' {admin.group(1)}").stdout == "200"

            # `token explain`, as printed: an absolute command and the config with the chosen ports.
            explain = next(line for line in lines if " token explain " in line)
            assert explain.startswith(("/", "'/")), explain
            checked = shell(*tokens, explain)
            assert checked.returncode == 0, checked
            assert Path(copy.group(1)).is_file()

            # The revocation, as printed: `jwt-sidecar revoke`, then the same curl is refused
            # (within a second: the demo's list is a file, checked twice a second).
            at = next(i for i, line in enumerate(lines) if " revoke --" in line)
            revoke, again = lines[at], lines[at + 1]
            assert revoke.startswith(("/", "'/")) and f"--config {copy.group(1)}" in revoke, revoke
            assert again == allowed.replace("curl -s ", "curl -si ", 1), again  # the same, with its head shown
            written = shell(revoke)
            assert written.returncode == 0 and "revoked in file " in written.stdout, written
            for _ in range(40):  # bounded: 2 s
                refused_now = shell(*tokens, again)
                if refused_now.stdout.startswith("HTTP/1.1 401 "):
                    break
                time.sleep(0.05)
            assert refused_now.stdout.startswith("HTTP/1.1 401 "), refused_now
            assert 'error="invalid_token", error_description="The access token has been revoked"' in refused_now.stdout
            # and the demo's access log (its stdout) says why: reason revoked.
            logged = ""
            while '"reason":"revoked"' not in logged.replace(" ", ""):
                line = await asyncio.wait_for(proc.stdout.readline(), 10)
                assert line, logged
                logged = line.decode()

            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            assert not Path(copy.group(1)).exists()  # the copy goes with the demo
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.mark.parametrize("option", ["--port", "--admin-port", "--issuer-port", "--upstream-port"])
def test_a_port_asked_for_that_is_taken_is_one_line(option: str) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "demo", option, str(port)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=60,
        )
    assert "Traceback" not in result.stderr
    assert (result.returncode, result.stderr) == (
        1,
        f"jwt-sidecar: error: cannot listen on 127.0.0.1:{port} ({option}): address already in use "
        "(another process listens there; stop it or choose another port)\n",
    )


async def test_ports_asked_for_are_the_ones_printed_and_served() -> None:
    ports = {role: free_port() for role in ROLES}
    stop = asyncio.Event()
    printed: list[str] = []
    task = asyncio.create_task(run_demo(REPO / "config.yaml", stop=stop, announce=printed.append, ports=ports))
    try:
        for _ in range(200):
            if printed or task.done():
                break
            await asyncio.sleep(0.05)
        assert printed, task.result() if task.done() else "the demo announced nothing"
        text = printed[0]
        assert re.search(rf"^  sidecar  http://127\.0\.0\.1:{ports['listen']}$", text, re.M), text
        assert re.search(rf"^  admin    http://127\.0\.0\.1:{ports['admin']}/readyz$", text, re.M), text
        assert re.search(rf"^  issuer   http://127\.0\.0\.1:{ports['issuer']}/\.well-known/jwks\.json$", text, re.M)
        assert re.search(
            rf"^  upstream http://127\.0\.0\.1:{ports['upstream']}   \(echoes what it receives\)$", text, re.M
        ), text
        token = re.search(r"TOKEN=(\S+)", text).group(1)
        async with aiohttp.ClientSession() as client:
            async with client.get(
                f"http://127.0.0.1:{ports['listen']}/api/hello", headers={"Authorization": f"Bearer {token}"}
            ) as response:
                assert response.status == 200
                assert (await response.json())["identity"]["X-User-Id"] == "alice"
            async with client.get(f"http://127.0.0.1:{ports['issuer']}/.well-known/jwks.json") as response:
                assert [key["kid"] for key in (await response.json())["keys"]] == ["demo-key"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_the_readme_lists_the_demos_options() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## The two commands") : readme.index("## Running it")]
    listed = set(re.findall(r"`(--[a-z-]+)", section))
    demo = next(
        action
        for action in build_parser()._subparsers._group_actions[0].choices.values()  # noqa: SLF001
        if action.prog.endswith(" demo")
    )
    options = {
        option
        for action in demo._actions
        for option in action.option_strings  # noqa: SLF001
        if option.startswith("--") and option != "--help"
    }
    assert listed == options


def demo_command(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "demo", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )


def test_a_demo_config_that_cannot_be_read_or_used_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = demo_command("--config", str(missing))
    assert (result.returncode, result.stderr) == (
        1,
        f"jwt-sidecar: error: {missing}: cannot read the config file: no such file or directory\n",
    )
    remote = tmp_path / "remote.yaml"
    remote.write_text(
        (REPO / "config.yaml")
        .read_text()
        .replace(
            "url: http://127.0.0.1:8090/.well-known/jwks.json", "url: https://issuer.example/.well-known/jwks.json"
        )
    )
    result = demo_command("--config", str(remote))
    assert (result.returncode, result.stderr) == (
        1,
        f"jwt-sidecar: error: {remote}: providers: the demo needs a provider whose jwks.url is on loopback "
        "(127.0.0.1), as in the repository's config.yaml\n",
    )


def test_one_port_asked_for_twice_is_a_usage_error() -> None:
    result = demo_command("--port", "9000", "--issuer-port", "9000")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "jwt-sidecar: error: --port and --issuer-port are both 9000; each listener needs its own port"
    )


async def test_a_config_port_that_is_asked_for_by_another_listener_gives_way(demo_config: Path) -> None:
    listen = int(re.search(r"^listen: 127\.0\.0\.1:(\d+)", demo_config.read_text(), re.M).group(1))
    stop = asyncio.Event()
    printed: list[str] = []
    task = asyncio.create_task(run_demo(demo_config, stop=stop, announce=printed.append, ports={"admin": listen}))
    try:
        for _ in range(200):
            if printed or task.done():
                break
            await asyncio.sleep(0.05)
        assert printed, task.result() if task.done() else "the demo announced nothing"
        text = printed[0]
        assert re.search(rf"^  admin    http://127\.0\.0\.1:{listen}/readyz$", text, re.M), text
        moved = re.search(rf"^  sidecar  http://127\.0\.0\.1:(\d+)   \({listen} was taken\)$", text, re.M)
        assert moved and int(moved.group(1)) != listen, text
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{listen}/readyz") as response:
                assert response.status == 200
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_a_demo_that_never_becomes_ready_says_why_in_one_line(tmp_path: Path) -> None:
    # A second provider, in use by a route, whose issuer does not answer: no keys, not ready.
    text = (
        (REPO / "config.yaml")
        .read_text()
        .replace(
            "providers:\n",
            """providers:
  elsewhere:
    issuer: https://elsewhere.example/
    audiences: [api]
    jwks: {url: "https://elsewhere.invalid/jwks"}
""",
        )
        .replace(
            "routes:\n",
            """routes:
  - name: elsewhere
    match: {path_prefix: /elsewhere/}
    auth: {provider: elsewhere}
""",
        )
    )
    for port in ("8080", "9901", "8000", "8090"):
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    result = demo_command("--config", str(path))
    # Above it, the key fetch failures the sidecar logged: they say why there are no keys.
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "jwt-sidecar: error: the demo's sidecar was not ready after 10s: no signing keys yet for provider(s): elsewhere"
    )
