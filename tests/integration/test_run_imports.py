"""`jwt-sidecar run` imports no aiohttp, and worker 0 of `workers: N` imports the run path once for all.

`import aiohttp` alone costs ~23 MiB of resident memory (bench/FIGURES.md). The admin port
and key fetches run on our own HTTP/1.1 code; aiohttp stays a dependency for the demo and the
tests' fake servers only. Checked two ways: what importing the run path loads (a fresh
interpreter), and what a running sidecar has mapped (aiohttp's C extensions are shared
objects: a process that imported it has them in /proc/PID/maps), for one process and for a
set of workers. The other workers of a set are forked from worker 0 (ops/workers.py): they
import nothing themselves, holding what worker 0 imported before the fork (uvloop and
cryptography included), shared copy-on-write.

No PyJWT either, in any process of a running sidecar: it cost 4.8 MiB each (base/jwk.py
parses JWKs and auth/verify.py checks signatures on cryptography's keys). PyJWT is pure
Python, so /proc/PID/maps cannot show it: the running sidecar is started with
PYTHONPROFILEIMPORTTIME, which every process it makes inherits, and its stderr (every import
of every process, at the time it happens) must not name it.

No prometheus-client in any process, one or a set of workers: its package imports
http.server, email, wsgiref, urllib.request and more, 4.1 MiB each (telemetry/exposition.py
writes `/metrics` instead, and telemetry/multiproc.py the set's multiprocess files).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import TestKey, jwks_of, mint
from tests.integration.conftest import BASE_CONFIG
from tests.support.process import ENV, REPO, children, running
from tests.support.upstream import start_upstream

linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")


def imported_by(code: str, env: dict[str, str] | None = None) -> set[str]:
    """The top-level packages a fresh interpreter holds after `code`."""
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    ).stdout
    return set(out.split())


@pytest.mark.parametrize(
    "code",
    [
        "import proxy.tools.cli",  # what `jwt-sidecar run` and `python -m proxy run` import
        "import proxy.ops.server, proxy.ops.workers, proxy.ops.admin, proxy.http.fetch, proxy.request.app",
    ],
)
def test_the_run_path_imports_no_aiohttp(code: str) -> None:
    assert "aiohttp" not in imported_by(code)


NOT_IN_ANY_PROCESS = (
    "prometheus_client",
    "http.server",
    "http.client",
    "email",
    "wsgiref",
    "urllib.request",
    "tempfile",
    "shutil",
    "difflib",
    "secrets",
    "cryptography.hazmat.primitives.serialization",
)
"""What `import prometheus_client` brought into the running sidecar (its exposition module),
and what cold paths import where they are used (`tempfile` and `shutil`, which bring `bz2`
and `lzma`; `difflib` for a misspelt key; cryptography's `serialization`, which brings its
SSH and cipher modules, for PEM keys and `jwt-sidecar keys`): ~2 MiB together
(bench/FIGURES.md, "Resident memory, session 10")."""


def unwanted(modules: list[str] | set[str]) -> list[str]:
    return sorted(name for name in modules if name in NOT_IN_ANY_PROCESS or name.split(".")[0] in NOT_IN_ANY_PROCESS)


def test_the_run_path_imports_no_prometheus_client(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import proxy.tools.cli, proxy.ops.server, proxy.ops.workers, proxy.ops.admin, proxy.telemetry.metrics\n"
            "from proxy.telemetry.metrics import Metrics, WorkersCollector\n"
            "from proxy.telemetry import multiproc\n"
            "Metrics().render('application/openmetrics-text'); Metrics().render(None)\n"
            # what a worker of a set does each second, and worker 0 at each scrape and at the end
            "metrics = Metrics(); metrics.route('api').observe_auth(0.001); metrics.mirror()\n"
            f"assert list(WorkersCollector({str(tmp_path)!r}).collect())\n"
            f"multiproc.mark_process_dead(1, {str(tmp_path)!r})\n"
            "import sys; print(' '.join(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
    ).stdout
    assert unwanted(out.split()) == []


def test_the_run_path_imports_no_pyjwt() -> None:
    loaded = imported_by(
        "import proxy.tools.cli, proxy.ops.server, proxy.config.builder, proxy.auth.verify, proxy.base.jwks"
    )
    assert "jwt" not in loaded
    assert "cryptography" in loaded  # what checks the signatures instead


def mapped_aiohttp(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines() if "/aiohttp/" in line})


def mapped(pid: int, part: str) -> bool:
    return part in Path(f"/proc/{pid}/maps").read_text()


@linux_only
@pytest.mark.parametrize("workers", [1, 2])
async def test_a_running_sidecar_has_no_aiohttp_loaded(
    tmp_path: Path, aiohttp_server: Any, jwks_server: Any, rsa_key: TestKey, workers: int
) -> None:
    jwks_server.document = jwks_of(rsa_key)
    upstream = await start_upstream(aiohttp_server)
    text = BASE_CONFIG.replace("{upstream}", upstream.url).replace("{jwks}", jwks_server.url())
    text += f"workers: {workers}\ndrain_timeout: 2s\n"
    # Every import logged to stderr (the operator log's stream, read all along by `running`).
    env = {**ENV, "PYTHONPROFILEIMPORTTIME": "1"}
    async with running(tmp_path, text, stdout=False, env=env) as run:  # ready: keys fetched, admin serving
        pids = [run.pid, *children(run.pid)]
        assert len(pids) == workers  # worker 0 and its forked children
        for pid in pids:
            assert mapped_aiohttp(pid) == [], pid
        async with aiohttp.ClientSession() as session:  # a verified token: the whole check has run
            token = mint(key=rsa_key)
            async with session.get(f"{run.url}/api/x", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200, await r.text()
            for accept in ("", "application/openmetrics-text; version=1.0.0"):  # both formats scraped
                async with session.get(f"{run.admin_url}/metrics", headers={"Accept": accept}) as r:
                    assert r.status == 200
                    assert b"\nprocess_max_fds" in await r.read()
        imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr().splitlines() if "|" in line]
        # Imported once per image: with workers, by `run` (its config check, before it became
        # worker 0) and by worker 0, never by a forked worker.
        assert imported.count("proxy.auth.verify") == (1 if workers == 1 else 2)
        assert not [name for name in imported if name == "jwt" or name.startswith("jwt.")]
        # No process of a set either: worker 0 and the workers it forks read and write the
        # multiprocess files with telemetry/multiproc.py.
        assert not [name for name in imported if name.split(".")[0] == "prometheus_client"]
        if workers == 1:  # (`run` of a set imports tempfile for the directory, before its exec)
            assert unwanted(imported) == []
        # Every worker verifies tokens on cryptography's keys, on uvloop (mapped before the fork).
        assert all(mapped(pid, "/cryptography/") for pid in pids)
        assert all(mapped(pid, "/uvloop/") for pid in pids)
        assert await run.stop(timeout=30) == 0
