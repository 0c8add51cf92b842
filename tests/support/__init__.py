"""Real aiohttp apps the tests run on loopback: the seams are sockets, never mocks."""
