"""A device's telemetry windows."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from protocol.api.base import RequestBody, ResponseBody
from protocol.api.drift import ModelName, ModelVersion


class WindowQuery(RequestBody):
    """A device's windows that ended in ``(since, until]``, newest first, a page at a time."""

    since: datetime | None = None
    until: datetime | None = None
    model: ModelName | None = None
    version: ModelVersion | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    before: str | None = Field(
        default=None,
        max_length=200,
        description="the next_before of the previous page: windows after it",
    )


class WindowView(ResponseBody):
    window_id: str
    start: datetime
    end: datetime
    model: str
    version: str
    requests: int
    errors: int
    labelled: bool = Field(description="labels were posted for it")


class WindowList(ResponseBody):
    device_id: str
    windows: list[WindowView]
    next_before: str | None = Field(
        default=None, description="more windows: pass this as before for the next page"
    )
