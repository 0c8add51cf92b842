"""The README's Metrics table names every metric the sidecar exports, and nothing else.

A metric missing from the table is one an operator cannot find; a name in the table that
is not exported is a dashboard panel that says "No data". One process is scraped here (the
integration fixture: a remote JWKS provider, the token cache on, one request of each
outcome); the supervisor of `workers: N` is checked against the same table in
test_worker_processes.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from proxy.telemetry.families import FAMILIES
from tests.conftest import TestKey, mint

README = Path(__file__).parents[2] / "README.md"
WORKERS_ONLY = {family.name for family in FAMILIES if family.workers_only}


def readme_metrics() -> set[str]:
    """Every metric name in the first column of the table under "### Metrics"."""
    section = README.read_text().split("\n### Metrics\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "the Metrics table"
    names: set[str] = set()
    for row in rows:
        first = row.strip("|").split("|")[0]
        found = re.findall(r"`([a-z_]+)`", first)
        assert found and not set(found) & names, row
        names |= set(found)
    return names


def exported(text: str) -> set[str]:
    """Metric names as PromQL reads them: a counter with its `_total`, others as they are
    (`_created` samples left out: `run` turns them off, prometheus_client.disable_created_metrics)."""
    return {
        family.name + "_total" if family.type == "counter" else family.name
        for family in text_string_to_metric_families(text)
        if not family.name.endswith("_created")
    }


async def test_the_readme_metrics_table_is_what_one_process_exports(sidecar: Any, rsa_key: TestKey) -> None:
    s = await sidecar()
    for headers in ({"Authorization": f"Bearer {mint(key=rsa_key)}"}, {}):
        async with await s.get("/orders", headers=headers):
            pass
    async with s.client.get(s.admin_url + "/metrics") as response:
        names = exported(await response.text())
    documented = readme_metrics()
    assert names - documented == set(), "exported, not in the README's Metrics table"
    assert documented - names == WORKERS_ONLY, "in the README's Metrics table, not exported"
