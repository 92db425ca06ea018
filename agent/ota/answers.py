"""What the update fetcher answers the installer: one typed message per outcome.

The fetcher (:mod:`agent.ota.fetch_worker`, a child process) prints exactly one
of these as a JSON line; the installer parses it with :func:`parse_answer`.
The models are light (no TUF, no network), so the serving process imports them
without the verification machinery.

A refusal says what it is about: ``assignment`` (the director's answer, or the
metadata behind it, was refused; nothing is known about any bundle; on a
standalone device, the image repository's newest release of its name was: none
released, none for this hardware, or a release counter below the installed) or
``download`` (the expected bundle was fetched and refused) or ``shadow`` (the
director's shadow target, or its download, was refused). Only a refusal with
``condemns_bundle`` proves the expected bundle itself bad.

The ``shadow`` command answers :data:`ShadowAnswer`: no shadow listed, a
shadow the device said not to download (held, refused, or waiting for its
retry) still listed, a new shadow downloaded and verified, or a refusal or
unavailability as above.

The ``plan`` command answers :data:`PlanAnswer`: the director's hybrid plan
for this device (:class:`PlanRead`: the plan, or why the one listed is
refused, or neither), or an unavailability when the fetcher itself failed.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from agent.ota.journal import InstallTarget
from protocol.hybrid import HybridPlan

# Why a plan the director listed is not followed (each a stable reason code). Here,
# not beside the director client that finds them, so the serving process knows
# them without loading python-tuf.
PLAN_MALFORMED: Final = "plan-malformed"
PLAN_HASH_MISMATCH: Final = "plan-hash-mismatch"
PLAN_WRONG_DEVICE: Final = "plan-wrong-device"
PLAN_DUPLICATE: Final = "plan-duplicate"
PLAN_EXPIRED: Final = "plan-expired"
PLAN_REFUSALS: Final = (
    PLAN_MALFORMED,
    PLAN_HASH_MISMATCH,
    PLAN_WRONG_DEVICE,
    PLAN_DUPLICATE,
    PLAN_EXPIRED,
)


class _Answer(BaseModel):
    # Answers are read only by update checks, after the agent serves: their validators
    # are built then, not at import (edge-agent run imports this module before it listens).
    model_config = ConfigDict(frozen=True, defer_build=True)


class Unassigned(_Answer):
    """The director assigns nothing (``check`` or ``download``)."""

    status: Literal["none"] = "none"


class Assigned(_Answer):
    """What to install (``check``)."""

    status: Literal["assigned"] = "assigned"
    target: InstallTarget


class RollbackAssigned(_Answer):
    """The director names a bundle as a fleet rollback of ``rollback_of`` (``check``).

    Checked like any assignment except for the release counter, which only the
    installer can judge: it accepts exactly the bundle its other slot holds from
    before (:meth:`~agent.ota.journal.Journal.rollback_refusal`), and never
    downloads one.
    """

    status: Literal["rollback"] = "rollback"
    target: InstallTarget
    rollback_of: str


class Changed(_Answer):
    """The director now names another bundle than the download expected (``download``)."""

    status: Literal["changed"] = "changed"
    target: InstallTarget


class Downloaded(_Answer):
    """The expected bundle, downloaded and verified, in the file ``path`` (``download``)."""

    status: Literal["downloaded"] = "downloaded"
    target: InstallTarget
    path: str


class Refused(_Answer):
    """The fetcher refused the director's answer or the downloaded bundle.

    ``target`` is the bundle whose download was refused, when a shadow's was
    (the director's answer was accepted): the keeper backs off that bundle, or
    never downloads it again while listed when ``condemns_bundle``.
    """

    status: Literal["refused"] = "refused"
    reason: str
    message: str
    about: Literal["assignment", "download", "shadow"]
    condemns_bundle: bool = False
    target: InstallTarget | None = None


class Unavailable(_Answer):
    """The repositories could not be reached, or the fetcher failed: try again later."""

    status: Literal["unavailable"] = "unavailable"
    reason: str
    message: str


class NoShadow(_Answer):
    """The director lists no shadow for this device (``shadow``)."""

    status: Literal["no-shadow"] = "no-shadow"


class ShadowKept(_Answer):
    """The director lists a bundle the device said not to download (``shadow``): the shadow
    it holds, one it refused, or one waiting for its retry. Nothing downloaded."""

    status: Literal["shadow-kept"] = "shadow-kept"
    target: InstallTarget


class ShadowDownloaded(_Answer):
    """The director's shadow, verified like an assignment, downloaded into ``path`` (``shadow``)."""

    status: Literal["shadow-downloaded"] = "shadow-downloaded"
    target: InstallTarget
    path: str


class Why(_Answer):
    """A reason code and what it means."""

    reason: str
    message: str


class PlanRead(_Answer):
    """The director's hybrid plan for this device (``plan``).

    ``plan``: the plan to follow, checked (signed, meant for this device, not
    expired); ``refusal``: why the plan the director listed is not followed;
    both ``None`` when it lists none. ``expires``: when the director targets
    metadata the plan came from expires (the plan is followed no longer).
    ``refresh_failed``: the director could not be refreshed (unreachable, or
    its new metadata failed verification), so this is the plan of the
    metadata trusted before, verified again; ``None`` after a refresh. When
    that stored metadata cannot be trusted either, ``plan`` is ``None``.
    """

    status: Literal["plan"] = "plan"
    plan: HybridPlan | None = None
    refusal: Why | None = None
    expires: AwareDatetime | None = None
    refresh_failed: Why | None = None


_DEFERRED = ConfigDict(defer_build=True)

FetchAnswer = Annotated[
    Unassigned | Assigned | RollbackAssigned | Changed | Downloaded | Refused | Unavailable,
    Field(discriminator="status"),
]
_ANSWER: TypeAdapter[FetchAnswer] = TypeAdapter(FetchAnswer, config=_DEFERRED)

ShadowAnswer = Annotated[
    NoShadow | ShadowKept | ShadowDownloaded | Refused | Unavailable,
    Field(discriminator="status"),
]
_SHADOW_ANSWER: TypeAdapter[ShadowAnswer] = TypeAdapter(ShadowAnswer, config=_DEFERRED)


PlanAnswer = Annotated[PlanRead | Unavailable, Field(discriminator="status")]
_PLAN_ANSWER: TypeAdapter[PlanAnswer] = TypeAdapter(PlanAnswer, config=_DEFERRED)


def parse_answer(line: str) -> FetchAnswer:
    """The fetcher's answer from its JSON line; raises ``ValueError`` when it is not one."""
    try:
        return _ANSWER.validate_json(line)
    except ValidationError as exc:
        raise ValueError(f"not an answer of the update fetcher: {exc.errors()[0]['msg']}") from None


def parse_shadow_answer(line: str) -> ShadowAnswer:
    """The fetcher's answer to ``shadow`` from its JSON line; ``ValueError`` when it is not one."""
    try:
        return _SHADOW_ANSWER.validate_json(line)
    except ValidationError as exc:
        raise ValueError(
            f"not a shadow answer of the update fetcher: {exc.errors()[0]['msg']}"
        ) from None


def parse_plan_answer(line: str) -> PlanAnswer:
    """The fetcher's answer to ``plan`` from its JSON line; ``ValueError`` when it is not one."""
    try:
        return _PLAN_ANSWER.validate_json(line)
    except ValidationError as exc:
        raise ValueError(
            f"not a plan answer of the update fetcher: {exc.errors()[0]['msg']}"
        ) from None
