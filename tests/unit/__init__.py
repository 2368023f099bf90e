"""Unit tests: no sockets, no sleeps."""
