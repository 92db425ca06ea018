"""Published releases: the server's registry of the bundles pushed to its image repository.

Not to be confused with :mod:`fleet_server.release`, the offline release
engineering a release engineer runs. :mod:`.rules` holds the plain rules
(which pushed paths are refused, the row <-> bundle mapping), :mod:`.store`
the queries, :mod:`.service` the publishing itself and :mod:`.routes` the
REST operations, which only call the service.
"""

from fleet_server.published.rules import (
    PushConflict,
    ReleaseError,
    ReleaseNotFound,
)
from fleet_server.published.service import ReleaseService, find_release, verify_repository

__all__ = [
    "PushConflict",
    "ReleaseError",
    "ReleaseNotFound",
    "ReleaseService",
    "find_release",
    "verify_repository",
]
