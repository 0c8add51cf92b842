"""`python -m proxy` is the `jwt-sidecar` command (also as worker 0 of `workers: N`, which `run`
turned itself into: ops/workers.py `become_first`)."""

from .tools.cli import main

raise SystemExit(main())
