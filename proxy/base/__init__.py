"""The ground every wing stands on: the error tree (errors.py), the clock, the operator log
(oplog.py, logthrottle.py, safetext.py) and key material (jwks.py, secretcheck.py,
secretfile.py). It imports only http/ of the package."""
