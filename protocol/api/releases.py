"""Releases: pushed to the image repository, listed, yanked."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Base64Bytes, Field

from protocol.api.base import LifecycleReason, RequestBody, ResponseBody
from protocol.versioning import NAME_PATTERN

# A file of an image repository as pushed: under metadata/ (flat) or targets/.
RepositoryFile = Annotated[
    str,
    Field(
        pattern=r"^(metadata/[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
        r"|targets(/[A-Za-z0-9][A-Za-z0-9._-]{0,254}){1,4})$",
        max_length=1024,
    ),
]

MAX_PUSH_FILES = 1000


class ReleaseView(ResponseBody):
    """A bundle released into the image repository."""

    target_path: str
    name: str
    version: str
    release_counter: int
    hardware_ids: list[str]
    sha256: str
    length: int
    released_at: datetime
    yanked_at: datetime | None = Field(
        default=None, description="when the release was yanked; null if it was not"
    )
    yank_reason: str | None = None


class ReleaseList(ResponseBody):
    releases: list[ReleaseView]


class ReleaseQuery(RequestBody):
    name: Annotated[str, Field(pattern=NAME_PATTERN.pattern, max_length=64)] | None = None


class ReleasePush(RequestBody):
    """Files of a signed image repository, base64, by path (``metadata/…``, ``targets/…``).

    The server verifies the resulting repository as a device would before it
    publishes any of them.
    """

    files: Annotated[
        dict[RepositoryFile, Base64Bytes], Field(min_length=1, max_length=MAX_PUSH_FILES)
    ]


class ReleasePushResult(ResponseBody):
    published: list[ReleaseView]
    files: int


class YankRequest(RequestBody):
    """Yank a release: no device that does not run it already is offered it any more."""

    release: Annotated[
        str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@/+-]{0,511}$", max_length=512)
    ] = Field(description="NAME@VERSION or the bundle's target path")
    reason: LifecycleReason


class YankResult(ResponseBody):
    release: ReleaseView
    withdrawn: list[str] = Field(
        description="devices assigned the release but not running it: their director "
        "metadata now names nothing, so they keep what they run"
    )
    kept: list[str] = Field(
        description="devices running the release: they keep it until assigned another "
        "(a yank is not a rollback)"
    )
    rules_cancelled: list[str] = Field(
        default_factory=list,
        description="tag rules (tag-N) that assigned the release, cancelled with the yank",
    )
