"""prometheus-client's multiprocess files, written and read without prometheus-client.

Owns: the files of `workers: N` under `PROMETHEUS_MULTIPROC_DIR`, in prometheus-client 0.26's
format (`mmap_dict.py`, `values.py`, `multiprocess.py`): one file per kind and process,
`counter_PID.db`, `histogram_PID.db`, `gauge_MODE_PID.db`; in each, a 4-byte count of the bytes
used, 4 bytes of padding, then one entry per series: a 4-byte key length, the key (the JSON of
`[family, sample name, labels, help]`, keys sorted, ASCII), spaces to an 8-byte boundary, then
two doubles, the value and a timestamp (0.0); 64 KiB to start, doubled as it fills. `Files`,
one process's writer (`set`, `commit`); `read`, a directory merged as
`MultiProcessCollector` merges it (counters and histograms summed over every file, histogram
buckets made cumulative with a `_count`; gauges in their file's mode: `livesum`, `livemin`,
`livemax` over the files of live processes); `mark_process_dead`, a dead process's live-gauge
files removed, as prometheus-client's.
Does not own: what is written (metrics.py's `_Mirror`, ops/server.py's readiness), the
directory's life (ops/workers.py), or the families worker 0 shows from it (metrics.py's
`WorkersCollector`).

Why not prometheus-client itself: importing it cost every process of a `workers: 2` set
~4 MiB of resident memory (its package `__init__`: http.server, email, wsgiref and more;
exposition.py says what), imported once in worker 0 before the fork yet counted in each
process's VmRSS, for 300 lines of file handling. The files are prometheus-client's, entry for
entry (tests/unit/telemetry/test_multiproc.py reads ours with its `MultiProcessCollector` and
its files with `read`), so a user's own tool reading `PROMETHEUS_MULTIPROC_DIR` reads them as
before. A histogram is written as prometheus-client's `Histogram` writes one (a `_sum`, then
one `_bucket` per bound, `+Inf` included, each counting its own observations).

One difference, on purpose: the bytes-used count of a file is written by `commit`, after every
entry a call has added, so a reader sees one copy of a process's metrics whole or not at all
(prometheus-client writes it after each entry, so a series could be read with some of its
buckets only). And `read` takes a file shorter than its header, one a process has only just
made, for an empty one where prometheus-client raises.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import mmap

from .exposition import MetricFamily, float_text

__all__ = ["DIRECTORY_ENV", "GAUGES", "LIVE_MODES", "Files", "Kind", "key", "mark_process_dead", "own", "read"]

DIRECTORY_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Where a process of the set writes its files (prometheus-client's variable, set by ops/workers.py
for the whole set, restarted workers included)."""

Kind = Literal["counter", "histogram", "gauge_livesum", "gauge_livemin", "gauge_livemax"]
"""A file's prefix: its type, and for a gauge its mode (how `read` merges the processes)."""

GAUGES: dict[str, Kind] = {"livesum": "gauge_livesum", "livemin": "gauge_livemin", "livemax": "gauge_livemax"}
"""A gauge's mode (families.py's `Family.gauge_mode`) -> the file it is written to."""

LIVE_MODES = ("liveall", "livemin", "livemax", "livesum", "livemostrecent")
"""The gauge modes whose files `mark_process_dead` removes (prometheus-client's)."""

_INITIAL_SIZE = 1 << 16
_FIRST_READ = 4096
"""Read first, the rest up to the bytes used after (prometheus-client reads a page first)."""
_INT = struct.Struct("i")
_DOUBLES = struct.Struct("dd")


def key(family: str, name: str, labels: Mapping[str, str], help_text: str) -> str:
    """A series' key in the files: prometheus-client's `mmap_key`."""
    return json.dumps([family, name, dict(labels), help_text], sort_keys=True)


