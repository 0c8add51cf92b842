"""The process: start-up checks and sockets (startup.py), serving and draining (server.py),
worker processes (workers.py), config reload (reload.py), the admin endpoints (admin.py)
and descriptor limits (limits.py)."""
