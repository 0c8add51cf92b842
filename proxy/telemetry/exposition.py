"""The `/metrics` body written by hand: metric families, the two text formats, process_* from /proc.

Owns: the family and sample objects a scrape fills (`CounterFamily`, `GaugeFamily`,
`HistogramFamily`: the attribute names and samples of prometheus-client's `*MetricFamily`, so
either kind goes through the same code); `Registry`, the collectors one body is made from, in
order; the Prometheus text format 0.0.4 (`text`) and OpenMetrics 1.0.0 (`openmetrics`), byte
for byte as prometheus-client 0.26 writes them (escaping, `floatToGoString`'s numbers, a
counter's `_total`, a histogram's `_bucket`/`_count`/`_sum`), and no `_created` samples (the
sidecar has always turned them off); `choose`, the format an `Accept` header asks for, with
prometheus-client's `choose_encoder`'s content types; and `ProcessCollector`, the process_*
families from /proc/PID, as prometheus-client's own reads and names them.
Does not own: which families exist (families.py) or their values (metrics.py).

Why not prometheus-client itself: `import prometheus_client` runs its package `__init__`,
which imports its exposition module and with it http.server, http.client, email.*,
urllib.request, wsgiref, socketserver, gzip, bz2, lzma, tempfile and more: 71 modules and
4.1 MiB of resident memory in a process that already holds asyncio, uvloop, cryptography
and yaml (VmRSS, measured 2026-12-04), a tenth of what one idle sidecar holds, for a body
this module writes in 200 lines. A `workers: N` set does not either: multiproc.py writes and
reads its multiprocess files; no process of the sidecar imports it.

Every family name and label name is declared in families.py and is a legacy Prometheus name
(`[a-zA-Z_][a-zA-Z0-9_]*`): written as it is, except where a scrape's `escaping=dots` (or
OpenMetrics' `escaping=values`) has prometheus-client rewrite even a legacy name, which is
done here alike (`_dots`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple, Protocol

__all__ = [
    "OPENMETRICS",
    "TEXT",
    "CounterFamily",
    "GaugeFamily",
    "HistogramFamily",
    "MetricFamily",
    "ProcessCollector",
    "Registry",
    "Sample",
    "choose",
    "float_text",
    "openmetrics",
    "text",
]

TEXT = "text/plain; version=0.0.4; charset=utf-8"
"""prometheus-client's CONTENT_TYPE_PLAIN_0_0_4: what a scrape without a usable Accept gets."""
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_TEXT_1_0_0 = "text/plain; version=1.0.0; charset=utf-8"
_ESCAPINGS = frozenset({"allow-utf-8", "underscores", "dots", "values"})


class Sample(NamedTuple):
    """One line of the body: a sample name, its labels and its value."""

    name: str
    labels: dict[str, str]
    value: float

    # prometheus-client's Sample has these too: its encoders (a test's reference) read them.
    @property
    def timestamp(self) -> None:
        return None

    @property
    def exemplar(self) -> None:
        return None

    @property
    def native_histogram(self) -> None:
        return None


class MetricFamily:
    """One family and its samples: `name` (a counter's without `_total`), `documentation`,
    `type`, `samples`, as prometheus-client's `Metric` has them."""

    __slots__ = ("documentation", "labelnames", "name", "samples", "type")
    unit = ""

    def __init__(self, name: str, documentation: str, kind: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.type = kind
        self.labelnames = tuple(labels)
        self.samples: list[Sample] = []

    def add_sample(self, name: str, labels: dict[str, str], value: float) -> None:
        self.samples.append(Sample(name, labels, value))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} samples={len(self.samples)}>"


class CounterFamily(MetricFamily):
    __slots__ = ()

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name.removesuffix("_total"), documentation, "counter", labels)

    def add_metric(self, values: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name + "_total", dict(zip(self.labelnames, values, strict=True)), value))


class GaugeFamily(MetricFamily):
    __slots__ = ()

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, "gauge", labels)

    def add_metric(self, values: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name, dict(zip(self.labelnames, values, strict=True)), value))


