"""`python -m proxy` is the `jwt-sidecar` command, or the supervisor of `workers: N` that `run`
turned itself into (ops/workers.py `become_supervisor`), which imports only what it needs."""

import os

if os.environ.get("JWT_SIDECAR_SUPERVISOR"):  # workers.SUPERVISOR_ENV, not imported: the import is the cost
    from .ops.workers import main
else:
    from .tools.cli import main

raise SystemExit(main())
