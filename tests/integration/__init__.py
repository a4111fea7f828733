"""Integration tests: an in-process hub or node on port 0 and/or a real redis-server that a
fixture starts."""
