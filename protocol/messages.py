"""Every MQTT payload, versioned: what devices report and what the server wants.

Payloads are JSON objects with ``v`` (the schema version), the ``device_id``
(which must equal the one in the topic), a ``message_id`` unique per message
(so a resent message is processed once) and ``sent_at`` (device clock, seconds
since the epoch). Unknown fields are refused rather than ignored, so a typo in
a device's firmware shows up as a dropped, counted message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter
from pydantic_core import PydanticCustomError

MESSAGE_SCHEMA_VERSION = 1

_DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
_Short = Annotated[str, Field(max_length=256)]
# Times are seconds since the epoch before 2100; counters fit a signed 64-bit column.
_Time = Annotated[float, Field(ge=0, le=4_102_444_800)]
_Count = Annotated[int, Field(ge=0, le=2**63 - 1)]

# Free-form JSON (an event's details) is bounded at the gate, so that everything that reads
# it later (the database, the API's serializer, a terminal) can take whatever got stored.
FREEFORM_MAX_DEPTH = 8  # nested objects and arrays, the outermost object being level 1
FREEFORM_MAX_ITEMS = 256  # keys and array items, counted through every level
FREEFORM_MAX_STRING = 2000  # characters of any key or string (the agent clips its texts to it)
# Its compact JSON in UTF-8: the default message limit, held even where a server's is raised.
FREEFORM_MAX_BYTES = 64 * 1024
_FREEFORM_INT = 2**63  # integers a JSON reader in any language (and a BIGINT) holds


class FreeformBounds(BaseModel):
    """How much free-form JSON a reader accepts; :data:`FREEFORM_BOUNDS` is the gate's."""

    model_config = ConfigDict(frozen=True)

    max_depth: int = FREEFORM_MAX_DEPTH
    max_items: int = FREEFORM_MAX_ITEMS
    max_string: int = FREEFORM_MAX_STRING
    max_bytes: int = FREEFORM_MAX_BYTES


FREEFORM_BOUNDS = FreeformBounds()


@dataclass(frozen=True)
class FreeformProblem:
    """Why a value is not bounded free-form JSON: its ``kind``, and a sentence naming the bound."""

    kind: Literal["too-deep", "too-large", "not-json"]
    message: str


def freeform_problem(
    value: object, bounds: FreeformBounds = FREEFORM_BOUNDS
) -> FreeformProblem | None:
    """``None`` if ``value`` is JSON within ``bounds``, else the first bound it breaks.

    The walk is iterative and stops at the first problem (or after ``max_items``
    items), so a hostile value costs no recursion and little time.
    """
    items = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > bounds.max_depth:
                return FreeformProblem(
                    "too-deep", f"nests deeper than {bounds.max_depth} levels of objects and arrays"
                )
            items += len(node)
            if items > bounds.max_items:
                return FreeformProblem(
                    "too-large", f"holds more than {bounds.max_items} keys and items in all"
                )
            if isinstance(node, dict):
                for key, child in node.items():
                    if not isinstance(key, str):
                        return FreeformProblem("not-json", "has a key that is not a string")
                    if len(key) > bounds.max_string:
                        return FreeformProblem(
                            "too-large",
                            f"has a key longer than {bounds.max_string} characters",
                        )
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in node)
        elif isinstance(node, str):
            if len(node) > bounds.max_string:
                return FreeformProblem(
                    "too-large", f"has a string longer than {bounds.max_string} characters"
                )
        elif isinstance(node, bool) or node is None:
            pass
        elif isinstance(node, int):
            if not -_FREEFORM_INT <= node < _FREEFORM_INT:
                return FreeformProblem("too-large", "has an integer beyond 64 bits")
        elif isinstance(node, float):
            if not math.isfinite(node):
                return FreeformProblem(
                    "not-json", "has a number JSON cannot hold (NaN or infinite)"
                )
        else:
            return FreeformProblem("not-json", f"holds a {type(node).__name__}, not JSON")
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > bounds.max_bytes:
        return FreeformProblem(
            "too-large", f"takes {size} bytes as JSON, more than {bounds.max_bytes}"
        )
    return None


