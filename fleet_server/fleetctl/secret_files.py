"""Secrets fleetctl reads from files and writes to files only their owner can read."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fleet_server.fleetctl.errors import CommandError


def read_secret(path: str, what: str) -> str:
    try:
        secret = Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise CommandError(f"cannot read the {what} from {path}: {exc.strerror}") from None
    if not secret:
        raise CommandError(f"{path} is empty; it should hold the {what}")
    return secret


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600 from the start), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None


def check_out_folder(args: argparse.Namespace, what: str) -> None:
    """Refuse an --out whose folder does not exist before the server makes a secret."""
    if args.out and not Path(args.out).absolute().parent.is_dir():
        raise CommandError(f"--out {args.out}: its folder does not exist; no {what}")
