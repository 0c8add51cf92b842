"""`python -m proxy` is the `jwt-sidecar` command."""

from .cli import main

raise SystemExit(main())
