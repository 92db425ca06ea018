"""The domain's errors: one root, and the few kinds of what went wrong.

Each feature's errors derive from :class:`FleetError` through one of the kinds
below; only the API layer (``fleet_server/api/errors.py``) says which HTTP
status each kind is answered with. A feature's own root (``RegistryError``,
``ReleaseError``, ...) may itself be a kind, and a subclass of it names its
more precise kind first, so the first kind in a class's MRO is what it means.
"""

from __future__ import annotations


class FleetError(Exception):
    """Something a caller asked that the server cannot do; the message says why."""


class Invalid(FleetError):
    """The request itself is malformed or names something in a form that is refused."""


class Unauthenticated(FleetError):
    """The credential given is missing, unknown or expired."""


class Forbidden(FleetError):
    """The credential is valid but may not do this."""


class NotFound(FleetError):
    """What the request names does not exist."""


class Conflict(FleetError):
    """The request contradicts the state the server holds."""


class Unprocessable(FleetError):
    """The request is well formed, but what it carries does not fit what it refers to."""


KINDS: tuple[type[FleetError], ...] = (
    Invalid,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    Unprocessable,
)


def kind_of(exc: FleetError) -> type[FleetError]:
    """The first kind in the error's MRO (:class:`Invalid` if it names none)."""
    for cls in type(exc).__mro__:
        if cls in KINDS:
            return cls
    return Invalid
