"""jwt-sidecar: a reverse proxy that verifies bearer JWTs and hands the upstream the caller's identity."""

__version__ = "0.1.0"
