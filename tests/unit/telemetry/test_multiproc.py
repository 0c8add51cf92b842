"""multiproc.py against prometheus-client 0.26 itself: the same files, read the same way.

Each writer runs in processes of its own (so several pids write one directory, as the workers
of a set do): ours through `multiproc.Files`, prometheus-client's through its `Counter`,
`Gauge` and `Histogram` with `PROMETHEUS_MULTIPROC_DIR` set. Then, both ways round, the
directory is read by prometheus-client's `MultiProcessCollector` and by `multiproc.read`,
which must give the same families, samples, labels and values in the same order; and a file
written by both for the same metrics is the same bytes. Every mode the sidecar writes
(counters and histograms summed, gauges `livesum`, `livemin`, `livemax`), a file grown past
its first 64 KiB, label values and help with quotes, backslashes, newlines and non-ASCII
text, and a dead process's live gauges removed (`mark_process_dead`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import multiprocess as theirs
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.telemetry import multiproc
from proxy.telemetry.exposition import float_text

REPO = Path(__file__).parents[3]

ODD = ['say "hi"', "back\\slash", "new\nline", "caf\u00e9 \u2603 \U0001f600", "", "{}[],:"]
"""Label values a JSON key and both readers must carry as they are."""


def spec(worker: int) -> list[dict[str, Any]]:
    """The metrics one writing process writes; values differ by `worker`, series partly overlap."""
    many = [[f"route-{i:04d}-{'x' * 60}", ODD[i % len(ODD)]] for i in range(900)]  # ~150 KiB of keys
    return [
        {
            "type": "counter",
            "name": "jwt_sidecar_requests",
            "help": "Requests answered.",
            "labels": ["route", "status"],
            "series": [[["api", "2xx"], 3 + worker], [["api", "4xx"], 0], *[[[odd, "5xx"], worker] for odd in ODD]],
        },
        {
            "type": "counter",
            "name": "plain",
            "help": 'help with "quotes", \\ and\nnewline \u00e9',
            "labels": [],
            "series": [[[], 1.5]],
        },
        {
            "type": "counter",
            "name": "big",
            "help": "A file past its first 64 KiB.",
            "labels": ["route", "odd"],
            "series": [[labels, i + worker] for i, labels in enumerate(many)],
        },
        *[
            {
                "type": "gauge",
                "mode": mode,
                "name": f"g_{mode}",
                "help": f"A {mode} gauge.",
                "labels": ["provider"],
                "series": [[["a"], 10.0 * (worker + 1)], [["b"], -float(worker)], [[ODD[worker % len(ODD)]], 0.25]],
            }
            for mode in ("livesum", "livemin", "livemax")
        ],
        {"type": "gauge", "mode": "livesum", "name": "ready", "help": "Ready.", "labels": [], "series": [[[], 1]]},
        {
            "type": "histogram",
            "name": "duration_seconds",
            "help": "Time.",
            "labels": ["route"],
            "buckets": [0.00005, 0.001, 0.25, 1.0, 30.0],
            "series": [
                [["api"], [0.00004, 0.0003, 0.001, 0.001, 2.0, 45.0][: 3 + worker]],
                [[ODD[2]], [0.3]],
                [["idle"], []],
            ],
        },
    ]


_THEIRS = """
import json, sys
from prometheus_client import Counter, Gauge, Histogram
for metric in json.loads(sys.argv[1]):
    labels = metric["labels"]
    if metric["type"] == "counter":
        made = Counter(metric["name"], metric["help"], labels, registry=None)
    elif metric["type"] == "gauge":
        made = Gauge(metric["name"], metric["help"], labels, registry=None, multiprocess_mode=metric["mode"])
    else:
        made = Histogram(metric["name"], metric["help"], labels, registry=None, buckets=metric["buckets"])
    for values, value in metric["series"]:
        child = made.labels(*values) if labels else made
        if metric["type"] == "counter":
            child.inc(value)
        elif metric["type"] == "gauge":
            child.set(value)
        else:
            for seconds in value:
                child.observe(seconds)
"""

_OURS = """
import json, math, sys
from proxy.telemetry import multiproc
from proxy.telemetry.exposition import float_text
files = multiproc.own()
for metric in json.loads(sys.argv[1]):
    name, help_text = metric["name"], metric["help"]
    for values, value in metric["series"]:
        labels = dict(zip(metric["labels"], values))
        if metric["type"] == "counter":
            files.set("counter", multiproc.key(name, name + "_total", labels, help_text), value)
        elif metric["type"] == "gauge":
            files.set(multiproc.GAUGES[metric["mode"]], multiproc.key(name, name, labels, help_text), value)
        else:  # as prometheus-client's Histogram: the sum, then each bucket's own count
            total = 0.0
            for seconds in value:
                total += seconds
            files.set("histogram", multiproc.key(name, name + "_sum", labels, help_text), total)
            bounds = (*metric["buckets"], math.inf)
            counts = [0.0] * len(bounds)
            for seconds in value:  # each observation in the first bucket that holds it
                counts[next(i for i, bound in enumerate(bounds) if seconds <= bound)] += 1
            for bound, count in zip(bounds, counts):
                key = multiproc.key(name, name + "_bucket", {**labels, "le": float_text(bound)}, help_text)
                files.set("histogram", key, count)
