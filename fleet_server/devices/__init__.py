"""Devices: the registry, enrolment, credentials, decommissioning.

:mod:`~fleet_server.devices.store` holds the registry's SQL and its rules on
device attributes; :mod:`~fleet_server.devices.service` joins it with the
assignments a device gets or loses; :mod:`~fleet_server.devices.routes` holds
the REST operations.
"""

from fleet_server.devices.errors import (
    DeviceDecommissioned,
    DeviceExists,
    DeviceNotFound,
    InvalidProvisioningToken,
    RegistryError,
)

__all__ = [
    "DeviceDecommissioned",
    "DeviceExists",
    "DeviceNotFound",
    "InvalidProvisioningToken",
    "RegistryError",
]