class _File:
    """One open file of this process: a dict of doubles in an mmap, appended to."""

    def __init__(self, path: str) -> None:
        import mmap  # noqa: PLC0415 - a shared object of its own, loaded by the processes that write

        self._mmap = mmap.mmap
        self._f = open(path, "a+b")  # noqa: SIM115 - open as long as the process writes
        size = os.fstat(self._f.fileno()).st_size
        if size == 0:
            self._f.truncate(_INITIAL_SIZE)
            size = _INITIAL_SIZE
        self._size = size
        self._m = self._mmap(self._f.fileno(), size)
        self.positions: dict[str, int] = {}
        used = _INT.unpack_from(self._m, 0)[0]
        if used == 0:
            used = 8
            self._m[0:4] = _INT.pack(used)
        else:  # this pid's file already (a pid reused within the set's life): go on from it
            for name, _value, _timestamp, pos in _entries(self._m, used):
                self.positions[name] = pos
        self._used = self._committed = used

    def value(self, name: str) -> float:
        pos = self.positions.get(name)
        return 0.0 if pos is None else _DOUBLES.unpack_from(self._m, pos)[0]

    def write(self, name: str, value: float) -> None:
        pos = self.positions.get(name)
        if pos is None:
            pos = self._add(name)
        # One slice assignment (prometheus-client's reason: pack_into writes 0 first, which a
        # reader could see).
        self._m[pos : pos + 16] = _DOUBLES.pack(value, 0.0)

    def _add(self, name: str) -> int:
        encoded = name.encode()
        padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
        entry = _INT.pack(len(encoded)) + padded + _DOUBLES.pack(0.0, 0.0)
        while self._used + len(entry) > self._size:
            self._size *= 2
            self._f.truncate(self._size)
            self._m = self._mmap(self._f.fileno(), self._size)
        self._m[self._used : self._used + len(entry)] = entry
        self._used += len(entry)
        pos = self.positions[name] = self._used - 16
        return pos

    def commit(self) -> None:
        if self._used != self._committed:
            self._m[0:4] = _INT.pack(self._used)
            self._committed = self._used

    def close(self) -> None:
        self._m.close()
        self._f.close()


class Files:
    """This process's files in `directory`, one per kind, opened on first write.

    One per process (every writer of a process shares it: two would each append to the same
    file). After a fork the child writes files of its own pid, from 0, as prometheus-client's
    `MultiProcessValue` does."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._pid = os.getpid()
        self._files: dict[str, _File] = {}

    def _file(self, kind: Kind) -> _File:
        if os.getpid() != self._pid:  # forked: the parent's files are the parent's
            self._pid = os.getpid()
            self.close()  # this process's maps of them only
        found = self._files.get(kind)
        if found is None:
            found = self._files[kind] = _File(os.path.join(self.directory, f"{kind}_{self._pid}.db"))
        return found

    def value(self, kind: Kind, series: str) -> float:
        """What this process last wrote for `series` (a `key`), 0.0 before it has."""
        return self._file(kind).value(series)

    def set(self, kind: Kind, series: str, value: float) -> None:
        """Write `value` for `series`; a new series is seen by readers from the next `commit`."""
        self._file(kind).write(series, value)

    def commit(self) -> None:
        """Make every series added since the last commit visible to readers."""
        for file in self._files.values():
            file.commit()

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()


_own: Files | None = None


def own() -> Files:
    """This process's files, in `DIRECTORY_ENV`: one `Files` for all its writers."""
    global _own  # noqa: PLW0603 - one per process, as the files are
    if _own is None:
        _own = Files(os.environ[DIRECTORY_ENV])
    return _own


def _entries(data: bytes | mmap.mmap, used: int) -> Iterable[tuple[str, float, float, int]]:
    """(key, value, timestamp, position of the value) of each entry: `_read_all_values`."""
    pos = 8
    while pos < used:
        length = _INT.unpack_from(data, pos)[0]
        if length + pos > used:
            raise RuntimeError("Read beyond file size detected, file is corrupted.")  # theirs, word for word
        pos += 4
        name = bytes(data[pos : pos + length]).decode()
        pos += length + (8 - (length + 4) % 8)
        value, timestamp = _DOUBLES.unpack_from(data, pos)
        yield name, value, timestamp, pos
        pos += 16


def _file_entries(path: str) -> list[tuple[str, float]]:
    with open(path, "rb") as f:
        data = f.read(_FIRST_READ)
        if len(data) < 8:  # just made, not yet sized: nothing in it yet
            return []
        used = _INT.unpack_from(data, 0)[0]
        if used > len(data):
            data += f.read(used - len(data))
    return [(name, value) for name, value, _timestamp, _pos in _entries(data, used)]