files.commit()
"""


def write(directory: Path, code: str, worker: int) -> int:
    """One process writing `spec(worker)` into `directory` with `code`; its pid."""
    run = subprocess.run(
        [sys.executable, "-c", code + "\nimport os; print(os.getpid())", json.dumps(spec(worker))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1])


def families(read: list[Any]) -> list[tuple[Any, ...]]:
    """Everything a family says, in order: name, help, type, and each sample's name, labels
    (in their order) and value."""
    return [
        (f.name, f.documentation, f.type, [(s.name, list(s.labels.items()), s.value) for s in f.samples]) for f in read
    ]


def both(directory: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    return families(list(MultiProcessCollector(None, path=str(directory)).collect())), families(
        multiproc.read(str(directory))
    )


@pytest.fixture(params=["ours", "theirs"])
def written(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, list[int]]:
    """A directory three processes wrote, with our writer or prometheus-client's."""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    code = _OURS if request.param == "ours" else _THEIRS
    return directory, [write(directory, code, worker) for worker in range(3)]


def value(read: list[tuple[Any, ...]], name: str, labels: dict[str, str]) -> float:
    found = [v for family in read for n, ls, v in family[3] if n == name and dict(ls) == labels]
    assert len(found) == 1, (name, labels, found)
    return float(found[0])


def test_a_directory_reads_the_same_through_prometheus_client_and_multiproc(written: tuple[Path, list[int]]) -> None:
    directory, pids = written
    assert sorted(os.listdir(directory)) == sorted(
        f"{kind}_{pid}.db" for pid in pids for kind in ("counter", "histogram", *multiproc.GAUGES.values())
    )
    big = [directory / f"counter_{pid}.db" for pid in pids]
    assert all(path.stat().st_size >= 1 << 17 for path in big)  # grown past its first 64 KiB
    theirs_read, ours = both(directory)
    assert ours == theirs_read
    # Not two empty lists agreeing: the modes, as the sidecar relies on them.
    assert value(ours, "jwt_sidecar_requests_total", {"route": "api", "status": "2xx"}) == 3 + 4 + 5
    assert value(ours, "g_livesum", {"provider": "a"}) == 60.0
    assert value(ours, "g_livemin", {"provider": "b"}) == -2.0
    assert value(ours, "g_livemax", {"provider": "a"}) == 30.0
    assert value(ours, "ready", {}) == 3
    assert value(ours, "big_total", {"route": f"route-0899-{'x' * 60}", "odd": ODD[899 % len(ODD)]}) == 899 * 3 + 3
    for odd in ODD:
        assert value(ours, "jwt_sidecar_requests_total", {"route": odd, "status": "5xx"}) == 0 + 1 + 2
    # Histograms: buckets summed over the processes, then made cumulative, with a _count.
    api = {"route": "api"}
    assert value(ours, "duration_seconds_bucket", {**api, "le": "5e-05"}) == 3
    assert value(ours, "duration_seconds_bucket", {**api, "le": "0.001"}) == 3 + 4 + 4
    assert value(ours, "duration_seconds_bucket", {**api, "le": "30.0"}) == 3 + 4 + 5
    assert value(ours, "duration_seconds_bucket", {**api, "le": "+Inf"}) == 3 + 4 + 5
    assert value(ours, "duration_seconds_count", api) == 3 + 4 + 5
    assert value(ours, "duration_seconds_sum", api) == pytest.approx(0.00134 + 0.00234 + 2.00234)
    assert value(ours, "duration_seconds_count", {"route": "idle"}) == 0
    helps = {family[0]: family[1] for family in ours}
    assert helps["plain"] == 'help with "quotes", \\ and\nnewline \u00e9'


