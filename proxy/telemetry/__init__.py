"""What the proxy reports about its traffic: the Prometheus metrics (their families declared
once in families.py, recorded and exported by metrics.py) and the access log (accesslog.py). The operator log is base/oplog.py: every wing writes to it."""
