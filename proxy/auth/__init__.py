"""A token, from the request to a verdict: finding it (extract.py), the key sets
(keys.py), verifying it (verify.py) and each route's claim and scope rules (rules.py)."""
