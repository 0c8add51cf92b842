"""What stops `jwt-sidecar run` (and `workers: N`, and `demo`) from starting is one line, exit 1.

Every failure here is the operator's to fix: a port in use, a port that needs privileges, an
address this machine does not have, a config or key file that cannot be read, a metrics
directory that cannot be written. Each test runs the real command as a subprocess and checks
the whole of stderr: one line naming what, where and why, no traceback, and nothing that
says the proxy served ("draining", "stopped").
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import refused_port

REPO = Path(__file__).parents[2]
IN_USE = "address already in use (another process listens there; stop it or choose another port)"

CONFIG = """\
listen: {listen}
admin: {admin}
upstream: {{url: "http://127.0.0.1:{refused}"}}
providers:
  main:
    issuer: https://issuer.example/
    audiences: [api]
{keys}
routes:
  - {{name: api, match: {{path_prefix: /}}, auth: {{provider: main}}}}
"""
# Connection refused (tests.conftest.refused_port): the start goes on without keys.
JWKS = f'    jwks: {{url: "http://127.0.0.1:{refused_port()}/jwks"}}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def held_port(host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False) -> Iterator[int]:
    """A port another process is listening on, as the operator's machine would have it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        if reuse_port:  # as another jwt-sidecar's workers hold it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen()
        yield sock.getsockname()[1]


def write_config(
    tmp_path: Path, *, listen: str | None = None, admin: str | None = None, keys: str = JWKS, extra: str = ""
) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        CONFIG.format(
            listen=listen or f"127.0.0.1:{free_port()}",
            admin=admin or f"127.0.0.1:{free_port()}",
            keys=keys,
            refused=refused_port(),
        )
        + extra
    )
    return path


def without_privileges() -> None:
    """In the child, before exec: drop every capability, so root meets permissions as anyone
    would (a port below 1024, a file of mode 000). PR_CAPBSET_DROP empties the bounding set,
    and exec then leaves root's permitted set empty."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; past the last capability it fails, harmlessly


def jwt_sidecar(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    preexec: Callable[[], None] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run the command to its end. One that starts serving instead (the failure this file is
    about) is killed at `timeout`, with its workers: it runs in a process group of its own."""
    with subprocess.Popen(
        [sys.executable, "-m", "proxy", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        preexec_fn=preexec,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_line(result: subprocess.CompletedProcess[str], line: str) -> None:
    assert "Traceback" not in result.stderr
    assert (result.returncode, result.stderr) == (1, f"jwt-sidecar: error: {line}\n")


WORKERS = pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "workers-2"])


def workers_line(workers: int) -> str:
    return f"workers: {workers}\n" if workers > 1 else ""


# -- ports ------------------------------------------------------------------------------------


@WORKERS
def test_a_listen_port_in_use_is_one_line_naming_address_and_port(tmp_path: Path, workers: int) -> None:
    with held_port() as port:
        path = write_config(tmp_path, listen=f"127.0.0.1:{port}", extra=workers_line(workers))
        result = jwt_sidecar("run", "--config", str(path))
    assert_one_line(result, f"cannot listen on 127.0.0.1:{port} (listen): {IN_USE}")


