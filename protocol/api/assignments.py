"""Assignments: which release a device or a tag's devices should run."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, model_validator

from protocol.api.base import DeviceId, RequestBody, ResponseBody, Tag
from protocol.api.releases import ReleaseView
from protocol.versioning import NAME_PATTERN

# dev-N: one device's assignment; tag-N: a tag rule (N fits the 32-bit id columns).
ASSIGNMENT_ID_PATTERN = r"^(dev|tag)-[1-9][0-9]{0,8}$"


class AssignmentRequest(RequestBody):
    """Assign a released bundle to devices by id, by tag, or both."""

    release: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@/+-]{0,511}$", max_length=512)
    ] = Field(description="NAME@VERSION or the bundle's target path")
    devices: Annotated[list[DeviceId], Field(max_length=10_000)] = Field(default_factory=list)
    tag: Tag | None = None

    @model_validator(mode="after")
    def _some_devices(self) -> AssignmentRequest:
        if not self.devices and self.tag is None:
            raise ValueError("name devices, a tag, or both")
        return self


class AssignmentView(ResponseBody):
    device_id: str
    target_path: str
    director_version: int


class AssignmentResult(ResponseBody):
    release: ReleaseView
    assignments: list[AssignmentView]
    rule: str | None = Field(
        default=None,
        description="the tag rule made (tag-N): devices gaining the tag later get the release too",
    )


class AssignmentQuery(RequestBody):
    device: DeviceId | None = None
    tag: Tag | None = None
    name: Annotated[str, Field(pattern=NAME_PATTERN.pattern, max_length=64)] | None = Field(
        default=None, description="the released bundle's name"
    )
    cancelled: bool = Field(default=False, description="list cancelled ones too")


class AssignmentItem(ResponseBody):
    """A device's current assignment (``dev-N``) or a tag rule (``tag-N``)."""

    id: str
    kind: Literal["device", "tag"]
    device_id: str | None = None
    tag: str | None = None
    rule: str | None = Field(default=None, description="the tag rule a device's assignment is from")
    target_path: str
    name: str
    version: str
    release_counter: int
    assigned_at: datetime
    actor: str
    devices: int | None = Field(
        default=None, description="a rule: how many devices hold its assignment now"
    )
    cancelled_at: datetime | None = None
    cancelled_by: str | None = None


class AssignmentList(ResponseBody):
    assignments: list[AssignmentItem]


class AssignmentCancelled(ResponseBody):
    id: str
    target_path: str
    devices: list[str] = Field(description="the devices that now keep what they run")
