"""Each micro-benchmark in bench/ still runs, on a few requests or entries: a smoke test.

They call the proxy's own classes (Verifier, TokenCache, key_source_for, RevocationIndex, the
pool), so an API change breaks them; until this test, only the full `bench/run` found that out
(verify_micro.py and cache_memory.py broke when `key_source_for` took `fetcher=`). Not a
measurement: no figure is checked, only that each script ends with status 0 and prints its
figures. bench/run's own drivers (Envoy, nginx, wrk) are not run here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.k8s_support import REPO

SCRIPTS = {
    "cache_memory": (["--entries", "20"], "bytes/entry allocated"),
    "verify_micro": (["--quick"], "RS256"),
    "pipeline_micro": (["--requests", "20", "--rounds", "1", "--warmup", "10", "--only", "c"], "c_no_token"),
    "pipeline_micro --floor": (
        ["--floor", "--requests", "20", "--rounds", "1", "--warmup", "10", "--only", "c"],
        "c_no_token",
    ),
    # (h) and (i): 1 MiB bodies, fed in reads of the size the event loop would read.
    "pipeline_micro h": (["--requests", "5", "--rounds", "1", "--warmup", "2", "--only", "h"], "h_answer_1mib"),
    "pipeline_micro i": (["--requests", "5", "--rounds", "1", "--warmup", "2", "--only", "i"], "i_upload_1mib"),
    "pipeline_micro --floor i": (
        ["--floor", "--requests", "5", "--rounds", "1", "--warmup", "2", "--only", "i"],
        "i_upload_1mib",
    ),
    "revocation_micro": (["--rules", "100", "--calls", "100"], "hit_sub"),
    "upstream_micro": (["--requests", "20"], "req/s"),
    "stray_probe": (["--requests", "10"], "0 of 10 crossed"),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_the_micro_benchmark_runs(name: str) -> None:
    args, printed = SCRIPTS[name]
    script = REPO / "bench" / f"{name.split()[0]}.py"
    result = subprocess.run([sys.executable, str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed in result.stdout, result.stdout[-3000:]