def _bounded(value: dict[str, Any]) -> dict[str, Any]:
    problem = freeform_problem(value)
    if problem is not None:
        # The error type carries the problem's kind, so the ingest gate can count by it.
        raise PydanticCustomError(f"freeform_{problem.kind.replace('-', '_')}", problem.message)
    return value


FreeformObject = Annotated[dict[str, Any], AfterValidator(_bounded)]
"""A JSON object of a device's own choosing, within :data:`FREEFORM_BOUNDS`."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    device_id: _DeviceId
    message_id: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    sent_at: _Time


class BundleRef(BaseModel):
    """A bundle as messages name it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _Short
    version: _Short
    release_counter: _Count
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None


class InstallOutcome(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    result: Literal["committed", "refused", "rolled_back"]
    bundle: BundleRef
    reason: _Short | None = None
    message: Annotated[str, Field(max_length=2000)] | None = None
    at: _Time


class HybridPlanState(BaseModel):
    """The hybrid plan a device follows (``plan_id``), or why it serves locally only.

    ``plan_id``/``mode``/``expires_at``: the plan in force (the plan's own
    expiry, seconds since the epoch); all ``None`` when none is. ``refused``
    (a reason code such as ``plan-hash-mismatch`` or ``plan-expired``) and
    ``message``: why the plan the director listed, or the one followed until
    now, is not followed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan_id: _Short | None = None
    mode: Literal["local", "escalate", "cloud_first"] | None = None
    expires_at: _Time | None = None
    refused: _Short | None = None
    message: Annotated[str, Field(max_length=2000)] | None = None


class ReportedState(_Message):
    """What the device runs and how its install is going (retained: the latest wins)."""

    kind: Literal["state"] = "state"
    agent_version: _Short
    hardware_id: _Short
    active: BundleRef | None = None
    previous: BundleRef | None = None
    installed_counter: _Count
    phase: Literal["idle", "downloading", "verified", "staging", "staged", "trial"]
    installing: BundleRef | None = None
    last_outcome: InstallOutcome | None = None
    # The shadow model running beside the active one (a rollout's shadow stage). Devices
    # leave it out when none runs, so a server that predates it (and refuses unknown
    # fields) still takes their state; a server reading an older device sees ``None``.
    shadow: BundleRef | None = None
    # The hybrid plan followed, or why none is; left out like ``shadow`` while the
    # director has listed none.
    hybrid_plan: HybridPlanState | None = None


class DeviceEvent(_Message):
    """Something that happened on the device (an install step, a refusal, a rollback)."""

    kind: Literal["event"] = "event"
    event: Annotated[str, Field(min_length=1, max_length=64)]
    at: _Time
    details: FreeformObject = Field(default_factory=dict, max_length=32)


class Heartbeat(_Message):
    """I am alive, and this is how serving goes."""

    kind: Literal["heartbeat"] = "heartbeat"
    uptime_s: float = Field(ge=0, le=1e10)
    served: dict[Annotated[str, Field(min_length=1, max_length=64)], _Count] = Field(
        default_factory=dict, max_length=8
    )


class Presence(_Message):
    """Online when the device connects; offline as its MQTT last will."""

    kind: Literal["presence"] = "presence"
    online: bool


class DesiredState(BaseModel):
    """What the server wants a device to run (retained, server to device).

    The assignment itself is the director's signed metadata; this message only
    says that it changed (``director_version``), so the device refreshes now
    instead of at its next poll. A forged message can therefore not install
    anything: it can at most make a device look.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    device_id: _DeviceId
    director_version: _Count
    bundle: BundleRef | None = None
    issued_at: _Time


class WindowAck(BaseModel):
    """The server stored these windows; the device may drop them from its outbox."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    device_id: _DeviceId
    window_ids: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(max_length=1000)


DeviceMessage = Annotated[
    ReportedState | DeviceEvent | Heartbeat | Presence, Field(discriminator="kind")
]
DEVICE_MESSAGE: TypeAdapter[ReportedState | DeviceEvent | Heartbeat | Presence] = TypeAdapter(
    DeviceMessage
)
