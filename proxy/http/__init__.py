"""Our own HTTP/1.1 wire code: the server the proxy listens with (http1.py), the client it
forwards with (upstream.py), the flow control both use (flow.py), the words for a network
failure (causes.py) and the one way they log (log.py). It imports nothing else of the
package (an import-linter contract in pyproject.toml); everything above may use it."""