@WORKERS
@pytest.mark.parametrize("how", ["config", "option"])
def test_with_json_logs_a_port_in_use_is_one_json_line(tmp_path: Path, workers: int, how: str) -> None:
    # A log collector reading a JSON log must be able to parse the line that says why it stopped.
    with held_port() as port:
        extra = workers_line(workers) + ("log_format: json\n" if how == "config" else "")
        path = write_config(tmp_path, listen=f"127.0.0.1:{port}", extra=extra)
        args = ("--log-format", "json") if how == "option" else ()
        result = jwt_sidecar("run", "--config", str(path), *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = json.loads(lines[0])
    assert (line["event"], line["level"]) == ("startup_failed", "ERROR")
    assert line["message"] == line["error"] == f"cannot listen on 127.0.0.1:{port} (listen): {IN_USE}"


@WORKERS
def test_a_listen_port_another_set_of_workers_shares_is_in_use_too(tmp_path: Path, workers: int) -> None:
    # SO_REUSEPORT on both sides would let the kernel split the traffic between them, silently.
    with held_port(reuse_port=True) as port:
        path = write_config(tmp_path, listen=f"127.0.0.1:{port}", extra=workers_line(workers))
        result = jwt_sidecar("run", "--config", str(path))
    assert_one_line(result, f"cannot listen on 127.0.0.1:{port} (listen): {IN_USE}")


@WORKERS
def test_an_admin_port_in_use_is_one_line(tmp_path: Path, workers: int) -> None:
    with held_port() as port:
        path = write_config(tmp_path, admin=f"127.0.0.1:{port}", extra=workers_line(workers))
        result = jwt_sidecar("run", "--config", str(path))
    assert_one_line(result, f"cannot listen on 127.0.0.1:{port} (admin): {IN_USE}")


def test_a_port_in_use_on_every_address_is_in_use_on_loopback_too(tmp_path: Path) -> None:
    with held_port("0.0.0.0") as port:
        path = write_config(tmp_path, listen=f"127.0.0.1:{port}")
        result = jwt_sidecar("run", "--config", str(path))
    assert_one_line(result, f"cannot listen on 127.0.0.1:{port} (listen): {IN_USE}")


def test_an_ipv6_port_in_use_is_written_with_brackets(tmp_path: Path) -> None:
    with held_port("::1") as port:
        path = write_config(tmp_path, listen=f'"[::1]:{port}"')
        result = jwt_sidecar("run", "--config", str(path))
    assert_one_line(result, f"cannot listen on [::1]:{port} (listen): {IN_USE}")


@WORKERS
def test_listen_and_admin_spelled_differently_on_one_port_name_each_other(tmp_path: Path, workers: int) -> None:
    # `localhost` and `127.0.0.1` look like two addresses to the config check; the bind knows better.
    port = free_port()
    path = write_config(tmp_path, listen=f"localhost:{port}", admin=f"127.0.0.1:{port}", extra=workers_line(workers))
    result = jwt_sidecar("run", "--config", str(path))
    assert_one_line(
        result,
        f"cannot listen on 127.0.0.1:{port} (admin): address already in use by `listen` "
        f"(localhost:{port}) of this same config; give admin a port of its own",
    )


@WORKERS
def test_admin_on_the_listen_address_itself_is_a_config_error_naming_its_line(tmp_path: Path, workers: int) -> None:
    port = free_port()
    path = write_config(tmp_path, listen=f"127.0.0.1:{port}", admin=f"127.0.0.1:{port}", extra=workers_line(workers))
    assert_one_line(
        jwt_sidecar("run", "--config", str(path)),
        f"{path}:2: admin: 127.0.0.1:{port} is also `listen`; the admin endpoints need their own port",
    )


def test_admin_inside_listens_every_address_is_a_config_error_naming_its_line(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, listen=f"0.0.0.0:{port}", admin=f"127.0.0.1:{port}")
    result = jwt_sidecar("run", "--config", str(path))
    assert_one_line(
        result,
        f"{path}:2: admin: 127.0.0.1:{port} and `listen` 0.0.0.0:{port} share port {port} on "
        "the same address (0.0.0.0 and :: are every address); the admin endpoints need their own "
        "port",
    )
    checked = jwt_sidecar("check-config", str(path))
    assert checked.returncode == 1 and f"{path}:2: admin: 127.0.0.1:{port} and `listen`" in checked.stderr


def test_an_address_this_machine_does_not_have_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, listen=f"192.0.2.1:{port}")  # TEST-NET-1: never a host's address
    result = jwt_sidecar("run", "--config", str(path))
    assert_one_line(result, f"cannot listen on 192.0.2.1:{port} (listen): 192.0.2.1 is not an address of this machine")


