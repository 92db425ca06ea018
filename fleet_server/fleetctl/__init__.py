"""``fleetctl``: the release engineer's and operator's command-line tool.

Human output by default, ``--json`` for scripts. It never prompts unless
standard input is a terminal; passphrases come from ``--passphrase-file`` or
``--passphrase-env``. Commands that talk to a fleet server (devices, assign,
audit, tokens, release push, drift, alerts, labels, rollout) take ``--server URL``
and an API token from ``--token-file`` or ``--token-env``. Errors a user can cause end in one line
on stderr and a non-zero exit, never a traceback.

``release_engineering/`` holds the offline commands, ``remote/`` those that talk
to a server, ``render`` what they print and ``parser`` the command line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fleet_server.api.client import ApiClientError
from fleet_server.fleetctl.errors import EXIT_FAILED, CommandError
from fleet_server.fleetctl.parser import build_parser
from fleet_server.fleetctl.remote.labels import read_labels_file
from fleet_server.release.bundle_builder import BundleBuildError
from fleet_server.release.keys import KeyStoreError
from fleet_server.release.repository import RepositoryError
from protocol.bundle import BundleFormatError
from protocol.cli import EXIT_BROKEN_PIPE, EXIT_USAGE, silence_stdout

__all__ = ["EXIT_FAILED", "CommandError", "build_parser", "main", "read_labels_file"]

USER_ERRORS = (
    CommandError,
    ApiClientError,
    BundleBuildError,
    BundleFormatError,
    KeyStoreError,
    RepositoryError,
    ValueError,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``fleetctl`` command; its exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.group is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        args.func(args)
        # Written here, inside the handler, so a closed pipe is not found at exit instead.
        sys.stdout.flush()
    except BrokenPipeError:  # first: it is an OSError, which a user error may one day include
        silence_stdout()
        return EXIT_BROKEN_PIPE
    except USER_ERRORS as exc:
        print(f"fleetctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    return 0
