"""The audit log: its entries, their verification and the signed head."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from protocol.api.base import RequestBody, ResponseBody

AuditAction = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", max_length=64)]


class AuditEntryView(ResponseBody):
    seq: int
    at: datetime
    actor: str
    action: str
    subject: str
    details: dict[str, Any]
    details_omitted: str | None = Field(
        default=None,
        description="why the stored details are not shown (then details is empty); null if shown",
    )
    prev_hash: str
    hash: str


class AuditQuery(RequestBody):
    """A page of the audit log, oldest first, after entry ``after``."""

    after: int = Field(default=0, ge=0)
    limit: int = Field(default=100, ge=1, le=1000)
    action: AuditAction | None = None


class AuditPage(ResponseBody):
    entries: list[AuditEntryView]
    next_after: int | None = Field(description="pass as ?after= for the next page; null at end")


class AuditVerification(ResponseBody):
    """Whether the hash chain holds; if not, the first entry that breaks it and why."""

    ok: bool
    entries: int
    broken_at: int | None = None
    problem: str | None = None


Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class AuditHead(BaseModel):
    """The audit log's newest entry at ``signed_at``: its number, hash, and the entry count."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=0, description="the newest entry's sequence number; 0 for an empty log")
    hash: Sha256Hex
    entries: int = Field(ge=0)
    signed_at: datetime
    key_id: Sha256Hex = Field(description="SHA-256 of the raw Ed25519 public key that signed")


class SignedAuditHead(BaseModel):
    """A head signed with the server's audit key; saved by operators as an anchor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    head: AuditHead
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]
    public_key: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
