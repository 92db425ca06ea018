"""The append-only, hash-chained audit log, and its signed head.

Every operator action and every rollout decision is one entry. Each entry's
hash covers its own fields and the previous entry's hash, so editing or
deleting any entry breaks the chain from there on, which :func:`verify_chain`
reports. Entries are appended under a lock on PostgreSQL (and SQLite's
single writer) so two replicas cannot fork the chain.

A chain alone cannot show that its newest entries were deleted: what is left
is still a valid chain. So the server signs its *head* (the newest entry's
sequence number and hash) with an audit key of its own, kept in its data
folder, and hands the signed head out (``GET /api/v1/audit/head``). An
operator saves heads outside the server (``fleetctl audit head --out FILE``);
checking the chain against a saved head (:class:`ChainCheck` with an
:class:`Anchor`) then finds a deleted tail, a rewritten entry, or a head that
another key signed. The checks are pure: the server runs them over its rows,
``fleetctl`` over the pages the API serves, so an operator need not take the
server's word for it. The server also keeps the last head it handed out or
verified in its data folder (:class:`HeadRecord`), so its own verification
finds a deleted tail done through the database alone.

The rules are in :mod:`.chain` (pure), the key and the head record in
:mod:`.signing`, the table in :mod:`.store`, verification in :mod:`.service`
and the REST operations, which only call the service, in :mod:`.routes`.
"""

from fleet_server.audit.chain import (
    GENESIS,
    Anchor,
    ChainCheck,
    ChainReport,
    anchor_of,
    entry_hash,
)
from fleet_server.audit.service import anchor_once, audit_page, verify_and_record
from fleet_server.audit.signing import (
    AUDIT_HEAD_FILE,
    AUDIT_KEY_FILE,
    AuditKeyError,
    AuditSigner,
    HeadRecord,
    head_signature_problem,
)
from fleet_server.audit.store import current_head, record, verify_chain

__all__ = [
    "AUDIT_HEAD_FILE",
    "AUDIT_KEY_FILE",
    "GENESIS",
    "Anchor",
    "AuditKeyError",
    "AuditSigner",
    "ChainCheck",
    "ChainReport",
    "HeadRecord",
    "anchor_of",
    "anchor_once",
    "audit_page",
    "current_head",
    "entry_hash",
    "head_signature_problem",
    "record",
    "verify_and_record",
    "verify_chain",
]
