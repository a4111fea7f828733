"""Unit tests: no sockets, no subprocesses, no Redis (fakeredis is fine)."""
