"""The operator's commands: the `jwt-sidecar` CLI (cli.py), the demo (demo.py), `token
explain` (explain.py) and the key and token tool (keygen.py)."""