def test_a_host_name_that_does_not_resolve_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, admin=f"nowhere.invalid:{port}")  # .invalid never resolves (RFC 6761)
    result = jwt_sidecar("run", "--config", str(path))
    assert_one_line(
        result,
        f"cannot listen on nowhere.invalid:{port} (admin): the host name 'nowhere.invalid' "
        "does not resolve to an address",
    )


@WORKERS
def test_a_privileged_port_without_the_privilege_is_one_line_saying_what_to_do(tmp_path: Path, workers: int) -> None:
    first_free = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    assert first_free > 1, "this machine lets anyone bind any port: no port needs a privilege here"
    port = first_free - 1
    path = write_config(tmp_path, listen=f"127.0.0.1:{port}", extra=workers_line(workers))
    result = jwt_sidecar("run", "--config", str(path), preexec=without_privileges)
    assert_one_line(
        result,
        f"cannot listen on 127.0.0.1:{port} (listen): permission denied: port {port} is below "
        "1024, which needs root or the CAP_NET_BIND_SERVICE capability; choose a port of 1024 or "
        "more",
    )


# -- files ------------------------------------------------------------------------------------


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert_one_line(
        jwt_sidecar("run", "--config", str(missing)),
        f"{missing}: cannot read the config file: no such file or directory",
    )
    # $JWT_SIDECAR_CONFIG, the default ./config.yaml's replacement, says the same.
    assert_one_line(
        jwt_sidecar("run", env={"JWT_SIDECAR_CONFIG": str(missing)}),
        f"{missing}: cannot read the config file: no such file or directory",
    )


def test_a_config_path_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    assert_one_line(
        jwt_sidecar("run", "--config", str(tmp_path)), f"{tmp_path}: cannot read the config file: is a directory"
    )


def test_an_unreadable_config_file_is_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.chmod(0)
    assert_one_line(
        jwt_sidecar("run", "--config", str(path), preexec=without_privileges),
        f"{path}: cannot read the config file: permission denied",
    )


def test_a_config_file_that_is_not_text_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"listen: 127.0.0.1:1\n\xff\xfe")
    assert_one_line(
        jwt_sidecar("run", "--config", str(path)), f"{path}: cannot read the config file: not UTF-8 text (byte 20)"
    )


@pytest.mark.parametrize(
    ("keys", "where"),
    [
        ("    pem_file: {key}", "8: providers.main.pem_file"),
        ("    pem_file: {{file: {key}, kid: k1}}", "8: providers.main.pem_file.file"),
        ("    jwks_file: {key}", "8: providers.main.jwks_file"),
        ("    algorithms: [HS256]\n    secret: {{file: {key}}}", "9: providers.main.secret.file"),
    ],
    ids=["pem_file", "pem_file-with-kid", "jwks_file", "secret-file"],
)
@pytest.mark.parametrize("state", ["missing", "unreadable"])
def test_a_key_file_missing_or_unreadable_is_one_line_naming_the_config_line(
    tmp_path: Path, keys: str, where: str, state: str
) -> None:
    key = tmp_path / "key-file"
    if state == "unreadable":
        key.write_text("whatever it holds, it cannot be read")
        key.chmod(0)
    path = write_config(tmp_path, keys=keys.format(key=key))
    result = jwt_sidecar("run", "--config", str(path), preexec=without_privileges)
    # The words after the path are config.py's (its check-config messages); the shape is ours.
    why = "no such file or directory" if state == "missing" else "permission denied"
    assert "Traceback" not in result.stderr and result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"jwt-sidecar: error: {path}:{where}: cannot read {key}: ") and line.lower().endswith(why)


