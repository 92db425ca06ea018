"""The assignments feature's data: what was assigned, cancelled, refused, yanked; its errors."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from fleet_server.db.models import Release
from fleet_server.devices.errors import RegistryError
from fleet_server.errors import Conflict, NotFound
from fleet_server.published.rules import ReleaseError


class AssignmentError(RegistryError):
    """The assignment cannot be made; the message says why."""


class ReleaseYanked(Conflict, AssignmentError):
    """The release was yanked: it is assigned to no device any more."""


class AssignmentConflict(Conflict, AssignmentError):
    """The assignment contradicts what a device runs, or what was cancelled already."""


class AssignmentNotFound(NotFound, AssignmentError):
    """No assignment of that release to that device."""


class ReleaseAlreadyYanked(Conflict, ReleaseError):
    """The release was yanked before."""


@dataclass(frozen=True)
class AssignmentResult:
    device_id: str
    target_path: str
    director_version: int


@dataclass(frozen=True)
class Assigned:
    """What :meth:`AssignmentService.assign` recorded: each device's assignment, and the rule."""

    results: list[AssignmentResult]
    rule_id: int | None


@dataclass(frozen=True)
class Cancelled:
    """What :meth:`AssignmentService.cancel` cancelled: the devices that now keep what they run."""

    assignment_id: str
    target_path: str
    devices: list[str]
    versions: dict[str, int]  # each device's director version that names nothing


@dataclass(frozen=True)
class Refusal:
    """An update a device refused, as its event says."""

    at: datetime
    received_at: datetime
    event: str
    reason: str | None
    bundle: str | None
    message: str | None


@dataclass(frozen=True)
class Committed:
    """A device's assignment as the database holds it."""

    device_id: str
    target_path: str | None
    director_version: int
    rollback_of: str | None = None  # a marked fleet rollback replacing this bundle
    shadow_path: str | None = None  # a release run as a shadow beside it


@dataclass(frozen=True)
class SyncStep:
    """What brings one device's director metadata in line with the database.

    ``sign``: sign the committed target at ``version`` (else nothing to sign);
    ``record``: the database's director version becomes ``version``.
    """

    sign: bool
    version: int
    record: bool


@dataclass(frozen=True)
class YankOutcome:
    """A yanked release, the devices whose assignment of it was withdrawn, those running it."""

    release: Release
    withdrawn: list[str]
    kept: list[str]
    rules_cancelled: list[str]
