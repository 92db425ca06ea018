"""One error hierarchy for the domain; only the API layer says which HTTP status each kind is."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import fleet_server
from fleet_server import errors
from fleet_server.api.errors import CALLER_ERRORS, HTTP_STATUS, http_status
from fleet_server.assignments.models import (
    AssignmentConflict,
    AssignmentError,
    AssignmentNotFound,
    ReleaseAlreadyYanked,
    ReleaseYanked,
)
from fleet_server.devices.errors import (
    DeviceDecommissioned,
    DeviceExists,
    DeviceNotFound,
    InvalidProvisioningToken,
    RegistryError,
)
from fleet_server.drift.models import DriftError
from fleet_server.drift.silences import AlertConflict, AlertNotFound
from fleet_server.labels.rules import LabelsMismatch, WindowNotFound
from fleet_server.published.rules import PushConflict, ReleaseError, ReleaseNotFound
from fleet_server.tokens.rules import (
    InvalidToken,
    LastAdminToken,
    RoleTooLow,
    TokenError,
    TokenNotFound,
    TokenRevoked,
)

# Errors under fleet_server that are not a caller's: refused by the API layer itself, raised
# by the CLI or at start-up, or turned into an ApiError where a handler meets them.
NOT_DOMAIN_ERRORS = {
    "fleet_server.api.errors.ApiError",
    "fleet_server.api.client.ApiClientError",
    "fleet_server.audit.signing.AuditKeyError",
    "fleet_server.broker_config.BrokerConfigError",
    "fleet_server.cloud.batching.QueueFull",
    "fleet_server.cloud.models.ModelRefused",
    "fleet_server.fleetctl.errors.CommandError",
    "fleet_server.mqtt.claim.StartRefused",
    "fleet_server.release.bundle_builder.BundleBuildError",
    "fleet_server.release.keys.KeyStoreError",
    "fleet_server.release.repository.RepositoryError",
    "fleet_server.release.verify.RepositoryVerificationError",
    "fleet_server.tls.TLSConfigError",
}


def test_each_kind_maps_to_one_status() -> None:
    assert {
        errors.Invalid: 400,
        errors.Unauthenticated: 401,
        errors.Forbidden: 403,
        errors.NotFound: 404,
        errors.Conflict: 409,
        errors.Unprocessable: 422,
    } == HTTP_STATUS
    assert set(HTTP_STATUS) == set(errors.KINDS)
    assert CALLER_ERRORS is errors.FleetError
    for kind in errors.KINDS:
        assert issubclass(kind, errors.FleetError)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RegistryError, 400),
        (DeviceExists, 409),
        (DeviceNotFound, 404),
        (InvalidProvisioningToken, 401),
        (DeviceDecommissioned, 409),
        (AssignmentError, 400),
        (ReleaseYanked, 409),
        (AssignmentConflict, 409),
        (AssignmentNotFound, 404),
        (ReleaseAlreadyYanked, 409),
        (ReleaseError, 400),
        (PushConflict, 409),
        (ReleaseNotFound, 404),
        (TokenError, 400),
        (InvalidToken, 401),
        (RoleTooLow, 403),
        (TokenNotFound, 404),
        (TokenRevoked, 409),
        (LastAdminToken, 409),
        (LabelsMismatch, 422),
        (WindowNotFound, 404),
        (AlertNotFound, 404),
        (AlertConflict, 409),
        (DriftError, 404),
    ],
)
def test_each_error_keeps_the_status_it_was_answered_with(
    error: type[errors.FleetError], status: int
) -> None:
    assert http_status(error("refused")) == status


def _classes_under_fleet_server() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(fleet_server.__path__, "fleet_server."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == info.name:
                found.append(cls)
    return found


def test_every_server_error_derives_from_the_root_or_is_named_as_not_a_callers() -> None:
    classes = _classes_under_fleet_server()
    names = {f"{cls.__module__}.{cls.__qualname__}" for cls in classes}
    assert names >= NOT_DOMAIN_ERRORS, "a listed class is gone; drop it from the list"
    strays = sorted(
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in classes
        if not issubclass(cls, errors.FleetError)
        and f"{cls.__module__}.{cls.__qualname__}" not in NOT_DOMAIN_ERRORS
    )
    assert strays == []
    for cls in classes:
        assert not hasattr(cls, "status") or cls.__module__.startswith("fleet_server.api."), cls
