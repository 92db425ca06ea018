"""The devices feature's errors, as kinds of :mod:`fleet_server.errors`."""

from __future__ import annotations

from fleet_server.errors import Conflict, Invalid, NotFound, Unauthenticated


class RegistryError(Invalid):
    """A registry request cannot be done; the message says why."""


class DeviceExists(Conflict, RegistryError):
    """A device goes by that id already."""


class DeviceNotFound(NotFound, RegistryError):
    """No device goes by that id."""


class InvalidProvisioningToken(Unauthenticated, RegistryError):
    """The provisioning token is unknown or expired."""


class DeviceDecommissioned(Conflict, RegistryError):
    """The device was decommissioned: it has no credential and takes no changes."""