def test_a_dead_processs_live_gauges_are_removed_as_prometheus_client_removes_them(
    written: tuple[Path, list[int]], tmp_path: Path
) -> None:
    directory, pids = written
    other = tmp_path / "copy"
    shutil.copytree(directory, other)
    multiproc.mark_process_dead(pids[2], str(directory))
    theirs.mark_process_dead(pids[2], str(other))
    assert sorted(os.listdir(directory)) == sorted(os.listdir(other))
    assert not [name for name in os.listdir(directory) if name.startswith("gauge_") and name.endswith(f"_{pids[2]}.db")]
    multiproc.mark_process_dead(pids[2], str(directory))  # again: nothing left to remove, no error
    theirs_read, ours = both(directory)
    assert ours == theirs_read
    assert ours == both(other)[1]
    # The gauges are the live processes' only; counters and histograms keep the dead one's counts.
    assert value(ours, "g_livesum", {"provider": "a"}) == 30.0
    assert value(ours, "g_livemin", {"provider": "b"}) == -1.0
    assert value(ours, "g_livemax", {"provider": "a"}) == 20.0
    assert value(ours, "ready", {}) == 2
    assert value(ours, "jwt_sidecar_requests_total", {"route": "api", "status": "2xx"}) == 3 + 4 + 5
    # Every process gone: no gauge at all.
    for pid in pids:
        multiproc.mark_process_dead(pid, str(directory))
    theirs_read, ours = both(directory)
    assert ours == theirs_read
    assert not [family for family in ours if family[2] == "gauge"]


def test_our_files_are_prometheus_clients_byte_for_byte(tmp_path: Path) -> None:
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    ours_dir.mkdir()
    theirs_dir.mkdir()
    ours_pid, theirs_pid = write(ours_dir, _OURS, 1), write(theirs_dir, _THEIRS, 1)
    names = sorted(name.replace(str(ours_pid), "PID") for name in os.listdir(ours_dir))
    assert names == sorted(name.replace(str(theirs_pid), "PID") for name in os.listdir(theirs_dir))
    for name in names:
        ours_bytes = (ours_dir / name.replace("PID", str(ours_pid))).read_bytes()
        theirs_bytes = (theirs_dir / name.replace("PID", str(theirs_pid))).read_bytes()
        assert ours_bytes == theirs_bytes, name


def test_a_copy_is_seen_whole_or_not_at_all_and_a_file_is_taken_up_again(tmp_path: Path) -> None:
    files = multiproc.Files(str(tmp_path))
    first = multiproc.key("c", "c_total", {"l": "1"}, "h")
    files.set("counter", first, 1.0)
    assert multiproc.read(str(tmp_path)) == []  # added, not committed: no reader sees it
    files.commit()
    files.set("counter", first, 2.0)  # a value of a committed series: seen at once
    second = multiproc.key("c", "c_total", {"l": "2"}, "h")
    files.set("counter", second, 5.0)
    assert families(multiproc.read(str(tmp_path))) == [("c", "h", "counter", [("c_total", [("l", "1")], 2.0)])]
    files.commit()
    files.close()
    # The same pid's file opened again (a writer made anew): it goes on from what is there.
    again = multiproc.Files(str(tmp_path))
    assert again.value("counter", second) == 5.0
    again.set("counter", second, 6.0)
    third = multiproc.key("c", "c_total", {"l": "3"}, "h")
    again.set("counter", third, math.pi)
    again.commit()
    read = families(multiproc.read(str(tmp_path)))
    assert read == families(list(MultiProcessCollector(None, path=str(tmp_path)).collect()))
    assert [(labels, v) for _, labels, v in read[0][3]] == [
        ([("l", "1")], 2.0),
        ([("l", "2")], 6.0),
        ([("l", "3")], math.pi),
    ]
    again.close()


def test_a_file_just_made_reads_as_empty(tmp_path: Path) -> None:
    (tmp_path / "counter_1.db").write_bytes(b"")  # created, not yet sized by its writer
    (tmp_path / "gauge_livesum_2.db").write_bytes(bytes(1 << 16))  # sized, nothing written yet
    (tmp_path / "notes.txt").write_text("not ours")
    assert multiproc.read(str(tmp_path)) == []


def test_float_text_is_how_both_write_a_bucket_bound() -> None:
    from prometheus_client.utils import floatToGoString

    for bound in (0.00005, 0.0001, 0.00025, 0.001, 0.25, 1.0, 2.5, 30.0, 1e7, math.inf):
        assert float_text(bound) == floatToGoString(bound)


def test_a_forked_child_writes_files_of_its_own_from_zero(tmp_path: Path) -> None:
    files = multiproc.Files(str(tmp_path))
    series = multiproc.key("c", "c_total", {}, "h")
    files.set("counter", series, 7.0)
    files.commit()
    pid = os.fork()
    if pid == 0:  # the child: its own file, from 0, the parent's left as it is
        try:
            files.set("counter", series, files.value("counter", series) + 1.0)
            files.commit()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert files.value("counter", series) == 7.0
    assert sorted(os.listdir(tmp_path)) == sorted([f"counter_{os.getpid()}.db", f"counter_{pid}.db"])
    read = families(multiproc.read(str(tmp_path)))
    assert read == families(list(MultiProcessCollector(None, path=str(tmp_path)).collect()))
    assert read[0][3] == [("c_total", [], 8.0)]
    files.close()
