"""The operator's commands: each talks to a fleet server's REST API (``--server``, a token)."""
