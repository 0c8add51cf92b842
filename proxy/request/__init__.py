"""The request path: the snapshot a request is served from (runtime.py), the steps from
route to answer (pipeline.py), identity headers in and out (identity.py), the upstream
exchange and WebSocket tunnel (forward.py), and the HTTP handler that ties them (app.py)."""
