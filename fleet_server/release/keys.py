"""Release keys for the image repository: generation, storage and loading.

Each TUF role (root, targets, snapshot, timestamp) gets Ed25519 keys and a
signature threshold. Private keys are PKCS#8 PEM files, mode 0600, optionally
encrypted with a passphrase; ``keys.json`` in the same folder records which
file belongs to which role. Root and targets keys are meant to be kept offline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey

ROLES = ("root", "targets", "snapshot", "timestamp")
INDEX_FILE = "keys.json"


class KeyStoreError(Exception):
    """A key store cannot be created or used; the message says what to do."""


@dataclass
class RoleKeys:
    """The signers of one role and how many of them must sign."""

    threshold: int
    signers: list[CryptoSigner] = field(default_factory=list)

    @property
    def public_keys(self) -> list[SSlibKey]:
        """The public halves, as TUF key objects."""
        return [s.public_key for s in self.signers]


@dataclass
class KeyStore:
    """All release keys of one image repository, by role."""

    roles: dict[str, RoleKeys]

    def __getitem__(self, role: str) -> RoleKeys:
        return self.roles[role]


def _signer(private_key: Ed25519PrivateKey) -> CryptoSigner:
    return CryptoSigner(private_key, SSlibKey.from_crypto(private_key.public_key()))


def init_keys(directory: Path, threshold: int = 1, passphrase: bytes | None = None) -> KeyStore:
    """Create keys for every role in ``directory`` (which must not hold keys already).

    Root and targets, the offline roles, get ``threshold`` keys each and need
    ``threshold`` signatures; snapshot and timestamp, signed online, get one key.
    """
    if threshold < 1:
        raise KeyStoreError("threshold must be at least 1")
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / INDEX_FILE).exists():
        raise KeyStoreError(f"{directory} already holds keys; refusing to overwrite them")
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    index: dict[str, dict[str, object]] = {}
    roles: dict[str, RoleKeys] = {}
    for role in ROLES:
        count = threshold if role in ("root", "targets") else 1
        role_keys = RoleKeys(threshold=count)
        files = []
        for i in range(1, count + 1):
            private = Ed25519PrivateKey.generate()
            pem = private.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
            )
            name = f"{role}-{i}.key"
            _write_private(directory / name, pem)
            files.append(name)
            role_keys.signers.append(_signer(private))
        roles[role] = role_keys
        index[role] = {"threshold": count, "files": files}
    payload = {"encrypted": passphrase is not None, "roles": index}
    (directory / INDEX_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    return KeyStore(roles)


def _write_private(path: Path, pem: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def is_encrypted(directory: Path) -> bool:
    """Whether the key store in ``directory`` needs a passphrase."""
    return bool(_read_index(directory).get("encrypted"))


def _read_index(directory: Path) -> dict[str, object]:
    try:
        data = json.loads((directory / INDEX_FILE).read_text())
    except FileNotFoundError:
        raise KeyStoreError(
            f"{directory} holds no keys ({INDEX_FILE} is missing); create them with "
            "'fleetctl keys init'"
        ) from None
    except json.JSONDecodeError as exc:
        raise KeyStoreError(f"{directory / INDEX_FILE} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise KeyStoreError(f"{directory / INDEX_FILE} is not a key index")
    return data


def load_keys(
    directory: Path, roles: tuple[str, ...] = ROLES, passphrase: bytes | None = None
) -> KeyStore:
    """Load the signers of ``roles`` from ``directory``."""
    index = _read_index(directory)
    role_index = index.get("roles")
    if not isinstance(role_index, dict):
        raise KeyStoreError(f"{directory / INDEX_FILE} lists no roles")
    if index.get("encrypted") and passphrase is None:
        raise KeyStoreError(
            f"the keys in {directory} are encrypted; give a passphrase "
            "(--passphrase-file FILE or --passphrase-env VAR)"
        )
    loaded: dict[str, RoleKeys] = {}
    for role in roles:
        entry = role_index.get(role)
        if not isinstance(entry, dict):
            raise KeyStoreError(f"{directory / INDEX_FILE} has no keys for role {role}")
        role_keys = RoleKeys(threshold=int(entry["threshold"]))
        for name in entry["files"]:
            path = directory / name
            try:
                private = serialization.load_pem_private_key(
                    path.read_bytes(), password=passphrase if index.get("encrypted") else None
                )
            except FileNotFoundError:
                raise KeyStoreError(f"key file {path} is missing") from None
            except (ValueError, TypeError) as exc:
                raise KeyStoreError(
                    f"cannot read {path}: wrong passphrase or not a key ({exc})"
                ) from None
            if not isinstance(private, Ed25519PrivateKey):
                raise KeyStoreError(f"{path} is not an Ed25519 key")
            role_keys.signers.append(_signer(private))
        loaded[role] = role_keys
    return KeyStore(loaded)
