"""The devices feature's errors; each carries the HTTP status the API maps it to."""

from __future__ import annotations


class RegistryError(Exception):
    """A registry request cannot be done; ``status`` is the HTTP status it maps to."""

    status = 400


class DeviceExists(RegistryError):
    status = 409


class DeviceNotFound(RegistryError):
    status = 404


class InvalidProvisioningToken(RegistryError):
    status = 401


class DeviceDecommissioned(RegistryError):
    """The device was decommissioned: it has no credential and takes no changes."""

    status = 409
