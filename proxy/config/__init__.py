"""The settings: the frozen dataclasses (settings.py), the YAML reader that keeps line numbers
(yamlsource.py), the builder that checks a file and makes a `Settings` (builder.py), what a
route's path selects (routing.py) and the checks across routes (routecheck.py)."""