class HistogramFamily(MetricFamily):
    __slots__ = ()

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, "histogram", labels)

    def add_metric(self, values: Sequence[str], buckets: Sequence[tuple[str, float]], sum_value: float) -> None:
        """`buckets`: (`le` as `float_text` writes it, cumulative count), ascending, +Inf last."""
        labels = dict(zip(self.labelnames, values, strict=True))
        name = self.name
        samples = self.samples
        for bound, count in buckets:
            samples.append(Sample(name + "_bucket", {**labels, "le": bound}, count))
        samples.append(Sample(name + "_count", labels, buckets[-1][1]))
        samples.append(Sample(name + "_sum", labels, sum_value))


class Family(Protocol):
    """What the encoders read: ours above (or prometheus-client's, in the tests' comparisons)."""

    name: str
    documentation: str
    type: str
    samples: Any


class Collector(Protocol):
    def collect(self) -> Iterable[Family]: ...


class Registry:
    """The collectors one body is made from, asked in the order they were registered."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def collect(self) -> Iterator[Family]:
        for collector in list(self._collectors):
            yield from collector.collect()


# -- the formats ---------------------------------------------------------------------------------


def float_text(value: float) -> str:
    """A number as prometheus-client writes it (`floatToGoString`): `+Inf`, `-Inf`, `NaN`,
    `repr` of the float (so 1 is `1.0`), and Go's exponent form from 1e7 on for positives."""
    d = float(value)
    if d == math.inf:
        return "+Inf"
    if d == -math.inf:
        return "-Inf"
    if d != d:  # NaN
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escaped(value: str) -> str:
    """A label value (both formats) or OpenMetrics help: backslash, newline and quote escaped."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels(labels: dict[str, str], dots: bool = False) -> str:
    if not labels:
        return ""
    if dots:
        return "{" + ",".join(f'{_dots(k)}="{_escaped(v)}"' for k, v in sorted(labels.items())) + "}"
    return "{" + ",".join(f'{k}="{_escaped(v)}"' for k, v in sorted(labels.items())) + "}"


def _dots(name: str) -> str:
    """A legacy name under the `dots` escaping scheme: each `_` doubled (prometheus-client's `_escape`)."""
    return name.replace("_", "__")


def text(families: Iterable[Family], escaping: str = "underscores") -> bytes:
    """The Prometheus text format 0.0.4 (prometheus-client's `generate_latest`)."""
    dots = escaping == "dots"
    out: list[str] = []
    for family in families:
        name, kind = family.name, family.type
        if kind == "counter":
            name += "_total"
        elif kind == "unknown":
            kind = "untyped"
        if dots:
            name = _dots(name)
        help_text = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        for sample in family.samples:
            sample_name = _dots(sample.name) if dots else sample.name
            out.append(f"{sample_name}{_labels(sample.labels, dots)} {float_text(sample.value)}\n")
    return "".join(out).encode()


def openmetrics(families: Iterable[Family], escaping: str = "underscores") -> bytes:
    """OpenMetrics 1.0.0 (prometheus-client's `openmetrics.exposition.generate_latest`)."""
    dots = escaping == "dots"
    # prometheus-client escapes a sample's name (not its family's) under `values` too.
    prefix = "U__" if escaping == "values" else ""
    out: list[str] = []
    for family in families:
        name = _dots(family.name) if dots else family.name
        out.append(f"# HELP {name} {_escaped(family.documentation)}\n# TYPE {name} {family.type}\n")
        for sample in family.samples:
            sample_name = prefix + _dots(sample.name) if dots or prefix else sample.name
            out.append(f"{sample_name}{_labels(sample.labels, dots)} {float_text(sample.value)}\n")
    out.append("# EOF\n")
    return "".join(out).encode()


Encoder = Callable[[Iterable[Family]], bytes]


def choose(accept: str | None) -> tuple[Encoder, str]:
    """The encoder and content type an `Accept` header asks for, as prometheus-client's
    `choose_encoder` chooses them (OpenMetrics when asked; text otherwise)."""
    for accepted in (accept or "").split(","):
        tokens = accepted.split(";")
        media = tokens[0].strip()
        if media == "application/openmetrics-text":
            version = _parameter(tokens, "version")
            if not version:
                return openmetrics, OPENMETRICS
            if _version(version) >= (1, 0, 0):
                escaping = _escaping(tokens)
                return partial(openmetrics, escaping=escaping), (
                    f"application/openmetrics-text; version={version}; charset=utf-8; escaping={escaping}"
                )
        elif media == "text/plain":
            version = _parameter(tokens, "version")
            if version and _version(version) >= (1, 0, 0):
                escaping = _escaping(tokens)
                return partial(text, escaping=escaping), f"{_TEXT_1_0_0}; escaping={escaping}"
    return text, TEXT


def _parameter(tokens: list[str], key: str) -> str:
    for token in tokens:
        if "=" in token:
            name, value = token.strip().split("=", 1)
            if name == key:
                return value
    return ""


def _escaping(tokens: list[str]) -> str:
    for token in tokens:
        if "=" in token:
            name, value = token.strip().split("=", 1)
            if name == "escaping":
                return value if value in _ESCAPINGS else "underscores"
    return "underscores"


def _version(version: str) -> tuple[Any, ...]:
    # prometheus-client's parse_version: a part that is not a number stays a string (and
    # comparing it with a number raises, there as here).
    parts: list[Any] = []
    for part in version.split("."):
        try:
            parts.append(int(part))
        except ValueError:
            parts.append(part)
    return tuple(parts)


# -- process_* -------------------------------------------------------------------------------------


class ProcessCollector:
    """The process_* families of process `pid()` ("self" by default), read from /proc/PID at
    each scrape as prometheus-client's ProcessCollector reads them: same names, help, types,
    values and order; nothing where /proc cannot be read."""

    def __init__(self, pid: Callable[[], int | str] = lambda: "self", proc: str = "/proc") -> None:
        self._pid = pid
        self._proc = proc
        try:
            self._ticks = float(os.sysconf("SC_CLK_TCK"))
        except (ValueError, OSError):
            self._ticks = 100.0
        self._pagesize = os.sysconf("SC_PAGE_SIZE")
        self._btime = 0.0
        try:
            with open(os.path.join(proc, "stat"), "rb") as stat:
                for line in stat:
                    if line.startswith(b"btime "):
                        self._btime = float(line.split()[1])
                        break
        except OSError:
            pass

    def collect(self) -> list[MetricFamily]:
        if not self._btime:
            return []
        pid = os.path.join(self._proc, str(self._pid()).strip())
        result: list[MetricFamily] = []
        try:
            with open(os.path.join(pid, "stat"), "rb") as stat:
                parts = stat.read().split(b")")[-1].split()
            ticks = self._ticks
            result += [
                _one(GaugeFamily("process_virtual_memory_bytes", "Virtual memory size in bytes."), float(parts[20])),
                _one(
                    GaugeFamily("process_resident_memory_bytes", "Resident memory size in bytes."),
                    float(parts[21]) * self._pagesize,
                ),
                _one(
                    GaugeFamily("process_start_time_seconds", "Start time of the process since unix epoch in seconds."),
                    float(parts[19]) / ticks + self._btime,
                ),
                _one(
                    CounterFamily("process_cpu_seconds_total", "Total user and system CPU time spent in seconds."),
                    float(parts[11]) / ticks + float(parts[12]) / ticks,
                ),
            ]
        except OSError:
            pass
        try:
            max_fds = None
            with open(os.path.join(pid, "limits"), "rb") as limits:
                for line in limits:
                    if line.startswith(b"Max open file"):
                        max_fds = float(line.split()[3])
                        break
            opened = len(os.listdir(os.path.join(pid, "fd")))
            result.append(_one(GaugeFamily("process_open_fds", "Number of open file descriptors."), opened))
            if max_fds is not None:
                result.append(_one(GaugeFamily("process_max_fds", "Maximum number of open file descriptors."), max_fds))
        except OSError:
            pass
        return result


def _one(family: CounterFamily | GaugeFamily, value: float) -> MetricFamily:
    family.add_metric((), value)
    return family
