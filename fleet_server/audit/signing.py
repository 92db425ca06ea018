"""The audit log's signed head: the server's audit key, and its record of the last head.

The server signs its *head* (the newest entry's sequence number and hash)
with an audit key of its own, kept in its data folder, and hands the signed
head out (``GET /api/v1/audit/head``). An operator saves heads outside the
server (``fleetctl audit head --out FILE``) to check the chain against later
(:mod:`fleet_server.audit.chain`). The server also keeps the last head it
handed out or verified in its data folder (:class:`HeadRecord`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import ValidationError

from fleet_server.audit.chain import Anchor, anchor_of
from protocol.api.audit import AuditHead, SignedAuditHead

AUDIT_KEY_FILE = "audit-key.pem"
# Signatures over a head start with this, so no other message of ours can pass for one.
_HEAD_CONTEXT = b"edgefleet audit head v1\n"


class AuditKeyError(Exception):
    """The audit key in the data folder cannot be read or created."""


class AuditSigner:
    """The server's audit key: an Ed25519 key in its data folder, created on first use."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key = public_hex(private.public_key())
        self.key_id = key_id(self.public_key)

    @classmethod
    def in_folder(cls, data_dir: Path) -> AuditSigner:
        """The key in ``data_dir`` (made there, readable by the owner only, if missing)."""
        path = data_dir / AUDIT_KEY_FILE
        if not path.exists():
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(pem)
                # A hard link appears whole or not at all, and never replaces a key: replicas
                # sharing the folder keep whichever key was made first.
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError as exc:
                raise AuditKeyError(f"cannot create the audit key {path}: {exc}") from None
            finally:
                tmp.unlink(missing_ok=True)
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise AuditKeyError(f"cannot read the audit key {path}: {exc}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise AuditKeyError(f"{path} is not an Ed25519 key")
        return cls(private)

    def sign(self, head: AuditHead) -> SignedAuditHead:
        """``head`` with this key's signature and public key."""
        signature = self._private.sign(_HEAD_CONTEXT + canonical_head(head))
        return SignedAuditHead(head=head, signature=signature.hex(), public_key=self.public_key)


def public_hex(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def key_id(public_key_hex: str) -> str:
    """The id a public key goes by: the SHA-256 of its raw bytes."""
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()


def canonical_head(head: AuditHead) -> bytes:
    """The bytes a head's signature covers."""
    return json.dumps(head.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def head_signature_problem(signed: SignedAuditHead) -> str | None:
    """``None`` if the signature is the head's key's over this head, else what is wrong."""
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(signed.public_key))
        if key_id(signed.public_key) != signed.head.key_id:
            return "its key id is not the id of the public key it carries"
        public.verify(bytes.fromhex(signed.signature), _HEAD_CONTEXT + canonical_head(signed.head))
    except (ValueError, InvalidSignature):
        return "its signature does not verify: the head was altered after it was signed"
    return None


# -- the server's own record of its head ----------------------------------------------

AUDIT_HEAD_FILE = "audit-head.json"


@dataclass(frozen=True)
class HeadRecord:
    """The last head the server vouched for, kept in its data folder, beside the audit key.

    Out of reach of someone who can only edit the database, it lets the
    server's own verification find a deleted tail too: each time the head is
    handed out or the log verified, the chain is checked against the record
    and, if it holds, the record moves on to the current head.
    """

    path: Path

    @classmethod
    def in_folder(cls, data_dir: Path) -> HeadRecord:
        return cls(data_dir / AUDIT_HEAD_FILE)

    def load(self, signer: AuditSigner) -> tuple[Anchor | None, str | None]:
        """The recorded head as an anchor, or what is wrong with the record (none: both None)."""
        try:
            signed = SignedAuditHead.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return None, None
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "the record"
            return (
                None,
                f"the server's head record {self.path} cannot be read: {where}: {err['msg']}",
            )
        except (OSError, ValueError) as exc:
            return None, f"the server's head record {self.path} cannot be read: {exc}"
        problem = head_signature_problem(signed)
        if problem is None and signed.head.key_id != signer.key_id:
            problem = "another key than the server's audit key signed it"
        if problem is not None:
            return None, f"the server's head record {self.path} is not genuine: {problem}"
        return anchor_of(signed), None

    def save(self, signed: SignedAuditHead) -> None:
        """Replace the record atomically (the caller checked the log extends the old one)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(signed.model_dump_json(indent=2) + "\n")
        tmp.replace(self.path)
