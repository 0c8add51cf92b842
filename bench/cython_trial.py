"""Trial (session 9, bench/FIGURES.md "Compiling with Cython"): the hot request-path modules
compiled in place by Cython 3 as they are (pure Python mode, no .pyx, no type declarations),
so that the compiled build and the interpreted one can be counted against each other.

Not part of the build: nothing in pyproject.toml, the Dockerfile or CI knows of it. It needs
`pip install cython` in the venv, gcc and the Python headers.

    .venv/bin/python bench/cython_trial.py build [--set hot|http|request|edge] [--binding] [--typing]
    .venv/bin/python bench/cython_trial.py clean      # delete every .so/.c it made: pure Python again
    .venv/bin/python bench/cython_trial.py status     # which modules are compiled now

Each module's `.so` sits beside its `.py` (`build_ext --inplace`); the import system prefers the
extension module, so deleting the `.so` files (`clean`) gives the interpreted build back.
annotation_typing is off by default: Cython's default (on, `--typing`) turns `str` and `list`
annotations into exact-type checks, which refuse a StrEnum member or a tuple where the
interpreted code accepts them (58 tests fail so, and every request of bench/pipeline_micro a 500).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The modules a request runs through (cProfile of bench/pipeline_micro.py a, c, d: every module
# of proxy/ with more than a handful of calls per round), grouped so a subset can be compiled.
SETS: dict[str, list[str]] = {
    "http": ["proxy/http/http1.py", "proxy/http/upstream.py", "proxy/http/flow.py"],
    "request": [
        "proxy/request/app.py",
        "proxy/request/pipeline.py",
        "proxy/request/forward.py",
        "proxy/request/identity.py",
        "proxy/request/exchange.py",
    ],
    "edge": [
        "proxy/telemetry/accesslog.py",
        "proxy/auth/verify.py",
        "proxy/auth/extract.py",
        "proxy/telemetry/metrics.py",
        "proxy/config/routing.py",
        "proxy/base/memo.py",
    ],
}
SETS["hot"] = SETS["http"] + SETS["request"] + SETS["edge"]
EVERY = sorted({m for ms in SETS.values() for m in ms})


def _build(modules: list[str], binding: bool, typing: bool, jobs: int) -> None:
    from Cython.Build import cythonize
    from setuptools import Extension, setup

    directives = {
        "language_level": 3,
        "binding": binding,  # True: functions are cyfunctions that look like Python's (introspection)
        "annotation_typing": typing,  # False: annotations are ignored (no C types, no type checks)
        "embedsignature": False,
    }
    extensions = [Extension(m[:-3].replace("/", "."), [m]) for m in modules]
    started = time.perf_counter()
    ext_modules = cythonize(extensions, compiler_directives=directives, nthreads=jobs, quiet=True, force=True)
    # optional=True: a module that fails to compile stays interpreted (the fallback a build would use).
    for ext in ext_modules:
        ext.optional = True
    setup(
        name="cython-trial",
        ext_modules=ext_modules,
        script_args=["build_ext", "--inplace", f"--parallel={jobs}", "--build-temp", "/tmp/cython-trial-build"],
    )
    print(f"built {len(modules)} modules in {time.perf_counter() - started:.1f} s", file=sys.stderr)


def _made() -> list[Path]:
    found: list[Path] = []
    for m in EVERY:
        stem = ROOT / m[:-3]
        found += stem.parent.glob(stem.name + ".cpython-*.so")
        if stem.with_suffix(".c").exists():
            found.append(stem.with_suffix(".c"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "clean", "status"])
    parser.add_argument("--set", action="append", choices=sorted(SETS), help="module set(s); default hot")
    parser.add_argument("--module", action="append", default=[], help="one more module path")
    parser.add_argument("--binding", action="store_true", help="binding=True (default False)")
    parser.add_argument("--typing", action="store_true", help="annotation_typing=True (default False)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.action == "clean":
        for path in _made():
            path.unlink()
            print(f"removed {path.relative_to(ROOT)}")
        return
    if args.action == "status":
        for path in _made():
            if path.suffix == ".so":
                print(f"{path.relative_to(ROOT)} {path.stat().st_size} bytes")
        return
    modules = [m for s in (args.set or ["hot"]) for m in SETS[s]] + args.module
    for path in _made():  # a build replaces whatever was compiled before
        path.unlink()
    _build(modules, args.binding, args.typing, args.jobs)


if __name__ == "__main__":
    main()
