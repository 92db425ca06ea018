"""Many devices running the real agent code against a real server and broker."""