_GAUGE_MERGES = {"livesum": "sum", "sum": "sum", "livemin": "min", "min": "min", "livemax": "max", "max": "max"}


def read(directory: str) -> list[MetricFamily]:
    """Every `.db` file in `directory`, merged as prometheus-client's `MultiProcessCollector.collect`
    merges them: families in the order first met (files in directory order, entries in file
    order), each family's type from its first file; samples' labels sorted by name. Counters
    and histograms: each series summed over the files; a histogram's buckets, summed, made
    cumulative (ascending `le`, written as prometheus-client writes numbers) with a `_count`
    after them. Gauges: merged in their file's mode (sum, min or max; the `live` modes' files
    are removed when their process dies, `mark_process_dead`). Other files (a summary, a gauge
    in another mode: the sidecar writes none) are left out."""
    parsed: dict[str, tuple[str, str, tuple[tuple[str, str], ...], str]] = {}
    families: dict[str, MetricFamily] = {}
    # family -> labels -> (sample name, labels) -> value, in the order first met
    values: dict[str, dict[tuple[tuple[str, str], ...], dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    buckets: dict[str, dict[tuple[tuple[str, str], ...], dict[float, float]]] = {}
    merges: dict[str, str] = {}
    for filename in os.listdir(directory):
        if not filename.endswith(".db") or filename.startswith("."):  # glob's `*.db`
            continue
        parts = filename.split("_")
        kind = parts[0]
        merge = "sum"
        if kind == "gauge":
            merge = _GAUGE_MERGES.get(parts[1], "")
            if not merge:
                continue
        elif kind not in ("counter", "histogram"):
            continue
        try:
            entries = _file_entries(os.path.join(directory, filename))
        except FileNotFoundError:  # a live gauge's file, removed since the listing
            continue
        for series, value in entries:
            found = parsed.get(series)
            if found is None:
                family_name, name, labels, help_text = json.loads(series)
                found = parsed[series] = (family_name, name, tuple(sorted(labels.items())), help_text)
            family_name, name, labels, help_text = found
            family = families.get(family_name)
            if family is None:
                family = families[family_name] = MetricFamily(family_name, help_text, kind)
                values[family_name] = {}
                buckets[family_name] = {}
                merges[family_name] = merge
            if family.type == "gauge":
                series_values = values[family_name].setdefault(labels, {})
                how = merges[family_name]
                current = series_values.get((name, labels))
                if how == "sum":
                    series_values[(name, labels)] = (current or 0.0) + value
                elif current is None:
                    series_values[(name, labels)] = value
                elif how == "min":
                    series_values[(name, labels)] = min(current, value)
                else:
                    series_values[(name, labels)] = max(current, value)
                continue
            if family.type == "histogram":
                le = next((label_value for label_name, label_value in labels if label_name == "le"), None)
                if le is not None:
                    without = tuple(label for label in labels if label[0] != "le")
                    by_bound = buckets[family_name].setdefault(without, {})
                    by_bound[float(le)] = by_bound.get(float(le), 0.0) + value
                    continue
            series_values = values[family_name].setdefault(labels, {})
            series_values[(name, labels)] = series_values.get((name, labels), 0.0) + value
    for family_name, family in families.items():
        by_labels = values[family_name]
        if family.type == "histogram":
            for labels, by_bound in buckets[family_name].items():
                merged = by_labels.setdefault(labels, {})
                total = 0.0
                for bound, count in sorted(by_bound.items()):
                    total += count
                    merged[(family_name + "_bucket", (*labels, ("le", float_text(bound))))] = total
                merged[(family_name + "_count", labels)] = total
        for series_values in by_labels.values():
            for (name, labels), value in series_values.items():
                family.add_sample(name, dict(labels), value)
    return list(families.values())


def mark_process_dead(pid: int, directory: str) -> None:
    """A process has ended: its live gauges' files removed, so `read` no longer counts them
    (prometheus-client's `mark_process_dead`); its counters and histograms stay."""
    for mode in LIVE_MODES:
        try:
            os.remove(os.path.join(directory, f"gauge_{mode}_{pid}.db"))
        except FileNotFoundError:
            pass
