"""A trial of layouts for `workers: 2`: what the set costs in memory when its workers are forked
from one parent that has imported everything `run` imports (their pages shared copy-on-write)
rather than started as fresh interpreters under a small supervisor. The `worker0+1` layout is
the one ops/workers.py builds (with its supervision, the admin port and `malloc_trim`); this
trial is kept to compare it with `parent+2`.

Two layouts, each measured as bench/rss.py measures `workers: 2` (bench/targets.py's config
and nginx, 10,000 requests of workload (a) over 32 connections; VmHWM summed over the tree,
and the tree's PSS, its peak sampled every 0.5 s during the requests):

- `parent+2`: the parent imports the run path, loads the config, forks two workers (each
  runs `jwt-sidecar run` as a worker does) and then only waits: a supervisor's admin port,
  metrics aggregation and restarts are not built here, so a real one would hold a little more.
- `worker0+1`: the parent forks one worker and then serves as worker 0 itself (the layout
  where the first worker is the supervisor: two processes in all).

    .venv/bin/python bench/fork_trial.py            # both layouts
    .venv/bin/python bench/fork_trial.py --layout worker0+1

The sidecar's own layout is measured by `bench/rss.py --workers 2`.
The figures are in bench/FIGURES.md ("Memory of `workers: 2`").
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYOUTS = ("parent+2", "worker0+1")


def _tree(config: str, layout: str) -> int:
    """The process tree of one layout (this file run with `--tree`): never returns normally."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fork-trial-")  # before prometheus-client
    import uvloop  # noqa: F401 - what a worker holds, imported before the fork

    from proxy.config import builder
    from proxy.ops import server  # noqa: F401
    from proxy.tools import cli

    builder.load(config)  # what the config check imports
    gc.collect()
    gc.freeze()  # what exists now is never traversed by the collector, so its pages stay shared
    forked = 2 if layout == "parent+2" else 1
    for index in range(forked):
        if os.fork() == 0:
            os.environ["JWT_SIDECAR_WORKER"] = str(index)
            os._exit(cli.main(["run", "--config", config]))
    if layout == "worker0+1":
        os.environ["JWT_SIDECAR_WORKER"] = str(forked)
        return cli.main(["run", "--config", config])
    signal.pause()
    return 0


def measure(layout: str) -> None:
    sys.path.insert(0, str(HERE))
    sys.path.insert(1, str(HERE.parent))
    import load
    import rss
    import targets as T
    import tokens
    import yaml

    procs = T.Processes()
    with tempfile.TemporaryDirectory(prefix="jwt-sidecar-fork-") as tmp:
        run_dir = Path(tmp)
        try:
            toks = tokens.make(run_dir, distinct=1)
            nginx = T.start_nginx(procs, run_dir, cpus=None)
            port, admin = T.free_port(), T.free_port()
            settings = T.sidecar_config(port=port, admin_port=admin, upstream_port=nginx.port, jwks_url=nginx.jwks_url)
            settings["workers"] = 2
            config = run_dir / "fork.yaml"
            config.write_text(yaml.safe_dump(settings, sort_keys=False))
            with (run_dir / "access.log").open("wb") as out, (run_dir / "err.log").open("wb") as err:
                tree = subprocess.Popen(
                    [sys.executable, __file__, "--tree", str(config), "--layout", layout],
                    stdout=out,
                    stderr=err,
                    cwd=HERE.parent,
                    start_new_session=True,
                )
            try:
                for _ in range(300):
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        time.sleep(0.1)
                time.sleep(2.0)  # both workers listening, the first key fetch settled
                pid = tree.pid
                _, usage = load.measure(pid, lambda: asyncio.run(rss._drive(port, toks.token, rss.REQUESTS)))
                time.sleep(0.5)
                print(
                    f"{layout}: {len(load.tree(pid))} processes; after {rss.REQUESTS:,} of (a): "
                    f"peak VmHWM {load.status_kib(pid, 'VmHWM') / 1024:.1f} MiB (tree), "
                    f"PSS {load.pss_kib(pid) / 1024:.1f} MiB, peak PSS {usage.peak_pss_kib / 1024:.1f} MiB"
                )
            finally:
                os.killpg(tree.pid, signal.SIGTERM)
                tree.wait(30)
        finally:
            procs.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=LAYOUTS, action="append")
    parser.add_argument("--tree", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tree:
        return _tree(args.tree, args.layout[0])
    for layout in args.layout or LAYOUTS:
        measure(layout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
