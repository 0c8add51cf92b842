"""What a running `jwt-sidecar run` has imported, for the tests that keep a library out of it.

A sidecar started with `IMPORT_ENV` (`process.ENV` with PYTHONPROFILEIMPORTTIME, which every
process it makes inherits) writes one stderr line per import of every process, at the time
it happens: `imported(run.stderr())` is every module it has loaded so far, lazy imports on the
request path included (what `sorted(sys.modules)` would print, for every process at once).
`mapped(pid, part)` is whether a path with `part` in it is mapped into the process now: a C
extension (multidict's, yarl's, propcache's, unicodedata's) shows there however it was loaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .process import ENV

IMPORT_ENV = {**ENV, "PYTHONPROFILEIMPORTTIME": "1"}
linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")


def imported(stderr: str) -> set[str]:
    """Every module named by an `import time: ... | ... | name` line of `stderr`."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def top_level(modules: set[str]) -> set[str]:
    """The packages of `modules` (`yarl._url` is `yarl`)."""
    return {name.split(".")[0] for name in modules}


def mapped(pid: int, part: str) -> bool:
    """Whether a file whose path contains `part` is mapped into process `pid` (/proc/PID/maps)."""
    return part in Path(f"/proc/{pid}/maps").read_text()
