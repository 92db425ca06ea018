"""How a ``fleetctl`` command that cannot go on ends: one line on stderr, exit status 1."""

EXIT_FAILED = 1


class CommandError(Exception):
    """A command cannot go on; the message is shown to the user as is."""