def test_a_prometheus_multiproc_dir_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    result = jwt_sidecar("run", "--config", str(write_config(tmp_path)), env={"PROMETHEUS_MULTIPROC_DIR": str(missing)})
    assert_one_line(
        result,
        f"PROMETHEUS_MULTIPROC_DIR is {missing}, where metrics cannot be written: no such file "
        "or directory; unset it (workers set their own) or make it a writable directory",
    )
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    result = jwt_sidecar(
        "run",
        "--config",
        str(write_config(tmp_path)),
        env={"PROMETHEUS_MULTIPROC_DIR": str(read_only)},
        preexec=without_privileges,
    )
    assert_one_line(
        result,
        f"PROMETHEUS_MULTIPROC_DIR is {read_only}, where metrics cannot be written: permission "
        "denied; unset it (workers set their own) or make it a writable directory",
    )


@WORKERS
def test_a_closed_stdout_with_the_access_log_on_is_one_line(tmp_path: Path, workers: int) -> None:
    result = jwt_sidecar(
        "run", "--config", str(write_config(tmp_path, extra=workers_line(workers))), preexec=lambda: os.close(1)
    )
    assert_one_line(
        result,
        "stdout is closed and the access log is written there; give the process a stdout or set access_log: false",
    )


@pytest.mark.parametrize("closed", [(0,), (0, 1)], ids=["stdin", "stdin-and-stdout"])
def test_a_process_started_without_standard_descriptors_serves_and_stops_cleanly(
    tmp_path: Path, closed: tuple[int, ...]
) -> None:
    # Started with descriptor 0 (and 1) closed, the first socket would take its number: with
    # uvloop, closing it later aborted the process (libuv asserts fd > 2), and bytes for stdout
    # would go to a client. The command holds /dev/null there first.
    port = free_port()
    config = write_config(tmp_path, listen=f"127.0.0.1:{port}", extra="access_log: false\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=lambda: [os.close(fd) for fd in closed],
    )
    try:
        for _ in range(300):  # up to 30 s for the listener
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"GET /anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = conn.recv(65536)
                break
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        else:
            raise AssertionError("the sidecar never listened")
        assert answer.startswith(b"HTTP/1.1 "), answer  # (no keys: 503; a token route either way)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Assertion" not in err and "Traceback" not in err


# -- a stop while starting ------------------------------------------------------------------


def _while_the_first_keys_load(tmp_path: Path, act: Callable[[subprocess.Popen[str]], None]) -> str:
    """Start `run` against an issuer that accepts and never answers (the start held in the
    first key fetch), `act(proc)` then, and return its stderr once it has exited."""
    with socket.socket() as issuer:
        issuer.bind(("127.0.0.1", 0))
        issuer.listen()
        port = issuer.getsockname()[1]
        path = write_config(tmp_path, keys=f'    jwks: {{url: "http://127.0.0.1:{port}/jwks", timeout: 30s}}')
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(path)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            issuer.settimeout(30)
            conn, _ = issuer.accept()  # the sidecar is now waiting for its first keys
            with conn:
                act(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _, err = proc.communicate()
    return err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_while_the_first_keys_load_ends_the_start_quietly(tmp_path: Path, sig: int) -> None:
    def stop(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0

    err = _while_the_first_keys_load(tmp_path, stop)
    assert "Traceback" not in err and "draining" not in err, err
    assert "stopped while starting; nothing was served" in err.splitlines()[-1]  # whatever the log format


def test_a_sighup_while_the_first_keys_load_does_not_kill_the_start(tmp_path: Path) -> None:
    # A config reloader (or worker 0 passing one on) may send SIGHUP before the process serves:
    # its default action would end the process; it is kept for once serving begins.
    def hup_then_stop(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None, "a SIGHUP while starting ended the process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    err = _while_the_first_keys_load(tmp_path, hup_then_stop)
    assert "Traceback" not in err, err
    assert "stopped while starting; nothing was served" in err.splitlines()[-1]


def test_the_readme_shows_the_line_a_port_in_use_gives(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    assert f"jwt-sidecar: error: cannot listen on 127.0.0.1:8080 (listen): {IN_USE}\n" in readme
