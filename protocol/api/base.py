"""What every body of the API shares: the prefix, the field types, the base models, errors."""

from __future__ import annotations

from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from protocol.topics import DEVICE_ID_PATTERN
from protocol.versioning import HARDWARE_ID_PATTERN

API_PREFIX = "/api/v1"

DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN.pattern, max_length=128)]
HardwareId = Annotated[str, Field(pattern=HARDWARE_ID_PATTERN.pattern, max_length=64)]
Tag = Annotated[str, Field(pattern=DEVICE_ID_PATTERN.pattern, max_length=128)]
Region = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,63}$", max_length=64)]
Tags = Annotated[list[Tag], Field(max_length=64)]


def iana_zone(zone: str) -> str:
    """``zone`` if it names a time zone of the IANA database; a ``ValueError`` naming it if not."""
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{zone!r} is not an IANA time zone such as Europe/Berlin, America/New_York or UTC"
        ) from None
    return zone


TimeZoneName = Annotated[str, Field(max_length=64), AfterValidator(iana_zone)]
LifecycleReason = Annotated[
    str, Field(min_length=1, max_length=500, pattern=r"^[^\x00-\x1f\x7f]+$")
]


class RequestBody(BaseModel):
    """A request body: an unknown field is an error, not an ignored option."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ResponseBody(BaseModel):
    """A response body."""

    model_config = ConfigDict(frozen=True)


class ErrorBody(ResponseBody):
    """Every error: one sentence saying what was wrong."""

    error: str


class Health(ResponseBody):
    status: Literal["ok"] = "ok"
