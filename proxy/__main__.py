"""`python -m proxy` is the `jwt-sidecar` command."""

from .tools.cli import main

raise SystemExit(main())
